"""Expander: the bi-adjacency matrix of a random biregular bipartite graph, one pattern per matrix shape."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from mthlib.masking import Batch, Masks, MaskStrategy, register_mask

REPAIR_ROUNDS = 1000
"""Rounds of degree-preserving swaps before giving up on a graph without repeated or forbidden edges."""


@register_mask("expander")
class Expander(MaskStrategy):
    """The bi-adjacency matrix of a random regular bipartite expander, the same for every layer.

    Source: Sampreeth R S, Biswas, Mitra, Basu, "Exploring the dual lottery ticket
    hypothesis in finetuning through specialised sparsification", ICLR 2025 Workshop on
    Sparsity in LLMs (OpenReview uuU8h4UK4j; no arXiv id): the mask of a weight matrix
    is the bi-adjacency matrix of a bipartite expander (outputs and inputs as the two
    sides), the same for every layer and for q, k, v; at 99% sparsity it beats random
    masks, and two expanders sharing < 10% of their edges carry two tasks trained one
    after the other. Random biregular bipartite graphs are near-Ramanujan expanders with
    high probability (Brito, Dumitriu, Harris, Combinatorics, Probability and Computing
    2022, arXiv:1804.07808).

    Selection rule: a parameter is viewed as a matrix of ``out = shape[0]`` rows and
    ``in = numel / out`` columns (a 1-D parameter as one row). For every distinct
    ``(out, in)``, one random bipartite graph in which every row has exactly
    ``d = max(1, round(keep * in))`` edges (``keep = round(1 - sparsity, 12)``, Python
    rounding: half to even) and every column ``floor(out * d / in)`` or one more
    (exactly ``out * d / in`` when that is whole): the configuration model, i.e. the
    row stubs matched to the column stubs by one random permutation (for a square
    matrix a union of ``d`` perfect matchings), whose repeated edges are then removed by
    degree-preserving swaps. When ``d > in / 2`` (and nothing is forbidden) the sparser
    complement is built instead. Count per tensor: ``out * d``, which differs from
    ``keep_count(numel)`` by at most ``out / 2 + 1``, except where ``keep * in < 0.5``
    raises ``d`` to 1 (at 99.9% sparsity and ``in = 576``: density 0.17%). The pattern
    depends only on ``(seed, out, in)``, so every layer, and q/k/v or gate/up of equal
    shape, share it; embeddings and the LM head follow the same rule when eligible. No
    scores, no ties.

    Sequential tasks: the entries of ``exclude_mask`` (e.g. a first expander mask, or a
    first task's sparse delta), over all eligible tensors of a shape, are forbidden edges,
    swapped away like repeated ones, so the new pattern shares no edge with them (the paper
    asks for < 10%); a graph that cannot avoid them within :data:`REPAIR_ROUNDS` rounds
    raises :class:`RuntimeError`.

    After :meth:`compute`, :attr:`report` maps each shape ``"OUTxIN"`` to ``d_row``,
    ``d_col`` (mean column degree), ``edges``, ``tensors`` and, with ``spectral_report``,
    ``sigma1`` and ``sigma2`` (largest and second singular values of the bi-adjacency
    matrix), ``ramanujan_bound`` ``sqrt(d_row - 1) + sqrt(d_col - 1)`` (``2 sqrt(d - 1)``
    for a square matrix), ``sigma2_over_bound`` (about 1 or below: a good expander) and
    ``spectral_gap`` ``sigma1 - sigma2``. Cost: no data and no gradients; one graph per
    shape (NumPy, about linear in its edges); the spectrum costs a sparse product of the
    bi-adjacency matrix with its transpose and a float64 eigendecomposition of a
    ``min(out, in)`` square matrix per shape (about 10 s at 4096).

    The shared options keep their meaning, except: ``sparsity`` is met approximately
    (see the count), ``allocation`` is fixed to ``per_tensor`` and is not an option,
    ``seed`` seeds the graphs (with the shape: :func:`numpy.random.default_rng`
    ``([seed, out, in])``), norms and biases (``include_norms``, ``include_biases``) get
    one-row patterns, and ``exclude_mask`` entries are forbidden edges (above).

    Args:
        spectral_report: Compute the singular values for :attr:`report`.
        **options: The shared options (``sparsity``, ``include``, ``seed``, ``exclude_mask``,
            ...) of :class:`~mthlib.masking.MaskStrategy`, except ``allocation``.
    """

    def __init__(self, spectral_report: bool = True, **options: Any) -> None:
        super().__init__(allocation="per_tensor", **options)
        self.spectral_report = spectral_report
        self.report: dict[str, dict[str, float]] = {}

    def row_degree(self, columns: int) -> int:
        """Edges per row of a matrix with ``columns`` columns: ``max(1, round(keep * columns))``."""
        return max(1, round(round(1.0 - self.sparsity, 12) * columns))

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Build one pattern per shape and give it to every eligible tensor of that shape."""
        params = self.eligible(model)
        views = {name: _matrix_view(tuple(p.shape)) for name, p in params.items()}
        avoid = self.exclusion()
        patterns: dict[tuple[int, int], torch.Tensor] = {}
        self.report = {}
        for view in dict.fromkeys(views.values()):
            rows, cols = view
            names = [name for name, v in views.items() if v == view]
            forbidden = _forbidden(avoid, names, params)
            rng = np.random.default_rng([self.seed, rows, cols])
            flat = biregular_edges(rows, cols, self.row_degree(cols), rng, forbidden)
            patterns[view] = torch.from_numpy(flat)
            self.report[f"{rows}x{cols}"] = self._describe(rows, cols, flat, len(names))
        return Masks({name: patterns[view] for name, view in views.items()},
                     {name: tuple(p.shape) for name, p in params.items()})

    def _describe(self, rows: int, cols: int, flat: np.ndarray, tensors: int) -> dict[str, float]:
        d_row, d_col = flat.size / rows, flat.size / cols
        info = {"d_row": d_row, "d_col": d_col, "edges": float(flat.size), "tensors": float(tensors)}
        if self.spectral_report:
            sigma1, sigma2 = singular_values(rows, cols, flat)
            bound = math.sqrt(max(d_row - 1.0, 0.0)) + math.sqrt(max(d_col - 1.0, 0.0))
            info.update(sigma1=sigma1, sigma2=sigma2, ramanujan_bound=bound, spectral_gap=sigma1 - sigma2,
                        sigma2_over_bound=sigma2 / bound if bound else math.inf)
        return info


def _matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, columns)`` a parameter is treated as: ``(shape[0], numel / shape[0])``, or one row for 1-D."""
    if len(shape) < 2:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def _forbidden(avoid: Masks | None, names: list[str], params: dict[str, nn.Parameter]) -> np.ndarray:
    """Sorted union of the entries ``avoid`` holds for any of ``names`` (tensors of one shape)."""
    parts = []
    for name in names if avoid is not None else []:
        if name in avoid and avoid.count(name):
            if avoid.shape(name) != tuple(params[name].shape):
                shape = tuple(params[name].shape)
                raise ValueError(f"exclude_mask has shape {avoid.shape(name)} for {name}; the model has {shape}")
            parts.append(avoid[name].numpy())
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def biregular_edges(rows: int, cols: int, degree: int, rng: np.random.Generator, forbidden: np.ndarray) -> np.ndarray:
    """Sorted flat indices ``r * cols + c`` of a random simple bipartite graph.

    Every row has ``degree`` edges; column degrees differ by at most one. No edge is in
    ``forbidden`` (sorted flat indices).

    Raises:
        ValueError: ``degree`` is not in ``[0, cols]``, or a row has fewer than ``degree`` allowed columns.
        RuntimeError: The swaps did not remove every repeated or forbidden edge.
    """
    if not 0 <= degree <= cols:
        raise ValueError(f"row degree {degree} is not in [0, {cols}] for a {rows}x{cols} matrix")
    if not forbidden.size and degree > cols // 2:
        complement = biregular_edges(rows, cols, cols - degree, rng, forbidden)
        return np.setdiff1d(np.arange(rows * cols, dtype=np.int64), complement, assume_unique=True)
    if forbidden.size:
        allowed = cols - np.bincount(forbidden // cols, minlength=rows)
        if int(allowed.min()) < degree:
            row = int(allowed.argmin())
            raise ValueError(
                f"row {row} of a {rows}x{cols} matrix has {int(allowed[row])} allowed columns; needs {degree}"
            )
    edges = rows * degree
    row_of = np.tile(np.arange(rows, dtype=np.int64), degree)
    column_degree = np.full(cols, edges // cols, dtype=np.int64)
    column_degree[rng.permutation(cols)[: edges % cols]] += 1
    col_of = rng.permutation(np.repeat(np.arange(cols, dtype=np.int64), column_degree))
    for _ in range(REPAIR_ROUNDS):
        keys = row_of * cols + col_of
        bad = np.flatnonzero(_bad(keys, forbidden))
        if not bad.size:
            return np.sort(keys)
        present = np.sort(keys)
        partner = rng.integers(0, edges, size=bad.size)
        new_bad = row_of[bad] * cols + col_of[partner]
        new_partner = row_of[partner] * cols + col_of[bad]
        ok = (row_of[bad] != row_of[partner]) & (col_of[bad] != col_of[partner])
        for new in (new_bad, new_partner):
            ok &= ~_contains(present, new) & ~_contains(forbidden, new)
        bad, partner = bad[ok], partner[ok]
        uses = np.bincount(np.concatenate([bad, partner]), minlength=edges)
        single = (uses[bad] == 1) & (uses[partner] == 1)
        bad, partner = bad[single], partner[single]
        col_of[bad], col_of[partner] = col_of[partner], col_of[bad].copy()
    raise RuntimeError(
        f"could not build a {rows}x{cols} pattern of row degree {degree} avoiding {forbidden.size} forbidden entries "
        f"in {REPAIR_ROUNDS} rounds; lower the density or drop exclude_mask"
    )


def _bad(keys: np.ndarray, forbidden: np.ndarray) -> np.ndarray:
    """Boolean per edge: a repeat of an earlier edge, or a forbidden one."""
    bad = np.ones(keys.size, dtype=bool)
    bad[np.unique(keys, return_index=True)[1]] = False
    return bad | _contains(forbidden, keys)


def _contains(sorted_values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Boolean per query: whether it occurs in the sorted array ``sorted_values``."""
    if not sorted_values.size:
        return np.zeros(queries.size, dtype=bool)
    position = np.searchsorted(sorted_values, queries).clip(max=sorted_values.size - 1)
    return sorted_values[position] == queries


def singular_values(rows: int, cols: int, flat: np.ndarray) -> tuple[float, float]:
    """Largest and second singular values of the ``rows x cols`` 0/1 matrix with ones at ``flat``.

    Square roots of the two largest eigenvalues of the Gram matrix over the smaller
    side (a sparse product, then a dense float64 eigendecomposition).
    """
    r, c = flat // cols, flat % cols
    if rows > cols:
        r, c, rows, cols = c, r, cols, rows
    adjacency = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([r, c])), torch.ones(flat.size, dtype=torch.float64), (rows, cols),
        check_invariants=False,
    ).coalesce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        gram = torch.sparse.mm(adjacency, adjacency.t()).to_dense()
    values = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
    return float(values[-1]), float(values[-2]) if rows > 1 else 0.0
