"""An example mask strategy: train whole rows of the weight matrices with the largest norm."""

from collections.abc import Iterable
from typing import Literal

from torch import nn

from mthlib.masking import Allocation, Batch, Masks, MaskStrategy, register_mask


@register_mask("row_norm")
class RowNorm(MaskStrategy):
    """Train the rows (output units) with the largest norm, whole rows first.

    Every entry is scored by the norm of its row, so :meth:`top_k` fills the
    highest-norm rows completely before it starts on the next one; only the last row
    reached by each selection (the whole model, or each tensor with ``per_tensor``) may
    be partly trained. Ties break by lower flat index. Keeps
    ``k = int(n * (1 - sparsity))`` entries. Cost: one pass over the weights, no
    calibration batches.

    Args:
        sparsity: Fraction of eligible entries that stay frozen.
        allocation: ``global`` top-k over the model, or ``per_tensor`` with the same
            density in every tensor.
        include: Name patterns of parameters that may be trained.
        exclude: Name patterns removed after ``include``.
        seed: Unused (the rule has no randomness); accepted like every strategy's.
        norm: ``l2`` or ``l1`` norm of each row.
    """

    def __init__(
        self,
        sparsity: float = 0.99,
        allocation: Allocation = "global",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        seed: int = 0,
        norm: Literal["l1", "l2"] = "l2",
    ) -> None:
        super().__init__(sparsity, allocation=allocation, include=include, exclude=exclude, seed=seed)
        self.norm = norm

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Score each entry by its row's norm and keep the top ``k``."""
        order = 1 if self.norm == "l1" else 2
        scores = {}
        for name, param in self.eligible(model).items():
            weight = param.detach().float()
            scores[name] = weight.norm(p=order, dim=-1, keepdim=True).expand_as(weight)
        return self.top_k(scores)
