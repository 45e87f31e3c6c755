"""``mth report``: run folders written by hand (no training) read, grouped over seeds and reported.

The fixture is a sweep folder as ``mth sweep`` leaves it: a random 90% mask and a Fisher 80%
mask read from ``OUT/masks`` (the ``file`` strategy), each at two learning rates and two seeds,
plus one full run. One run was resumed (``version_0`` and ``version_1``), one Fisher run saved
no delta. Deltas and the mask file are written by mthlib's own writers on a tiny model; every
delta trains half of its entries, so update sparsity differs from the mask's.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mthlib.analysis import commands
from mthlib.analysis.runs import SEED_KEYS, Run, Strategy, find_runs, group_runs, mask_strategy, run_setting
from mthlib.analysis.sweep_report import SweepReport, jaccard_grid, report
from mthlib.cli import main
from mthlib.deltas import save_delta
from mthlib.fingerprint import file_sha256, model_fingerprint
from mthlib.masking import get_mask_class
from tests.conftest import make_tiny_lm

PNG = b"\x89PNG\r\n\x1a\n"
OFFSETS = {"reward": 0.0, "format": 0.1, "similarity": 0.05, "accuracy": -0.1, "order": 0.01, "copy": 0.02,
           "one_per_line": 0.03}
"""Each final val/<metric> is the run's final val/reward plus this offset."""
FINAL_REWARD = {
    "random,lr=0.001,seed=0": 0.2, "random,lr=0.001,seed=1": 0.4,
    "random,lr=0.01,seed=0": 0.5, "random,lr=0.01,seed=1": 0.9,
    "fisher,lr=0.001,seed=0": 0.1, "fisher,lr=0.001,seed=1": 0.3,
    "fisher,lr=0.01,seed=0": 0.6, "fisher,lr=0.01,seed=1": 0.6,
    "full,lr=1e-05,seed=0": 0.45,
}
RESUMED = "fisher,lr=0.01,seed=1"
NO_DELTA = "fisher,lr=0.001,seed=1"


def _rows(name: str, steps: range, final_step: int | None, seed: int) -> list[dict[str, float]]:
    """Train rows at ``steps``; val rows at step 1 (all zero) and, when given, the final ones at ``final_step``."""
    rows = [{"step": s, "reward": 0.1 * s + 0.01 * seed, "rewards/format": 0.2 * s, "rewards/order": 0.05 * s + seed}
            for s in steps]
    if 1 in steps:
        rows.append({"step": 1, **{f"val/{m}": 0.0 for m in OFFSETS}})
    if final_step is not None:
        rows.append({"step": final_step, **{f"val/{m}": FINAL_REWARD[name] + off for m, off in OFFSETS.items()}})
    return rows


def _write_version(folder: Path, config: dict, rows: list[dict[str, float]]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("# lightning.pytorch==2.6\n" + yaml.safe_dump(config, sort_keys=False))
    fields = ["step", "epoch", *sorted({key for row in rows for key in row} - {"step"})]
    with (folder / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows({"epoch": 0, **row} for row in rows)


def _trained_half(base: torch.nn.Module, masks) -> torch.nn.Module:
    """A copy of ``base`` whose every other masked entry moved by 0.5 (the rest stored but unchanged)."""
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, idx in masks.items():
            params[name].view(-1)[idx[::2]] += 0.5
    return model


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    base = make_tiny_lm(seed=0)
    base.save_pretrained(root / "base")
    fingerprint = model_fingerprint(base)
    out = root / "lr_sweep"
    fisher = get_mask_class("random")(sparsity=0.8, seed=7).compute(base, None)
    fisher_file = out / "masks" / "0123abcd.safetensors"
    recorded = {"class_path": "mthlib.registry.fisher.FisherMask", "name": "fisher",
                "init_args": {"sparsity": 0.8, "num_samples": 4, "seed": 0}}
    fisher.save(fisher_file, metadata={"strategy": json.dumps(recorded), "base_model": str(root / "base"),
                                       "base_fingerprint": fingerprint})
    for name in FINAL_REWARD:
        label, lr_part, seed_part = name.split(",")
        lr, seed = float(lr_part.removeprefix("lr=")), int(seed_part.removeprefix("seed="))
        if label == "random":
            mask = {"class_path": "mthlib.masking.names.random", "init_args": {"sparsity": 0.9, "seed": seed}}
            masks = get_mask_class("random")(sparsity=0.9, seed=seed).compute(base, None)
        elif label == "fisher":
            mask = {"class_path": "mthlib.masking.names.file",
                    "init_args": {"path": str(fisher_file), "digest": file_sha256(fisher_file)}}
            masks = fisher
        else:
            mask, masks = None, None
        config = {"seed_everything": seed,
                  "trainer": {"max_steps": 4, "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                         "init_args": {"save_dir": str(out), "name": name}}},
                  "model": {"model_name_or_path": str(root / "base"), "learning_rate": lr, "mask": mask},
                  "data": {"seed": 0, "batch_size": 2}, "checkpoint": {"dirpath": None}, "ckpt_path": None}
        run = out / name
        if name == RESUMED:  # stopped at step 3 after its checkpoint at step 2; resumed from step 2
            _write_version(run / "version_0", config, [*_rows(name, range(0, 4), None, seed),
                                                        {"step": 3, "val/reward": 0.99}])
            resumed = {**config, "ckpt_path": str(run / "version_0" / "checkpoints" / "last.ckpt")}
            _write_version(run / "version_1", resumed, _rows(name, range(2, 4), 3, seed))
            for step, version in ((2, "version_0"), (4, "version_1")):
                save_delta(run / version / "deltas" / f"step={step:06d}.safetensors", _trained_half(base, masks),
                           dict(masks.items()), base_model=str(root / "base"), base_fingerprint=fingerprint,
                           strategy=None, sparsity=0.8, step=step)
            continue
        _write_version(run / "version_0", config, _rows(name, range(0, 4), 3, seed))
        if masks is None:
            dense = copy.deepcopy(base)
            with torch.no_grad():
                next(dense.parameters()).view(-1)[:10] += 1.0
            dense.save_pretrained(run / "version_0" / "model")
        elif name != NO_DELTA:
            save_delta(run / "version_0" / "deltas" / "step=000004.safetensors", _trained_half(base, masks),
                       dict(masks.items()), base_model=str(root / "base"), base_fingerprint=fingerprint,
                       strategy=None, sparsity=0.9, step=4)
    return out


@pytest.fixture(scope="module")
def written(sweep, tmp_path_factory):
    folder = tmp_path_factory.mktemp("written") / "reports"
    return report(str(sweep), out=str(folder)), folder


def test_runs_group_over_seeds_and_split_by_learning_rate_and_strategy(written):
    result, _ = written
    groups = [(g.strategy.label, g.strategy.sparsity, g.learning_rate, [r.name for r in g.runs]) for g in result.groups]
    assert groups == [
        ("full", 0.0, 1e-05, ["full,lr=1e-05,seed=0"]),
        ("fisher", 0.8, 0.001, ["fisher,lr=0.001,seed=0", "fisher,lr=0.001,seed=1"]),
        ("fisher", 0.8, 0.01, ["fisher,lr=0.01,seed=0", "fisher,lr=0.01,seed=1"]),
        ("random", 0.9, 0.001, ["random,lr=0.001,seed=0", "random,lr=0.001,seed=1"]),
        ("random", 0.9, 0.01, ["random,lr=0.01,seed=0", "random,lr=0.01,seed=1"]),
    ]


def test_seed_keys_decide_what_a_seed_is(sweep):
    runs = find_runs(sweep)
    only_global = group_runs(runs, seed_keys=["seed_everything"])  # the random mask's own seed now splits groups
    assert [len(g.runs) for g in only_global] == [1, 2, 2, 1, 1, 1, 1]
    first, second = runs[0], runs[1]  # fisher lr=0.001, seeds 0 and 1: different loggers, seeds
    assert first.config["trainer"]["logger"] != second.config["trainer"]["logger"]
    assert run_setting(first, ["seed_everything"])[0] == run_setting(second, ["seed_everything"])[0]
    assert run_setting(first, [])[0] != run_setting(second, [])[0]


def test_final_table_is_mean_and_sample_std_over_seeds(written):
    result, _ = written
    table = result.tables()[0]
    assert table.headers == ["#", "strategy", "sparsity", "learning rate", "seeds", "reward", "format (tag rate)",
                             "similarity", "accuracy (exact sort)", "order", "copy", "one_per_line"]
    rows = {row[0]: row for row in table.rows}
    assert rows[1][1:6] == ["full", "0", "1e-05", 1, "0.4500"]  # one seed: no std
    assert rows[2][1:6] == ["fisher", "0.8", "0.001", 2, "0.2000 ± 0.1414"]
    assert rows[4][5] == "0.3000 ± 0.1414" and rows[5][5] == "0.7000 ± 0.2828"
    assert rows[3][5] == "0.6000 ± 0.0000"  # the resumed run's final evaluation, not the abandoned 0.99
    assert rows[5][8] == "0.6000 ± 0.2828" and rows[5][6] == "0.8000 ± 0.2828"  # accuracy -0.1, format +0.1
    reward = result.final(result.groups[4], "reward")
    assert (reward.n, reward.mean) == (2, pytest.approx(0.7)) and reward.std == pytest.approx(math.sqrt(0.08))


def test_a_resumed_run_joins_its_versions_by_step(written, sweep):
    result, _ = written
    run = next(r for g in result.groups for r in g.runs if r.name == RESUMED)
    assert [v.name for v in run.versions] == ["version_0", "version_1"]
    assert [s for s, _ in run.metrics["reward"]] == [0, 1, 2, 3]
    assert run.metrics["val/reward"] == [(1, 0.0), (3, 0.6)]  # version_0's step-3 evaluation was abandoned
    assert run.latest_delta() == sweep / RESUMED / "version_1" / "deltas" / "step=000004.safetensors"


def test_jaccard_equals_mth_analyze_overlap_with_the_random_baseline(written, sweep):
    result, folder = written
    overlap = result.overlap
    names = [r.name for g in result.groups for r in g.runs if r.name != "full,lr=1e-05,seed=0"]
    assert overlap.labels == names
    inputs = [str(sweep / "masks" / "0123abcd.safetensors") if name == NO_DELTA else
              str(next(r for g in result.groups for r in g.runs if r.name == name).latest_delta()) for name in names]
    analyzed = commands.overlap(inputs)
    assert overlap.matrix("jaccard") == analyzed.matrix("jaccard") and overlap.total == analyzed.total
    fisher_pair, random_pair = overlap.pair(0, 1), overlap.pair(4, 5)
    assert fisher_pair.jaccard == 1.0  # the mask file and a delta of it: the same entries
    d1, d2 = random_pair.d1, random_pair.d2
    assert random_pair.jaccard_random == pytest.approx(d1 * d2 / (d1 + d2 - d1 * d2))
    assert random_pair.jaccard < 0.5 and random_pair.jaccard == pytest.approx(0.1 * 0.1 / 0.19, abs=0.05)
    report_json = json.loads((folder / "report.json").read_text())
    assert report_json["overlap"]["jaccard_matrix"] == analyzed.matrix("jaccard")
    grid = jaccard_grid(overlap)  # the heatmap: measured above the diagonal, the baseline below
    assert grid[4][5] == 100 * random_pair.jaccard and grid[5][4] == 100 * random_pair.jaccard_random
    assert math.isnan(grid[3][3])


def test_update_sparsity_equals_mth_analyze_sparsity(sweep, tmp_path):
    result = report(str(sweep), out=str(tmp_path / "r"), sparsity=True)
    measured = result.update_sparsity
    assert sorted(measured) == sorted(set(FINAL_REWARD) - {NO_DELTA})
    runs = {r.name: r for g in result.groups for r in g.runs}
    base = str(sweep.parent / "base")
    for name, got in measured.items():
        finetuned = runs[name].latest_delta() or runs[name].final_model()
        analyzed = commands.sparsity(base, str(finetuned))
        for view in ("stored", "bf16"):
            assert got.sparsity(view, 1e-5) == analyzed.sparsity(view, 1e-5), (name, view)
    random_run = measured["random,lr=0.01,seed=0"]
    assert 0.9 < random_run.sparsity("stored", 1e-5) < 0.96  # half of a 10% mask moved: about 95%
    assert measured["full,lr=1e-05,seed=0"].changed("stored", 1e-5) == 10
    table = result.tables()[-1]
    assert table.title.startswith("Update sparsity (%)") and len(table.rows) == len(measured)
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["update_sparsity"]["random,lr=0.01,seed=0"]["stored"] == random_run.sparsity("stored", 1e-5)


def test_pages_link_valid_pngs(written):
    result, folder = written
    images = ["reward_vs_lr.png", *(f"curves_{i}.png" for i in range(1, 6)), "jaccard.png"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["report.md", "report.html", "report.json", *images])
    markdown, page = (folder / "report.md").read_text(), (folder / "report.html").read_text()
    for image in images:
        assert (folder / image).read_bytes()[:8] == PNG
        assert f"]({image})" in markdown and f'<img src="{image}"' in page
    assert "| 3 | fisher | 0.8 | 0.01 | 2 | 0.6000 ± 0.0000 |" in markdown
    assert "Not measured: mth report --sparsity true" in markdown
    assert "d1·d2 / (d1 + d2 − d1·d2)" in markdown and "<script" not in page
    assert "| I1 | I2 | \\|I1∩I2\\| | o1 |" in markdown  # a pipe inside a cell does not split it


def test_the_command_takes_the_folder_positionally(sweep, tmp_path, capsys):
    main(["report", str(sweep), "--out", str(tmp_path / "r"), "--seed_keys", "[seed_everything]"])
    printed = capsys.readouterr().out
    assert "Final evaluation" in printed and "wrote" in printed and (tmp_path / "r" / "report.html").is_file()
    assert json.loads((tmp_path / "r" / "report.json").read_text())["seed_keys"] == ["seed_everything"]


def test_bad_folders_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty" / "version_0").mkdir(parents=True)
    (tmp_path / "empty" / "version_0" / "config.yaml").write_text("seed_everything: 0\n")  # no metrics.csv
    with pytest.raises(ValueError, match=r"^no run folders \(config.yaml \+ metrics.csv\) under .*empty$"):
        report(str(tmp_path / "empty"))
    with pytest.raises(SystemExit) as stop:
        main(["report", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == f"mth report: error: no such folder: {tmp_path / 'missing'}\n"
    (tmp_path / "bad" / "version_0").mkdir(parents=True)
    (tmp_path / "bad" / "version_0" / "config.yaml").write_text("- a list\n")
    (tmp_path / "bad" / "version_0" / "metrics.csv").write_text("step,reward\n0,1.0\n")
    with pytest.raises(ValueError, match="config.yaml is not a YAML mapping"):
        report(str(tmp_path / "bad"))


def test_a_mask_file_without_a_record_is_keyed_by_its_digest_not_its_path(tmp_path):
    masks = get_mask_class("random")(sparsity=0.5, seed=0).compute(make_tiny_lm(seed=0), None)
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for path in paths:
        masks.save(path)  # no strategy recorded
    strategies = [mask_strategy({"class_path": "mthlib.masking.names.file",
                                 "init_args": {"path": str(path), "digest": file_sha256(path)}}) for path in paths]
    assert strategies[0] == Strategy("file", {"digest": file_sha256(paths[0])}, paths[0])
    assert strategies[0].init_args == strategies[1].init_args and strategies[0].sparsity is None
    assert mask_strategy(None) == Strategy("full", {}) and mask_strategy(None).sparsity == 0.0


def test_other_differing_keys_get_a_setting_column():
    def run(name: str, power: float, seed: int) -> Run:
        config = {"seed_everything": seed, "model": {"learning_rate": 0.001, "mask": None},
                  "data": {"env": {"init_args": {"power": power}}}}
        return Run(name, (Path(name),), config, {"val/reward": [(3, power / 10 + seed / 100)]})

    groups = group_runs([run("a", 1.0, 0), run("b", 1.0, 1), run("c", 4.0, 0)])
    table = SweepReport("runs", list(SEED_KEYS), groups).tables()[0]
    assert table.headers[:6] == ["#", "strategy", "sparsity", "learning rate", "setting", "seeds"]
    assert [row[4:7] for row in table.rows] == [["data.env.init_args.power=1.0", 2, "0.1050 ± 0.0071"],
                                                ["data.env.init_args.power=4.0", 1, "0.4000"]]
