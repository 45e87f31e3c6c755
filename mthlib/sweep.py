"""Sweeps: a grid of config values expanded into ordinary ``mth fit`` runs, one folder each, resumable.

A sweep file names the fit config(s), an output folder and a grid of dotted config keys,
each with its list of values::

    config: configs/quickstart.yaml          # or a list, layered as mth fit layers them
    out: runs/lr_sweep
    grid:
      model.learning_rate: [1.0e-4, 1.0e-3]
      model.mask.init_args.seed: [0, 2001, 42]

The grid is the product of the lists, in the order written (the last key varies fastest).
``grid`` may also be a list of such mappings: the runs of each, one after another (a learning
rate per strategy, say, where one product would pair every strategy with every rate).
Run ``learning_rate=0.0001,seed=0`` is ``mth fit --config CONFIG --model.learning_rate 0.0001
--model.mask.init_args.seed 0`` logging to ``OUT/learning_rate=0.0001,seed=0/version_0``
(a CSVLogger): a run folder like any other, with its ``config.yaml``, ``metrics.csv``,
checkpoints and deltas. A run is named by each key's last part (the whole key where two
last parts clash) and its value (a ``class_path`` value by its class name).

Masks that need calibration (``fisher``, ``snip``, ...) are built once per distinct setting
(mask arguments, model, dtype, environment, calibration batch size) into
``OUT/masks/<digest>.safetensors``, as ``mth masks build`` builds them, and every run with
that setting trains the file (the ``file`` strategy): the same mask, bitwise, without
calibrating again for each learning rate.

Resuming: ``OUT/sweep.json`` records each finished run and the exact arguments it ran with
(written atomically after every run). A rerun skips finished runs, resumes a run that
stopped part-way from its newest checkpoint (``--ckpt_path last``: it logs into the next
``version_N``), and starts the others. A finished run whose arguments have changed since is
refused in one line: a changed sweep belongs in a new folder. On a cluster, ``--run NAME``
runs one run of the grid per job (``--list`` prints the names), with the same rules.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mthlib.cli import MthCLI
from mthlib.utils import atomic_write_text

RECORD = "sweep.json"
"""The file in the output folder that lists finished runs."""


@dataclass(frozen=True)
class SweepRun:
    """One point of the grid: its folder name and the ``(key, value)`` pairs it sets, in grid order."""

    name: str
    values: tuple[tuple[str, Any], ...]

    def fit_args(self, configs: list[str]) -> list[str]:
        """``mth fit`` arguments without the command word: the configs, then one ``--key value`` per grid key."""
        words = [word for path in configs for word in ("--config", path)]
        for key, value in self.values:
            words += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        return words


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file: the fit configs, the output folder and its grids (each a key to a list of values)."""

    configs: list[str]
    out: Path
    grids: list[dict[str, list[Any]]]

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        """Read and check a sweep file; every mistake is one line naming the file and the field.

        Raises:
            FileNotFoundError: The sweep file or a config it names does not exist.
            ValueError: A missing or malformed ``config``, ``out`` or ``grid``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sweep file not found: {path}")
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(spec, dict) or set(spec) != {"config", "out", "grid"}:
            got = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
            raise ValueError(f"{path}: a sweep file is a mapping with keys config, out and grid; got {got}")
        configs = [spec["config"]] if isinstance(spec["config"], str) else spec["config"]
        if not isinstance(configs, list) or not configs or not all(isinstance(c, str) for c in configs):
            raise ValueError(f"{path}: config must be a fit config path or a list of them; got {spec['config']!r}")
        for config in configs:
            if not Path(config).is_file():
                raise FileNotFoundError(f"{path}: config file not found: {config}")
        grids = spec["grid"] if isinstance(spec["grid"], list) and spec["grid"] else [spec["grid"]]
        for grid in grids:
            if not isinstance(grid, dict) or not grid:
                raise ValueError(f"{path}: grid must map dotted config keys to lists of values (or be a list of "
                                 f"such mappings); got {grid!r}")
            for key, values in grid.items():
                if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
                    raise ValueError(f"{path}: grid key {key!r} is not a dotted config key such as model.learning_rate")
                if not isinstance(values, list) or not values:
                    raise ValueError(f"{path}: grid key {key} needs a non-empty list of values; got {values!r}")
        return cls(configs=configs, out=Path(str(spec["out"])), grids=grids)

    def runs(self) -> list[SweepRun]:
        """Every point of every grid, in order, the last key varying fastest, each with a unique folder name.

        A point that two grids share (the same name, the same values) is run once.

        Raises:
            ValueError: Two different points would share a folder name (two values with the same label).
        """
        runs: dict[str, SweepRun] = {}
        for run in (run for grid in self.grids for run in _grid_runs(grid)):
            if runs.setdefault(run.name, run) != run:
                raise ValueError(f"two grids name different runs {run.name}: {dict(runs[run.name].values)} and "
                                 f"{dict(run.values)}; give distinct values")
        return list(runs.values())


def _grid_runs(grid: dict[str, list[Any]]) -> list[SweepRun]:
    """The points of one grid (the product of its lists), named by each key's last part and the value's label."""
    keys = list(grid)
    leaves = [key.rsplit(".", 1)[-1] for key in keys]
    shown = [leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(keys, leaves)]
    labels = {key: [_label(value) for value in values] for key, values in grid.items()}
    for key, named in labels.items():
        if len(set(named)) != len(named):
            raise ValueError(f"grid key {key}: two values share the folder label {named}; give distinct values")
    return [SweepRun(",".join(f"{label}={labels[key][i]}" for label, key, i in zip(shown, keys, point)),
                     tuple((key, grid[key][i]) for key, i in zip(keys, point)))
            for point in itertools.product(*(range(len(grid[key])) for key in keys))]


def _label(value: Any) -> str:
    """A value as a folder-name part: numbers as ``%g``, a ``class_path`` mapping by its class name."""
    if isinstance(value, dict) and "class_path" in value:
        text = str(value["class_path"]).rsplit(".", 1)[-1]
        if value.get("init_args"):
            text += "-" + hashlib.sha256(json.dumps(value["init_args"], sort_keys=True).encode()).hexdigest()[:6]
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (str, int, bool)) or value is None:
        text = str(value)
    else:
        text = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    return re.sub(r"[^\w.+=-]", "-", text)


def run_sweep(path: str | Path, only: str | None = None) -> dict[str, Any]:
    """Run (or resume) every run of the sweep file, or only the one named ``only``; return the record.

    Raises:
        ValueError: ``only`` is not a run of the grid, or a finished run's arguments changed.
    """
    sweep = Sweep.load(path)
    runs = sweep.runs()
    if only is not None:
        names = [run.name for run in runs]
        if only not in names:
            raise ValueError(f"no run named {only!r} in {path}; runs: {', '.join(names)}")
        runs = [run for run in runs if run.name == only]
    sweep.out.mkdir(parents=True, exist_ok=True)
    record_path = sweep.out / RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"runs": {}}
    for run in runs:
        own = run.fit_args(sweep.configs)
        calibrated = _calibrated_mask(own, sweep.out)
        args = own if calibrated is None else [*own, "--config", json.dumps(
            {"model": {"mask": {"class_path": "file", "init_args": {"path": str(calibrated[0])}}}})]
        done = record["runs"].get(run.name)
        if done is not None:
            if done["args"] != args:
                raise ValueError(f"run {run.name} in {sweep.out} finished with other arguments ({done['args']}); "
                                 "a changed sweep needs a new out folder")
            print(f"sweep: {run.name}: finished, skipped")
            continue
        if calibrated is not None and not calibrated[0].is_file():
            _build_mask(own, *calibrated)
        folder = sweep.out / run.name
        resume = any(folder.glob("*/checkpoints/*.ckpt"))
        print(f"sweep: {run.name}: {'resuming' if resume else 'training'}")
        logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                  "init_args": {"save_dir": str(sweep.out), "name": run.name}}
        MthCLI(args=["fit", *args, "--config", json.dumps({"trainer": {"logger": logger}}),
                     *(["--ckpt_path", "last"] if resume else [])])
        record = json.loads(record_path.read_text()) if record_path.is_file() else {"runs": {}}
        record["runs"][run.name] = {"args": args, "folder": str(folder)}
        atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    return record


def _calibrated_mask(args: list[str], out: Path) -> tuple[Path, dict[str, Any]] | None:
    """Where the mask of ``args`` is kept when it needs calibration, and the setting it depends on; else ``None``.

    The file is named by a digest of the setting, so every run with the same setting trains
    the same file; nothing is built here (:func:`_build_mask` does, before a run that needs it).
    """
    config = _parsed(args)
    mask = config["model"].get("mask")
    if not mask or not _strategy(mask).needs_calibration:
        return None
    setting = {"mask": mask, "model": config["model"]["model_name_or_path"], "dtype": config["model"]["dtype"],
               "env": config["data"]["env"], "calibration_batch_size": config["model"]["calibration_batch_size"]}
    digest = hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return out / "masks" / f"{digest}.safetensors", setting


def _build_mask(args: list[str], path: Path, setting: dict[str, Any]) -> None:
    """Compute the mask ``args`` would train into ``path``, as ``mth masks build`` does, with its setting beside it."""
    from mthlib.tools import write_config_mask

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path.with_suffix(".json"), json.dumps(setting, indent=2, default=str) + "\n")
    write_config_mask(args, str(path))


def _parsed(args: list[str]) -> dict[str, Any]:
    """The full fit configuration ``args`` give (as ``mth fit --print_config`` prints it), nothing instantiated."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            MthCLI(args=[*args, "--print_config"], run=False)
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    return yaml.safe_load(printed.getvalue())


def _strategy(mask: dict[str, Any]) -> Any:
    """The mask strategy a parsed ``model.mask`` section builds (only its arguments are read: no model)."""
    module, _, name = str(mask["class_path"]).rpartition(".")
    return getattr(importlib.import_module(module), name)(**(mask.get("init_args") or {}))
