"""``mth report RUNS_DIR``: one page that puts the runs of a sweep side by side.

The runs are read and grouped over seeds by :mod:`mthlib.analysis.runs`. The report holds

* the final evaluation of every group: per ``val/*`` metric, the mean and sample standard
  deviation (n - 1) over the group's runs of each run's last logged value, with the number of
  runs, the strategy, its configured sparsity and the learning rate;
* the evaluation reward against the learning rate, one line per strategy setting;
* training curves per group (``reward`` and ``rewards/*``): the mean over seeds at each step,
  with a band from the lowest to the highest seed;
* the pairwise overlap of the masked runs' subnetworks, exactly as ``mth analyze overlap``
  computes it on the same inputs (each run's newest delta, or the mask file its ``file``
  strategy names), with the Jaccard random baseline;
* optionally, update sparsity as ``mth analyze sparsity`` measures it.

Nothing is computed twice: overlap is :func:`~mthlib.analysis.overlap.subnetwork_overlap`,
update sparsity :func:`~mthlib.analysis.sparsity.update_sparsity`, the pages
:func:`~mthlib.analysis.report.write_report`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mthlib.analysis.compare import VIEWS
from mthlib.analysis.overlap import OverlapResult, subnetwork_overlap
from mthlib.analysis.plot_run import panel_curves
from mthlib.analysis.plots import band_plot, errorbar_plot, heatmap
from mthlib.analysis.report import Part, Section, Table, percent, render_text, write_report
from mthlib.analysis.runs import SEED_KEYS, Run, RunGroup, find_runs, group_runs, varying_keys
from mthlib.analysis.sources import WeightSource, resolve_weights
from mthlib.analysis.sparsity import PAPER_TOLERANCE, SparsityResult, update_sparsity
from mthlib.utils import safetensors_metadata

VAL_METRICS = ("reward", "format", "similarity", "accuracy", "order", "copy", "one_per_line")
"""Evaluation metrics in table order; any other ``val/*`` metric follows, by name."""

METRIC_HEADERS = {"format": "format (tag rate)", "accuracy": "accuracy (exact sort)"}
"""Column names of metrics whose name alone does not say what they count."""

TRAIN_CURVES = ("reward", "rewards/")
"""The training metrics drawn per group (as :func:`~mthlib.analysis.plot_run.panel_curves` selects them)."""

OWN_COLUMNS = ("model.learning_rate", "model.mask", "model.mask.init_args.sparsity")
"""Setting keys the final table shows in columns of their own."""

JACCARD_BASELINE = "d1·d2 / (d1 + d2 − d1·d2)"


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (NaN for one value) of ``n`` values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        """The statistics of ``values`` (None when there is none)."""
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values))

    def cell(self, digits: int = 4) -> str:
        """``mean ± std`` with ``digits`` decimals (the mean alone for one value)."""
        return f"{self.mean:.{digits}f}" if math.isnan(self.std) else f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass
class SweepReport:
    """The groups of a folder of runs and what was measured on them; :meth:`parts` is the page."""

    runs_dir: str
    seed_keys: list[str]
    groups: list[RunGroup]
    overlap: OverlapResult | None = None
    update_sparsity: dict[str, SparsityResult] | None = None
    figures: dict[str, list[Section]] = field(default_factory=dict)

    def val_metrics(self) -> list[str]:
        """The ``val/*`` metrics any run logged, without the prefix, in table order."""
        logged = {name.removeprefix("val/") for g in self.groups for r in g.runs for name in r.metrics
                  if name.startswith("val/")}
        return [m for m in VAL_METRICS if m in logged] + sorted(logged - set(VAL_METRICS))

    def final(self, group: RunGroup, metric: str) -> Stat | None:
        """Statistics over the group's runs of the last logged ``val/<metric>`` (runs that logged it)."""
        return Stat.of([value for run in group.runs if (value := run.last(f"val/{metric}")) is not None])

    def label(self, group: RunGroup, learning_rate: bool = True) -> str:
        """The group as a short line: strategy, sparsity, the other keys that vary, and the learning rate."""
        words = [group.strategy.label]
        if group.strategy.label != "full" and group.strategy.sparsity is not None:
            words.append(f"{group.strategy.sparsity:g}")
        words += [f"{key}={group.setting.get(key)}" for key in self.other_keys]
        if learning_rate and group.learning_rate is not None:
            words.append(f"lr={group.learning_rate:g}")
        return " ".join(words)

    @functools.cached_property
    def other_keys(self) -> list[str]:
        """The setting keys that differ between groups, besides strategy, sparsity and learning rate.

        A mask argument counts only where it differs between groups of one strategy: that two
        strategies take different arguments is what their names already say.
        """
        by_strategy: dict[str, list[RunGroup]] = {}
        for group in self.groups:
            by_strategy.setdefault(group.strategy.label, []).append(group)
        mask_keys = {key for same in by_strategy.values() for key in varying_keys(same)
                     if key.startswith("model.mask.")}
        return [key for key in varying_keys(self.groups)
                if key not in OWN_COLUMNS and (not key.startswith("model.mask.") or key in mask_keys)]

    def _final_table(self) -> Table:
        metrics, others = self.val_metrics(), self.other_keys
        rows = [[i, g.strategy.label, _number(g.strategy.sparsity), _number(g.learning_rate),
                 *([", ".join(f"{k}={g.setting.get(k)}" for k in others)] if others else []), len(g.runs),
                 *((stat.cell() if (stat := self.final(g, m)) else None) for m in metrics)]
                for i, g in enumerate(self.groups, start=1)]
        headers = ["#", "strategy", "sparsity", "learning rate", *(["setting"] if others else []), "seeds",
                   *(METRIC_HEADERS.get(m, m) for m in metrics)]
        return Table("Final evaluation: last logged val/* metric, mean ± sample std over seeds", headers, rows)

    def _runs_table(self) -> Table:
        rows = [[run.name, i, ", ".join(f"{k}={v}" for k, v in run.seeds(self.seed_keys).items()),
                 len(run.versions), max((s for points in run.metrics.values() for s, _ in points), default=None),
                 run.last("val/reward")]
                for i, g in enumerate(self.groups, start=1) for run in g.runs]
        return Table("Runs (versions of a resumed run joined)", ["run", "#", "seeds", "versions", "last step",
                                                                 "val/reward"], rows)

    def _sparsity_table(self) -> Table:
        group_of = {run.name: (i, g) for i, g in enumerate(self.groups, start=1) for run in g.runs}
        rows = [[name, group_of[name][0], os.path.relpath(result.finetuned, self.runs_dir), result.base,
                 result.total, percent(group_of[name][1].strategy.sparsity),
                 *(percent(result.sparsity(view, PAPER_TOLERANCE)) for view in result.views)]
                for name, result in (self.update_sparsity or {}).items()]
        return Table(f"Update sparsity (%), 1 − nnz(|θ1 − θ0| > {PAPER_TOLERANCE:g}) / n over every entry of the "
                     "base (mth analyze sparsity)",
                     ["run", "#", "measured", "base", "n", "mask sparsity", *(f"{v} view" for v in VIEWS)], rows)

    def tables(self) -> list[Table]:
        """The final evaluation, the runs, the overlap tables and update sparsity (what was measured)."""
        tables = [self._final_table(), self._runs_table()]
        if self.overlap is not None:
            tables += self.overlap.tables()
        if self.update_sparsity:
            tables.append(self._sparsity_table())
        return tables

    def parts(self) -> list[Part]:
        """The page: the tables, each figure after the table it illustrates, and what was not measured."""
        parts: list[Part] = [self._final_table(), self._runs_table(), *self.figures.get("learning_rate", []),
                             *self.figures.get("curves", [])]
        if self.overlap is not None:
            parts += [*self.overlap.tables(), *self.figures.get("overlap", [])]
        else:
            parts.append(Section("Mask overlap (Jaccard)",
                                 "Fewer than two runs saved a delta or name a mask file: nothing to compare."))
        if self.update_sparsity:
            parts.append(self._sparsity_table())
        elif self.update_sparsity is None:
            parts.append(Section("Update sparsity", "Not measured: mth report --sparsity true measures each run's "
                                 "newest delta (a full run: its model/ folder) against its base, as mth analyze "
                                 "sparsity does, reading every weight of the base."))
        else:
            parts.append(Section("Update sparsity", "No run saved a delta or a model/ folder: nothing to measure."))
        return parts

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: every group with its runs and statistics, the overlap and update sparsity."""
        return {
            "runs_dir": self.runs_dir,
            "seed_keys": self.seed_keys,
            "groups": [{"index": i, "label": self.label(g), "strategy": g.strategy.label,
                        "sparsity": g.strategy.sparsity, "learning_rate": g.learning_rate, "setting": g.setting,
                        "runs": [run.name for run in g.runs],
                        "val": {m: dataclasses.asdict(s) for m in self.val_metrics() if (s := self.final(g, m))}}
                       for i, g in enumerate(self.groups, start=1)],
            "overlap": self.overlap.to_dict() if self.overlap is not None else None,
            "update_sparsity": None if self.update_sparsity is None else {
                name: {"base": r.base, "finetuned": r.finetuned, "total": r.total,
                       **{view: r.sparsity(view, PAPER_TOLERANCE) for view in r.views}}
                for name, r in self.update_sparsity.items()},
            "figures": {kind: [s.image for s in sections] for kind, sections in self.figures.items()},
        }


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def _drawn(path: Path | None) -> Path:
    if path is None:
        raise ValueError("matplotlib is not installed: pip install matplotlib")
    return path


def learning_rate_figure(report: SweepReport, out: Path) -> list[Section]:
    """``val/reward`` against the learning rate (log scale), one line per setting, error bars ± std over seeds."""
    series: dict[str, list[tuple[float, float, float]]] = {}
    for group in report.groups:
        stat = report.final(group, "reward")
        if stat is not None and isinstance(group.learning_rate, (int, float)) and group.learning_rate > 0:
            series.setdefault(report.label(group, learning_rate=False), []).append(
                (float(group.learning_rate), stat.mean, stat.std))
    title = "Evaluation reward against learning rate"
    if not series:
        return [Section(title, "No run logged val/reward at a positive learning rate: nothing to draw.")]
    _drawn(errorbar_plot(series, "learning rate", "val/reward (last)", "val/reward, mean ± std over seeds",
                         out / "reward_vs_lr.png", log_x=True))
    return [Section(title, "Each point: the mean over seeds of the last logged val/reward; bars: ± sample std.",
                    "reward_vs_lr.png")]


def _band(runs: Sequence[Run], metric: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per step any run logged ``metric`` at: the mean, lowest and highest value over the runs that did."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for step, value in dict(run.metrics.get(metric, [])).items():
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return (steps, [statistics.fmean(by_step[s]) for s in steps], [min(by_step[s]) for s in steps],
            [max(by_step[s]) for s in steps])


def curve_figures(report: SweepReport, out: Path) -> list[Section]:
    """One figure per group: ``reward`` and ``rewards/*`` against step, the mean over seeds with a min–max band."""
    sections = []
    for i, group in enumerate(report.groups, start=1):
        names = sorted({name for run in group.runs for name in panel_curves(run.metrics, TRAIN_CURVES)})
        if not names:
            continue
        label = report.label(group)
        _drawn(band_plot({name: _band(group.runs, name) for name in names}, f"#{i} {label}",
                         out / f"curves_{i}.png"))
        sections.append(Section(f"Training curves of #{i}: {label}",
                                f"Mean over {len(group.runs)} seed(s) at each step; band: lowest to highest seed.",
                                f"curves_{i}.png"))
    return sections


def mask_overlap(groups: Sequence[RunGroup]) -> OverlapResult | None:
    """``mth analyze overlap`` of the masked runs' subnetworks, labelled by run; None with fewer than two.

    A run's subnetwork is its newest delta's stored entries, else the mask file its ``file``
    strategy names; a run with neither (a full run) is left out.
    """
    inputs = []
    for group in groups:
        for run in group.runs:
            mask_file = group.strategy.mask_file
            source = run.latest_delta() or (mask_file if mask_file is not None and mask_file.is_file() else None)
            if source is not None:
                inputs.append((run.name, source))
    if len(inputs) < 2:
        return None
    result = subnetwork_overlap([os.fspath(path) for _, path in inputs])
    return dataclasses.replace(result, labels=[name for name, _ in inputs])


def jaccard_grid(result: OverlapResult) -> list[list[float]]:
    """The pairwise Jaccard (%) of ``result``: measured above the diagonal, the random baseline below, NaN on it."""
    k = len(result.labels)
    return [[math.nan if i == j else 100.0 * (p.jaccard if i < j else p.jaccard_random)
             for j in range(k) for p in [result.pair(min(i, j), max(i, j))]] for i in range(k)]


def overlap_figure(result: OverlapResult, out: Path) -> list[Section]:
    """Heatmap of :func:`jaccard_grid`, the runs labelled by their index in the overlap tables."""
    labels = [f"{i}: {label}" for i, label in enumerate(result.labels)]
    _drawn(heatmap(jaccard_grid(result), labels, labels, "Jaccard (%): measured above the diagonal, random below",
                   out / "jaccard.png"))
    return [Section("Mask overlap (Jaccard)",
                    f"|A∩B| / |A∪B| of the runs' masks above the diagonal; below it, the expected Jaccard of two "
                    f"independent uniform masks of the same densities d1, d2: {JACCARD_BASELINE}. Densities count "
                    f"the n={result.total} entries of the parameters the masks name.", "jaccard.png")]


def measure_update_sparsity(groups: Sequence[RunGroup]) -> dict[str, SparsityResult]:
    """Update sparsity of every run that saved weights, as ``mth analyze sparsity --base BASE --finetuned X``.

    X is the run's newest delta, laid over the base it records (``base_model``, fingerprint
    checked), or a full run's ``model/`` folder against its ``model.model_name_or_path``. Each
    distinct base is opened once; each measurement reads every weight of it.
    """
    bases: dict[str, WeightSource] = {}
    results = {}
    for group in groups:
        for run in group.runs:
            delta, model = run.latest_delta(), run.final_model()
            if delta is not None:
                spec, base = delta, safetensors_metadata(delta)["base_model"]
            elif model is not None:
                spec, base = model, str(run.config["model"]["model_name_or_path"])
            else:
                continue
            if base not in bases:
                bases[base] = resolve_weights(base)
            results[run.name] = update_sparsity(bases[base], spec, (PAPER_TOLERANCE,), VIEWS)
    return results


def report(
    runs_dir: str,
    out: str | None = None,
    sparsity: bool = False,
    seed_keys: Sequence[str] = SEED_KEYS,
) -> SweepReport:
    """Put the runs under RUNS_DIR side by side: evaluation over seeds, reward vs learning rate, curves, mask overlap.

    Every folder under RUNS_DIR holding config.yaml and metrics.csv is a run (the version_N
    folders of one parent are one resumed run); runs whose configs differ only in the seed
    keys (and where they log or resumed from) form a group. Writes report.md, report.html,
    report.json and PNG figures; see :mod:`mthlib.analysis.runs` for the grouping rule.

    Args:
        runs_dir: A sweep's out folder, or any folder of runs (searched at any depth).
        out: Folder for the report and its figures (default: RUNS_DIR/report).
        sparsity: Also measure each run's update sparsity at tol 1e-5 against its base, as mth analyze
            sparsity does (reads every weight of the base once per run; off by default).
        seed_keys: Config keys that only seed a run, e.g. '[seed_everything, model.mask.init_args.seed, data.seed]'.
    """
    root = Path(runs_dir)
    folder = Path(out) if out is not None else root / "report"
    result = SweepReport(str(root), list(seed_keys), group_runs(find_runs(root), seed_keys))
    folder.mkdir(parents=True, exist_ok=True)
    result.figures["learning_rate"] = learning_rate_figure(result, folder)
    result.figures["curves"] = curve_figures(result, folder)
    result.overlap = mask_overlap(result.groups)
    if result.overlap is not None:
        result.figures["overlap"] = overlap_figure(result.overlap, folder)
    if sparsity:
        result.update_sparsity = measure_update_sparsity(result.groups)
    print(render_text(result.tables()), end="")
    written = write_report(result, folder, "report", parts=result.parts(), heading=f"Sweep report: {root}",
                           html_page=True)
    images = [folder / s.image for sections in result.figures.values() for s in sections if s.image]
    print(f"wrote {', '.join(os.fspath(p) for p in [*written, *images])}")
    return result
