"""``mth export --format peft``: a sparse delta as a PEFT SHiRA adapter that ``PeftModel.from_pretrained`` loads.

SHiRA (``peft.ShiraConfig``, peft>=0.17) adds to each adapted ``nn.Linear`` a sparse update:
the values ``shira_weight`` at the (row, column) pairs ``shira_indices``, times a scaling of
1.0, added to the weight. Every adapted layer holds exactly ``r * (in + out)`` entries, with
one ``r`` for all layers, while a delta trains any number ``k`` of entries per matrix. The
adapter therefore takes the smallest ``r`` that holds the densest layer,
``max ceil(k / (in + out))``, and pads every layer with zero-valued updates at the lowest
flat positions its delta does not train: they change nothing, but are stored. The values are
``trained - base``, computed in float64 and rounded once to the adapter's dtype, so base plus
adapter equals the merged export up to that rounding.

Only the ``weight`` of an ``nn.Linear`` that is not tied to another parameter can be adapted;
a delta that trains anything else (embeddings, norms, biases, a head tied to the input
embeddings) is refused, naming the parameter and the strategy option that leaves it out.
PEFT's own ``save_pretrained`` writes the folder; it stores the indices beside the values in
``adapter_model.safetensors``, so loading needs neither the mask function nor mthlib.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mthlib.deltas import SparseDelta, check_base
from mthlib.fingerprint import canonical_names

MASK_TYPE = "mthlib_delta"
"""``ShiraConfig.mask_type`` of an exported adapter: not ``random``, so loading takes the saved indices."""

_AVOID = {"embedding": "include_embeddings: false", "norm": "include_norms: false", "bias": "include_biases: false"}


@dataclass(frozen=True)
class ShiraLayout:
    """Where an adapter's entries go: the shared ``r`` and, per adapted module, its entries.

    Attributes:
        r: SHiRA's rank parameter; every module holds ``r * (in + out)`` entries.
        indices: Per module name, sorted flat indices into the weight: the trained ones and the padding.
        updates: Per module name, ``trained - base`` (float64) at ``indices``, zero at the padding.
        trained: Entries the delta trains, over all modules.
    """

    r: int
    indices: dict[str, Tensor]
    updates: dict[str, Tensor]
    trained: int

    @property
    def stored(self) -> int:
        """Entries the adapter stores, padding included."""
        return sum(int(idx.numel()) for idx in self.indices.values())

    def describe(self) -> str:
        """One sentence for the model card: ``r``, the modules, and what the padding costs."""
        return (f"SHiRA adapter with r={self.r} on {len(self.indices)} linear layers: the {self.trained} trained "
                f"entries are stored with {self.stored - self.trained} zero-valued padding entries "
                f"({self.stored} in all), since SHiRA gives every layer r * (in + out) entries.")


def require_peft() -> Any:
    """The ``peft`` module, or one line saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ValueError("--format peft needs the 'peft' package: pip install peft") from None
    return peft


def plan_shira(model: nn.Module, delta: SparseDelta) -> ShiraLayout:
    """Lay ``delta`` out as SHiRA entries over ``model``, its untouched base; nothing is modified.

    Raises:
        ValueError: One line: a trained parameter SHiRA cannot adapt (with the option that avoids
            it), a layer that ``r * (in + out)`` entries would overfill, an empty delta, or a
            base the delta does not apply to (see :func:`~mthlib.deltas.check_base`).
    """
    from mthlib.masking.kinds import parameter_kinds  # mthlib.masking imports Lightning: only when exporting

    params = check_base(model, delta)
    canonical = canonical_names(model)
    kinds = parameter_kinds(model)
    trained = sorted(name for name, idx in delta.indices.items() if idx.numel())
    shapes = {name: _linear_shape(model, name, canonical, kinds) for name in trained}
    if not shapes:
        raise ValueError("cannot export as a PEFT adapter: the delta has no trained entries")
    counts = {name: int(delta.indices[name].numel()) for name in shapes}
    densest = max(shapes, key=lambda name: math.ceil(counts[name] / sum(shapes[name])))
    r = math.ceil(counts[densest] / sum(shapes[densest]))
    for name, (out_features, in_features) in shapes.items():
        if r * (in_features + out_features) > in_features * out_features:
            raise ValueError(
                f"cannot export as a PEFT adapter: SHiRA gives every layer r * (in + out) entries with one r, and "
                f"{densest} ({counts[densest]} trained entries) needs r={r}, which overfills {name} "
                f"({r * (in_features + out_features)} entries > {in_features * out_features}); use --format hf")
    indices, updates = {}, {}
    for name, (out_features, in_features) in shapes.items():
        entries = delta.indices[name].to(torch.int64)
        padding = r * (in_features + out_features) - counts[name]
        taken = torch.zeros(counts[name] + padding, dtype=torch.bool)  # the lowest free positions lie below k + padding
        taken[entries[entries < taken.numel()]] = True
        free = (~taken).nonzero().squeeze(1)[:padding]
        base = params[name].detach().reshape(-1)[entries.to(params[name].device)].cpu()
        change = delta.values[name].to(torch.float64) - base.to(torch.float64)
        flat, order = torch.cat([entries, free]).sort()
        indices[name.removesuffix(".weight")] = flat
        updates[name.removesuffix(".weight")] = torch.cat([change, torch.zeros(padding, dtype=torch.float64)])[order]
    return ShiraLayout(r, indices, updates, sum(counts.values()))


def _linear_shape(model: nn.Module, name: str, canonical: dict[str, str], kinds: dict[str, str]) -> tuple[int, int]:
    """``(out, in)`` of the ``nn.Linear`` whose untied weight ``name`` is; one line naming the way out otherwise."""
    kind = kinds.get(canonical[name], "other")
    avoid = f"train with {_AVOID[kind]}" if kind in _AVOID else "leave it out with the strategy's exclude option"
    tied = [other for other, owner in canonical.items() if owner == canonical[name] and other != name]
    if tied:
        raise ValueError(f"cannot export {name} as a PEFT adapter: it is one tensor with {tied[0]}, and a SHiRA "
                         f"update of an nn.Linear would leave the tensor's other use unchanged; {avoid}, or use --format hf")
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf != "weight" or not isinstance(module, nn.Linear):
        raise ValueError(f"cannot export {name} as a PEFT adapter: SHiRA adapts only the weight of an nn.Linear, "
                         f"not the {leaf} of a {type(module).__name__}; {avoid}, or use --format hf")
    return module.out_features, module.in_features


def write_shira_adapter(model: nn.Module, delta: SparseDelta, folder: str | os.PathLike) -> ShiraLayout:
    """Write ``delta`` over ``model`` (its base) as a SHiRA adapter folder with PEFT's ``save_pretrained``.

    ``model`` is modified: its adapted layers are wrapped by PEFT. The folder holds
    ``adapter_config.json`` (``base_model_name_or_path`` is the delta's base) and
    ``adapter_model.safetensors`` (values and indices of every adapted layer).
    """
    peft = require_peft()
    layout = plan_shira(model, delta)
    masks = {model.get_submodule(name): flat for name, flat in layout.indices.items()}
    config = peft.ShiraConfig(r=layout.r, mask_type=MASK_TYPE, target_modules=sorted(layout.indices),
                              task_type="CAUSAL_LM", inference_mode=True)  # as saved; no mask_type warning
    config.mask_fn = partial(_mask, masks)
    adapted = peft.get_peft_model(model, config)
    config.base_model_name_or_path = delta.base_model  # get_peft_model sets the in-memory model's name_or_path
    with torch.no_grad():
        for name, flat in layout.indices.items():
            layer = adapted.base_model.model.get_submodule(name)
            rows, cols = layer.shira_indices["default"].to(torch.int64)
            position = torch.searchsorted(flat, (rows * layer.in_features + cols).cpu())
            layer.shira_weight["default"].copy_(layout.updates[name][position])
    adapted.save_pretrained(Path(folder), save_embedding_layers=False)
    return layout


def _mask(masks: dict[nn.Module, Tensor], base_layer: nn.Module, r: int, **_: Any) -> Tensor:
    """SHiRA's ``mask_fn``: the planned entries of ``base_layer`` as a 0/1 matrix in its weight's dtype and device."""
    weight = base_layer.weight
    mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
    mask[masks[base_layer].to(weight.device)] = 1
    return mask.view_as(weight)
