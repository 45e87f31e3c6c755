"""Magnitude: keep the entries with the largest (or smallest) absolute weight."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from mthlib.masking import Batch, Masks, MaskStrategy, register_mask


@register_mask("magnitude")
class Magnitude(MaskStrategy):
    """Train the entries with the largest absolute weight (or the smallest).

    Source: Han, Pool, Tran, Dally, "Learning both Weights and Connections for Efficient
    Neural Networks", NeurIPS 2015 (arXiv:1506.02626): the magnitude criterion behind
    iterative magnitude pruning and the lottery ticket (Frankle & Carbin, ICLR 2019,
    arXiv:1803.03635). The bottom-k variant trains the weights the pretrained model
    relies on least, a contrast for asking whether *where* the subnetwork sits matters.

    Selection rule: score every eligible entry by ``|w|`` (``-|w|`` when ``largest`` is
    false) and keep ``k = keep_count(n)`` entries, ``n`` being all eligible entries
    (``global``) or each tensor's (``per_tensor``); ties go to the earlier parameter,
    then the lower flat index. Cost: one pass over the weights; no calibration. No
    random choice, so ``seed`` has no effect.

    Args:
        largest: Keep the largest magnitudes (``False``: the smallest).
        **options: The shared options (``sparsity``, ``allocation``, ``include``, ``seed``, ...)
            of :class:`~mthlib.masking.MaskStrategy`.
    """

    def __init__(self, largest: bool = True, **options: Any) -> None:
        super().__init__(**options)
        self.largest = largest

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Keep the ``k`` entries of largest (or smallest) ``|w|``."""
        sign = 1.0 if self.largest else -1.0
        return self.top_k({name: p.detach().float().abs() * sign for name, p in self.eligible(model).items()})
