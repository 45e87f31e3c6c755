"""SparseState: the one object that holds what a run knows about its subnetwork.

It owns the :class:`~mthlib.masking.Masks`, the base values of the active entries, the base
model's fingerprint, a digest of every parameter's frozen entries, the step of the last mask
update, and, while attached to a model, the masked layers and gradient hooks it installed.
Everything else receives it explicitly: :class:`~mthlib.masking.SparseAdamW` takes it as its
first argument, :class:`~mthlib.masking.MaskCallback` creates and checkpoints it, the GRPO
module asks it for reference (base) log-probabilities and trained values, the delta writer
reads the masks and fingerprint from it.

Lifecycle::

    state = SparseState.capture(model, masks)   # record the base (model untouched)
    state.attach(model)                          # masked layers + gradient hooks
    optimizer = SparseAdamW(state, lr=1e-4)
    ...                                          # train
    state.detach()                               # original layers, no hooks, requires_grad restored

Nothing is stored on the model, nothing is global: two models in one process, each with
its own state (or none), never see each other's hooks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from mthlib.fingerprint import model_fingerprint
from mthlib.masking.gradients import ActiveGradients, remap_values
from mthlib.masking.layers import LayerSwap, wrap_linear_layers
from mthlib.masking.masks import Masks, index_dtype, locate
from mthlib.masking.swap import frozen_digests, gather_values, scatter_values, swapped_to_base


class SparseState:
    """Masks, base values, base fingerprint and frozen-entry digests of a sparse fine-tune.

    Args:
        masks: The trainable entries.
        base_values: Name to the base model's values at ``masks[name]`` (aligned with it).
        base_fingerprint: :func:`~mthlib.fingerprint.model_fingerprint` of the untouched base.
        digests: Name to the digest of the parameter with its active entries at base values
            (:func:`~mthlib.masking.frozen_digests`): equal digests prove the frozen entries never moved.
        last_update_step: Optimizer step of the last mask update (dynamic strategies).
    """

    def __init__(
        self,
        masks: Masks,
        base_values: Mapping[str, torch.Tensor],
        base_fingerprint: str,
        digests: Mapping[str, str],
        last_update_step: int = 0,
    ) -> None:
        self.masks = masks
        self.base_values = dict(base_values)
        self.base_fingerprint = base_fingerprint
        self.digests = dict(digests)
        self.last_update_step = last_update_step
        self._model: nn.Module | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._requires_grad: dict[str, bool] = {}
        self._layers: LayerSwap | None = None
        self._gradients: ActiveGradients | None = None

    @classmethod
    def capture(cls, model: nn.Module, masks: Masks, base_fingerprint: str | None = None) -> SparseState:
        """Record the base of ``model`` (which must be untouched) for ``masks``.

        Args:
            model: The base model.
            masks: The trainable entries.
            base_fingerprint: The model's fingerprint when already known (it is hashed otherwise).
        """
        base_values = gather_values(model, masks)
        digests = dict(frozen_digests(model, masks, base_values))
        return cls(masks, base_values, base_fingerprint or model_fingerprint(model), digests)

    # -- binding to a live model ------------------------------------------------------------
    def attach(self, model: nn.Module, sparse_backward: bool = True) -> SparseState:
        """Start training ``model``'s active entries: masked layers, gradient hooks, ``requires_grad``.

        Parameters with active entries get ``requires_grad=True``, all others ``False`` (so
        autograd computes no weight gradient for them). With ``sparse_backward`` each sparse
        enough linear layer is replaced by an :class:`~mthlib.masking.layers.ActiveEntryLinear`.

        Returns:
            ``self``.

        Raises:
            RuntimeError: Already attached.
            ValueError: The masks name a parameter the model lacks, with another shape, or a
                non-contiguous one.
        """
        if self._model is not None:
            raise RuntimeError("this SparseState is already attached to a model; detach() it first")
        params = dict(model.named_parameters())
        self._check(params)
        self._model, self._params = model, params
        self._requires_grad = {name: p.requires_grad for name, p in params.items()}
        self._bind(sparse_backward)
        return self

    def _bind(self, sparse_backward: bool, gradient_sums: Mapping[str, torch.Tensor] | None = None) -> None:
        active = self._active_indices()
        for name, param in self._params.items():
            param.requires_grad_(name in active)
        self._layers = wrap_linear_layers(self._model, active) if sparse_backward else None
        self._gradients = ActiveGradients(self._params, active, gradient_sums)

    def _unbind(self) -> None:
        if self._layers is not None:
            self._layers.restore()
        if self._gradients is not None:
            self._gradients.remove()
        self._layers, self._gradients = None, None

    def detach(self) -> None:
        """Undo :meth:`attach`: original layers, no hooks, ``requires_grad`` as it was. Idempotent."""
        if self._model is None:
            return
        self._unbind()
        for name, param in self._params.items():
            param.requires_grad_(self._requires_grad.get(name, True))
        self._model, self._params, self._requires_grad = None, {}, {}

    @property
    def attached(self) -> bool:
        """Whether :meth:`attach` bound this state to a model."""
        return self._model is not None

    @property
    def model(self) -> nn.Module:
        """The attached model."""
        return self._bound()

    @property
    def parameters(self) -> dict[str, nn.Parameter]:
        """Name to parameter of the attached model."""
        self._bound()
        return dict(self._params)

    @property
    def gradients(self) -> ActiveGradients:
        """The gradients gathered at the active entries since they were last cleared."""
        self._bound()
        return self._gradients

    @property
    def sparse_backward(self) -> bool:
        """Whether masked linear layers compute weight gradients at the active entries only."""
        return self._layers is not None

    def _bound(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("this SparseState is not attached to a model; call attach(model) first")
        return self._model

    def _active_indices(self) -> dict[str, torch.Tensor]:
        return {name: idx.to(self._params[name].device) for name, idx in self.masks.items() if idx.numel()}

    def _check(self, params: Mapping[str, nn.Parameter]) -> None:
        for name in self.masks:
            param = params.get(name)
            if param is None:
                raise ValueError(f"the masks name parameter {name}, which the model does not have")
            if tuple(param.shape) != self.masks.shape(name):
                raise ValueError(f"mask of {name} has shape {self.masks.shape(name)}; the parameter has {tuple(param.shape)}")
            if self.masks.count(name) and not param.is_contiguous():
                raise ValueError(f"parameter {name} is not contiguous; sparse training writes through param.view(-1)")

    @contextlib.contextmanager
    def calibrating(self) -> Iterator[None]:
        """A block for gradient passes that are not training steps (a dynamic strategy's calibration).

        Inside it the gradient hooks leave ``.grad`` alone and masked layers compute dense
        weight gradients, so the pass sees every entry's gradient and the optimizer sees none.
        """
        self._bound()
        if self._layers is not None:
            self._layers.use_dense_gradients(True)
        try:
            with self._gradients.paused():
                yield
        finally:
            if self._layers is not None:
                self._layers.use_dense_gradients(False)

    # -- values -----------------------------------------------------------------------------
    def trained_values(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """Name to a copy of the attached model's current values at the active entries.

        ``copy=False`` may hand out a complete mask's parameter itself, for reading only (:func:`gather_values`).
        """
        return gather_values(self._bound(), self.masks, copy)

    def load_trained_values(self, values: Mapping[str, torch.Tensor]) -> None:
        """Write ``values`` (as from :meth:`trained_values`) into the active entries of the attached model."""
        scatter_values(self._bound(), self.masks, values)

    @contextlib.contextmanager
    def swapped_to_base(self) -> Iterator[nn.Module]:
        """Within the block the attached model computes exactly what the base computes (for a KL reference)."""
        with swapped_to_base(self._bound(), self.masks, self.base_values) as model:
            yield model

    def verify(self, step: int | None = None) -> None:
        """Check that every entry outside the mask still holds its base value, bitwise.

        Raises:
            RuntimeError: The first parameter (by name) whose frozen entries changed, or one that is gone.
        """
        mismatch = self._first_mismatch(self._bound())
        if mismatch is not None:
            where = f" at step {step}" if step is not None else ""
            raise RuntimeError(f"frozen entries of {mismatch}{where}")

    def _first_mismatch(self, model: nn.Module) -> str | None:
        seen = set()
        for name, digest in frozen_digests(model, self.masks, self.base_values):
            seen.add(name)
            if digest != self.digests.get(name):
                return f"{name} differ from the base model: digest {digest} != recorded {self.digests.get(name)}"
        missing = sorted(set(self.digests) - seen)
        if missing:
            return f"{', '.join(missing[:5])} are gone from the model (recorded at the start)"
        return None

    # -- dynamic masks ----------------------------------------------------------------------
    @torch.no_grad()
    def replace_masks(self, new: Masks, step: int) -> None:
        """Switch the attached model to ``new`` masks over the same parameters (a dynamic strategy's update).

        Entries dropped return to their base values, so everything outside the mask stays the
        base, bitwise; grown entries start from their base values; kept entries keep their
        trained values and their summed gradients.

        Raises:
            ValueError: ``new`` covers other parameters or shapes than the current masks.
        """
        model, old = self._bound(), self.masks
        if new.shapes != old.shapes:
            raise ValueError(f"a mask update must keep the parameters and their shapes; got {sorted(new.names)[:5]}...")
        for name, idx in old.difference(new).items():
            if idx.numel():
                flat = self._params[name].view(-1)
                position = torch.searchsorted(old[name], idx)
                flat.index_copy_(0, idx.to(flat.device), self.base_values[name][position.to(flat.device)].to(flat.dtype))
        base_values = {}
        for name, idx in new.items():
            current = gather_values(model, Masks({name: idx}, {name: new.shape(name)}))[name]
            found, position = locate(old[name], idx)
            found, position = found.to(current.device), position.to(current.device)
            current[found] = self.base_values[name].to(current.device)[position[found]]
            base_values[name] = current
        sparse_backward = self.sparse_backward
        buffers = self._gradients.buffers
        self._unbind()
        self.masks, self.base_values, self.last_update_step = new, base_values, step
        self._bind(sparse_backward, _remapped(buffers, old, new))

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self, include_base_values: bool = True) -> dict[str, Any]:
        """Everything needed to rebuild this state (indices int32/int64 as in the delta format).

        Args:
            include_base_values: Save the base values too. A run that reloads its base
                model from its source can leave them out: :meth:`from_state_dict` then reads
                them from that freshly loaded base (its frozen digests are checked first).
        """
        state = {
            "base_fingerprint": self.base_fingerprint,
            "digests": dict(self.digests),
            "last_update_step": int(self.last_update_step),
            "names": list(self.masks.names),
            "shapes": {name: list(shape) for name, shape in self.masks.shapes.items()},
            "indices": {name: idx.to(index_dtype(math.prod(self.masks.shape(name)))) for name, idx in self.masks.items()},
        }
        if include_base_values:
            state["base_values"] = {name: values.detach().cpu() for name, values in self.base_values.items()}
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], model: nn.Module) -> SparseState:
        """Rebuild a state saved by :meth:`state_dict` for ``model``, the run's model as loaded.

        Raises:
            ValueError: The model's frozen entries differ from those recorded (another base).
        """
        names = state["names"]
        masks = Masks({n: state["indices"][n] for n in names}, {n: state["shapes"][n] for n in names})
        base_values = state.get("base_values") or gather_values(model, masks)
        params = dict(model.named_parameters())
        base_values = {n: v.to(params[n].device) for n, v in base_values.items()}
        restored = cls(masks, base_values, state["base_fingerprint"], state["digests"], int(state["last_update_step"]))
        mismatch = restored._first_mismatch(model)
        if mismatch is not None:
            raise ValueError(
                f"the model does not match the checkpoint (base fingerprint {restored.base_fingerprint}): frozen entries of "
                f"{mismatch}; resume from the same base"
            )
        return restored


def _remapped(buffers: Mapping[str, torch.Tensor], old: Masks, new: Masks) -> dict[str, torch.Tensor]:
    """Gradient sums aligned with ``old`` re-aligned with ``new`` (grown entries 0)."""
    return {name: remap_values(values, old[name].to(values.device), new[name].to(values.device))
            for name, values in buffers.items() if name in new and new.count(name)}
