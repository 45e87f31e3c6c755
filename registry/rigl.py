"""RigL: a dynamic mask that drops the entries that moved least and grows those with the largest gradient."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from mthlib.masking import Allocation, Batch, Masks, MaskStrategy, register_mask


@register_mask("rigl")
class RigL(MaskStrategy):
    """Dynamic mask: periodically swap the least-moved active entries for the frozen ones with the largest gradient.

    Source: Evci, Gale, Menick, Castro, Elsen, "Rigging the Lottery: Making All Tickets
    Winners", ICML 2020 (arXiv:1911.11134). RigL prunes the smallest *weights*; here the
    model starts from a pretrained base, so an active entry's importance is how far it
    moved, ``|w - w_base|``.

    Initial mask (:meth:`compute`): ``init="random"`` keeps the top ``k`` of i.i.d. uniform
    scores drawn from a :class:`torch.Generator` seeded with ``seed`` (a uniformly random
    subset, of ``keep_count(numel)`` entries per tensor with ``per_tensor``, of
    ``keep_count(n)`` over the model with ``global``); ``init="magnitude"`` keeps the top
    ``k`` of ``|w|``. Ties: earlier parameter, then lower flat index.

    Update rule (:meth:`update`, called by the mask callback at steps divisible by
    ``update_every``): the drop fraction at ``step`` is
    ``f = drop_fraction * (1 + cos(pi * min(step, total_steps) / total_steps)) / 2``
    (the paper's cosine decay; 0 from ``total_steps`` on). With ``per_tensor``
    allocation (the default, as in the paper) ``d_t = int(f * masks.count(t))``
    entries move inside each tensor ``t``, so every tensor keeps its count; with
    ``global``, ``d = int(f * masks.total)`` move across the whole model. The ``d``
    active entries with the smallest ``|w - w_base|`` are dropped, and the ``d``
    entries that were frozen before the update (never just-dropped ones, never
    ``exclude_mask`` entries) with the largest ``|grad|`` are grown, ``grad`` being the
    dense log-likelihood gradient summed over the calibration batches the callback
    passes. Ties in both rankings: earlier parameter, then lower flat index. ``d`` is
    capped by the number of growable entries; the count never changes. The callback
    returns dropped entries to their base values; grown ones start from their base
    values. Cost: :meth:`compute` needs no data; each update runs one forward and
    backward pass per calibration batch over ``num_samples`` sequences and holds one
    fp32 copy of the eligible weights' gradients.

    Args:
        drop_fraction: Fraction of active entries swapped at step 0 (the paper's ``alpha``).
        update_every: Optimizer steps between two updates (the paper's ``Delta T``).
        total_steps: Steps over which the drop fraction decays to 0 (the paper's ``T_end``).
        init: Initial mask: ``random`` (seeded) or ``magnitude`` (largest ``|w|``).
        num_samples: Calibration sequences whose gradients each update sums.
        allocation: ``per_tensor`` (the paper's: every tensor keeps its count) or
            ``global`` (the count is fixed over the model and moves between tensors).
        **options: The other shared options (``sparsity``, ``include``, ``seed``, ...) of
            :class:`~mthlib.masking.MaskStrategy`; ``seed`` seeds the initial random mask
            and the calibration stream.
    """

    needs_calibration = True
    dynamic = True

    def __init__(
        self,
        drop_fraction: float = 0.3,
        update_every: int = 10,
        total_steps: int = 1000,
        init: Literal["random", "magnitude"] = "random",
        num_samples: int = 16,
        allocation: Allocation = "per_tensor",
        **options: Any,
    ) -> None:
        if not 0.0 <= drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1]; got {drop_fraction}")
        if update_every < 1 or total_steps < 1:
            raise ValueError(f"update_every and total_steps must be >= 1; got {update_every}, {total_steps}")
        if init not in ("random", "magnitude"):
            raise ValueError(f"init must be 'random' or 'magnitude'; got {init!r}")
        super().__init__(allocation=allocation, **options)
        self.drop_fraction = drop_fraction
        self.update_every = update_every
        self.total_steps = total_steps
        self.init = init
        self.use_calibration(num_samples)

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """The initial mask (``batches`` are not used)."""
        params = self.eligible(model)
        if self.init == "magnitude":
            return self.top_k({name: p.detach().float().abs() for name, p in params.items()})
        generator = torch.Generator().manual_seed(self.seed)
        return self.top_k({name: torch.rand(p.shape, generator=generator) for name, p in params.items()})

    def fraction_at(self, step: int) -> float:
        """The cosine-decayed drop fraction at ``step`` (0 from ``total_steps`` on)."""
        progress = min(max(step, 0), self.total_steps) / self.total_steps
        return self.drop_fraction * (1.0 + math.cos(math.pi * progress)) / 2.0

    def drop_count(self, active: int, step: int) -> int:
        """Entries moved at ``step`` out of ``active`` ones: ``int(fraction_at(step) * active)``."""
        return int(self.fraction_at(step) * active)

    def update(
        self,
        masks: Masks,
        model: nn.Module,
        step: int,
        grads: Mapping[str, torch.Tensor] | None,
        base_values: Mapping[str, torch.Tensor],
        batches: Iterable[Batch] | None,
    ) -> Masks:
        """Drop the active entries that moved least, grow the frozen ones with the largest gradient.

        Args:
            masks: The current masks (from :meth:`compute` or an earlier update).
            model: The model being trained (current values at the active entries).
            step: The global optimizer step (sets the drop fraction).
            grads: Unused: the optimizer keeps gradients of active entries only, and
                growing needs those of frozen entries.
            base_values: Name to the base values at ``masks[name]`` (aligned with it).
            batches: Calibration batches for the dense gradient.

        Returns:
            Masks with the same parameters and the same count (per tensor with ``per_tensor``).

        Raises:
            ValueError: ``batches`` is ``None``, or ``masks`` names a parameter that is not eligible.
        """
        if batches is None:
            raise ValueError("rigl needs calibration batches in update() to compute the gradients of frozen entries")
        params = self.eligible(model)
        unknown = [name for name in masks if name not in params]
        if unknown:
            raise ValueError(f"the masks name parameters rigl may not train: {', '.join(unknown[:5])}")
        if self.fraction_at(step) == 0.0:
            return masks
        names = list(masks.names)
        active = {name: masks[name].to(params[name].device) for name in names}
        change = {
            name: (params[name].detach().reshape(-1).index_select(0, active[name]).float()
                   - base_values[name].to(params[name].device).float()).abs()
            for name in names
        }
        growth = self._growth_scores(active, model, batches)
        groups = [names] if self.allocation == "global" else [[name] for name in names]
        indices = {}
        for group in groups:
            growable = sum(int(torch.count_nonzero(torch.isfinite(growth[n]))) for n in group)
            count = min(self.drop_count(sum(masks.count(n) for n in group), step), growable)
            dropped = _largest([-change[n] for n in group], count)
            grown = _largest([growth[n] for n in group], count)
            for name, drop, grow in zip(group, dropped, grown):
                keep = torch.ones(active[name].numel(), dtype=torch.bool, device=drop.device)
                keep[drop] = False
                indices[name] = torch.sort(torch.cat([active[name][keep], grow])).values.cpu()
        return Masks(indices, masks.shapes)

    def _growth_scores(
        self, active: Mapping[str, torch.Tensor], model: nn.Module, batches: Iterable[Batch]
    ) -> dict[str, torch.Tensor]:
        """Flat ``|grad|`` per masked parameter (on its device), ``-inf`` where an entry may not be grown."""
        scores = self.accumulate(model, batches, lambda weight, grad: grad.abs())
        exclusion = self.exclusion()
        out = {}
        for name, indices in active.items():
            flat = scores.pop(name).reshape(-1)
            flat[indices] = -math.inf
            if exclusion is not None and name in exclusion:
                flat[exclusion[name].to(flat.device)] = -math.inf
            out[name] = flat
        return out


def _largest(values: Sequence[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Positions of the ``count`` largest entries of the 1-D ``values`` taken together.

    Ties go to the earlier tensor, then the lower position; each result is sorted.
    """
    if count == 0:
        return [torch.zeros(0, dtype=torch.int64, device=part.device) for part in values]
    flat = torch.cat(list(values))
    threshold = torch.kthvalue(flat, flat.numel() - count + 1).values
    remaining = count - int(torch.count_nonzero(flat > threshold))
    out = []
    for part in values:
        above = torch.nonzero(part > threshold).view(-1)
        ties = torch.nonzero(part == threshold).view(-1)[:remaining]
        remaining -= int(ties.numel())
        out.append(torch.sort(torch.cat([above, ties])).values)
    return out
