"""N:M: in every group of M consecutive input weights of a row, train exactly the N best-scored ones."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mthlib.masking import (
    DATA_SCORES,
    Batch,
    EntryScore,
    Masks,
    MaskStrategy,
    check_entry_score,
    entry_scores,
    register_mask,
)


@register_mask("nm")
class NM(MaskStrategy):
    """N:M semi-structured: exactly N trained entries in every M consecutive input weights.

    Source: Mishra et al., "Accelerating Sparse Deep Neural Networks" (NVIDIA, 2021,
    arXiv:2104.08378), the 2:4 pattern of Ampere sparse tensor cores; Zhou et al.,
    "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch", ICLR 2021
    (arXiv:2102.04010), for general N:M.

    Selection rule: every eligible parameter must be a matrix ``(out, in)`` whose input
    dimension ``in`` (the last) is a multiple of ``m``. Each row's entries are split into
    groups of ``m`` consecutive columns, as semi-structured kernels group a Linear layer's
    input weights, and in every group the ``n`` entries with the highest ``score`` are
    kept (ties to the lower column). Entries of ``exclude_mask`` are never kept; a group
    with fewer than ``n`` other entries is an error. :func:`check_nm` verifies the result
    before it is returned.

    Count: exactly ``n / m`` of every eligible matrix. The pattern fixes the density, so
    the strategy takes neither ``sparsity`` (it is ``1 - n / m``) nor ``allocation`` (every
    group of every tensor keeps the same share): the command line does not offer them, a
    config switching to ``nm`` drops them, and passing them in Python is an error.

    Embeddings: eligible by default, like every strategy's. A tied embedding is also
    the LM head, a Linear layer over the hidden dimension, where the pattern is the one a
    kernel uses; an untied input table is grouped the same way (along the hidden
    dimension), though a lookup gains no speed from it: ``include_embeddings: false``
    leaves it dense-frozen.

    Cost: ``magnitude`` and ``random``: one pass over the weights, no data; ``fisher``
    and ``snip``: one forward and backward pass per calibration batch over
    ``num_samples`` sequences. Then a sort of each group of ``m``. ``seed`` seeds the
    ``random`` score and the calibration stream.

    Args:
        n: Entries kept per group, ``1 <= n < m``.
        m: Group size along the input dimension.
        score: ``magnitude`` (``|w|``), ``random`` (seeded uniform), ``fisher`` (squared
            calibration gradients) or ``snip`` (``|g * w|``); see
            :func:`~mthlib.masking.entry_scores`.
        num_samples: Calibration sequences (``fisher`` and ``snip`` only).
        **options: The shared options except ``sparsity`` and ``allocation`` (``include``,
            ``exclude``, ``seed``, ``exclude_mask``, ...) of :class:`~mthlib.masking.MaskStrategy`.
    """

    def __init__(self, n: int = 2, m: int = 4, score: EntryScore = "magnitude", num_samples: int = 128,
                 **options: Any) -> None:
        if not 1 <= n < m:
            raise ValueError(f"n:m needs 1 <= n < m (n entries kept in every m); got n={n}, m={m}")
        check_entry_score(score)
        for fixed in ("sparsity", "allocation"):
            if fixed in options:
                raise ValueError(f"{n}:{m} masks fix sparsity at 1 - n/m = {1 - n / m:g} in every group: do not pass {fixed}")
        super().__init__(sparsity=1.0 - n / m, allocation="per_tensor", **options)
        self.n = n
        self.m = m
        self.score = score
        self.use_calibration(num_samples, needed=score in DATA_SCORES)

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Keep the top ``n`` of every ``m`` consecutive entries of each row by ``score``, then :func:`check_nm`."""
        params = self.eligible(model)
        for name, p in params.items():
            if p.dim() != 2 or p.shape[1] % self.m:
                raise ValueError(
                    f"{self.n}:{self.m} masks need matrices whose input dimension (the last) is a multiple of "
                    f"{self.m}; {name} has shape {tuple(p.shape)} (leave it out with exclude)"
                )
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        excluded = self.excluded_indices(shapes)
        chosen = {}
        for name, scores in entry_scores(self, model, batches, self.score).items():
            blocked = excluded.get(name)
            chosen[name] = top_n_per_group(scores, self.n, self.m, blocked, name)
        masks = Masks(chosen, shapes)
        check_nm(masks, self.n, self.m)
        return masks


def top_n_per_group(scores: torch.Tensor, n: int, m: int, blocked: torch.Tensor | None = None, name: str = "scores",
                    chunk: int = 1 << 20) -> torch.Tensor:
    """Sorted flat indices of the ``n`` highest scores in every ``m`` consecutive entries (row-major).

    Ties go to the lower index (a stable sort). Entries whose flat index is in
    ``blocked`` are never chosen. Groups are sorted ``chunk`` at a time, so the int64
    sort indices never cover the whole tensor.

    Raises:
        ValueError: A score is NaN, or a group has fewer than ``n`` entries outside ``blocked``.
    """
    groups = scores.detach().reshape(-1, m)
    if bool(torch.isnan(groups).any()):
        raise ValueError(f"scores of {name} contain NaN")
    flags = None
    if blocked is not None and blocked.numel():
        flags = torch.zeros(groups.numel(), dtype=torch.int8, device=groups.device)
        flags[blocked.to(groups.device)] = 1
        flags = flags.view(-1, m)
        short = torch.nonzero(flags.sum(dim=1) > m - n).view(-1)
        if short.numel():
            raise ValueError(
                f"cannot keep {n} of {m} entries in {name}: the group at flat index {int(short[0]) * m} has fewer "
                f"than {n} entries outside exclude_mask"
            )
    kept = []
    for start in range(0, groups.shape[0], chunk):
        order = torch.sort(groups[start: start + chunk], dim=1, descending=True, stable=True).indices
        if flags is not None:  # blocked entries last, the rest still by score: a second stable sort
            last = torch.sort(flags[start: start + chunk].gather(1, order), dim=1, stable=True).indices
            order = order.gather(1, last)
        base = torch.arange(start, start + order.shape[0], device=order.device).unsqueeze(1) * m
        kept.append((base + order[:, :n]).reshape(-1))
    return torch.sort(torch.cat(kept)).values.cpu()


def check_nm(masks: Masks, n: int, m: int) -> None:
    """Raise :class:`ValueError` unless every group of ``m`` consecutive entries of every row keeps exactly ``n``.

    Args:
        masks: Masks over matrices whose last dimension is a multiple of ``m``.
        n: Entries each group must keep.
        m: Group size along the last dimension.
    """
    for name, indices in masks.items():
        shape = masks.shape(name)
        if len(shape) != 2 or shape[1] % m:
            raise ValueError(f"{name} has shape {shape}: not a matrix whose last dimension is a multiple of {m}")
        counts = torch.bincount(indices.long() // m, minlength=shape[0] * shape[1] // m)
        wrong = torch.nonzero(counts != n).view(-1)
        if wrong.numel():
            group = int(wrong[0])
            row, column = divmod(group * m, shape[1])
            raise ValueError(
                f"{name} breaks {n}:{m}: row {row}, columns {column}-{column + m - 1} keep {int(counts[group])} entries"
            )

