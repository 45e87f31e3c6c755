"""The arithmetic of iterative tickets: entry scores, the sparsity schedule, pruning, mask distance, early bird.

Pure functions over :class:`~mthlib.masking.Masks` and tensors, used by :mod:`mthlib.tickets`
(which runs the rounds) and testable on hand-made masks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import torch
from torch import Tensor

from mthlib.masking import Masks
from mthlib.masking.selection import select_top

Scorer = Callable[[Tensor, Tensor], Tensor]
"""``scorer(base_values, trained_values) -> scores``, 1-D and aligned with one parameter's mask indices; higher is kept."""

def diff_score(base: Tensor, trained: Tensor) -> Tensor:
    """``|trained - base|`` in float64: how far the fine-tune moved each entry (the ``diff`` strategy's score)."""
    return (trained.double() - base.double()).abs()


def magnitude_score(base: Tensor, trained: Tensor) -> Tensor:
    """``|trained|``: the magnitude of each trained weight (iterative magnitude pruning)."""
    return trained.abs()


CRITERIA: Mapping[str, Scorer] = MappingProxyType({"diff": diff_score, "magnitude": magnitude_score})
"""Criterion name to its scorer."""


def hamming_distance(a: Masks, b: Masks) -> float:
    """``|A xor B| / (|A| + |B|)``: 0 for equal masks, 1 for disjoint ones (0 when both are empty).

    The Hamming distance of the two masks over all entries, normalised by the entries they
    keep rather than by all entries (You et al. divide by all), so a threshold means the
    same at 50% and at 99.9% sparsity; for two masks of ``k`` of ``n`` entries it is the
    paper's distance times ``n / 2k``.

    Raises:
        ValueError: The masks cover different parameters or shapes.
    """
    if a.shapes != b.shapes:
        raise ValueError("the two masks cover different parameters or shapes; a distance needs the same ones")
    kept = a.total + b.total
    if not kept:
        return 0.0
    common = int(a.overlap(b)["intersection"])
    return (kept - 2 * common) / kept


def early_bird_stop(distances: Sequence[float | None], threshold: float | None) -> bool:
    """Whether the latest distance between consecutive draws is below ``threshold`` (``None``: never)."""
    return threshold is not None and bool(distances) and distances[-1] is not None and distances[-1] < threshold


def sparsity_schedule(first: int, target: int, rounds: int, prune_fraction: float | None = None) -> tuple[list[int], str]:
    """Entries of each round's mask, from round 0's ``first`` down to ``target``, and why the list ends.

    Round j keeps ``max(target, round(first * keep**j))`` with ``keep = 1 - prune_fraction``,
    or, without ``prune_fraction``, ``keep = (target / first) ** (1 / (rounds - 1))`` (the target
    in exactly ``rounds - 1`` prunings). The list stops at the first round at ``target``
    (reason ``"target"``); when ``rounds`` rounds do not get there, the last one is set to
    ``target`` (reason ``"rounds"``).

    Raises:
        ValueError: ``target`` is not in ``[1, first)``, ``rounds < 2`` or ``prune_fraction`` is outside (0, 1).
    """
    if not 0 < target < first:
        raise ValueError(f"the target must keep between 1 and {first - 1} entries (fewer than round 0); got {target}")
    check_schedule(rounds, prune_fraction)
    keep = (target / first) ** (1 / (rounds - 1)) if prune_fraction is None else 1.0 - prune_fraction
    counts = [first]
    while counts[-1] > target and len(counts) < rounds:
        counts.append(max(target, round(first * keep ** len(counts))))
    if counts[-1] == target:
        return counts, "target"
    counts[-1] = target
    return counts, "rounds"


def check_schedule(rounds: int, prune_fraction: float | None) -> None:
    if rounds < 2:
        raise ValueError(f"rounds must be >= 2 (round 0 and at least one pruned round); got {rounds}")
    if prune_fraction is not None and not 0 < prune_fraction < 1:
        raise ValueError(f"prune_fraction must be in (0, 1) (the share of entries each round removes); "
                         f"got {prune_fraction}")


def prune(scores: Mapping[str, Tensor], mask: Masks, count: int) -> Masks:
    """The ``count`` best-scoring active entries of ``mask``, as masks of the same shapes.

    Args:
        scores: For every parameter with active entries, one score per entry (aligned with ``mask[name]``).
        mask: The entries to choose from.
        count: Entries to keep (one top-k over all parameters; ties: earlier parameter, then lower index).

    Raises:
        ValueError: A score is missing, misshapen or NaN, or ``count`` exceeds the mask.
    """
    if not 0 <= count <= mask.total:
        raise ValueError(f"cannot keep {count} entries of a mask of {mask.total}")
    names = [name for name in mask if mask.count(name)]
    for name in names:
        score = scores.get(name)
        if score is None or tuple(score.shape) != (mask.count(name),):
            raise ValueError(f"{name} needs {mask.count(name)} scores, one per active entry; "
                             f"got {None if score is None else tuple(score.shape)}")
        if bool(torch.isnan(score).any()):
            raise ValueError(f"the scores of {name} contain NaN")
    positions = select_top({name: scores[name] for name in names}, count, {})
    return Masks({name: mask[name][positions[name]] for name in names}, mask.shapes)
