"""Per-entry scores by a named criterion, for strategies that rank entries and then impose a structure on them.

A strategy such as N:M or block selection does not invent a score of its own: it takes a
standard one (weight magnitude, a seeded uniform draw, squared gradients or connection
sensitivity) and decides *which pattern* of entries to keep by it. :func:`entry_scores`
gives those scores through the public gradient passes of
:class:`~mthlib.masking.MaskStrategy`, so every such strategy scores the same way and
calls the same calibration path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import nn

from mthlib.masking.calibration import Batch

if TYPE_CHECKING:
    from mthlib.masking.strategy import MaskStrategy

EntryScore = Literal["magnitude", "random", "fisher", "snip"]
"""``magnitude``: ``|w|``; ``random``: seeded uniform; ``fisher``: squared calibration gradients; ``snip``: ``|g * w|``."""

ENTRY_SCORES: tuple[str, ...] = get_args(EntryScore)
"""The accepted score names, in the order the error message lists them."""

DATA_SCORES: frozenset[str] = frozenset({"fisher", "snip"})
"""The scores that need calibration batches."""


def check_entry_score(score: str) -> None:
    """Raise :class:`ValueError` (one line) unless ``score`` is one of :data:`ENTRY_SCORES`."""
    if score not in ENTRY_SCORES:
        raise ValueError(f"score must be one of {', '.join(map(repr, ENTRY_SCORES))}; got {score!r}")


def entry_scores(
    strategy: MaskStrategy, model: nn.Module, batches: Iterable[Batch] | None, score: EntryScore
) -> dict[str, torch.Tensor]:
    """Score every entry of ``strategy``'s eligible parameters by ``score``.

    * ``magnitude``: ``|w|`` in fp32, on the parameter's device.
    * ``random``: ``torch.rand`` of each parameter's shape from one CPU generator seeded
      with ``strategy.seed``, drawn in eligible order (the same on every device).
    * ``fisher``: :meth:`~mthlib.masking.MaskStrategy.squared_grads`, the sum over
      calibration batches of the squared batch gradient (with one batch, ``grad ** 2``).
    * ``snip``: :meth:`~mthlib.masking.MaskStrategy.accumulate` of ``|g * w|``, ``g`` the
      gradient summed over the calibration batches.

    Args:
        strategy: The strategy whose eligibility (and seed) applies.
        model: The causal LM.
        batches: Calibration batches; needed only for the scores in :data:`DATA_SCORES`.
        score: One of :data:`ENTRY_SCORES`.

    Returns:
        Parameter name to a score tensor of the parameter's shape, in eligible order.

    Raises:
        ValueError: Unknown ``score``, or a data score without ``batches``.
    """
    check_entry_score(score)
    if score in DATA_SCORES and batches is None:
        raise ValueError(f"score {score!r} needs calibration batches; got none")
    if score == "fisher":
        return strategy.squared_grads(model, batches)
    if score == "snip":
        return strategy.accumulate(model, batches, lambda weight, grad: (grad * weight.float()).abs())
    params = strategy.eligible(model)
    if score == "magnitude":
        return {name: p.detach().float().abs() for name, p in params.items()}
    generator = torch.Generator().manual_seed(strategy.seed)
    return {name: torch.rand(p.shape, generator=generator) for name, p in params.items()}
