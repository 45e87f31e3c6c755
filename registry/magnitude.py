"""Magnitude: keep the entries with the largest (or smallest) absolute weight."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from mthlib.masking import Allocation, Batch, Masks, MaskStrategy, register_mask


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
    then the lower flat index. Cost: one pass over the weights; no calibration.

    Args:
        sparsity: Fraction of eligible entries that stay frozen.
        largest: Keep the largest magnitudes (``False``: the smallest).
        allocation: ``global`` top-k over the model, or ``per_tensor``.
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
        sparsity: float = 0.99,
        largest: bool = True,
        allocation: Allocation = "global",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        include_norms: bool = False,
        include_biases: bool = False,
        include_embeddings: bool = True,
        seed: int = 0,
        exclude_mask: str | None = None,
    ) -> None:
        super().__init__(sparsity, allocation=allocation, include=include, exclude=exclude,
                         include_norms=include_norms, include_biases=include_biases,
                         include_embeddings=include_embeddings, seed=seed, exclude_mask=exclude_mask)
        self.largest = largest

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Keep the ``k`` entries of largest (or smallest) ``|w|``."""
        sign = 1.0 if self.largest else -1.0
        return self.top_k({name: p.detach().float().abs() * sign for name, p in self.eligible(model).items()})
