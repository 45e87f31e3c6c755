"""SparseAdamW: AdamW that keeps gradients and state only for the active entries of a mask.

Memory: for each masked parameter a hook gathers ``grad.view(-1)[indices]`` into an fp32
buffer of ``k`` values as soon as autograd has accumulated the dense gradient, then
frees the dense gradient (``param.grad = None``). The optimizer state is two fp32
vectors of ``k`` values (``exp_avg``, ``exp_avg_sq``) and a step counter per parameter.
Parameters without active entries get ``requires_grad=False``, so autograd never
computes their weight gradients.

Exactness: the update is :class:`torch.optim.AdamW`'s (decoupled weight decay
``p -= lr * wd * p``, bias-corrected moments, ``eps`` added to ``sqrt(v_hat)``) applied
to the active entries only; entries outside the mask are never written, so they stay
bitwise equal to their initial values whatever the weight decay or clipping.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mthlib.distributed import all_reduce_mean_
from mthlib.masking import sparse_backward
from mthlib.masking.masks import Masks, locate

_STATE_KEYS = ("exp_avg", "exp_avg_sq")

_GATHER_HOOKS: dict[int, tuple[weakref.ref, RemovableHandle]] = {}
"""Parameter id to (weak parameter, hook handle): at most one SparseAdamW gathers a parameter's gradient."""

_PAUSED: set[int] = set()
"""Ids of parameters whose gradients SparseAdamW leaves alone for now (see :func:`gathering_paused`)."""


@contextlib.contextmanager
def gathering_paused(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Let backward passes inside the block leave dense ``.grad`` on ``params`` untouched by SparseAdamW.

    Used by gradient passes that are not training steps (e.g. a dynamic strategy's
    calibration pass during training): their gradients must neither be freed by the
    gather hooks nor leak into the optimizer's buffers.
    """
    ids = {id(p) for p in params} - _PAUSED
    _PAUSED.update(ids)
    try:
        yield
    finally:
        _PAUSED.difference_update(ids)


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over the active entries of :class:`~mthlib.masking.Masks`; everything else stays frozen.

    One parameter group holds the parameters with active entries, so learning-rate
    schedulers work on ``param_groups[0]["lr"]``. Parameters may be fp32 or bf16; state
    and gradient buffers are fp32, and updates are computed in fp32 then rounded to the
    parameter dtype. Constructing a SparseAdamW detaches any earlier SparseAdamW's
    gradient hooks from the same parameters.

    Gradient clipping must go through :meth:`clip_grad_norm_` (dense ``.grad`` is always
    ``None``), and gradient accumulation works by calling ``backward`` several times
    before :meth:`step`: the buffers sum like dense gradients do.

    Methods only mutate containers created in ``__init__``, never rebind attributes:
    Lightning's ``LightningOptimizer`` runs methods such as ``zero_grad`` with itself as
    ``self`` and forwards only attribute *reads* to the wrapped optimizer, so a rebinding
    would land on the wrapper and leave this optimizer's buffers untouched.

    Args:
        model: The model whose parameters ``masks`` names (names as in ``named_parameters()``).
        masks: The trainable entries.
        lr: Learning rate.
        betas: Coefficients of the running averages of the gradient and of its square.
        eps: Added to the denominator for numerical stability.
        weight_decay: Decoupled weight decay coefficient (active entries only).
        sparse_backward: Let masked linear layers compute weight gradients at the active
            entries only (:mod:`~mthlib.masking.sparse_backward`), instead of a dense
            gradient that the hook then gathers from. Same values, far fewer FLOPs.

    Raises:
        ValueError: Bad hyper-parameters, a mask naming a parameter the model lacks or with
            another shape, a non-contiguous parameter, or no active entry at all.
    """

    def __init__(
        self,
        model: nn.Module,
        masks: Masks,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        sparse_backward: bool = True,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0; got lr={lr}, eps={eps}, weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1); got {betas}")
        self._named = dict(model.named_parameters())
        self._check(masks)
        if masks.total == 0:
            raise ValueError("the masks have no active entry: there is nothing to train")
        self._param_names: dict[torch.Tensor, str] = {p: n for n, p in self._named.items()}
        active = [self._named[name] for name in masks if masks.count(name)]
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__([{"params": active}], defaults)
        self._current = {"masks": masks}
        self._self_ref = weakref.ref(self)  # hooks must reach this optimizer, not a wrapper calling set_masks
        self._indices: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._stepped_grads: dict[str, torch.Tensor] = {}
        self._hooks: dict[str, RemovableHandle] = {}
        for name in masks:
            if masks.count(name):
                self._activate(name, masks[name])
        for name, param in self._named.items():
            param.requires_grad_(name in self._indices)
        self._model = model
        self._sparse_backward = sparse_backward
        self._install_sparse_backward()

    def _install_sparse_backward(self) -> None:
        if self._sparse_backward:
            sparse_backward.install(self._model, self._indices)

    # -- masks ------------------------------------------------------------------------------
    @property
    def masks(self) -> Masks:
        """The current masks."""
        return self._current["masks"]

    def _check(self, masks: Masks) -> None:
        for name in masks:
            param = self._named.get(name)
            if param is None:
                raise ValueError(f"the masks name parameter {name}, which the model does not have")
            if tuple(param.shape) != masks.shape(name):
                raise ValueError(f"mask of {name} has shape {masks.shape(name)}; the parameter has {tuple(param.shape)}")
            if masks.count(name) and not param.is_contiguous():
                raise ValueError(f"parameter {name} is not contiguous; SparseAdamW writes through param.view(-1)")

    def _activate(self, name: str, indices: torch.Tensor) -> None:
        """Start training ``name`` at ``indices``: device indices, zero state, gather hook."""
        param = self._named[name]
        self._indices[name] = indices.to(param.device)
        k = indices.numel()
        self.state[param] = {
            "step": torch.tensor(0.0),
            "exp_avg": torch.zeros(k, dtype=torch.float32, device=param.device),
            "exp_avg_sq": torch.zeros(k, dtype=torch.float32, device=param.device),
        }
        param.requires_grad_(True)
        previous = _GATHER_HOOKS.pop(id(param), None)
        if previous is not None and previous[0]() is param:
            previous[1].remove()
        handle = param.register_post_accumulate_grad_hook(_gather_hook(self._self_ref, name))
        _GATHER_HOOKS[id(param)] = (weakref.ref(param), handle)
        self._hooks[name] = handle

    def _deactivate(self, name: str) -> None:
        param = self._named[name]
        self._indices.pop(name)
        self.state.pop(param, None)
        self._grads.pop(name, None)
        _release(param, self._hooks.pop(name))

    def set_masks(self, masks: Masks) -> None:
        """Switch to new masks (dynamic strategies).

        Entries kept keep their moments; grown entries start with zero moments; dropped
        entries lose theirs. A parameter's step counter (bias correction) carries on.
        Pending gradient buffers are remapped the same way (grown entries: 0).
        """
        self._check(masks)
        if masks.total == 0:
            raise ValueError("the new masks have no active entry: there is nothing to train")
        for name in list(self._indices):
            if name not in masks or not masks.count(name):
                self._deactivate(name)
        for name in masks:
            new = masks[name]
            if not new.numel():
                continue
            if name not in self._indices:
                self._activate(name, new)
                continue
            param = self._named[name]
            old = self._indices[name]
            new = new.to(param.device)
            found, position = locate(old, new)
            state = self.state[param]
            for key in _STATE_KEYS:
                state[key] = _remap(state[key], found, position)
            if name in self._grads:
                self._grads[name] = _remap(self._grads[name], found, position)
            self._indices[name] = new
        self._stepped_grads.clear()
        self.param_groups[0]["params"] = [self._named[name] for name in masks if masks.count(name)]
        for name, param in self._named.items():
            param.requires_grad_(name in self._indices)
        self._current["masks"] = masks
        self._install_sparse_backward()

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (dense gradients accumulate in ``.grad`` again)."""
        for name in list(self._hooks):
            _release(self._named[name], self._hooks.pop(name))
        sparse_backward.uninstall(self._model)

    # -- gradients --------------------------------------------------------------------------
    def _gather(self, name: str, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None or id(param) in _PAUSED:
            return
        part = _active_part(grad, self._indices[name])
        buffer = self._grads.get(name)
        if buffer is None:
            self._grads[name] = part
        else:
            buffer.add_(part)
        param.grad = None

    @property
    def sparse_grads(self) -> dict[str, torch.Tensor]:
        """Name to fp32 gradient at the active entries (aligned with ``masks[name]``).

        While gradients are being accumulated these are the running sums; after
        :meth:`step` and :meth:`zero_grad` they are the gradients the last step used.
        """
        return dict(self._grads or self._stepped_grads)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the sparse gradient buffers (``set_to_none`` is accepted for API compatibility)."""
        self._grads.clear()
        for name in self._indices:
            self._named[name].grad = None

    @torch.no_grad()
    def all_reduce_gradients(self) -> None:
        """Average the sparse gradients over all processes (data parallel); a no-op in a single process.

        Only the ``k`` active entries per parameter travel, in one flat buffer. A parameter
        that received no gradient on this process contributes zeros, so every process ends
        with the same buffers and takes the same :meth:`step`. Call it after the last
        backward of a step and before :meth:`clip_grad_norm_`.
        """
        for name, idx in self._indices.items():
            if name not in self._grads:
                self._grads[name] = torch.zeros(idx.numel(), dtype=torch.float32, device=idx.device)
        all_reduce_mean_(self._grads[name] for name in sorted(self._indices))

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Scale the sparse gradients so their total norm is at most ``max_norm``.

        Same rule as :func:`torch.nn.utils.clip_grad_norm_` (coefficient
        ``max_norm / (norm + 1e-6)`` clamped to 1) over the gradients SparseAdamW keeps,
        which are exactly the gradient entries that can change the model.

        Returns:
            The total norm before clipping (a 0-dim fp32 tensor).
        """
        grads = list(self._grads.values())
        if not grads:
            return torch.zeros(())
        norms = torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads])
        total = torch.linalg.vector_norm(norms, norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
        return total

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
        for param in group["params"]:
            name = self._param_names[param]
            grad = self._grads.get(name)
            if grad is None:
                continue
            state = self.state[param]
            state["step"] += 1
            step = float(state["step"])
            idx = self._indices[name]
            flat = param.view(-1)
            weight = flat.index_select(0, idx).float()
            if wd != 0:
                weight.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = lr / (1 - beta1**step)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            weight.addcdiv_(state["exp_avg"], denom, value=-step_size)
            flat.index_copy_(0, idx, weight.to(param.dtype))
        self._stepped_grads.clear()
        self._stepped_grads.update(self._grads)
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

        The indices themselves are not repeated here (the mask callback checkpoints them); the
        digest lets :meth:`load_state_dict` refuse moments saved for other masks.
        """
        state = super().state_dict()
        state["masks"] = {"digest": _masks_digest(self.masks), "total": self.masks.total}
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the moments stay fp32 whatever the parameter dtype.

        Raises:
            ValueError: The state has no masks or was saved for different masks.
        """
        state_dict = dict(state_dict)
        saved = state_dict.pop("masks", None)
        if saved is None:
            raise ValueError("not a SparseAdamW state dict: it has no 'masks' entry")
        if saved["digest"] != _masks_digest(self.masks):
            raise ValueError(
                f"optimizer state was saved for different masks ({saved['total']} active entries) than this "
                f"optimizer's ({self.masks.total}); build SparseAdamW from the checkpoint's masks"
            )
        super().load_state_dict(state_dict)
        for position, param in enumerate(self.param_groups[0]["params"]):
            source = state_dict["state"].get(position, {})
            for key in _STATE_KEYS:
                if key in source:
                    self.state[param][key] = source[key].to(device=param.device, dtype=torch.float32, copy=True)


def _masks_digest(masks: Masks) -> str:
    """SHA-256 over every masked parameter's name, shape and indices, in name order."""
    digest = hashlib.sha256()
    for name in sorted(masks.names):
        digest.update(f"{name}:{list(masks.shape(name))}".encode())
        digest.update(masks[name].to(torch.int64).cpu().numpy().tobytes())
    return digest.hexdigest()


def _active_part(grad: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The fp32 gradient at ``indices`` (sorted flat), from a dense or a sparse COO gradient.

    A coalesced sparse gradient whose entries are exactly ``indices`` (what an
    active-entry backward produces) is read without densifying; any other sparse
    gradient is densified first.
    """
    if not grad.is_sparse:
        return grad.reshape(-1).index_select(0, indices).float()
    if grad.is_coalesced() and grad._nnz() == indices.numel():
        strides = torch.tensor(_strides(grad.shape), device=indices.device)
        flat = (grad._indices() * strides.unsqueeze(1)).sum(dim=0)
        if torch.equal(flat, indices):
            return grad._values().float()
    return grad.to_dense().reshape(-1).index_select(0, indices).float()


def _strides(shape: torch.Size) -> list[int]:
    """Row-major strides of a contiguous tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]


def _release(param: torch.Tensor, handle: RemovableHandle) -> None:
    """Remove a gather hook and forget it in the per-parameter table if it is the current one."""
    handle.remove()
    if _GATHER_HOOKS.get(id(param), (None, None))[1] is handle:
        del _GATHER_HOOKS[id(param)]


def _gather_hook(optimizer: weakref.ref, name: str) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        owner = optimizer()
        if owner is not None:
            owner._gather(name, param)

    return hook


def _remap(values: torch.Tensor, found: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(found.numel(), dtype=values.dtype, device=values.device)
    out[found] = values[position[found]]
    return out
