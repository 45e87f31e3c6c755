"""SNIP: keep the entries with the largest connection sensitivity ``|gradient x weight|``."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from mthlib.masking import Allocation, Batch, Masks, MaskStrategy, register_mask


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
    sequences; one fp32 buffer per eligible parameter.

    Args:
        sparsity: Fraction of eligible entries that stay frozen.
        num_samples: Calibration sequences whose gradients are summed.
        allocation: ``global`` top-k over the model, or ``per_tensor``.
        include: Name patterns of parameters that may be trained.
        exclude: Name patterns removed after ``include``.
        include_norms: Let layer-norm weights be trained.
        include_biases: Let biases be trained.
        include_embeddings: Let the input embeddings and the LM head be trained.
        seed: Seed of the calibration stream.
        exclude_mask: Path of a :class:`~mthlib.masking.Masks` file whose entries are never chosen.
    """

    needs_calibration = True

    def __init__(
        self,
        sparsity: float = 0.99,
        num_samples: int = 128,
        allocation: Allocation = "global",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        include_norms: bool = False,
        include_biases: bool = False,
        include_embeddings: bool = True,
        seed: int = 0,
        exclude_mask: str | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (calibration sequences); got {num_samples}")
        super().__init__(sparsity, allocation=allocation, include=include, exclude=exclude,
                         include_norms=include_norms, include_biases=include_biases,
                         include_embeddings=include_embeddings, seed=seed, exclude_mask=exclude_mask)
        self.num_samples = num_samples

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Score by ``|g * w|`` with ``g`` summed over ``batches`` and keep the top ``k``."""
        return self.top_k(self.accumulate(model, batches, lambda weight, grad: (grad * weight.float()).abs()))
