"""Every mask strategy on the quickstart: build time, peak memory, and the reward of a quickstart-length run.

Each row builds its mask with ``mth masks build`` (one fresh process, so its wall time and
peak RSS are the build's alone), then trains ``configs/quickstart.yaml`` on that mask file
with ``mth fit`` (12 steps, greedy evaluation of 16 prompts at the end). Only the mask and
the learning rate change from row to row: every mask runs at the quickstart's 1e-3, and
the gradient-chosen ones (and ``random``, for reference) also at 1e-4, the rate the
quickstart documents for Fisher. ``random`` and ``fisher`` are the baselines at the same
sparsity. ``nm`` cannot hit 99% exactly (it keeps n of every m), so it runs as 1:64
(98.44%) beside a random mask of the same sparsity.

Finished builds and runs are skipped, so a killed invocation continues where it stopped.

    python bench/strategy_rewards.py --out bench_runs/strategies [--only grasp,random]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"

MASKS: dict[str, dict] = {
    "random": {"class_path": "random", "init_args": {"sparsity": 0.99, "seed": 0}},
    "fisher": {"class_path": "fisher", "init_args": {"sparsity": 0.99, "num_samples": 64}},
    "grasp": {"class_path": "grasp", "init_args": {"sparsity": 0.99, "num_samples": 8}},
    "synflow": {"class_path": "synflow", "init_args": {"sparsity": 0.99, "rounds": 20}},
    "continuous": {"class_path": "continuous", "init_args": {"sparsity": 0.99, "num_samples": 8, "steps": 20}},
    "block": {"class_path": "block", "init_args": {"sparsity": 0.99, "block_size": 32, "score": "magnitude"}},
    "nm": {"class_path": "nm", "init_args": {"n": 1, "m": 64, "score": "magnitude"}},
    "random_1of64": {"class_path": "random", "init_args": {"sparsity": 1 - 1 / 64, "seed": 0}},
}
"""Mask name to the ``model.mask`` config that builds it."""

ROWS: dict[str, tuple[str, float]] = {
    **{name: (name, 1e-3) for name in MASKS},  # the quickstart's learning rate for every mask
    # gradient-chosen entries move the loss far more per unit of update: at 1e-3 a Fisher mask collapses
    # (reward 0), so they also run at the learning rate the quickstart documents for Fisher
    **{f"{name}_lr1e-4": (name, 1e-4) for name in ("fisher", "grasp", "continuous", "random")},
}
"""Row name to (mask name, learning rate)."""


def run_measured(command: list[str], log: Path) -> tuple[float, float]:
    """Run ``command`` (output to ``log``); its wall seconds and peak RSS in GiB. Raises on failure."""
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed; see {log}")
    return seconds, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def build(mask: str, out: Path) -> dict:
    """Build the mask once (rows share it); the measured cost is kept beside it in ``<mask>.build.yaml``."""
    mask_file, record = out / "masks" / f"{mask}.safetensors", out / "masks" / f"{mask}.build.yaml"
    if record.exists():
        return yaml.safe_load(record.read_text())
    overlay = write_yaml(out / "masks" / f"{mask}.yaml", {"model": {"mask": MASKS[mask]}})
    command = [sys.executable, "-m", "mthlib.cli", "masks", "build", "--config", str(QUICKSTART),
               "--config", str(overlay), "--out", str(mask_file)]
    seconds, rss = run_measured(command, out / "masks" / f"{mask}.build.log")
    result = {"build_s": round(seconds, 1), "build_rss_gib": round(rss, 2), "mask": str(mask_file)}
    write_yaml(record, result)
    return result


def fit(row: str, mask_file: str, learning_rate: float, out: Path) -> Path:
    """Train the quickstart on the mask file at ``learning_rate``; the run's ``metrics.csv``."""
    metrics = out / "runs" / row / "version_0" / "metrics.csv"
    done = out / "runs" / row / "done"
    if done.exists():
        return metrics
    overlay = write_yaml(out / "runs" / f"{row}.yaml", {
        "trainer": {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(out / "runs"), "name": row, "version": 0,
                                             "flush_logs_every_n_steps": 1}}},
        "model": {"mask": {"class_path": "file", "init_args": {"path": mask_file}}, "learning_rate": learning_rate},
    })
    command = [sys.executable, "-m", "mthlib.cli", "fit", "--config", str(QUICKSTART), "--config", str(overlay)]
    seconds, rss = run_measured(command, out / "runs" / f"{row}.fit.log")
    write_yaml(done, {"fit_s": round(seconds, 1), "fit_rss_gib": round(rss, 2)})
    return metrics


def summarize(metrics: Path) -> dict[str, float]:
    """Step-0 reward, mean reward of the last six steps, and every ``val/`` figure of the run."""
    rows = list(csv.DictReader(metrics.open()))
    rewards = [float(r["reward"]) for r in rows if r.get("reward")]
    summary = {"reward_step0": rewards[0], "reward_last6": sum(rewards[-6:]) / len(rewards[-6:])}
    for r in rows:
        summary.update({k: float(v) for k, v in r.items() if k.startswith("val/") and v})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_runs/strategies"))
    parser.add_argument("--only", default=",".join(ROWS), help="comma-separated rows, from: " + ", ".join(ROWS))
    args = parser.parse_args()
    rows = args.only.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(ROWS)}")
    for sub in ("masks", "runs"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    results = {}
    for row in rows:
        mask, learning_rate = ROWS[row]
        built = build(mask, args.out)
        metrics = fit(row, built["mask"], learning_rate, args.out)
        results[row] = {**built, **yaml.safe_load((metrics.parent.parent / "done").read_text()), **summarize(metrics)}
        print(f"{row}: {results[row]}", flush=True)
    val_keys = sorted({k for r in results.values() for k in r if k.startswith("val/")})
    print("\n| strategy | arguments | learning rate | build s | build peak RSS GiB | reward step 0 | reward steps 6-11 | "
          + " | ".join(val_keys) + " | fit s |")
    print("|" + "---|" * (8 + len(val_keys)))
    for row, r in results.items():
        mask, learning_rate = ROWS[row]
        shown = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in MASKS[mask]["init_args"].items())
        vals = " | ".join(f"{r.get(k, float('nan')):.3f}" for k in val_keys)
        print(f"| {MASKS[mask]['class_path']} | {shown} | {learning_rate:g} | {r['build_s']:.0f} | {r['build_rss_gib']:.2f} | "
              f"{r['reward_step0']:.3f} | {r['reward_last6']:.3f} | {vals} | {r['fit_s']:.0f} |")


if __name__ == "__main__":
    main()
