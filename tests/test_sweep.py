"""`mth sweep`: grid expansion, one ordinary fit run per point, calibrated masks built once, skip and resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from mthlib.cli import main
from mthlib.masking import Masks
from mthlib.sweep import RECORD, Sweep, run_sweep
from tests.conftest import TINY_FIT_CONFIG, save_tiny_chat_lm



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny base model and two fit configs, checkpointed every step: a 90% random mask and a 90% Fisher mask."""
    folder = tmp_path_factory.mktemp("sweep")
    model = save_tiny_chat_lm(folder / "tiny", seed=3)
    masks = {"random": "{class_path: random, init_args: {sparsity: 0.9, seed: 4}}",
             "fisher": "{class_path: fisher, init_args: {sparsity: 0.9, num_samples: 4}}"}
    for name, mask in masks.items():
        config = yaml.safe_load(TINY_FIT_CONFIG.format(model=model, mask=mask))
        config["checkpoint"]["every_n_train_steps"] = 1
        config["model"]["calibration_batch_size"] = 2
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def sweep_file(folder: Path, name: str, spec: dict) -> Path:
    path = folder / f"{name}.sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()}


def steps(metrics: Path) -> list[int]:
    return sorted({int(row["step"]) for row in csv.DictReader(metrics.open()) if row.get("reward")})


def test_the_grid_expands_in_order_with_readable_unique_names(world):
    spec = {"config": [str(world / "random.yaml")], "out": str(world / "x"),
            "grid": {"model.learning_rate": [0.001, 0.0001], "model.mask.init_args.seed": [0, 2001, 42],
                     "seed_everything": [7]}}
    runs = Sweep.load(sweep_file(world, "order", spec)).runs()
    assert [run.name for run in runs] == [
        f"learning_rate={lr},seed={seed},seed_everything=7" for lr in ("0.001", "0.0001") for seed in (0, 2001, 42)
    ]
    assert runs[4].fit_args(["a.yaml"]) == ["--config", "a.yaml", "--model.learning_rate", "0.0001",
                                              "--model.mask.init_args.seed", "2001", "--seed_everything", "7"]
    clash = {**spec, "grid": {"model.mask.init_args.seed": [1], "data.seed": [2]}}
    assert [r.name for r in Sweep.load(sweep_file(world, "clash", clash)).runs()] == [
        "model.mask.init_args.seed=1,data.seed=2"]
    masks = {**spec, "grid": {"model.mask": [{"class_path": "random", "init_args": {"sparsity": 0.99}},
                                             {"class_path": "fisher"}, "snip"]}}
    names = [r.name for r in Sweep.load(sweep_file(world, "masks", masks)).runs()]
    assert names[1:] == ["mask=fisher", "mask=snip"] and names[0].startswith("mask=random-")


def test_a_list_of_grids_runs_each_grid_in_order_and_a_shared_point_once(world):
    full = {"model.mask": [None], "model.learning_rate": [1e-5]}
    random = {"model.mask": ["random"], "model.learning_rate": [1e-3, 1e-5]}
    spec = {"config": str(world / "random.yaml"), "out": str(world / "x"), "grid": [random, full, random]}
    runs = Sweep.load(sweep_file(world, "list", spec)).runs()
    assert [run.name for run in runs] == ["mask=random,learning_rate=0.001", "mask=random,learning_rate=1e-05",
                                          "mask=None,learning_rate=1e-05"]
    assert runs[2].fit_args([]) == ["--model.mask", "null", "--model.learning_rate", "1e-05"]
    clash = {**spec, "grid": [{"model.learning_rate": [1e-3]}, {"model.learning_rate": ["0.001"]}]}
    with pytest.raises(ValueError, match="two grids name different runs learning_rate=0.001"):
        Sweep.load(sweep_file(world, "clash_list", clash)).runs()


@pytest.mark.parametrize(("spec", "message"), [
    ({"config": "random.yaml", "out": "o"}, "a sweep file is a mapping with keys config, out and grid"),
    ({"config": "random.yaml", "out": "o", "grid": {}}, "grid must map dotted config keys"),
    ({"config": "random.yaml", "out": "o", "grid": [{"seed_everything": [1]}, {}]}, "or be a list of such mappings"),
    ({"config": "random.yaml", "out": "o", "grid": [{"seed_everything": [1]}, {"x y": [1]}]}, "not a dotted config"),
    ({"config": "random.yaml", "out": "o", "grid": {"model.learning rate": [1]}}, "is not a dotted config key"),
    ({"config": "random.yaml", "out": "o", "grid": {"model.learning_rate": []}}, "needs a non-empty list"),
    ({"config": "missing.yaml", "out": "o", "grid": {"seed_everything": [1]}}, "config file not found: missing.yaml"),
    ({"config": "random.yaml", "out": "o", "grid": {"seed_everything": [1, 1]}}, "two values share the folder label"),
])
def test_bad_sweep_files_are_one_line_errors(world, spec, message, monkeypatch):
    monkeypatch.chdir(world)
    path = sweep_file(world, "bad", spec)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        Sweep.load(path).runs()


def test_unknown_run_name_lists_the_runs(world, tmp_path):
    spec = {"config": str(world / "random.yaml"), "out": str(tmp_path / "o"), "grid": {"seed_everything": [1, 2]}}
    with pytest.raises(ValueError, match="no run named 'seed_everything=3'.*runs: seed_everything=1, seed_everything=2"):
        run_sweep(sweep_file(tmp_path, "s", spec), only="seed_everything=3")


def test_a_sweep_trains_each_point_builds_a_calibrated_mask_once_and_skips_finished_runs(world, tmp_path, capsys):
    out = tmp_path / "lr"
    path = sweep_file(tmp_path, "lr", {"config": str(world / "fisher.yaml"), "out": str(out),
                                       "grid": {"model.learning_rate": [0.01, 0.05]}})
    main(["sweep", "--config", str(path)])
    record = json.loads((out / RECORD).read_text())
    assert sorted(record["runs"]) == ["learning_rate=0.01", "learning_rate=0.05"]
    built = sorted((out / "masks").glob("*.safetensors"))
    assert len(built) == 1  # one Fisher setting, two learning rates
    main(["masks", "build", "--config", str(world / "fisher.yaml"), "--out", str(tmp_path / "direct.safetensors")])
    assert Masks.load(built[0]) == Masks.load(tmp_path / "direct.safetensors")  # the mask mth fit would train
    for name, rate in (("learning_rate=0.01", 0.01), ("learning_rate=0.05", 0.05)):
        config = yaml.safe_load((out / name / "version_0" / "config.yaml").read_text())
        assert config["model"]["learning_rate"] == rate
        assert config["model"]["mask"]["init_args"]["path"] == str(built[0])
        assert steps(out / name / "version_0" / "metrics.csv") == [0, 1]
    before = files(out)
    capsys.readouterr()
    main(["sweep", "--config", str(path)])
    assert files(out) == before  # nothing trained or rewritten
    assert capsys.readouterr().out.count("finished, skipped") == 2
    built[0].unlink()  # a finished run never rebuilds its mask just to be skipped
    main(["sweep", "--config", str(path)])
    assert not built[0].exists() and capsys.readouterr().out.count("finished, skipped") == 2
    main(["sweep", "--config", str(path), "--list_runs", "true"])
    assert capsys.readouterr().out.split() == ["learning_rate=0.01", "learning_rate=0.05"]

    changed = sweep_file(tmp_path, "lr", {"config": str(world / "random.yaml"), "out": str(out),
                                          "grid": {"model.learning_rate": [0.01]}})
    with pytest.raises(ValueError, match="finished with other arguments"):
        run_sweep(changed)


def test_a_stopped_run_resumes_from_its_checkpoint_and_one_run_can_run_alone(world, tmp_path):
    out = tmp_path / "seeds"
    path = sweep_file(tmp_path, "seeds", {"config": str(world / "random.yaml"), "out": str(out),
                                          "grid": {"model.mask.init_args.seed": [4, 5]}})
    stopped = Sweep.load(path).runs()[1]
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": stopped.name}}
    # the run as the sweep starts it, stopped after its first step (checkpointed every step)
    main(["fit", *stopped.fit_args([str(world / "random.yaml")]), "--trainer.max_steps", "1",
          "--config", json.dumps({"trainer": {"logger": logger}})])
    run_sweep(path, only=stopped.name)
    record = json.loads((out / RECORD).read_text())
    assert list(record["runs"]) == [stopped.name]  # the other run was not started
    assert not (out / "seed=4").exists()
    assert steps(out / stopped.name / "version_0" / "metrics.csv") == [0]
    assert steps(out / stopped.name / "version_1" / "metrics.csv") == [1]  # resumed at step 1, not retrained
    run_sweep(path)
    assert sorted(json.loads((out / RECORD).read_text())["runs"]) == ["seed=4", "seed=5"]
