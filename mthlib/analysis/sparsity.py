"""Update sparsity: the fraction of entries a fine-tune left unchanged, overall, per layer and per type.

Following Mukherjee et al., "Reinforcement Learning Finetunes Small Subnetworks in
Large Language Models" (NeurIPS 2025, arXiv:2505.11711), §2 and Table 6:
``sparsity(θ0, θ1) = 1 - nnz(|θ1 - θ0| > tol) / n`` at tolerances 1e-8 ... 1e-5
(the paper's default is 1e-5 on bf16 values). Both the stored values and a bf16
view are measured (see :mod:`mthlib.analysis.compare`, also for ``compare_dtype``).

Two choices decide whether the numbers match the paper's script (``check_sparsity.py``):

* ``layer_average``: a layer's sparsity is ``pooled`` by default, ``1 - changed / n`` over
  all entries of its parameters, so large matrices weigh more; the script reports the
  ``unweighted`` mean over the layer's parameters of each one's ``1 - changed / n``
  (its layer table also counts every non-zero bf16 difference, i.e. tolerance 0). Types
  and the overall figure are always pooled.
* ``compare_dtype``: ``float64`` compares the bf16 view's rounded values exactly;
  ``bf16`` takes their difference in bf16 and rounds the tolerance to bf16, as the script.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mthlib.analysis.compare import VIEWS, CompareDtype, View, check_compare_dtype, count_changed
from mthlib.analysis.naming import kind_order, layer_order, parameter_kind, parameter_layer
from mthlib.analysis.report import Table, percent
from mthlib.analysis.sources import Spec, WeightSource, check_same_parameters, resolve_weights

DEFAULT_TOLERANCES: tuple[float, ...] = (1e-8, 1e-7, 1e-6, 1e-5)
PAPER_TOLERANCE = 1e-5

LayerAverage = Literal["pooled", "unweighted"]
LAYER_AVERAGES: dict[str, str] = {
    "pooled": "pooled: 1 - changed / n over all entries of the layer's parameters",
    "unweighted": "unweighted: mean over the layer's parameters of 1 - changed / n, as the paper's script",
}
"""How a layer's sparsity is aggregated from its parameters, and the definition reports state."""

COMPARISONS: dict[str, str] = {
    "float64": "bf16 view compared in float64: |b - a| of the rounded values, exactly, against tol",
    "bf16": "bf16 view compared in bf16: |b - a| taken in bf16 against tol rounded to bf16, as the paper's script",
}
"""The arithmetic of the bf16 view for each ``compare_dtype``, as reports state it."""


@dataclass(frozen=True)
class ParamSparsity:
    """Changed-entry counts of one parameter.

    Attributes:
        name: Parameter name.
        layer: Layer group (see :func:`~mthlib.analysis.naming.parameter_layer`).
        kind: Parameter type (see :func:`~mthlib.analysis.naming.parameter_kind`).
        numel: Number of entries.
        changed: Per view, the number of changed entries at each tolerance.
    """

    name: str
    layer: str
    kind: str
    numel: int
    changed: dict[str, list[int]]


@dataclass
class SparsityResult:
    """Update sparsity of one fine-tune against its base, kept per parameter and aggregated on demand."""

    base: str
    finetuned: str
    tolerances: list[float]
    views: list[str]
    params: list[ParamSparsity] = field(default_factory=list)
    layer_average: LayerAverage = "pooled"
    compare_dtype: CompareDtype = "float64"

    @property
    def total(self) -> int:
        """Number of entries compared."""
        return sum(p.numel for p in self.params)

    def _select(self, layer: str | None = None, kind: str | None = None) -> list[ParamSparsity]:
        return [p for p in self.params if layer in (None, p.layer) and kind in (None, p.kind)]

    def changed(self, view: str, tol: float, layer: str | None = None, kind: str | None = None) -> int:
        """Number of changed entries, overall or within a layer and/or type."""
        i = self._tolerance_index(tol)
        return sum(p.changed[view][i] for p in self._select(layer, kind))

    def numel(self, layer: str | None = None, kind: str | None = None) -> int:
        """Number of entries, overall or within a layer and/or type."""
        return sum(p.numel for p in self._select(layer, kind))

    def sparsity(self, view: str, tol: float, layer: str | None = None, kind: str | None = None) -> float:
        """``1 - changed / n`` overall or within a layer and/or type (NaN when no parameter matches)."""
        n = self.numel(layer, kind)
        return 1.0 - self.changed(view, tol, layer, kind) / n if n else float("nan")

    def layer_sparsity(self, view: str, tol: float, layer: str) -> float:
        """A layer's sparsity as :attr:`layer_average` defines it (NaN when the layer has no entries).

        ``pooled`` is :meth:`sparsity` of the layer; ``unweighted`` the mean over the layer's
        parameters (those with entries) of each one's ``1 - changed / n``.
        """
        if self.layer_average == "pooled":
            return self.sparsity(view, tol, layer=layer)
        i = self._tolerance_index(tol)
        params = [p for p in self._select(layer=layer) if p.numel]
        return sum(1.0 - p.changed[view][i] / p.numel for p in params) / len(params) if params else float("nan")

    def groups(self, by: Literal["layer", "kind"]) -> list[str]:
        """Layer or type groups present, in report order."""
        present = {getattr(p, by) for p in self.params}
        return layer_order(present) if by == "layer" else kind_order(present)

    def paper_tolerance(self) -> float:
        """1e-5 when measured, else the largest tolerance."""
        return PAPER_TOLERANCE if PAPER_TOLERANCE in self.tolerances else max(self.tolerances)

    def _tolerance_index(self, tol: float) -> int:
        if tol not in self.tolerances:
            raise ValueError(f"tolerance {tol} was not measured (measured: {self.tolerances})")
        return self.tolerances.index(tol)

    def tables(self) -> list[Table]:
        """Overall sparsity per view, then per layer and per type for each view (percent).

        Titles name the definitions: the bf16 view's arithmetic (when measured) and each
        layer table's :attr:`layer_average`; type tables are pooled.
        """
        tols = self.tolerances
        headers = [f"tol={t:g}" for t in tols]
        arithmetic = f"; {COMPARISONS[self.compare_dtype]}" if "bf16" in self.views else ""
        overall = Table(
            f"Update sparsity (%) of {self.finetuned} vs {self.base}, n={self.total}{arithmetic}",
            ["view", *headers],
            [[view, *(percent(self.sparsity(view, t)) for t in self.tolerances)] for view in self.views],
        )
        tables = [overall]
        for view in self.views:
            rows = [[layer, self.numel(layer=layer), *(percent(self.layer_sparsity(view, t, layer)) for t in tols)]
                    for layer in self.groups("layer")]
            title = f"Sparsity (%) per layer, {view} view ({LAYER_AVERAGES[self.layer_average]})"
            tables.append(Table(title, ["layer", "n", *headers], rows))
        for view in self.views:
            rows = [[kind, self.numel(kind=kind), *(percent(self.sparsity(view, t, kind=kind)) for t in tols)]
                    for kind in self.groups("kind")]
            tables.append(Table(f"Sparsity (%) per type, {view} view (pooled)", ["type", "n", *headers], rows))
        return tables

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: inputs, totals, every aggregate and every parameter's counts."""

        def block(**group: str) -> dict[str, Any]:
            return {view: {f"{t:g}": self.sparsity(view, t, **group) for t in self.tolerances} for view in self.views}

        def layer_block(layer: str) -> dict[str, Any]:
            return {view: {f"{t:g}": self.layer_sparsity(view, t, layer) for t in self.tolerances}
                    for view in self.views}

        return {
            "base": self.base,
            "finetuned": self.finetuned,
            "tolerances": self.tolerances,
            "views": self.views,
            "compare_dtype": self.compare_dtype,
            "compare_definition": COMPARISONS[self.compare_dtype],
            "layer_average": self.layer_average,
            "layer_average_definition": LAYER_AVERAGES[self.layer_average],
            "total": self.total,
            "overall": block(),
            "per_layer": {g: layer_block(g) for g in self.groups("layer")},
            "per_type": {g: block(kind=g) for g in self.groups("kind")},
            "params": [
                {"name": p.name, "layer": p.layer, "type": p.kind, "numel": p.numel, "changed": p.changed}
                for p in self.params
            ],
        }


def update_sparsity(
    base: Spec | WeightSource,
    finetuned: Spec | WeightSource,
    tolerances: Sequence[float] = DEFAULT_TOLERANCES,
    views: Sequence[View] = VIEWS,
    *,
    check_fingerprint: bool = True,
    layer_average: LayerAverage = "pooled",
    compare_dtype: CompareDtype = "float64",
) -> SparsityResult:
    """Measure update sparsity, one parameter at a time (two tensors in memory at most).

    Args:
        base: The model before fine-tuning (θ0).
        finetuned: The model after (θ1); a delta or run folder is laid over ``base``.
        tolerances: Entries with ``|θ1 - θ0| > tol`` count as updated.
        views: ``"stored"`` and/or ``"bf16"`` (both sides rounded to bf16 first).
        check_fingerprint: Refuse a delta made from another base.
        layer_average: ``pooled`` or ``unweighted`` per-layer sparsity (see the module docstring).
        compare_dtype: ``float64`` or ``bf16``: the arithmetic of the bf16 view (see the module docstring).

    Raises:
        ValueError: Parameter names or shapes differ (the parameter is named), a delta
            belongs to another base, or an option has a value not allowed.
    """
    if not tolerances:
        raise ValueError("tolerances must list at least one value")
    for view in views:
        if view not in VIEWS:
            raise ValueError(f"views must be among {list(VIEWS)}, not {view!r}")
    if layer_average not in LAYER_AVERAGES:
        raise ValueError(f"layer_average must be one of {list(LAYER_AVERAGES)}, not {layer_average!r}")
    check_compare_dtype(compare_dtype, views)
    base_source = resolve_weights(base)
    ft_source = resolve_weights(finetuned, base_source, check_fingerprint=check_fingerprint)
    check_same_parameters(base_source, ft_source)
    result = SparsityResult(base_source.label, ft_source.label, [float(t) for t in tolerances], list(views),
                            layer_average=layer_average, compare_dtype=compare_dtype)
    arithmetic: dict[str, CompareDtype] = {view: compare_dtype if view == "bf16" else "float64" for view in views}
    for name in base_source.names():
        theta0, theta1 = base_source.get(name), ft_source.get(name)
        changed = {view: count_changed(theta0, theta1, result.tolerances, view, arithmetic[view]) for view in views}
        result.params.append(
            ParamSparsity(name, parameter_layer(name), parameter_kind(name), int(theta0.numel()), changed)
        )
    return result
