"""Weight and index-set sources: every spec kind, lazy model loading, fingerprints that match the model's."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from mthlib.analysis.index_sets import DeltaIndexSets, resolve_index_sets
from mthlib.analysis.sources import open_weights, resolve_weights, run_deltas, spec_kind, update_indices
from mthlib.deltas import load_delta, write_delta
from mthlib.fingerprint import model_fingerprint


def test_hf_folder_yields_the_models_parameters_and_fingerprint(tiny_lm, tmp_path):
    tiny_lm.save_pretrained(tmp_path / "m")
    params = dict(tiny_lm.named_parameters())
    seen = dict(open_weights(tmp_path / "m"))
    assert seen.keys() == params.keys() and "lm_head.weight" not in seen
    assert all(torch.equal(seen[name], params[name]) for name in params)
    assert resolve_weights(tmp_path / "m").fingerprint() == model_fingerprint(tiny_lm)


def test_sharded_folder_reads_through_the_index(tiny_lm_untied, tmp_path):
    tiny_lm_untied.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    source = resolve_weights(tmp_path / "m")
    assert source.names() == sorted(dict(tiny_lm_untied.named_parameters()))
    assert source.fingerprint() == model_fingerprint(tiny_lm_untied)


def test_delta_is_laid_over_the_base_and_run_folder_picks_the_highest_step(tiny_run, tmp_path):
    delta = load_delta(tiny_run.delta)
    older = type(delta)(delta.indices, delta.values, {**delta.metadata, "step": "3"}, delta.shapes)
    write_delta(older, tiny_run.delta.parent.parent / "last.safetensors")
    write_delta(delta, tiny_run.delta.parent / "last.safetensors")  # the newest, linked under its usual name
    run = tiny_run.delta.parent.parent
    assert spec_kind(run) == "run"
    assert [(step, path.name) for step, path in run_deltas(run)] == [
        (3, "last.safetensors"), (10, "step_000010.safetensors")]
    trained = dict(tiny_run.trained.named_parameters())
    for source in (resolve_weights(tiny_run.delta, tiny_run.base_dir), resolve_weights(run)):
        for name in source.names():
            assert torch.equal(source.get(name), trained[name]), name


def test_index_sets_of_a_delta_mask_and_weights(tiny_run, hand_pair, tmp_path):
    stored = resolve_index_sets(tiny_run.delta)
    assert isinstance(stored, DeltaIndexSets)
    assert all(torch.equal(stored.indices(n), tiny_run.indices[n]) for n in stored.names())
    save_file({"w.indices": torch.tensor([2, 5]), "w.shape": torch.tensor([3, 4])}, str(tmp_path / "m.safetensors"),
              metadata={"format": "mthlib.masks"})
    mask = resolve_index_sets(tmp_path / "m.safetensors")
    assert mask.names() == ["w"] and mask.shape("w") == (3, 4) and mask.indices("w").tolist() == [2, 5]
    changed = update_indices(hand_pair.base, hand_pair.finetuned, tol=1e-6)
    assert changed["model.layers.0.self_attn.q_proj.weight"].tolist() == [2, 3, 4]
    assert changed["model.norm.weight"].tolist() == []
    assert update_indices(hand_pair.base, hand_pair.finetuned, tol=1e-6, view="bf16")[
        "model.layers.1.mlp.up_proj.weight"].tolist() == [3]


def test_delta_of_another_base_is_one_clear_line(tiny_run, hand_pair):
    with pytest.raises(ValueError) as err:
        resolve_weights(tiny_run.delta, hand_pair.base)
    message = str(err.value)
    assert "\n" not in message and load_delta(tiny_run.delta).base_fingerprint in message
    assert resolve_weights(hand_pair.base).fingerprint() in message


def test_model_names_load_lazily_through_mthlib_models(tiny_lm, monkeypatch):
    requested = []

    def load_model(name):
        requested.append(name)
        return tiny_lm, None

    monkeypatch.setitem(sys.modules, "mthlib.models", types.SimpleNamespace(load_model=load_model))
    source = resolve_weights("embedded")
    assert requested == ["embedded"] and source.fingerprint() == model_fingerprint(tiny_lm)


def test_bad_specs_give_clear_errors(tmp_path, hand_pair):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    (tmp_path / "emptydir").mkdir()
    save_file({"w.indices": torch.tensor([0]), "w.shape": torch.tensor([2])}, str(tmp_path / "m.safetensors"),
              metadata={"format": "mthlib.masks"})
    with pytest.raises(ValueError, match="unsupported file"):
        resolve_weights(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        resolve_weights(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="neither an HF model folder"):
        resolve_weights(tmp_path / "emptydir")
    with pytest.raises(ValueError, match="mask file"):
        resolve_weights(tmp_path / "m.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        resolve_weights(str(tmp_path / "gone"))
    with pytest.raises(ValueError, match="delta_sets must be"):
        resolve_index_sets(hand_pair.finetuned, hand_pair.base, delta_sets="all")
