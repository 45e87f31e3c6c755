"""`mth` end to end on a tiny model: fit from YAML writes its run folder; bad configs fail clearly."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mthlib.cli import main
from mthlib.sweep import Sweep
from tests.conftest import make_tiny_chat_lm

CONFIG = """
trainer:
  max_steps: 2
  val_check_interval: 2
  limit_val_batches: 1
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {runs}, name: tiny}}
checkpoint:
  every_n_train_steps: 2
model:
  model_name_or_path: {model}
  num_generations: 2
  max_completion_length: 4
data:
  env:
    class_path: mthlib.envs.AlphabetSort
    init_args: {{max_turns: 1}}
  batch_size: 1
  eval_size: 2
"""


@pytest.fixture
def tiny_config(tmp_path):
    model, tokenizer = make_tiny_chat_lm(seed=3)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    path = tmp_path / "tiny.yaml"
    path.write_text(CONFIG.format(runs=tmp_path / "runs", model=tmp_path / "tiny"))
    return path


def run_mth(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "mthlib.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_fit_from_yaml_writes_config_metrics_and_checkpoint(tiny_config, tmp_path):
    main(["fit", "--config", str(tiny_config)])
    run = tmp_path / "runs" / "tiny" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["num_generations"] == 2 and saved["seed_everything"] == 0
    assert saved["data"]["env"]["class_path"] == "mthlib.envs.AlphabetSort"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    train = [r for r in rows if r["reward"]]
    assert len(train) == 2 and {"reward_std", "frac_reward_zero_std", "completions/mean_length"} <= set(rows[0])
    assert any(r["val/reward"] for r in rows)
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "model" / "config.json").exists()  # a dense run hands back a Hugging Face folder


def test_ckpt_path_last_resumes_from_the_newest_run_into_a_new_folder(tiny_config, tmp_path):
    missing = run_mth("fit", "--config", str(tiny_config), "--ckpt_path", "last", cwd=tmp_path)
    assert missing.returncode != 0 and "nothing" not in missing.stderr and "no " in missing.stderr.splitlines()[-1]
    main(["fit", "--config", str(tiny_config)])
    main(["fit", "--config", str(tiny_config), "--ckpt_path", "last", "--trainer.max_steps", "3"])
    runs = tmp_path / "runs" / "tiny"
    first = list(csv.DictReader((runs / "version_0" / "metrics.csv").open()))
    resumed = list(csv.DictReader((runs / "version_1" / "metrics.csv").open()))
    assert [r["step"] for r in first if r["reward"]] == ["0", "1"]
    assert [r["step"] for r in resumed if r["reward"]] == ["2"]  # continues at step 2, old logs untouched


def test_print_config_shows_defaults_without_loading_anything(tiny_config, tmp_path):
    result = run_mth("fit", "--config", str(tiny_config), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["loss_type"] == "dapo" and printed["model"]["beta"] == 0.0


def test_reinit_is_a_model_option_shown_by_print_config(tiny_config, capsys):
    printed = []
    for extra in ([], ["--model.mask", "random", "--model.reinit", "true"]):
        with pytest.raises(SystemExit) as stop:
            main(["fit", "--config", str(tiny_config), *extra, "--print_config"])
        assert not stop.value.code
        printed.append(yaml.safe_load(capsys.readouterr().out)["model"]["reinit"])
    assert printed == [False, True]


def test_masks_list_and_build(tiny_config, tmp_path, capsys):
    main(["masks", "list"])
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert {"random", "fisher", "snip", "magnitude", "expander", "rigl", "diff"} <= set(names)
    config = tmp_path / "masked.yaml"
    config.write_text(tiny_config.read_text().replace("model:\n", "model:\n  mask: {class_path: fisher, init_args: {sparsity: 0.9, num_samples: 4}}\n"))
    main(["masks", "build", "--config", str(config), "--out", str(tmp_path / "m.safetensors")])
    from mthlib.masking import Masks

    masks = Masks.load(tmp_path / "m.safetensors")
    assert 0.09 < masks.density < 0.11


SWEEPS = Path(__file__).parents[1] / "configs" / "sweeps"
SHIPPED_SWEEPS = sorted(path for path in SWEEPS.glob("*.yaml") if set(yaml.safe_load(path.read_text())) == {
    "config", "out", "grid"})
SHIPPED_CONFIGS = sorted(set(Path(__file__).parents[1].joinpath("configs").rglob("*.yaml")) - set(SHIPPED_SWEEPS))


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=[path.stem for path in SHIPPED_CONFIGS])
def test_every_shipped_config_parses(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), "--print_config"])
    assert not stop.value.code, capsys.readouterr().err[-2000:]
    assert yaml.safe_load(capsys.readouterr().out)["model"]["model_name_or_path"]
    assert not list(tmp_path.iterdir())  # parsing writes nothing


@pytest.mark.parametrize("sweep", SHIPPED_SWEEPS, ids=[path.stem for path in SHIPPED_SWEEPS])
def test_every_shipped_sweep_expands_into_runs_that_parse(sweep, monkeypatch, capsys):
    monkeypatch.chdir(SWEEPS.parents[1])  # a sweep names its configs from the repository root
    parsed = Sweep.load(sweep)
    runs = parsed.runs()
    assert runs
    for run in runs:
        with pytest.raises(SystemExit) as stop:
            main(["fit", *run.fit_args(parsed.configs), "--print_config"])
        assert not stop.value.code, capsys.readouterr().err[-2000:]
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["learning_rate"] == dict(run.values)["model.learning_rate"]


def test_configs_folder_is_not_empty():
    assert len(SHIPPED_CONFIGS) >= 5


BLOG_RUNS = {  # "Beyond the Lottery Ticket": (mask, sparsity, seed, learning rate) per run
    "qwen2.5-0.5b-full": (None, None, None, 1e-6),
    "qwen2.5-0.5b-fisher99": ("fisher", 0.99, None, 5e-6),
    "qwen2.5-0.5b-fisher999": ("fisher", 0.999, None, 1e-5),
    "qwen2.5-0.5b-random99-seed0": ("random", 0.99, 0, 1e-4),
    "qwen2.5-0.5b-random99-seed2001": ("random", 0.99, 2001, 5e-5),
    "qwen2.5-0.5b-random99-seed42": ("random", 0.99, 42, 5e-5),
}


@pytest.mark.parametrize("name", BLOG_RUNS)
def test_blog_configs_state_the_blogs_settings(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(Path(__file__).parents[1] / "configs" / "mth" / f"{name}.yaml"), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    model, data = config["model"], config["data"]
    mask, sparsity, seed, learning_rate = BLOG_RUNS[name]
    assert model["model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct" and model["learning_rate"] == learning_rate
    assert (data["eval_size"], data["eval_seed"], config["trainer"]["max_steps"]) == (512, 2001, 300)
    env = data["env"]["init_args"]
    assert (env["min_turns"], env["max_turns"], env["min_names_per_turn"], env["max_names_per_turn"], env["power"]) \
        == (1, 3, 1, 5, 4.0)
    if mask is None:
        assert model["mask"] is None and model["dtype"] == "float32"  # a dense 1e-6 step would round away in bf16
        return
    assert model["mask"]["class_path"].endswith(mask) and model["mask"]["init_args"]["sparsity"] == sparsity
    assert model["dtype"] == "bfloat16"
    if mask == "fisher":
        assert model["mask"]["init_args"]["num_samples"] == 1024
    else:
        assert model["mask"]["init_args"]["seed"] == seed
