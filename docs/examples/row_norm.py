"""An example mask strategy: train whole rows of the weight matrices with the largest norm."""

from collections.abc import Iterable
from typing import Any, Literal

from torch import nn

from mthlib.masking import Batch, Masks, MaskStrategy, register_mask


@register_mask("row_norm")
class RowNorm(MaskStrategy):
    """Train the rows (output units) with the largest norm, whole rows first.

    Every entry is scored by the norm of its row, so :meth:`top_k` fills the
    highest-norm rows completely before it starts on the next one; only the last row
    reached by each selection (the whole model, or each tensor with ``per_tensor``) may
    be partly trained. Ties break by lower flat index. Keeps
    ``k = int(n * (1 - sparsity))`` entries. Cost: one pass over the weights, no
    calibration batches; ``seed`` has no effect (the rule has no randomness).

    Args:
        norm: ``l2`` or ``l1`` norm of each row.
        **options: The options every strategy shares (``sparsity``, ``allocation``,
            ``include``, ``exclude``, ``seed``, ...), documented on
            :class:`~mthlib.masking.MaskStrategy`.
    """

    def __init__(self, norm: Literal["l1", "l2"] = "l2", **options: Any) -> None:
        super().__init__(**options)
        self.norm = norm

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Score each entry by its row's norm and keep the top ``k``."""
        order = 1 if self.norm == "l1" else 2
        scores = {}
        for name, param in self.eligible(model).items():
            weight = param.detach().float()
            scores[name] = weight.norm(p=order, dim=-1, keepdim=True).expand_as(weight)
        return self.top_k(scores)
