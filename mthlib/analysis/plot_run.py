"""``mth plot RUN_DIR``: PNG curves of a run from the ``metrics.csv`` its CSV logger wrote.

Lightning's :class:`~lightning.pytorch.loggers.CSVLogger` writes one row per logging call,
with a ``step`` column and an empty cell for every metric not logged in that row
(training and evaluation rows interleave). Each figure gathers the metrics one panel of
:data:`PANELS` names; a panel with no logged value draws nothing.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from mthlib.analysis.plots import curves_plot

Curves = dict[str, list[tuple[int, float]]]

PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("reward", "training reward and scores", ("reward", "rewards/")),
    ("loss", "loss", ("loss",)),
    ("kl", "KL to the base model", ("kl",)),
    ("val", "evaluation (greedy)", ("val/",)),
    ("timing", "seconds per step", ("timing/",)),
)
"""(file stem, title, metric names) of every figure; a name ending in ``/`` takes every metric under it."""


def read_metrics(path: str | os.PathLike) -> Curves:
    """Every metric of a CSV logger's ``metrics.csv`` as ``(step, value)`` points, in file order.

    Empty cells (a metric not logged in that row) and non-finite values are left out.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file has no ``step`` column, or a cell is not a number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a run's log folder, e.g. runs/quickstart/version_0")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if "step" not in (reader.fieldnames or ()):
            raise ValueError(f"{path} has no 'step' column (columns: {', '.join(reader.fieldnames or ())})")
        curves: Curves = {}
        for line, row in enumerate(reader, start=2):
            for name, cell in row.items():
                if name in ("step", "epoch") or not cell:
                    continue
                try:
                    step, value = int(row["step"]), float(cell)
                except ValueError:
                    raise ValueError(f"{path}:{line}: {name}={cell!r} (step {row['step']!r}) is not a number") from None
                if math.isfinite(value):
                    curves.setdefault(name, []).append((step, value))
    return curves


def panel_curves(curves: Curves, names: tuple[str, ...]) -> Curves:
    """The curves one panel draws: exact names, and every metric under a name ending in ``/``."""
    return {key: points for key, points in curves.items()
            if key in names or any(name.endswith("/") and key.startswith(name) for name in names)}


def plot_run(run_dir: str, out: str | None = None) -> None:
    """Draw PNG curves of a run from its ``metrics.csv``: reward and scores, loss, KL, evaluation, step time.

    One figure per panel with logged values: ``reward.png`` (``reward`` and ``rewards/*``),
    ``loss.png``, ``kl.png`` (runs with ``beta > 0``), ``val.png`` (``val/*``) and
    ``timing.png`` (``timing/*``). Each file is written atomically.

    Args:
        run_dir: A run's log folder, the one holding ``metrics.csv`` (e.g. ``runs/quickstart/version_0``).
        out: Folder for the PNG files (default: ``RUN_DIR/plots``).
    """
    curves = read_metrics(Path(run_dir) / "metrics.csv")
    folder = Path(out) if out is not None else Path(run_dir) / "plots"
    written = []
    for stem, title, names in PANELS:
        chosen = panel_curves(curves, names)
        if chosen:
            path = curves_plot(chosen, title, folder / f"{stem}.png")
            if path is None:
                raise ValueError("matplotlib is not installed: pip install matplotlib")
            written.append(path)
    if not written:
        raise ValueError(f"{Path(run_dir) / 'metrics.csv'} holds none of the plotted metrics (reward, loss, kl, val/*, "
                         "timing/*) with a finite value")
    for path in written:
        print(f"wrote {path}")
