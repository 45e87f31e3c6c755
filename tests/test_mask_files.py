"""`mth masks build` gives the mask `mth fit` trains, and a run from that file equals a run that computes it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from mthlib.cli import main
from mthlib.deltas import load_delta
from mthlib.fingerprint import model_fingerprint
from mthlib.masking import Masks, build_mask
from tests.conftest import make_tiny_chat_lm, make_tiny_lm

CONFIG = """
trainer:
  max_steps: 2
  val_check_interval: 10
  limit_val_batches: 0
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {runs}, name: {name}}}
checkpoint:
  every_n_train_steps: 10
model:
  model_name_or_path: {model}
  num_generations: 2
  max_completion_length: 4
  learning_rate: 0.01
  calibration_batch_size: 3
  mask: {mask}
data:
  env:
    class_path: mthlib.envs.AlphabetSort
    init_args: {{max_turns: 1}}
  batch_size: 1
  eval_size: 2
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny"
    model, tokenizer = make_tiny_chat_lm(seed=3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_config(tmp_path, model, name: str, mask: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIG.format(runs=tmp_path / "runs", name=name, model=model, mask=mask))
    return path


def last_delta(tmp_path, name: str):
    return load_delta(tmp_path / "runs" / name / "version_0" / "deltas" / "last.safetensors")


@pytest.mark.parametrize("strategy", ["fisher", "snip"])
def test_masks_build_gives_the_mask_fit_trains_and_fit_from_the_file_is_bitwise_the_same_run(
    strategy, tiny_model, tmp_path
):
    mask = f"{{class_path: {strategy}, init_args: {{sparsity: 0.9, num_samples: 7, seed: 4}}}}"
    computing = write_config(tmp_path, tiny_model, "computing", mask)
    out = tmp_path / "mask.safetensors"
    main(["masks", "build", "--config", str(computing), "--out", str(out)])
    main(["fit", "--config", str(computing)])
    built, trained = Masks.load(out), last_delta(tmp_path, "computing")
    assert sorted(trained.indices) == sorted(n for n in built if built.count(n))
    for name, idx in trained.indices.items():
        assert torch.equal(idx.to(torch.int64), built[name]), name  # bitwise the same mask
    with safe_open(str(out), framework="pt") as handle:
        header = handle.metadata()
    assert header["base_fingerprint"] == trained.base_fingerprint
    assert json.loads(header["strategy"])["init_args"]["num_samples"] == 7

    from_file = write_config(tmp_path, tiny_model, "from_file", f"{{class_path: file, init_args: {{path: {out}}}}}")
    main(["fit", "--config", str(from_file)])
    replayed = last_delta(tmp_path, "from_file")
    assert sorted(replayed.indices) == sorted(trained.indices)
    for name in trained.indices:
        assert torch.equal(replayed.indices[name], trained.indices[name]), name
        assert torch.equal(replayed.values[name], trained.values[name]), name  # same weights, bitwise
    digest = replayed.strategy["init_args"]["digest"]
    assert replayed.strategy["name"] == "file" and len(digest) == 64
    saved = (tmp_path / "runs" / "from_file" / "version_0" / "config.yaml").read_text()
    assert str(out) in saved and f"digest: {digest}" in saved  # the run's config names the file and its digest


def run_mth(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mthlib.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_mask_file_for_another_base_or_changed_since_is_one_error_line(tiny_model, tmp_path):
    other = make_tiny_chat_lm(seed=8)[0]
    masks = build_mask("random", sparsity=0.9).compute(other, None)
    path = tmp_path / "other.safetensors"
    masks.save(path, metadata={"base_fingerprint": model_fingerprint(other), "base_model": "other"})
    config = write_config(tmp_path, tiny_model, "wrong", f"{{class_path: file, init_args: {{path: {path}}}}}")
    result = run_mth("fit", "--config", str(config), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "was built for base fingerprint" in result.stderr.strip().splitlines()[-1]

    changed = run_mth("fit", "--config", str(config), "--model.mask.digest", "0" * 64, cwd=tmp_path)
    assert changed.returncode != 0 and "Traceback" not in changed.stderr
    assert f"{path} has SHA-256" in changed.stderr and "the file changed" in changed.stderr


def test_the_file_strategy_checks_shapes_and_records_the_file(tmp_path):
    model = make_tiny_lm(seed=0)
    masks = build_mask("random", sparsity=0.95).compute(model, None)
    path = tmp_path / "m.safetensors"
    masks.save(path)  # no base fingerprint recorded: only names and shapes are checked
    strategy = build_mask("file", path=str(path))
    assert strategy.compute(model, None) == masks
    assert strategy.sparsity == pytest.approx(1 - masks.density)
    assert strategy.config()["init_args"] == {"path": str(path), "digest": strategy.digest}
    with pytest.raises(ValueError, match="has shape .* the model has"):
        strategy.compute(make_tiny_lm(seed=0, hidden=16), None)
    with pytest.raises(FileNotFoundError, match="mask file not found"):
        build_mask("file", path=str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("form", ["repeated", "list"])
def test_masks_build_layers_several_configs_in_order_as_fit_does(form, tiny_model, tmp_path):
    base = write_config(tmp_path, tiny_model, "layered", "{class_path: random, init_args: {sparsity: 0.9, seed: 1}}")
    seed = tmp_path / "seed.yaml"
    seed.write_text("model:\n  mask:\n    init_args: {seed: 5}\n")
    configs = ["--config", str(base), "--config", str(seed)] if form == "repeated" else ["--config", f"[{base}, {seed}]"]
    main(["masks", "build", *configs, "--out", str(tmp_path / "layered.safetensors")])
    layered = Masks.load(tmp_path / "layered.safetensors")
    model = make_tiny_chat_lm(seed=3)[0]
    expected = build_mask("random", sparsity=0.9, seed=5).compute(model, None)
    first_file_only = build_mask("random", sparsity=0.9, seed=1).compute(model, None)
    assert sorted(layered) == sorted(expected)
    assert all(torch.equal(layered[name], expected[name]) for name in expected)  # the second file's seed won
    assert not all(torch.equal(layered[name], first_file_only[name]) for name in expected)


def test_masks_shuffle_keeps_counts_records_its_source_and_trains_with_the_file_strategy(tiny_model, tmp_path, capsys):
    computing = write_config(tmp_path, tiny_model, "source", "{class_path: random, init_args: {sparsity: 0.9, seed: 1}}")
    source, shuffled = tmp_path / "source.safetensors", tmp_path / "shuffled.safetensors"
    main(["masks", "build", "--config", str(computing), "--out", str(source)])
    main(["masks", "shuffle", "--mask", str(source), "--seed", "7", "--out", str(shuffled)])
    assert "(seed 7) -> " in capsys.readouterr().out
    built, moved = Masks.load(source), Masks.load(shuffled)
    assert moved.shapes == built.shapes and all(moved.count(n) == built.count(n) for n in built)
    assert all(not torch.equal(moved[n], built[n]) for n in built if built.count(n) > 10)  # hundreds of entries each
    assert moved.metadata["derived"] == "shuffle" and moved.metadata["seed"] == "7"
    assert moved.metadata["source_sha256"] == build_mask("file", path=str(source)).digest
    assert moved.metadata["base_fingerprint"] == built.metadata["base_fingerprint"]
    assert json.loads(moved.metadata["source_strategy"])["init_args"]["seed"] == 1

    again, other = tmp_path / "again.safetensors", tmp_path / "other.safetensors"
    main(["masks", "shuffle", "--mask", str(source), "--seed", "7", "--out", str(again)])
    main(["masks", "shuffle", "--mask", str(source), "--seed", "8", "--out", str(other)])
    assert again.read_bytes() == shuffled.read_bytes()  # same seed: the same file, byte for byte
    assert Masks.load(other) != moved

    from_file = write_config(tmp_path, tiny_model, "shuffled", f"{{class_path: file, init_args: {{path: {shuffled}}}}}")
    main(["fit", "--config", str(from_file)])  # the file strategy accepts it: same base fingerprint
    trained = last_delta(tmp_path, "shuffled")
    assert sorted(trained.indices) == sorted(n for n in moved if moved.count(n))
    assert all(torch.equal(idx.to(torch.int64), moved[name]) for name, idx in trained.indices.items())

    from_delta = tmp_path / "from_delta.safetensors"  # a delta's stored entries shuffle the same way
    main(["masks", "shuffle", "--mask", str(tmp_path / "runs/shuffled/version_0/deltas/last.safetensors"),
          "--seed", "7", "--out", str(from_delta)])
    redrawn = Masks.load(from_delta)
    assert {n: redrawn.count(n) for n in redrawn} == {n: int(i.numel()) for n, i in trained.indices.items()}
    assert redrawn.metadata["base_fingerprint"] == trained.base_fingerprint


def test_masks_shuffle_of_a_missing_or_foreign_file_is_one_error_line(tmp_path):
    missing = run_mth("masks", "shuffle", "--mask", "nope.safetensors", "--seed", "1", "--out", "out.safetensors",
                      cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr == "mth masks: error: mask file not found: nope.safetensors\n"
    (tmp_path / "notes.txt").write_text("not a mask")
    foreign = run_mth("masks", "shuffle", "--mask", "notes.txt", "--seed", "1", "--out", "out.safetensors", cwd=tmp_path)
    assert foreign.returncode == 2 and foreign.stderr.startswith("mth masks: error: notes.txt is not a safetensors file")
    assert len(foreign.stderr.splitlines()) == 1 and not (tmp_path / "out.safetensors").exists()
