"""The runs under a folder (a sweep's ``OUT``, or any folder of runs): found, their versions joined, grouped over seeds.

A *run folder* is any folder holding ``config.yaml`` and ``metrics.csv`` (what ``mth fit``
writes through its CSV logger), at any depth. Lightning numbers a logger's folders
``version_0``, ``version_1``, ...; a run resumed with ``--ckpt_path`` (as ``mth sweep`` resumes
a stopped run) logs into the next one. The ``version_N`` folders of one parent are therefore
read as one run, in version order: each version's metrics replace the earlier versions' from
its first logged step on (a resume restarts at its checkpoint's step, so what the earlier
version logged past that step is the abandoned stretch; a version that starts again at step 0,
a fresh run logged to the same folder, replaces the run), and the newest version's
``config.yaml`` describes the run. A folder of any other name is a run of its own.

Runs that differ only by seed form a *group* (:func:`group_runs`). The group key is the run's
configuration, flattened to dotted keys, without

* the seed keys (default :data:`SEED_KEYS`), and
* :data:`WHERE_KEYS`, the keys that say where a run logs, saves or resumed from,

and with ``model.mask`` named by what it selects (:func:`mask_strategy`): the strategy's short
name and arguments. A ``file`` mask (what ``mth sweep`` trains when a strategy needs
calibration) is named by the strategy its file records, so runs of one Fisher setting group
together, and show as ``fisher``, whether they computed the mask or read it from a file; a
file that records no strategy is named by its SHA-256 (``digest``), never by its path.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mthlib.analysis.plot_run import Curves, read_metrics
from mthlib.analysis.sources import run_deltas
from mthlib.utils import safetensors_metadata

SEED_KEYS: tuple[str, ...] = ("seed_everything", "model.mask.init_args.seed")
"""Config keys that only seed a run (``mth report --seed_keys`` replaces them, e.g. to add ``data.seed``)."""

WHERE_KEYS: tuple[str, ...] = ("trainer.logger", "trainer.default_root_dir", "checkpoint.dirpath", "ckpt_path")
"""Config keys (with everything under them) that say where a run logs, saves or resumed from, not what it trains."""

_VERSION = re.compile(r"version_(\d+)")


@dataclass(frozen=True)
class Run:
    """One run: its version folders in order, the newest version's configuration and the joined metrics.

    Attributes:
        name: The run folder relative to the folder searched (its own name when that is the folder searched).
        versions: The folders holding ``config.yaml`` and ``metrics.csv``, oldest first.
        config: The newest version's ``config.yaml``.
        metrics: Every metric of every version, joined as the module docstring says.
    """

    name: str
    versions: tuple[Path, ...]
    config: dict[str, Any]
    metrics: Curves

    def last(self, metric: str) -> float | None:
        """The metric's last logged value (None when it was never logged)."""
        points = self.metrics.get(metric)
        return points[-1][1] if points else None

    def latest_delta(self) -> Path | None:
        """The newest sparse delta over all versions (highest step, the later version's on a tie); None without one."""
        found = [(step, i, path) for i, version in enumerate(self.versions) for step, path in run_deltas(version)]
        return max(found)[2] if found else None

    def final_model(self) -> Path | None:
        """The Hugging Face folder a dense run writes when fit ends (``<newest version>/model``), if there is one."""
        folder = self.versions[-1] / "model"
        return folder if (folder / "config.json").is_file() else None

    def seeds(self, seed_keys: Sequence[str]) -> dict[str, Any]:
        """The run's value of each seed key it sets."""
        flat = flatten(self.config)
        return {key: flat[key] for key in seed_keys if key in flat}


@dataclass(frozen=True)
class Strategy:
    """What a run's mask selects, as the group key names it.

    Attributes:
        label: ``full`` (no mask), the strategy's registered short name, or ``file`` for a mask file
            that records no strategy.
        init_args: The strategy's arguments (a file without a record: its ``digest``).
        mask_file: The file a ``file`` strategy trains (its index set when the run saved no delta).
    """

    label: str
    init_args: dict[str, Any]
    mask_file: Path | None = None

    @property
    def sparsity(self) -> float | None:
        """The fraction of entries the mask leaves frozen, as configured (0 for a full run, None when unknown)."""
        return 0.0 if self.label == "full" else self.init_args.get("sparsity")


@dataclass(frozen=True)
class RunGroup:
    """Runs whose configurations differ only in the seed keys.

    Attributes:
        setting: The group key: the flattened configuration the runs share (see the module docstring).
        strategy: Their mask strategy.
        runs: The runs, by name.
    """

    setting: dict[str, Any]
    strategy: Strategy
    runs: tuple[Run, ...]

    @property
    def learning_rate(self) -> float | None:
        """``model.learning_rate`` (None when the configuration has none)."""
        return self.setting.get("model.learning_rate")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{dotted key: value}``; lists and empty mappings are values."""
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _under(key: str, roots: Sequence[str]) -> bool:
    return any(key == root or key.startswith(root + ".") for root in roots)


def _short_name(class_path: str) -> str:
    """The registered short name of a strategy class path (its last part when the class cannot be imported)."""
    module, _, attribute = class_path.rpartition(".")
    try:
        return str(getattr(importlib.import_module(module), attribute).name or attribute)
    except (ImportError, AttributeError, ValueError):
        return attribute


def mask_strategy(mask: Any) -> Strategy:
    """The :class:`Strategy` of a run's ``model.mask`` section (a ``file`` mask by the strategy its file records)."""
    if not mask:
        return Strategy("full", {})
    if not isinstance(mask, dict):
        return Strategy(_short_name(str(mask)), {})
    init_args = dict(mask.get("init_args") or {})
    name = _short_name(str(mask.get("class_path", "")))
    if name != "file":
        return Strategy(name, init_args)
    path = Path(str(init_args.get("path")))
    recorded = json.loads(safetensors_metadata(path).get("strategy", "null")) if path.is_file() else None
    if isinstance(recorded, dict) and recorded.get("name"):
        return Strategy(str(recorded["name"]), dict(recorded.get("init_args") or {}), path)
    return Strategy("file", {"digest": init_args.get("digest")}, path)


def run_setting(run: Run, seed_keys: Sequence[str]) -> tuple[dict[str, Any], Strategy]:
    """The run's group key (flattened, see the module docstring) and its mask strategy."""
    model = run.config.get("model")
    strategy = mask_strategy(model.get("mask") if isinstance(model, dict) else None)
    setting = {key: value for key, value in flatten(run.config).items() if not _under(key, (*WHERE_KEYS, "model.mask"))}
    setting["model.mask"] = strategy.label
    setting.update({f"model.mask.init_args.{key}": value for key, value in flatten(strategy.init_args).items()})
    return {key: value for key, value in setting.items() if not _under(key, seed_keys)}, strategy


def _order(value: Any) -> tuple[bool, bool, Any]:
    """A sort key putting numbers first (ascending), then other values as text, then None."""
    number = isinstance(value, (int, float))
    return (value is None, not number, value if number else str(value))


def group_runs(runs: Sequence[Run], seed_keys: Sequence[str] = SEED_KEYS) -> list[RunGroup]:
    """Runs grouped by their setting over seeds; by strategy, sparsity, other settings, then learning rate."""
    found: dict[str, tuple[dict[str, Any], Strategy, list[Run]]] = {}
    for run in runs:
        setting, strategy = run_setting(run, seed_keys)
        key = json.dumps(setting, sort_keys=True, default=str)
        found.setdefault(key, (setting, strategy, []))[2].append(run)
    groups = [RunGroup(setting, strategy, tuple(sorted(members, key=lambda r: r.name)))
              for setting, strategy, members in found.values()]
    others = {id(group): json.dumps({k: v for k, v in group.setting.items() if k != "model.learning_rate"},
                                    sort_keys=True, default=str) for group in groups}
    return sorted(groups, key=lambda g: (g.strategy.label != "full", g.strategy.label, _order(g.strategy.sparsity),
                                         others[id(g)], _order(g.learning_rate)))


def varying_keys(groups: Sequence[RunGroup]) -> list[str]:
    """The dotted keys whose value is not the same in every group (absent counts as a value), sorted."""
    keys = sorted({key for group in groups for key in group.setting})
    missing = object()
    return [key for key in keys
            if len({json.dumps(g.setting.get(key, missing), sort_keys=True, default=repr) for g in groups}) > 1]


def join_versions(parts: Sequence[Curves]) -> Curves:
    """The metrics of a run's versions (oldest first) joined: each replaces the earlier points from its first step on."""
    joined: Curves = {}
    for part in parts:
        steps = [step for points in part.values() for step, _ in points]
        if not steps:
            continue
        start = min(steps)
        joined = {name: [(s, v) for s, v in points if s < start] for name, points in joined.items()}
        for name, points in part.items():
            joined.setdefault(name, []).extend(points)
    return {name: points for name, points in joined.items() if points}


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a YAML mapping (a run's config.yaml, as mth fit saves it)")
    return config


def _version_number(folder: Path) -> int:
    match = _VERSION.fullmatch(folder.name)
    return int(match.group(1)) if match else -1


def find_runs(runs_dir: str | Path) -> list[Run]:
    """Every run under ``runs_dir`` (itself included), by name.

    Raises:
        FileNotFoundError: ``runs_dir`` is not a folder.
        ValueError: No run folder under it, or a ``config.yaml`` or ``metrics.csv`` that does not read.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    folders: dict[Path, list[Path]] = {}
    for config in sorted(root.rglob("config.yaml")):
        version = config.parent
        if (version / "metrics.csv").is_file():
            owner = version.parent if _VERSION.fullmatch(version.name) else version
            folders.setdefault(owner, []).append(version)
    if not folders:
        raise ValueError(f"no run folders (config.yaml + metrics.csv) under {root}")
    runs = []
    for owner, versions in sorted(folders.items()):
        ordered = tuple(sorted(versions, key=_version_number))
        inside = owner != root and owner.is_relative_to(root)
        runs.append(Run(owner.relative_to(root).as_posix() if inside else owner.name, ordered,
                        _read_config(ordered[-1] / "config.yaml"),
                        join_versions([read_metrics(version / "metrics.csv") for version in ordered])))
    return runs
