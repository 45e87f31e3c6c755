"""Render the docs' measured-results fragments, ``docs/_generated/<name>.rst``, from ``docs/data/<name>/``.

``quickstart_curve`` (included by ``quickstart.rst``)
    ``metrics.csv`` is the quickstart run's ``runs/quickstart/version_N/metrics.csv`` as
    Lightning's CSVLogger writes it, trimmed to the columns shown; ``measurement.json``
    holds the command, machine, wall time, peak RSS, evaluation size and versions.
``tickets_repro`` (included by ``tutorials/reproducing.rst``)
    ``report.json``, ``reward_vs_lr.png`` and ``jaccard.png`` are what ``mth report runs/tickets
    --out reports/tickets --sparsity true`` wrote after the two sweeps; ``measurement.json`` holds
    the machine, the versions, the steps per run and the grid's wall time.
``measuring_results`` (included by ``tutorials/measuring.rst``)
    ``sparsity.json`` and ``rank.json`` are what ``mth analyze sparsity|rank --out`` write,
    trimmed to the summaries (``params`` dropped, ``matrices`` replaced by its length);
    ``measurement.json`` describes the fine-tune and holds the commands.

After a new measurement, copy the tool's output over the data file, update
``measurement.json``, and build the docs (``docs/conf.py`` runs :func:`write_fragments`)
or run ``python docs/generate.py``. The fragments are never committed.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mthlib.analysis.plot_run import read_metrics
from mthlib.analysis.sweep_report import Stat
from mthlib.analysis.sparsity import PAPER_TOLERANCE
from mthlib.utils import atomic_write_text

DOCS = Path(__file__).resolve().parent
DATA = DOCS / "data"
GENERATED = DOCS / "_generated"

CURVE_HEADERS = ["step", "reward", "answer tag present", "similarity (0 without tag)", "step s", "generation s"]
VIEW_LABELS = {"stored": "stored (fp32)", "bf16": "bf16"}


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``."""
    return json.loads(path.read_text(encoding="utf-8"))


def short_float(value: float) -> str:
    """``value`` as ``%g`` without the exponent's leading zeros: 1e-08 -> ``1e-8``."""
    text = f"{value:g}"
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def duration(seconds: float) -> str:
    """Wall time as ``3 min 47 s``."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def list_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A reStructuredText ``list-table`` with one header row."""
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [headers, *rows]:
        lines.append(f"   * - {row[0]}")
        lines.extend(f"     - {cell}" for cell in row[1:])
    return "\n".join(lines)


@dataclass(frozen=True)
class Curve:
    """The quickstart's measured curve, every number formatted as the docs print it.

    Attributes:
        rows: One row per training step, in the order of :data:`CURVE_HEADERS`.
        evaluation: Final evaluation: ``reward``, ``format`` and ``accuracy``.
        measurement: The contents of ``measurement.json``.
    """

    rows: list[list[str]]
    evaluation: dict[str, str]
    measurement: dict[str, Any]


def read_curve(folder: Path) -> Curve:
    """The curve in ``folder/metrics.csv`` and its context; CSVLogger's 0-based ``step`` is shown from 1.

    Training rows are those with a ``reward``; the evaluation is the last row with a ``val/reward``.
    """
    with (folder / "metrics.csv").open(newline="", encoding="utf-8") as f:
        metrics = list(csv.DictReader(f))
    rows = [
        [str(int(m["step"]) + 1), f"{float(m['reward']):.2f}", f"{float(m['rewards/format']):.0%}",
         f"{float(m['rewards/similarity']):.2f}", f"{float(m['timing/step_s']):.1f}",
         f"{float(m['timing/generation_s']):.1f}"]
        for m in metrics if m["reward"]
    ]
    final = [m for m in metrics if m["val/reward"]][-1]
    evaluation = {"reward": f"{float(final['val/reward']):.2f}", "format": f"{float(final['val/format']):.0%}",
                  "accuracy": f"{float(final['val/accuracy']):.0%}"}
    return Curve(rows, evaluation, read_json(folder / "measurement.json"))


def versions(measurement: dict[str, Any]) -> str:
    """The package versions of a measurement: ``torch 2.13.0, transformers 5.23``."""
    return ", ".join(f"{name} {version}" for name, version in measurement["versions"].items())


def render_quickstart_curve(folder: Path) -> str:
    """The reward curve of the quickstart run, with its wall time, memory and final evaluation."""
    curve = read_curve(folder)
    m, ev = curve.measurement, curve.evaluation
    return f"""Measured reward curve
---------------------

Measured on a {m['machine']} (``{m['command']}`` as shipped, {duration(m['wall_s'])} wall,
peak RSS {m['peak_rss_gib']} GiB; {versions(m)}):

{list_table(CURVE_HEADERS, curve.rows)}

Evaluation at the end ({m['eval_prompts']} held-out prompts, greedy decoding): reward {ev['reward']}, answer tag present
in {ev['format']}, exact sorts {ev['accuracy']}. The rise is format learning; sorting itself needs far longer runs.
"""


def matrix_count(rank: dict[str, Any]) -> int:
    """Matrices ranked: the tool's ``matrices`` list, or its length in a trimmed copy."""
    matrices = rank["matrices"]
    return matrices if isinstance(matrices, int) else len(matrices)


def sparsity_table(sparsity: dict[str, Any]) -> str:
    """Overall update sparsity (%) per view and tolerance."""
    tolerances = sparsity["tolerances"]
    rows = [
        [VIEW_LABELS[view], *(f"{100 * sparsity['overall'][view][f'{t:g}']:.2f}" for t in tolerances)]
        for view in sparsity["views"]
    ]
    return list_table(["view", *(f"tol {short_float(t)}" for t in tolerances)], rows)


def rank_table(rank: dict[str, Any]) -> str:
    """Mean rank (% of full) over all matrices and per type."""
    means = {"all": rank["mean_percent"], **rank["per_type"]}
    return list_table(["type", *means], [["mean rank %", *(f"{round(v, 2):g}" for v in means.values())]])


def render_measuring_results(folder: Path) -> str:
    """Update sparsity and rank of the tutorial's short full fine-tune, with the figures."""
    m = read_json(folder / "measurement.json")
    sparsity, rank = read_json(folder / "sparsity.json"), read_json(folder / "rank.json")
    tag = m["answer_tag_rate"]
    paper_tol = short_float(PAPER_TOLERANCE)
    bf16_unchanged = sparsity["overall"]["bf16"][f"{PAPER_TOLERANCE:g}"]
    threshold = "S.max() * " + rank["tolerance"].removeprefix("rtol=").replace("*", " * ").replace(",", ", ")
    commands = "\n".join(f"   {command}" for command in m["commands"])
    return f"""Measured on the embedded model
------------------------------

The short full fine-tune above ({m['steps']} GRPO steps, learning rate {short_float(m['learning_rate'])}, every weight trainable, fp32 AdamW;
the answer-tag rate rose from {tag['first_step']:.0%} to {tag['last_step']:.0%}), measured on a {m['machine']} with

.. code-block:: bash

{commands}

Update sparsity (% of the {sparsity['total']:,} entries left unchanged):

{sparsity_table(sparsity)}

In fp32 AdamW moves almost every entry a little (its normalised update is about the learning rate
whatever the gradient's size), so the stored view is nearly dense. Rounded to bfloat16, the
precision the paper's models train in, {bf16_unchanged:.0%} of the entries did not change: the sparsity the paper
reports is largely a property of that precision. Per layer and parameter type (bf16 view):

.. image:: /_static/measuring/sparsity_bf16.png
   :alt: Update sparsity per layer and parameter type, bf16 view, tolerance {paper_tol}
   :width: 600px

and in the stored view:

.. image:: /_static/measuring/sparsity_stored.png
   :alt: Update sparsity per layer and parameter type, stored view, tolerance {paper_tol}
   :width: 600px

Rank of the update (threshold ``{threshold}``), {matrix_count(rank)} matrices:

{rank_table(rank)}

As the paper finds, the update is sparse (in bf16) yet nearly full rank.
"""


SKILL_KEYS = ("reward", "format", "similarity", "accuracy", "order", "copy", "one_per_line")


def render_skill_curve(folder: Path) -> str:
    """``configs/skill.yaml``'s run: greedy evaluations before and during training, training windows of five steps."""
    m = read_json(folder / "measurement.json")
    base, run = read_metrics(folder / "base_metrics.csv"), read_metrics(folder / "metrics.csv")
    evaluations = [("before training", {key: base[f"val/{key}"][-1][1] for key in SKILL_KEYS})] + [
        (f"after step {step + 1}", {key: dict(run[f"val/{key}"])[step] for key in SKILL_KEYS})
        for step, _ in run["val/reward"]]
    eval_rows = [[label, *(f"{values[key]:.3f}" for key in SKILL_KEYS)] for label, values in evaluations]
    columns = [[value for _, value in run["reward" if key == "reward" else f"rewards/{key}"]] for key in SKILL_KEYS]
    seconds = [value for _, value in run["timing/step_s"]]
    window_rows = []
    for start in range(0, len(seconds), 5):
        means = [sum(values[start:start + 5]) / len(values[start:start + 5]) for values in [*columns, seconds]]
        window_rows.append([f"{start + 1}-{min(start + 5, len(seconds))}", *(f"{v:.2f}" for v in means[:-1]),
                            f"{means[-1]:.0f}"])
    return f"""Measured on a {m['machine']} (``{m['command']}`` as shipped, {duration(m['wall_s'])} wall for
{len(seconds)} steps and {len(evaluations) - 1} evaluations, peak RSS {m['peak_rss_gib']} GiB; {versions(m)}). Greedy
evaluation on {m['eval_prompts']} prompts, before training (``{m['base_command']}``) and every
{m['eval_every']} steps:

{list_table(["evaluation", *SKILL_KEYS], eval_rows)}

Training, means over windows of five steps (16 completions of 2 prompts a step):

{list_table(["steps", *SKILL_KEYS, "s/step"], window_rows)}
"""


TICKET_METRICS = ("reward", "format", "similarity", "accuracy", "order", "copy")


def stat_cell(stat: dict[str, Any] | None) -> str:
    """A ``report.json`` statistic as the report prints it, with 3 decimals (``-`` for none).

    JSON keeps a single run's undefined standard deviation as ``null``.
    """
    if stat is None:
        return "-"
    return Stat(stat["mean"], math.nan if stat["std"] is None else stat["std"], stat["n"]).cell(digits=3)


def render_tickets_repro(folder: Path) -> str:
    """The multiple-tickets grid: ``mth report``'s final evaluations, mask overlaps and update sparsity.

    The base model's row is ``skill_curve``'s ``base_metrics.csv``: the same 64 evaluation prompts, before training.
    """
    m, report = read_json(folder / "measurement.json"), read_json(folder / "report.json")
    base = read_metrics(DATA / "skill_curve" / "base_metrics.csv")
    rows = [["base model (no training)", "-", *(f"{base[f'val/{key}'][-1][1]:.3f}" for key in TICKET_METRICS)]]
    rows += [[group["label"], str(len(group["runs"])), *(stat_cell(group["val"].get(key)) for key in TICKET_METRICS)]
             for group in report["groups"]]
    overlap = report["overlap"]
    pair_rows = [[pair["first"], pair["second"], f"{pair['jaccard']:.2%}", f"{pair['jaccard_random']:.2%}"]
                 for pair in overlap["pairs"]]
    sparsity_rows = [[name, f"{result['stored']:.1%}", f"{result['bf16']:.1%}"]
                     for name, result in sorted(report["update_sparsity"].items())]
    return f"""Measured on a {m['machine']} ({versions(m)}): {len(report['groups'])} settings,
{sum(len(group['runs']) for group in report['groups'])} runs of {m['steps']} steps each, {duration(m['wall_s'])} wall
for the whole grid, one run after another. Final greedy evaluation on {m['eval_prompts']} prompts (seed 2001), the
mean ± sample standard deviation over seeds where a setting has several:

{list_table(["setting", "runs", *TICKET_METRICS], rows)}

Overlap of the trained subnetworks (``mth analyze overlap`` on each run's mask; a mask trained at two learning
rates is one mask), beside the Jaccard index two independent random masks of the same sizes reach:

{list_table(["mask 1", "mask 2", "Jaccard", "random baseline"], pair_rows)}

Update sparsity, ``1 − nnz(|θ1 − θ0| > 1e-5) / n`` against the base, of the weights as stored (fp32) and
rounded to bf16 as the paper's checkpoints were:

{list_table(["run", "update sparsity (fp32)", "in bf16"], sparsity_rows)}
"""


FRAGMENTS: dict[str, Callable[[Path], str]] = {
    "quickstart_curve": render_quickstart_curve,
    "skill_curve": render_skill_curve,
    "measuring_results": render_measuring_results,
    "tickets_repro": render_tickets_repro,
}


def write_fragments(data: Path = DATA, out: Path = GENERATED) -> list[Path]:
    """Render every fragment from ``data/<name>/`` into ``out/<name>.rst``; return their paths.

    A fragment whose text is unchanged is left alone, so Sphinx does not rebuild the pages including it.
    """
    paths = []
    for name, render in FRAGMENTS.items():
        path, text = out / f"{name}.rst", render(data / name)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_fragments():
        print(written)
