"""Fisher: keep the entries with the largest squared log-likelihood gradients on calibration data."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from torch import nn

from mthlib.masking import Batch, Masks, MaskStrategy, register_mask


@register_mask("fisher")
class Fisher(MaskStrategy):
    """Train the entries with the largest diagonal Fisher information (squared gradients).

    Source: Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
    PNAS 2017 (arXiv:1612.00796), for the diagonal Fisher
    ``F_i = 1/N sum_n (d log p(x_n) / d theta_i)^2``; used as a mask by Adewuyi,
    "Beyond the Lottery Ticket: Multiple Winning Subnetworks in Pretrained LLMs"
    (blog, 2025) with 1,024 calibration samples at 99% and 99.9% sparsity.

    Selection rule: score every eligible entry by ``estimator``:

    * ``batch`` (the blog's): ``g_i ** 2`` where ``g`` is the gradient of the *summed*
      calibration loss (each batch's Hugging Face mean loss, summed over batches), i.e.
      ``theta.grad ** 2`` after one backward pass over the whole calibration set.
    * ``per_sample`` (the empirical Fisher of EWC): ``sum_n g_{n,i} ** 2`` over single
      sequences ``n``.

    Keep ``k = keep_count(n)`` entries with the highest score, ``n`` being all eligible
    entries (``global``) or each tensor's (``per_tensor``); ties go to the earlier
    parameter, then the lower flat index (:meth:`~mthlib.masking.MaskStrategy.top_k`).
    Cost: one forward and backward pass per calibration batch (``per_sample``: per
    sequence) over ``num_samples`` sequences; one fp32 buffer per eligible parameter.
    ``seed`` seeds the calibration stream.

    Args:
        num_samples: Calibration sequences (the blog: 1,024).
        estimator: ``batch`` (square of the summed gradient) or ``per_sample`` (sum of squares).
        **options: The shared options (``sparsity``, ``allocation``, ``include``, ``seed``, ...)
            of :class:`~mthlib.masking.MaskStrategy`.
    """

    needs_calibration = True

    def __init__(self, num_samples: int = 1024, estimator: Literal["batch", "per_sample"] = "batch",
                 **options: Any) -> None:
        if estimator not in ("batch", "per_sample"):
            raise ValueError(f"estimator must be 'batch' or 'per_sample'; got {estimator!r}")
        super().__init__(**options)
        self.use_calibration(num_samples)
        self.estimator = estimator

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Score by the chosen Fisher estimate over ``batches`` and keep the top ``k``."""
        if self.estimator == "per_sample":
            return self.top_k(self.squared_grads(model, batches, per_sample=True))
        return self.top_k(self.accumulate(model, batches, lambda weight, grad: grad * grad))
