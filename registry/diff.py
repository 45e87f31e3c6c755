"""Diff: the entries a finished fine-tune changed, i.e. the subnetwork it actually updated."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mthlib.analysis import ModuleWeights, changed_indices, resolve_weights, spec_kind
from mthlib.masking import Batch, Masks, MaskStrategy, register_mask

Entries = dict[str, torch.Tensor]
"""Parameter name to one flat tensor (indices, or one score per index)."""


@register_mask("diff")
class Diff(MaskStrategy):
    """Train the entries a given fine-tune changed by more than a tolerance.

    Source: Mukherjee, Yuan, Hakkani-Tur, Peng, "Reinforcement Learning Finetunes Small
    Subnetworks in Large Language Models", NeurIPS 2025 (arXiv:2505.11711): re-training
    only the subnetwork an RL run updated recovers the full run. Pointed at a short dense
    warm-up run it gives LoTA's mask (Panda et al., "Lottery Ticket Adaptation",
    arXiv:2406.16797).

    Selection rule: for every eligible parameter, the flat indices where
    ``|theta_finetuned - theta_base| > tolerance`` (compared in float64; NaN counts as
    changed; the base is the model passed to :meth:`compute`), minus ``exclude_mask``
    entries. ``sparsity`` only caps the count: with ``k = keep_count(n)`` (``n``: all
    eligible entries for ``global``, each tensor's for ``per_tensor``), a group that
    changed more than ``k`` entries keeps the ``k`` with the largest ``|diff|`` (ties:
    earlier parameter, then lower flat index); otherwise every changed entry is kept, so
    the count is at most ``k`` and can be smaller. The default ``sparsity=0`` keeps
    every changed entry.

    ``finetuned`` is a Hugging Face model folder (what ``save_pretrained`` writes), a
    safetensors file of a full state dict, an mthlib sparse delta (laid over the base;
    its base fingerprint must match) or a run folder (its latest delta); see
    :mod:`mthlib.analysis.sources`. It may also be a mask file
    (:meth:`~mthlib.masking.Masks.save`, ``mth masks build``): its entries then count as
    the changed ones, restricted to eligible parameters (an eligible parameter the file
    does not name has none) and ``tolerance`` is not used; a mask has no ``|diff|``, so a
    binding cap keeps the earliest entries (earlier parameter, then lower flat index).
    Cost: one pass over both models, one tensor at a time; no calibration. No random
    choice, so ``seed`` has no effect.

    Args:
        finetuned: Path of the fine-tuned weights, or of a mask file.
        tolerance: Entries that moved by more than this count as changed (the paper: 1e-5).
        sparsity: Caps the count at ``keep_count(n)`` (0: no cap); ``allocation`` says
            whether the cap applies to the model (``global``) or to every tensor.
        **options: The other shared options (``allocation``, ``include``, ``exclude_mask``,
            ...) of :class:`~mthlib.masking.MaskStrategy`.
    """

    def __init__(self, finetuned: str, tolerance: float = 1e-5, sparsity: float = 0.0, **options: Any) -> None:
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0; got {tolerance}")
        super().__init__(sparsity=sparsity, **options)
        self.finetuned = finetuned
        self.tolerance = tolerance

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """The changed entries of every eligible parameter (capped by ``sparsity``)."""
        params = self.eligible(model)
        changed, moved = self._from_mask(model, params) if self._is_mask_file() else self._from_weights(model, params)
        exclusion = self.exclusion()
        for name, idx in changed.items():
            if exclusion is not None and name in exclusion and idx.numel():
                keep = ~torch.isin(idx, exclusion[name])
                changed[name], moved[name] = idx[keep], moved[name][keep]
        groups = [list(params)] if self.allocation == "global" else [[name] for name in params]
        indices = {}
        for group in groups:
            k = self.keep_count(sum(params[n].numel() for n in group))
            if sum(changed[n].numel() for n in group) <= k:
                indices.update({n: changed[n] for n in group})
            else:
                indices.update(self.top_k({n: _scatter(params[n], changed[n], moved[n]) for n in group}).items())
        return Masks(indices, {name: tuple(p.shape) for name, p in params.items()})

    def _is_mask_file(self) -> bool:
        path = Path(self.finetuned).expanduser()
        return path.is_file() and spec_kind(path) == "masks"

    def _from_weights(self, model: nn.Module, params: dict[str, nn.Parameter]) -> tuple[Entries, Entries]:
        """Per eligible parameter, the changed flat indices and how far each moved (NaN: ``inf``)."""
        tuned = resolve_weights(self.finetuned, ModuleWeights(model, "the base model"))
        available = set(tuned.names())
        changed, moved = {}, {}
        for name, param in params.items():
            if name not in available:
                raise ValueError(f"{self.finetuned} has no parameter {name}; it has e.g. {sorted(available)[:3]}")
            base, other = param.detach().cpu(), tuned.get(name)
            if tuple(other.shape) != tuple(base.shape):
                raise ValueError(
                    f"{name} has shape {tuple(other.shape)} in {self.finetuned}, {tuple(base.shape)} in the base"
                )
            idx = changed[name] = changed_indices(base, other, self.tolerance)
            delta = (other.reshape(-1)[idx].double() - base.reshape(-1)[idx].double()).abs()
            moved[name] = torch.nan_to_num(delta, nan=math.inf).float()
        return changed, moved

    def _from_mask(self, model: nn.Module, params: dict[str, nn.Parameter]) -> tuple[Entries, Entries]:
        """Per eligible parameter, the mask file's entries, each with the same score."""
        mask = Masks.load(Path(self.finetuned).expanduser())
        known = dict(model.named_parameters())
        for name in mask.names:
            if name not in known:
                raise ValueError(f"mask file {self.finetuned} names {name}, which the model does not have")
            if mask.shape(name) != tuple(known[name].shape):
                raise ValueError(f"{name} has shape {mask.shape(name)} in mask file {self.finetuned}, "
                                 f"{tuple(known[name].shape)} in the model")
        changed = {n: mask[n] if n in mask else torch.zeros(0, dtype=torch.int64) for n in params}
        return changed, {n: torch.zeros(idx.numel()) for n, idx in changed.items()}


def _scatter(param: nn.Parameter, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Scores of ``param``'s shape: ``values`` at ``indices``, ``-inf`` elsewhere (never chosen first)."""
    scores = torch.full((param.numel(),), -math.inf)
    scores[indices] = values
    return scores.view(param.shape)
