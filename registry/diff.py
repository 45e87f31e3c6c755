"""Diff: the entries a finished fine-tune changed, i.e. the subnetwork it actually updated."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from mthlib.analysis.compare import changed_indices
from mthlib.analysis.sources import ModuleWeights, resolve_weights
from mthlib.masking import Allocation, Batch, Masks, MaskStrategy, register_mask


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
    :mod:`mthlib.analysis.sources`. Cost: one pass over both models, one tensor at a
    time; no calibration.

    Args:
        finetuned: Path of the fine-tuned weights.
        tolerance: Entries that moved by more than this count as changed (the paper: 1e-5).
        sparsity: Caps the count at ``keep_count(n)`` (0: no cap).
        allocation: Whether the cap applies to the model (``global``) or to every tensor.
        include: Name patterns of parameters that may be trained.
        exclude: Name patterns removed after ``include``.
        include_norms: Let layer-norm weights be trained.
        include_biases: Let biases be trained.
        include_embeddings: Let the input embeddings and the LM head be trained.
        seed: Unused (no random choice); kept for the common signature.
        exclude_mask: Path of a :class:`~mthlib.masking.Masks` file whose entries are never chosen.
    """

    def __init__(
        self,
        finetuned: str,
        tolerance: float = 1e-5,
        sparsity: float = 0.0,
        allocation: Allocation = "global",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        include_norms: bool = False,
        include_biases: bool = False,
        include_embeddings: bool = True,
        seed: int = 0,
        exclude_mask: str | None = None,
    ) -> None:
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0; got {tolerance}")
        super().__init__(sparsity, allocation=allocation, include=include, exclude=exclude,
                         include_norms=include_norms, include_biases=include_biases,
                         include_embeddings=include_embeddings, seed=seed, exclude_mask=exclude_mask)
        self.finetuned = finetuned
        self.tolerance = tolerance

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """The changed entries of every eligible parameter (capped by ``sparsity``)."""
        params = self.eligible(model)
        tuned = resolve_weights(self.finetuned, ModuleWeights(model, "the base model"))
        available = set(tuned.names())
        exclusion = self.exclusion()
        changed, moved = {}, {}
        for name, param in params.items():
            if name not in available:
                raise ValueError(f"{self.finetuned} has no parameter {name}; it has e.g. {sorted(available)[:3]}")
            base, other = param.detach().cpu(), tuned.get(name)
            if tuple(other.shape) != tuple(base.shape):
                raise ValueError(
                    f"{name} has shape {tuple(other.shape)} in {self.finetuned}, {tuple(base.shape)} in the base"
                )
            idx = changed_indices(base, other, self.tolerance)
            if exclusion is not None and name in exclusion and idx.numel():
                idx = idx[~torch.isin(idx, exclusion[name])]
            changed[name] = idx
            delta = (other.reshape(-1)[idx].double() - base.reshape(-1)[idx].double()).abs()
            moved[name] = torch.nan_to_num(delta, nan=math.inf).float()
        groups = [list(params)] if self.allocation == "global" else [[name] for name in params]
        indices = {}
        for group in groups:
            k = self.keep_count(sum(params[n].numel() for n in group))
            if sum(changed[n].numel() for n in group) <= k:
                indices.update({n: changed[n] for n in group})
            else:
                indices.update(self.top_k({n: _scatter(params[n], changed[n], moved[n]) for n in group}).items())
        return Masks(indices, {name: tuple(p.shape) for name, p in params.items()})


def _scatter(param: nn.Parameter, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Scores of ``param``'s shape: ``values`` at ``indices``, ``-inf`` elsewhere (never chosen first)."""
    scores = torch.full((param.numel(),), -math.inf)
    scores[indices] = values
    return scores.view(param.shape)
