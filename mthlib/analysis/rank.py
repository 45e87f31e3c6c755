"""Rank of each 2-D update matrix ΔW = W1 - W0, as a percentage of full rank min(M, N).

Mukherjee et al. (arXiv:2505.11711, Table 2) report the mean over a model's update
matrices; RL updates are sparse yet nearly full-rank. Ranks come from
:func:`torch.linalg.matrix_rank` with NumPy's convention unless ``rtol`` is given:
singular values at most ``S.max() * max(M, N) * eps`` count as zero, where ``eps``
is the machine epsilon of the compute dtype (ΔW is formed in float64, then cast).
Keep the default float32 for fp32/bf16 weights: in float64 the rounding of the
stored values (W0 + ΔW rounded to the weight dtype) shows up as extra rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mthlib.analysis.naming import kind_order, parameter_kind, parameter_layer
from mthlib.analysis.report import Table
from mthlib.analysis.sources import Spec, WeightSource, check_same_parameters, resolve_weights

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class MatrixRank:
    """Rank of one update matrix.

    Attributes:
        name: Parameter name.
        layer: Layer group.
        kind: Parameter type.
        shape: ``(M, N)``.
        rank: Numerical rank of ΔW.
    """

    name: str
    layer: str
    kind: str
    shape: tuple[int, int]
    rank: int

    @property
    def full(self) -> int:
        """Largest possible rank, ``min(M, N)``."""
        return min(self.shape)

    @property
    def percent(self) -> float:
        """Rank as a percentage of ``min(M, N)``."""
        return 100.0 * self.rank / self.full


@dataclass
class RankResult:
    """Ranks of every analysed update matrix."""

    base: str
    finetuned: str
    tolerance: str
    matrices: list[MatrixRank] = field(default_factory=list)

    def mean_percent(self, kind: str | None = None) -> float:
        """Mean of rank percentages, over all matrices or one type (NaN when none)."""
        chosen = [m.percent for m in self.matrices if kind is None or m.kind == kind]
        return sum(chosen) / len(chosen) if chosen else float("nan")

    def tables(self) -> list[Table]:
        """Mean rank overall and per type, then every matrix."""
        kinds = kind_order({m.kind for m in self.matrices})
        summary = Table(
            f"Update rank (% of full) of {self.finetuned} vs {self.base} ({self.tolerance})",
            ["type", "matrices", "mean rank %"],
            [["all", len(self.matrices), self.mean_percent()]]
            + [[k, sum(m.kind == k for m in self.matrices), self.mean_percent(k)] for k in kinds],
        )
        detail = Table(
            "Rank per matrix",
            ["name", "shape", "rank", "full", "rank %"],
            [[m.name, "x".join(map(str, m.shape)), m.rank, m.full, m.percent] for m in self.matrices],
        )
        return [summary, detail]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        kinds = kind_order({m.kind for m in self.matrices})
        return {
            "base": self.base,
            "finetuned": self.finetuned,
            "tolerance": self.tolerance,
            "mean_percent": self.mean_percent(),
            "per_type": {k: self.mean_percent(k) for k in kinds},
            "matrices": [
                {"name": m.name, "layer": m.layer, "type": m.kind, "shape": list(m.shape),
                 "rank": m.rank, "full": m.full, "percent": m.percent}
                for m in self.matrices
            ],
        }


def update_rank(
    base: Spec | WeightSource,
    finetuned: Spec | WeightSource,
    *,
    include_embeddings: bool = False,
    rtol: float | None = None,
    dtype: Literal["float32", "float64"] = "float32",
    check_fingerprint: bool = True,
) -> RankResult:
    """Rank of every 2-D update matrix, one matrix in memory at a time.

    Args:
        base: The model before fine-tuning.
        finetuned: The model after; a delta or run folder is laid over ``base``.
        include_embeddings: Also rank the embedding and ``lm_head`` matrices (large SVDs).
        rtol: Relative tolerance on singular values; None uses ``max(M, N) * eps``.
        dtype: Compute dtype of the SVD (and of ``eps``).
        check_fingerprint: Refuse a delta made from another base.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, not {dtype!r}")
    base_source = resolve_weights(base)
    ft_source = resolve_weights(finetuned, base_source, check_fingerprint=check_fingerprint)
    check_same_parameters(base_source, ft_source)
    rule = f"rtol={rtol:g}" if rtol is not None else f"rtol=max(M,N)*eps({dtype})"
    result = RankResult(base_source.label, ft_source.label, rule)
    for name in base_source.names():
        kind = parameter_kind(name)
        if len(base_source.shape(name)) != 2 or (kind in ("embeddings", "lm_head") and not include_embeddings):
            continue
        update = (ft_source.get(name).to(torch.float64) - base_source.get(name).to(torch.float64)).to(_DTYPES[dtype])
        rank = int(torch.linalg.matrix_rank(update, rtol=rtol)) if bool(update.any()) else 0
        result.matrices.append(MatrixRank(name, parameter_layer(name), kind, tuple(update.shape), rank))
    return result
