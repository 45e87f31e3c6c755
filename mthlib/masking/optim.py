"""SparseAdamW: AdamW that keeps state only for the active entries of a :class:`~mthlib.masking.SparseState`.

Memory: the gradients come from the state's :class:`~mthlib.masking.gradients.ActiveGradients`
(``k`` fp32 values per trained parameter; dense gradients are freed as they appear), and the
optimizer state is two fp32 vectors of ``k`` values (``exp_avg``, ``exp_avg_sq``) and a step
counter per parameter; a bf16 or fp16 parameter adds a third, its fp32 master values.

Low precision: written straight into a bf16 weight, an update smaller than half a bf16
ulp of the weight (most updates at learning rates around 1e-6) rounds away, and the run
"trains" without changing anything. For a bf16/fp16 parameter the optimizer therefore
keeps fp32 *master* values of the active entries only (``master``: 4 bytes per trained
entry, ~5 MB for 1% of a 135M model), updates those, and writes their rounded value
into the weight after each step, as mixed-precision training keeps fp32 master
weights, but for the trained entries alone.

Exactness: the update is :class:`torch.optim.AdamW`'s (decoupled weight decay
``p -= lr * wd * p``, bias-corrected moments, ``eps`` added to ``sqrt(v_hat)``) applied
to the active entries only, computed by torch's fused AdamW kernel
(:func:`torch.optim.adamw.adamw` with ``fused=True``: one pass over each vector instead of
one per operation); entries outside the mask are never written, so they stay bitwise
equal to their initial values whatever the weight decay or clipping.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim.adamw import adamw

from mthlib.masking.gradients import remap_values
from mthlib.masking.masks import Masks, holds_every_entry
from mthlib.masking.state import SparseState

_STATE_KEYS = ("exp_avg", "exp_avg_sq")


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over the active entries of an attached :class:`~mthlib.masking.SparseState`; everything else stays frozen.

    One parameter group holds the parameters with active entries, so learning-rate
    schedulers work on ``param_groups[0]["lr"]``. Parameters may be fp32, bf16 or fp16;
    state and gradient buffers are fp32. A low-precision parameter's active entries are
    updated in fp32 master values (taken from the weight when the optimizer is built or
    an entry joins the mask) and the weight receives their rounded value, so small
    updates accumulate instead of rounding away.

    Gradient clipping must go through :meth:`clip_grad_norm_` (dense ``.grad`` is always
    ``None``), and gradient accumulation works by calling ``backward`` several times
    before :meth:`step`: the buffers sum like dense gradients do.

    Methods only mutate containers created in ``__init__``, never rebind attributes:
    Lightning's ``LightningOptimizer`` runs methods such as ``zero_grad`` with itself as
    ``self`` and forwards only attribute *reads* to the wrapped optimizer, so a rebinding
    would land on the wrapper and leave this optimizer's buffers untouched.

    Args:
        sparse_state: The run's state, attached to the model being trained.
        lr: Learning rate.
        betas: Coefficients of the running averages of the gradient and of its square.
        eps: Added to the denominator for numerical stability.
        weight_decay: Decoupled weight decay coefficient (active entries only).

    Raises:
        ValueError: Bad hyper-parameters or no active entry at all.
        RuntimeError: The state is not attached to a model.
    """

    def __init__(
        self,
        sparse_state: SparseState,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0; got lr={lr}, eps={eps}, weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1); got {betas}")
        if sparse_state.masks.total == 0:
            raise ValueError("the masks have no active entry: there is nothing to train")
        params = sparse_state.parameters
        names = _active_names(sparse_state.masks)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__([{"params": [params[name] for name in names]}], defaults)
        self.sparse_state = sparse_state
        self._names = names
        self._last_grads: dict[str, torch.Tensor] = {}
        self._device_indices: tuple[Masks, dict[str, torch.Tensor]] | None = None
        for name in names:
            self.state[params[name]] = _new_state(params[name], sparse_state.masks[name])

    @property
    def masks(self) -> Masks:
        """The current masks (the state's)."""
        return self.sparse_state.masks

    def _indices_on_devices(self) -> dict[str, torch.Tensor]:
        """Every active parameter's indices on its device, copied once per masks (not once per step on a GPU)."""
        masks = self.masks
        if self._device_indices is None or self._device_indices[0] is not masks:
            params = self.sparse_state.parameters
            self._device_indices = (masks, {name: masks[name].to(params[name].device) for name in self._names})
        return self._device_indices[1]

    def remap(self, old: Masks) -> None:
        """Follow the state's new masks after :meth:`SparseState.replace_masks` replaced ``old``.

        Entries kept keep their moments (and master values); grown entries start with zero
        moments (and the weight's current value); dropped entries lose theirs. A
        parameter's step counter (bias correction) carries on.
        """
        new, params = self.masks, self.sparse_state.parameters
        names = _active_names(new)
        for name in self._names:
            if name not in names:
                self.state.pop(params[name], None)
        for name in names:
            param = params[name]
            if name not in self._names or not old.count(name):
                self.state[param] = _new_state(param, new[name])
                continue
            state = self.state[param]
            old_idx, new_idx = old[name].to(param.device), new[name].to(param.device)
            for key in _STATE_KEYS:
                state[key] = remap_values(state[key], old_idx, new_idx)
            if "master" in state:
                kept = torch.isin(new_idx, old_idx)
                current = param.detach().view(-1).index_select(0, new_idx).float()
                state["master"] = torch.where(kept, remap_values(state["master"], old_idx, new_idx), current)
        self._names[:] = names
        self.param_groups[0]["params"] = [params[name] for name in names]
        self._last_grads.clear()

    # -- gradients --------------------------------------------------------------------------
    @property
    def sparse_grads(self) -> dict[str, torch.Tensor]:
        """Name to fp32 gradient at the active entries (aligned with ``masks[name]``).

        While gradients are being accumulated these are the running sums; after
        :meth:`step` and :meth:`zero_grad` they are the gradients the last step used.
        """
        return dict(self.sparse_state.gradients.buffers or self._last_grads)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the sparse gradient sums (``set_to_none`` is accepted for API compatibility)."""
        self.sparse_state.gradients.clear()

    def all_reduce_gradients(self) -> None:
        """Average the sparse gradients over all processes; call after the last backward, before clipping."""
        self.sparse_state.gradients.all_reduce_mean()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Scale the sparse gradients so their total norm is at most ``max_norm``; returns the norm before."""
        return self.sparse_state.gradients.clip_norm_(max_norm, norm_type)

    # -- update -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step on the active entries that received a gradient since :meth:`zero_grad`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, (beta1, beta2), eps, wd = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        grads = self.sparse_state.gradients.buffers
        params = self.sparse_state.parameters
        indices = self._indices_on_devices()
        weights, used, moments, squares, steps, write_back = [], [], [], [], [], []
        for name in self._names:
            grad = grads.get(name)
            if grad is None:
                continue
            param = params[name]
            state = self.state[param]
            idx = indices[name]
            flat = param.view(-1)
            whole = holds_every_entry(idx, flat.numel())  # update in place, no gather
            if "master" in state:
                weight = state["master"]
            else:  # an fp32 parameter
                weight = flat if whole else flat.index_select(0, idx)
            weights.append(weight)
            used.append(grad)
            moments.append(state["exp_avg"])
            squares.append(state["exp_avg_sq"])
            steps.append(state["step"])
            if weight is not flat:
                write_back.append((flat, None if whole else idx, weight))
        if weights:  # torch's fused AdamW kernel: one pass over each tensor, the same update as AdamW's
            adamw(weights, used, moments, squares, [], steps, fused=True, amsgrad=False, beta1=beta1, beta2=beta2,
                  lr=lr, weight_decay=wd, eps=eps, maximize=False)
        for flat, idx, weight in write_back:
            if idx is None:  # fp32 master values of a whole low-precision parameter
                flat.copy_(weight)
            else:
                flat.index_copy_(0, idx, weight.to(flat.dtype))
        self._last_grads.clear()
        self._last_grads.update(grads)
        return loss

    # -- state ------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes held by the optimizer state tensors (moments and step counters)."""
        return sum(
            t.numel() * t.element_size() for state in self.state.values() for t in state.values()
            if isinstance(t, torch.Tensor)
        )

    def state_dict(self) -> dict[str, Any]:
        """:meth:`torch.optim.Optimizer.state_dict` plus ``"masks"``: a digest of the masks it belongs to.

        The indices themselves are not repeated here (the sparse state checkpoints them); the
        digest lets :meth:`load_state_dict` refuse moments saved for other masks.
        """
        state = super().state_dict()
        state["masks"] = {"digest": masks_digest(self.masks), "total": self.masks.total}
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; moments and master values stay fp32 whatever the parameter dtype.

        A state saved without master values (from fp32 parameters) takes them from the
        (already restored) low-precision weights.

        Raises:
            ValueError: The state has no masks or was saved for different masks.
        """
        state_dict = dict(state_dict)
        saved = state_dict.pop("masks", None)
        if saved is None:
            raise ValueError("not a SparseAdamW state dict: it has no 'masks' entry")
        if saved["digest"] != masks_digest(self.masks):
            raise ValueError(
                f"optimizer state was saved for different masks ({saved['total']} active entries) than this "
                f"optimizer's ({self.masks.total}); build SparseAdamW from the checkpoint's masks"
            )
        super().load_state_dict(state_dict)
        for position, (name, param) in enumerate(zip(self._names, self.param_groups[0]["params"])):
            source, state = state_dict["state"].get(position, {}), self.state[param]
            for key in (*_STATE_KEYS, "master"):
                if key in source:
                    state[key] = source[key].to(device=param.device, dtype=torch.float32, copy=True)
            if param.dtype == torch.float32:
                state.pop("master", None)
            elif "master" not in source:
                state["master"] = _new_state(param, self.masks[name])["master"]


def masks_digest(masks: Masks) -> str:
    """SHA-256 over every masked parameter's name, shape and indices, in name order."""
    digest = hashlib.sha256()
    for name in sorted(masks.names):
        digest.update(f"{name}:{list(masks.shape(name))}".encode())
        digest.update(masks[name].to(torch.int64).cpu().numpy().tobytes())
    return digest.hexdigest()


def _active_names(masks: Masks) -> list[str]:
    return [name for name in masks if masks.count(name)]


def _new_state(param: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fresh state for ``param``'s active ``indices``: zero moments, and fp32 master values unless it is fp32."""
    k, device = indices.numel(), param.device
    state = {
        "step": torch.tensor(0.0),
        "exp_avg": torch.zeros(k, dtype=torch.float32, device=device),
        "exp_avg_sq": torch.zeros(k, dtype=torch.float32, device=device),
    }
    if param.dtype != torch.float32:
        state["master"] = param.detach().view(-1).index_select(0, indices.to(device)).float()
    return state
