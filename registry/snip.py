"""SNIP: keep the entries with the largest connection sensitivity ``|gradient x weight|``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from mthlib.masking import Batch, Masks, MaskStrategy, register_mask


@register_mask("snip")
class Snip(MaskStrategy):
    """Train the entries with the largest connection sensitivity ``|gradient x weight|``.

    Source: Lee, Ajanthan, Torr, "SNIP: Single-shot Network Pruning based on Connection
    Sensitivity", ICLR 2019 (arXiv:1810.02340).

    Selection rule: sum the log-likelihood gradient ``g`` (each batch's Hugging Face mean
    loss) over the calibration batches, score each eligible entry by ``|g * w|`` and keep
    ``k = keep_count(n)`` entries, ``n`` being all eligible entries (``global``) or each
    tensor's (``per_tensor``); ties go to the earlier parameter, then the lower flat index.
    Cost: one forward and backward pass per calibration batch over ``num_samples``
    sequences; one fp32 buffer per eligible parameter. ``seed`` seeds the calibration stream.

    Args:
        num_samples: Calibration sequences whose gradients are summed.
        **options: The shared options (``sparsity``, ``allocation``, ``include``, ``seed``, ...)
            of :class:`~mthlib.masking.MaskStrategy`.
    """

    needs_calibration = True

    def __init__(self, num_samples: int = 128, **options: Any) -> None:
        super().__init__(**options)
        self.use_calibration(num_samples)

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Score by ``|g * w|`` with ``g`` summed over ``batches`` and keep the top ``k``."""
        return self.top_k(self.accumulate(model, batches, lambda weight, grad: (grad * weight.float()).abs()))
