"""Overlap of subnetworks (index sets) and what chance alone would give.

For index sets I1, I2 over n entries (Mukherjee et al., arXiv:2505.11711, §5 and
Appendix E; the blog's Jaccard overlap of masks):

* ``o1 = |I1 ∩ I2| / |I1|`` and ``o2 = |I1 ∩ I2| / |I2|``;
* ``jaccard = |I1 ∩ I2| / |I1 ∪ I2|``;
* random baselines for independent uniform sets of densities ``d1 = |I1|/n`` and
  ``d2 = |I2|/n``: ``o1_random = d2``, ``o2_random = d1``,
  ``jaccard_random = d1 d2 / (d1 + d2 - d1 d2)``.

Sets are read one parameter at a time, so memory holds one parameter's sets only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch import Tensor

from mthlib.analysis.report import Table, percent
from mthlib.analysis.index_sets import IndexSets, resolve_index_sets
from mthlib.analysis.sources import Spec, WeightSource, resolve_weights, total_entries


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def intersection_size(a: Tensor, b: Tensor) -> int:
    """``|a ∩ b|`` for two sorted unique 1-D integer tensors."""
    if a.numel() == 0 or b.numel() == 0:
        return 0
    small, large = (a, b) if a.numel() <= b.numel() else (b, a)
    small_np, large_np = small.numpy(), large.numpy()
    pos = np.searchsorted(large_np, small_np).clip(max=large_np.size - 1)
    return int((large_np[pos] == small_np).sum())


@dataclass(frozen=True)
class PairOverlap:
    """Overlap of two index sets over ``total`` entries.

    Attributes:
        first: Label of I1.
        second: Label of I2.
        size1: ``|I1|``.
        size2: ``|I2|``.
        intersection: ``|I1 ∩ I2|``.
        total: ``n``, the number of entries the sets are drawn from.
    """

    first: str
    second: str
    size1: int
    size2: int
    intersection: int
    total: int

    @property
    def union(self) -> int:
        """``|I1 ∪ I2|``."""
        return self.size1 + self.size2 - self.intersection

    @property
    def d1(self) -> float:
        """Density of I1."""
        return _ratio(self.size1, self.total)

    @property
    def d2(self) -> float:
        """Density of I2."""
        return _ratio(self.size2, self.total)

    @property
    def o1(self) -> float:
        """Share of I1 that I2 covers."""
        return _ratio(self.intersection, self.size1)

    @property
    def o2(self) -> float:
        """Share of I2 that I1 covers."""
        return _ratio(self.intersection, self.size2)

    @property
    def jaccard(self) -> float:
        """``|I1 ∩ I2| / |I1 ∪ I2|``."""
        return _ratio(self.intersection, self.union)

    @property
    def o1_random(self) -> float:
        """Expected o1 of independent random sets: the density of I2."""
        return self.d2

    @property
    def o2_random(self) -> float:
        """Expected o2 of independent random sets: the density of I1."""
        return self.d1

    @property
    def jaccard_random(self) -> float:
        """Jaccard of independent random sets of the same densities."""
        return _ratio(self.d1 * self.d2, self.d1 + self.d2 - self.d1 * self.d2)

    def to_dict(self) -> dict[str, Any]:
        """Counts and every ratio."""
        keys = ("first", "second", "size1", "size2", "intersection", "union", "total", "d1", "d2",
                "o1", "o1_random", "o2", "o2_random", "jaccard", "jaccard_random")
        return {key: getattr(self, key) for key in keys}


@dataclass
class OverlapResult:
    """Pairwise overlaps of several index sets."""

    labels: list[str]
    sizes: list[int]
    total: int
    intersections: list[list[int]]

    def pair(self, i: int, j: int) -> PairOverlap:
        """Overlap of input ``i`` (I1) with input ``j`` (I2)."""
        return PairOverlap(self.labels[i], self.labels[j], self.sizes[i], self.sizes[j],
                           self.intersections[i][j], self.total)

    def pairs(self) -> list[PairOverlap]:
        """Every unordered pair ``i < j``."""
        k = len(self.labels)
        return [self.pair(i, j) for i in range(k) for j in range(i + 1, k)]

    def matrix(self, metric: Literal["o1", "jaccard"]) -> list[list[float]]:
        """``k x k`` matrix; ``o1`` row i column j is the share of input i covered by input j."""
        k = len(self.labels)
        return [[getattr(self.pair(i, j), metric) for j in range(k)] for i in range(k)]

    def tables(self) -> list[Table]:
        """Per pair: sizes, o1, o2 and Jaccard beside their random baselines (percent)."""
        inputs = Table(
            f"Index sets over n={self.total} entries",
            ["#", "input", "entries", "density %"],
            [[i, label, size, percent(_ratio(size, self.total))]
             for i, (label, size) in enumerate(zip(self.labels, self.sizes))],
        )
        pairs = Table(
            "Overlap (%) beside the random baseline",
            ["I1", "I2", "|I1∩I2|", "o1", "o1 random", "o2", "o2 random", "jaccard", "jaccard random"],
            [[i, j, p.intersection, percent(p.o1), percent(p.o1_random), percent(p.o2), percent(p.o2_random),
              percent(p.jaccard), percent(p.jaccard_random)]
             for i in range(len(self.labels)) for j in range(i + 1, len(self.labels)) for p in [self.pair(i, j)]],
        )
        return [inputs, pairs]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "labels": self.labels,
            "sizes": self.sizes,
            "total": self.total,
            "pairs": [p.to_dict() for p in self.pairs()],
            "o1_matrix": self.matrix("o1"),
            "jaccard_matrix": self.matrix("jaccard"),
        }


def _universe(sets: Sequence[IndexSets], base: WeightSource | None) -> tuple[list[str], int]:
    """Parameter names to scan and ``n``: all of the base's, else the union of the inputs' (shapes must agree)."""
    shapes: dict[str, tuple[int, ...]] = {}
    owner: dict[str, str] = {}
    if base is not None:
        for name in base.names():
            shapes[name], owner[name] = base.shape(name), base.label
    for source in sets:
        for name in source.names():
            shape = source.shape(name)
            if name not in shapes:
                if base is not None:
                    raise ValueError(f"{source.label}: parameter {name} is not in the base {base.label}")
                shapes[name], owner[name] = shape, source.label
            elif shapes[name] != shape:
                raise ValueError(f"{name} has shape {shape} in {source.label} but {shapes[name]} in {owner[name]}")
    total = total_entries(base) if base is not None else sum(math.prod(s) for s in shapes.values())
    return sorted(shapes), total


def overlap_sets(sets: Sequence[IndexSets], base: WeightSource | None = None) -> OverlapResult:
    """Pairwise overlap of index sets, streamed one parameter at a time.

    Args:
        sets: Two or more index sets.
        base: When given, ``n`` counts every entry of the base; otherwise ``n`` is
            the number of entries of the parameters any input lists.
    """
    if len(sets) < 2:
        raise ValueError(f"overlap needs at least two inputs, got {len(sets)}")
    names, total = _universe(sets, base)
    k = len(sets)
    sizes = [0] * k
    inter = [[0] * k for _ in range(k)]
    listed = [set(s.names()) for s in sets]
    for name in names:
        current = [s.indices(name) if name in listed[i] else None for i, s in enumerate(sets)]
        for i in range(k):
            if current[i] is None:
                continue
            sizes[i] += int(current[i].numel())
            for j in range(i + 1, k):
                if current[j] is not None:
                    inter[i][j] += intersection_size(current[i], current[j])
    for i in range(k):
        inter[i][i] = sizes[i]
        for j in range(i):
            inter[i][j] = inter[j][i]
    return OverlapResult([s.label for s in sets], sizes, total, inter)


def subnetwork_overlap(
    inputs: Sequence[Spec],
    base: Spec | WeightSource | None = None,
    *,
    tol: float = 1e-5,
    delta_sets: Literal["stored", "changed"] = "stored",
    check_fingerprint: bool = True,
) -> OverlapResult:
    """Overlap of the subnetworks named by ``inputs`` (masks, deltas, run folders or fine-tuned weights).

    Args:
        inputs: Two or more specs (see :mod:`mthlib.analysis.sources`).
        base: The common base; required for weights, used for ``n`` when given.
        tol: An entry of fine-tuned weights is in the set when ``|θ - θ_base| > tol``.
        delta_sets: A delta's set is its ``"stored"`` entries, or the ``"changed"`` ones.
        check_fingerprint: Refuse a delta made from another base.
    """
    base_source = resolve_weights(base) if base is not None else None
    sets = [
        resolve_index_sets(spec, base_source, tol=tol, delta_sets=delta_sets, check_fingerprint=check_fingerprint)
        for spec in inputs
    ]
    return overlap_sets(sets, base_source)
