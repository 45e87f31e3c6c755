"""Expander: the bi-adjacency matrix of a random biregular bipartite graph, one pattern per matrix shape."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from mthlib.masking import Batch, Masks, MaskStrategy, register_mask

REPAIR_ROUNDS = 200


@register_mask("expander")
class Expander(MaskStrategy):
    """A sparse random expander graph's bi-adjacency matrix as the mask, shared by every layer.

    Source: "Exploring the DLTH in finetuning through specialised sparsification" (seed 004):
    the mask of an ``out x in`` weight is the bi-adjacency matrix of a bipartite expander
    (rows and columns as the two sides), the same mask for every layer and for q, k, v;
    at 99% sparsity it beats a random mask, and two expanders sharing < 10% of their edges
    carry two tasks trained one after the other.

    Selection rule: for every distinct matrix shape ``(out, in)`` a random graph in which every
    row has exactly ``d = max(1, round((1 - sparsity) * in))`` entries and every column has
    ``floor(out * d / in)`` or one more (exactly ``out * d / in`` when it divides), built as a
    random configuration (a union of random matchings) whose repeated edges are repaired by
    degree-preserving swaps. Count per tensor: ``out * d``, which can differ slightly from
    ``int(numel * (1 - sparsity))`` because degrees are whole numbers (at 99.9% sparsity and
    ``in = 576``, ``d = 1``: density 0.17%). The pattern depends only on ``(seed, shape)``, so
    every layer, and q/k/v or gate/up of equal shape, share it. With ``exclude_mask`` the edges
    of the given masks (over all tensors of the shape) are swapped away too: the two masks share
    no edge when the repair succeeds, and :attr:`report` gives the shared fraction otherwise.
    Cost: one graph per shape; no calibration. After :meth:`compute`, :attr:`report` maps each
    shape to its degrees, its second-largest singular value and the Ramanujan bound
    ``sqrt(d_row - 1) + sqrt(d_col - 1)`` (a graph is a good expander when the first is close
    to or below the second; the largest singular value is ``sqrt(d_row * d_col)``).

    Args:
        sparsity: Fraction of entries that stay frozen in every matrix.
        include: Name patterns of parameters that may be trained.
        exclude: Name patterns removed after ``include``.
        include_embeddings: Let embeddings and the LM head be trained.
        seed: Seed of the graphs.
        exclude_mask: Masks file whose entries the graphs avoid (sequential tasks).
        spectral_report: Compute singular values for :attr:`report` (an SVD per shape).
    """

    def __init__(
        self,
        sparsity: float = 0.99,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        include_embeddings: bool = True,
        seed: int = 0,
        exclude_mask: str | None = None,
        spectral_report: bool = True,
    ) -> None:
        super().__init__(
            sparsity, allocation="per_tensor", include=include, exclude=exclude,
            include_embeddings=include_embeddings, seed=seed, exclude_mask=exclude_mask,
        )
        self.spectral_report = spectral_report
        self.report: dict[str, dict[str, float]] = {}

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        eligible = {n: p for n, p in self.eligible(model).items() if p.ndim == 2}
        excluded = self.exclusion()
        patterns: dict[tuple[int, int], torch.Tensor] = {}
        self.report = {}
        for shape in dict.fromkeys(tuple(p.shape) for p in eligible.values()):
            forbidden = _forbidden(excluded, eligible, shape)
            pattern, shared = biregular_pattern(*shape, self.row_degree(shape[1]), self._rng(shape), forbidden)
            patterns[shape] = pattern
            self.report[f"{shape[0]}x{shape[1]}"] = self._describe(shape, pattern, shared)
        return Masks({n: patterns[tuple(p.shape)] for n, p in eligible.items()},
                     {n: tuple(p.shape) for n, p in eligible.items()})

    def row_degree(self, columns: int) -> int:
        """Entries per row: ``max(1, round((1 - sparsity) * columns))``."""
        return max(1, round((1 - self.sparsity) * columns))

    def _rng(self, shape: tuple[int, int]) -> np.random.Generator:
        return np.random.default_rng([self.seed, *shape])

    def _describe(self, shape: tuple[int, int], pattern: torch.Tensor, shared: int) -> dict[str, float]:
        out, inn = shape
        d_row = pattern.numel() / out
        d_col = pattern.numel() / inn
        info = {"d_row": d_row, "d_col": d_col, "edges": float(pattern.numel()), "shared_with_excluded": float(shared)}
        if self.spectral_report:
            dense = torch.zeros(out * inn)
            dense[pattern] = 1.0
            values = torch.linalg.svdvals(dense.view(out, inn))
            info["sigma1"] = float(values[0])
            info["sigma2"] = float(values[1]) if values.numel() > 1 else 0.0
            info["ramanujan_bound"] = float(np.sqrt(max(d_row - 1, 0)) + np.sqrt(max(d_col - 1, 0)))
        return info


def _forbidden(excluded: Masks | None, eligible: dict[str, nn.Parameter], shape: tuple[int, int]) -> np.ndarray:
    if excluded is None:
        return np.empty(0, dtype=np.int64)
    parts = [excluded[n].numpy() for n, p in eligible.items() if tuple(p.shape) == shape and n in excluded]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def biregular_pattern(
    rows: int, columns: int, row_degree: int, rng: np.random.Generator, forbidden: np.ndarray
) -> tuple[torch.Tensor, int]:
    """Sorted flat indices of a random bipartite graph with exact row degrees and balanced column degrees.

    Returns:
        The indices, and how many of them are in ``forbidden`` (0 unless the repair gave up).
    """
    if row_degree > columns:
        raise ValueError(f"row degree {row_degree} exceeds the {columns} columns")
    edges = rows * row_degree
    row_of = np.repeat(np.arange(rows), row_degree)
    base, extra = divmod(edges, columns)
    column_degree = np.full(columns, base)
    column_degree[rng.choice(columns, extra, replace=False)] += 1
    col_of = rng.permutation(np.repeat(np.arange(columns), column_degree))
    for _ in range(REPAIR_ROUNDS):
        bad = _bad_edges(row_of * columns + col_of, forbidden)
        if not bad.size:
            break
        for edge, partner in zip(bad.tolist(), rng.integers(0, edges, bad.size).tolist()):
            col_of[edge], col_of[partner] = col_of[partner], col_of[edge]
    flat = row_of * columns + col_of
    unique = np.unique(flat)
    if unique.size != edges:
        raise RuntimeError(f"could not build a simple {rows}x{columns} graph of row degree {row_degree}")
    return torch.from_numpy(unique).to(torch.int64), int(np.isin(unique, forbidden).sum())


def _bad_edges(flat: np.ndarray, forbidden: np.ndarray) -> np.ndarray:
    """Positions of repeated edges (all but the first copy) and of forbidden edges."""
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    repeated = order[1:][ordered[1:] == ordered[:-1]]
    banned = np.flatnonzero(np.isin(flat, forbidden)) if forbidden.size else np.empty(0, dtype=np.int64)
    return np.union1d(repeated, banned)
