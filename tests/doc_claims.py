"""What documentation pages say their commands leave behind, checked after the page ran (``CLAIMS``).

Used by ``tests/test_tutorials.py``: each function takes the page's folder and everything its
commands printed, and asserts the files and figures the page tells the reader to expect.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import yaml


def _run_folder_files(folder: Path, output: str) -> None:
    run = folder / "runs" / "quickstart" / "version_0"
    for name in ("config.yaml", "hparams.yaml", "metrics.csv", "checkpoints/last.ckpt", "deltas/last.safetensors"):
        assert (run / name).is_file(), f"the quickstart page lists {name} in the run folder"
    assert (folder / "runs" / "quickstart" / "version_1").is_dir(), "a second run of the config is version_1"
    config = yaml.safe_load((run / "config.yaml").read_text())
    settings = (config["model"]["dtype"], config["model"]["rollout_engine"], config["model"]["rollout_dtype"],
                config["trainer"]["precision"])
    assert settings == ("bfloat16", "native", "bfloat16", "bf16-mixed"), (
        "README: the quickstart keeps bf16 weights, samples with the native engine in bf16, bf16-mixed")


def _strategy_listed(folder: Path, output: str) -> None:
    assert re.search(r"^row_norm\s+Train the rows", output, re.MULTILINE), "mth masks list does not show row_norm"
    assert (folder / "runs" / "quickstart" / "version_2" / "deltas" / "last.safetensors").is_file()


def _reports_written(folder: Path, output: str) -> None:
    for name in ("full/sparsity.md", "full/sparsity.json", "overlap/overlap.json", "random99/consecutive.json"):
        assert (folder / "reports" / name).is_file(), f"reports/{name} is missing"
    assert len(list((folder / "masks").glob("*.safetensors"))) == 4


def _exports_load_with_transformers(folder: Path, output: str) -> None:
    from transformers import AutoModelForCausalLM

    for name in ("exported", "merged", "runs/sequential/task2_model"):
        assert AutoModelForCausalLM.from_pretrained(folder / name).num_parameters() > 0, name


def _dataset_rewards_logged(folder: Path, output: str) -> None:
    rows = list(csv.DictReader((folder / "runs" / "quickstart" / "version_0" / "metrics.csv").open()))
    val = [row for row in rows if row.get("val/reward")]
    assert val, "the environments page says the run logs val/reward"
    for key in ("val/reward", "val/correct", "val/brief"):
        assert math.isfinite(float(val[-1][key])), f"the environments page says the run logs {key}"
    assert {"rewards/correct", "rewards/brief"} <= set(rows[0]), "the environments page lists rewards/<name>"


def _sweep_reported(folder: Path, output: str) -> None:
    report = folder / "reports" / "lr_sweep"
    for name in ("report.md", "report.html", "reward_vs_lr.png", "curves_1.png", "curves_2.png", "jaccard.png"):
        assert (report / name).is_file(), f"the sweeps page says mth report writes {name}"
    groups = json.loads((report / "report.json").read_text())["groups"]
    assert [(group["learning_rate"], len(group["runs"])) for group in groups] == [(1e-4, 2), (1e-3, 2)], (
        "the sweeps page says two seeds of a learning rate are one group")


def _fp32_settings_recorded(folder: Path, output: str) -> None:
    config = yaml.safe_load((folder / "runs" / "quickstart" / "version_0" / "config.yaml").read_text())
    assert config["trainer"]["precision"] == "32-true", "the fp32 command overrides the quickstart's bf16-mixed"
    assert (config["model"]["rollout_engine"], config["model"]["rollout_dtype"]) == ("hf", None)
    assert config["model"]["dtype"] == "float32", "the fp32 command overrides the quickstart's bf16 weights"


CLAIMS: dict[str, Callable[[Path, str], None]] = {
    "docs/environments.rst": _dataset_rewards_logged,
    "docs/quickstart.rst": _run_folder_files,
    "docs/tutorials/custom_strategy.rst": _strategy_listed,
    "docs/tutorials/measuring.rst": _reports_written,
    "docs/tutorials/checkpoints.rst": _exports_load_with_transformers,
    "docs/tutorials/sweeps.rst": _sweep_reported,
    "docs/tutorials/precision.rst": _fp32_settings_recorded,
}
