"""Keep an inference engine's weights equal to a sparse fine-tune's, shipping only the active entries.

A separate rollout engine (vLLM, colocated or as a server) holds its own copy of the model. A
dense sync after every optimizer step moves every weight; a sparse fine-tune changes only its
mask's entries, so :class:`SparseWeightSync` sends, per step, the current values at the active
entries (1% of the weights at 99% sparsity), and the flat indices only when the engine does not
have the current mask yet (the first sync, and after a dynamic strategy's mask update).

The engine side is :class:`SparseUpdateReceiver`: a mixin with one method, written against any
object whose ``model`` (or vLLM's ``model_runner.model``) has named parameters. Engines that fuse
projections (vLLM stores ``q_proj``, ``k_proj``, ``v_proj`` as one ``qkv_proj`` and ``gate_proj``,
``up_proj`` as ``gate_up_proj``, stacked by rows) are served by :func:`fused_layout`, which maps
each trainer parameter to its engine parameter and the flat offset of its rows there.

    sync = SparseWeightSync(state, layout=fused_layout(model))   # trainer side, once
    update = sync.update()                                         # after every optimizer step
    llm.collective_rpc("apply_sparse_update", args=(update,))     # vLLM, with SparseUpdateReceiver
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from mthlib.masking import Masks, SparseState, gather_values

FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
"""Engine module name to the trainer modules stacked into it by rows, in order (vLLM's Llama and Qwen2)."""


@dataclass(frozen=True)
class Target:
    """Where a trainer parameter lives in the engine: the engine parameter and the flat offset of its rows."""

    name: str
    offset: int = 0


@dataclass(frozen=True)
class SparseUpdate:
    """One sync: per trainer parameter, the values at its active entries and, when new, their flat indices.

    Attributes:
        version: The mask version the values belong to; the receiver refuses values of a version
            whose indices it never received.
        values: Trainer parameter name to a 1-D tensor of the active entries' values.
        indices: Trainer parameter name to the flat engine indices (offset applied); empty when
            the receiver already holds this version's indices.
        targets: Trainer parameter name to its engine parameter name.
        restore: After a mask update, trainer parameter name to the flat engine indices of the
            entries the new mask dropped and their (base) values, written before ``values``.
    """

    version: int
    values: dict[str, torch.Tensor]
    indices: dict[str, torch.Tensor]
    targets: dict[str, str]
    restore: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this update carries."""
        tensors = [*self.values.values(), *self.indices.values(), *(t for pair in self.restore.values() for t in pair)]
        return sum(t.numel() * t.element_size() for t in tensors)


def fused_layout(model: nn.Module) -> dict[str, Target]:
    """Trainer parameter name to its place in an engine that fuses q/k/v and gate/up by rows.

    Parameters outside the fused modules keep their names at offset 0. A bias is fused the same
    way as its weight (one element per row).
    """
    params = dict(model.named_parameters())
    layout = {name: Target(name) for name in params}
    for fused, parts in FUSED.items():
        pattern = re.compile(rf"^(.*\.){re.escape(parts[0])}\.(weight|bias)$")
        for name in params:
            found = pattern.match(name)
            if found is None:
                continue
            prefix, kind = found.groups()
            offset = 0
            for part in parts:
                member = f"{prefix}{part}.{kind}"
                layout[member] = Target(f"{prefix}{fused}.{kind}", offset)
                offset += params[member].numel()
    return layout


class SparseWeightSync:
    """The trainer side: builds one :class:`SparseUpdate` per optimizer step from a :class:`SparseState`.

    Args:
        state: The attached sparse state of the trained model.
        layout: Trainer parameter name to its :class:`Target` in the engine; default: the same
            names at offset 0 (an engine that stores the model as the trainer does).
    """

    def __init__(self, state: SparseState, layout: Mapping[str, Target] | None = None) -> None:
        self.state = state
        self.layout = dict(layout) if layout is not None else {}
        self.version = 0
        self._sent_masks: Masks | None = None
        self.bytes_sent = 0

    def _target(self, name: str) -> Target:
        return self.layout.get(name, Target(name))

    def _engine_indices(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        return idx.to(torch.int64) + self._target(name).offset

    def update(self) -> SparseUpdate:
        """The values at the active entries now, with the indices if the mask changed since the last update."""
        masks = self.state.masks
        indices: dict[str, torch.Tensor] = {}
        restore: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if masks is not self._sent_masks:  # a mask update replaces the state's Masks object
            if self._sent_masks is not None:  # the trainer put the base back at dropped entries: so must the engine
                dropped = self._sent_masks.difference(masks)
                restore = {name: (self._engine_indices(name, dropped[name]), value)
                           for name, value in gather_values(self.state.model, dropped).items() if value.numel()}
            self.version += 1
            self._sent_masks = masks
            indices = {name: self._engine_indices(name, idx) for name, idx in masks.items() if idx.numel()}
        values = {name: v for name, v in self.state.trained_values().items() if v.numel()}
        targets = {name: self._target(name).name for name in {*values, *restore}}
        update = SparseUpdate(self.version, values, indices, targets, restore)
        self.bytes_sent += update.nbytes
        return update


class SparseUpdateReceiver:
    """The engine side: a mixin whose :meth:`apply_sparse_update` writes an update into the engine's model.

    Mix it into vLLM's worker through ``worker_extension_cls`` (the worker's model is
    ``self.model_runner.model``), or into any object with a ``model`` attribute.
    """

    def _engine_model(self) -> nn.Module:
        runner = getattr(self, "model_runner", None)
        return runner.model if runner is not None else self.model

    def load_dense_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Load every weight of a dense run through the engine model's own ``load_weights`` (vLLM's API)."""
        self._engine_model().load_weights(weights)

    @torch.no_grad()
    def apply_sparse_update(self, update: SparseUpdate) -> int:
        """Write ``update``'s values at its indices (or those of its version received before); return entries written.

        Raises:
            ValueError: The update's version has no indices here (a sync was lost), or it names
                a parameter the engine does not have.
        """
        if update.indices:
            self.sparse_indices = (update.version, dict(update.indices))
        version, indices = getattr(self, "sparse_indices", (None, {}))
        if version != update.version:
            raise ValueError(f"sparse update of mask version {update.version}, but this engine holds the indices of "
                             f"version {version}; resend the indices (a new SparseWeightSync starts at version 1)")
        params = dict(self._engine_model().named_parameters())
        writes = [*update.restore.items(), *((name, (indices[name], values)) for name, values in update.values.items())]
        for name, (where, values) in writes:
            target = params.get(update.targets[name])
            if target is None:
                raise ValueError(f"the engine has no parameter {update.targets[name]} (for {name})")
            flat = target.data.view(-1)
            flat.index_copy_(0, where.to(flat.device), values.to(device=flat.device, dtype=flat.dtype))
        return sum(values.numel() for values in update.values.values())
