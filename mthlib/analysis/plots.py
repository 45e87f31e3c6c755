"""PNG figures of analysis results; matplotlib is optional (``pip install mthlib[plot]``).

matplotlib is imported only when a figure is drawn, through its object API (no
pyplot, no global backend change). Without it, each function warns once and
returns None.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mthlib.analysis.consecutive import ConsecutiveResult
from mthlib.analysis.overlap import OverlapResult
from mthlib.analysis.sparsity import SparsityResult
from mthlib.utils import atomic_path


def _figure(width: float, height: float) -> Any | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping PNG plots (pip install matplotlib)", stacklevel=3)
        return None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path


def heatmap(
    values: Sequence[Sequence[float]], rows: Sequence[str], columns: Sequence[str], title: str, path: str | os.PathLike
) -> Path | None:
    """Draw an annotated heatmap (NaN cells blank) to ``path``; None without matplotlib."""
    figure = _figure(max(4.0, 0.7 * len(columns) + 2.0), max(3.0, 0.35 * len(rows) + 1.5))
    if figure is None:
        return None
    axes = figure.add_subplot()
    image = axes.imshow([list(r) for r in values], aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(columns)), labels=list(columns), rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), labels=list(rows))
    axes.set_title(title)
    if len(rows) * len(columns) <= 400:
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    color = "black" if image.norm(value) > 0.6 else "white"
                    axes.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=7)
    figure.colorbar(image, ax=axes)
    return _save(figure, Path(path))


def sparsity_heatmaps(result: SparsityResult, out: str | os.PathLike) -> list[Path]:
    """One layer x type heatmap of sparsity (%) per view, at the paper's tolerance."""
    tol = result.paper_tolerance()
    layers, kinds = result.groups("layer"), result.groups("kind")
    written = []
    for view in result.views:
        grid = [[100.0 * result.sparsity(view, tol, layer, kind) for kind in kinds] for layer in layers]
        path = heatmap(grid, layers, kinds, f"Update sparsity (%), {view} view, tol={tol:g}",
                       Path(out) / f"sparsity_{view}.png")
        if path is not None:
            written.append(path)
    return written


def overlap_heatmaps(result: OverlapResult, out: str | os.PathLike) -> list[Path]:
    """Heatmaps of the pairwise o1 and Jaccard matrices (%)."""
    labels = [f"{i}: {Path(label).name or label}" for i, label in enumerate(result.labels)]
    written = []
    for metric in ("o1", "jaccard"):
        grid = [[100.0 * v for v in row] for row in result.matrix(metric)]
        path = heatmap(grid, labels, labels, f"{metric} (%)", Path(out) / f"overlap_{metric}.png")
        if path is not None:
            written.append(path)
    return written


def consecutive_plot(result: ConsecutiveResult, out: str | os.PathLike) -> list[Path]:
    """Line plot of the share of the model changed at each transition (%)."""
    figure = _figure(6.0, 3.5)
    if figure is None:
        return []
    axes = figure.add_subplot()
    axes.plot([t.end for t in result.transitions], [100.0 * t.changed / result.total for t in result.transitions],
              marker="o")
    axes.set_xlabel("step")
    axes.set_ylabel("entries changed since previous checkpoint (%)")
    axes.set_title(f"tol={result.tol:g}")
    return [_save(figure, Path(out) / "consecutive.png")]


def curves_plot(
    curves: Mapping[str, Sequence[tuple[float, float]]], title: str, path: str | os.PathLike
) -> Path | None:
    """Line plot of named ``(step, value)`` curves on one set of axes; None without matplotlib.

    Curves of 20 points or fewer (e.g. evaluations) get markers.
    """
    figure = _figure(6.0, 3.5)
    if figure is None:
        return None
    axes = figure.add_subplot()
    for name, points in curves.items():
        steps, values = zip(*points)
        axes.plot(steps, values, label=name, marker="o" if len(points) <= 20 else None, markersize=3)
    axes.set_xlabel("step")
    axes.set_title(title)
    axes.legend(fontsize=8)
    return _save(figure, Path(path))


Band = tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[float]]
"""``(steps, means, lows, highs)`` of one curve drawn with a shaded band."""


def band_plot(curves: Mapping[str, Band], title: str, path: str | os.PathLike) -> Path | None:
    """Mean curves against step, each with a shaded band from its lows to its highs; None without matplotlib."""
    figure = _figure(6.0, 3.5)
    if figure is None:
        return None
    axes = figure.add_subplot()
    for name, (steps, means, lows, highs) in curves.items():
        (line,) = axes.plot(steps, means, label=name, marker="o" if len(steps) <= 20 else None, markersize=3)
        axes.fill_between(steps, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("step")
    axes.set_title(title)
    axes.legend(fontsize=8)
    return _save(figure, Path(path))


def errorbar_plot(
    series: Mapping[str, Sequence[tuple[float, float, float]]], xlabel: str, ylabel: str, title: str,
    path: str | os.PathLike, log_x: bool = False,
) -> Path | None:
    """One line of ``(x, mean, error)`` points per named series, with error bars; None without matplotlib.

    A NaN error (one sample) draws no bar.
    """
    figure = _figure(6.0, 4.0)
    if figure is None:
        return None
    axes = figure.add_subplot()
    for name, points in series.items():
        xs, means, errors = zip(*sorted(points))
        axes.errorbar(xs, means, yerr=[0.0 if math.isnan(e) else e for e in errors], label=name, marker="o",
                      markersize=4, capsize=3)
    if log_x:
        axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8)
    return _save(figure, Path(path))
