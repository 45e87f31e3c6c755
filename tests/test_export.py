"""``export_model``: HF folders that reload with identical logits, delta folders with a model card, atomic output."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from mthlib.deltas import load_delta, save_delta
from mthlib.export import DELTA_FILENAME, export_model
from mthlib.fingerprint import model_fingerprint

STRATEGY = {"class_path": "mthlib.registry.fisher.Fisher", "init_args": {"sparsity": 0.99}}


def tiny_tokenizer():
    vocab = {f"t{i}": i for i in range(64)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t3")


@pytest.fixture
def trained_delta(tiny_lm, tmp_path):
    """(untouched base copy, trained model, delta path)."""
    base = copy.deepcopy(tiny_lm)
    fingerprint = model_fingerprint(tiny_lm)
    gen = torch.Generator().manual_seed(0)
    indices = {}
    with torch.no_grad():
        for name, param in tiny_lm.named_parameters():
            idx = torch.randperm(param.numel(), generator=gen)[: max(1, param.numel() // 20)].sort().values
            param.view(-1)[idx] += 0.1 * torch.randn(idx.numel(), generator=gen)
            indices[name] = idx
    path = save_delta(tmp_path / "delta.safetensors", tiny_lm, indices, base_model="tiny-base",
                      base_fingerprint=fingerprint, strategy=STRATEGY, sparsity=0.95, step=12)
    return base, tiny_lm, path


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_hf_export_reloads_with_identical_logits(trained_delta, tmp_path):
    base, trained, path = trained_delta
    out = export_model(path, tmp_path / "exported", base_model=base, tokenizer=tiny_tokenizer())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(reloaded, ids), logits(trained, ids))
    assert AutoTokenizer.from_pretrained(out)("t1 t5")["input_ids"] == [1, 5]
    card = (out / "README.md").read_text()
    assert "tiny-base" in card and load_delta(path).base_fingerprint in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors", "exported"]


def test_delta_export_copies_the_delta_and_writes_a_card(trained_delta, tmp_path):
    _, _, path = trained_delta
    out = export_model(path, tmp_path / "shared", format="delta")
    copied, original = load_delta(out / DELTA_FILENAME), load_delta(path)
    assert copied.metadata == original.metadata
    assert all(torch.equal(copied.values[n], original.values[n]) for n in original.values)
    card = (out / "README.md").read_text()
    assert original.base_fingerprint in card and "mthlib.registry.fisher.Fisher" in card and "| step | 12 |" in card


def test_existing_folder_needs_overwrite(trained_delta, tmp_path):
    _, _, path = trained_delta
    out = tmp_path / "shared"
    export_model(path, out, format="delta")
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(path, out, format="delta")
    export_model(path, out, format="delta", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", DELTA_FILENAME]


def test_other_base_refused_and_nothing_written(trained_delta, tmp_path):
    base, _, path = trained_delta
    with torch.no_grad():
        base.model.norm.weight[0] += 1.0
    with pytest.raises(ValueError, match="fingerprint"):
        export_model(path, tmp_path / "exported", base_model=base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors"]


def test_base_loaded_lazily_through_mthlib_models(trained_delta, tmp_path, monkeypatch):
    base, trained, path = trained_delta
    requested = []

    def load_model(name, dtype):
        requested.append((name, dtype))
        return base, tiny_tokenizer()

    monkeypatch.setitem(sys.modules, "mthlib.models", types.SimpleNamespace(load_model=load_model))
    out = export_model(path, tmp_path / "exported")
    assert requested == [("tiny-base", "float32")]
    assert (out / "tokenizer.json").is_file()
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), ids), logits(trained, ids))


def test_bad_format_is_refused(trained_delta, tmp_path):
    _, _, path = trained_delta
    with pytest.raises(ValueError, match="'hf', 'delta' or 'peft'"):
        export_model(path, tmp_path / "x", format="gguf")
