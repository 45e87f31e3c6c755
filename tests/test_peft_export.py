"""``mth export --format peft``: SHiRA adapters that PEFT loads with the merged export's logits, and the refusals."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import types

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from mthlib.cli import main
from mthlib.deltas import load_delta, save_delta
from mthlib.export import export_model
from mthlib.fingerprint import model_fingerprint
from tests.conftest import make_tiny_lm, make_tiny_tokenizer

peft = pytest.importorskip("peft")

COUNTS = {  # uneven per-layer counts; q_proj's 200 set r = ceil(200 / 64) = 4
    "model.layers.0.self_attn.q_proj.weight": 200,
    "model.layers.0.self_attn.k_proj.weight": 1,
    "model.layers.1.mlp.down_proj.weight": 37,
    "lm_head.weight": 90,
}
ADAPTER = "adapter_model.safetensors"


def train(model: nn.Module, counts: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Move ``counts[name]`` random entries of each named parameter; return their sorted flat indices."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters(remove_duplicate=False))
    indices = {}
    with torch.no_grad():
        for name, count in counts.items():
            param = params[name]
            idx = torch.randperm(param.numel(), generator=gen)[:count].sort().values
            param.view(-1)[idx] += 0.1 * torch.randn(count, generator=gen)
            indices[name] = idx
    return indices


def make_delta(model: nn.Module, counts: dict[str, int], path, base_model: str = "tiny-base"):
    """Train ``model`` in place on ``counts`` and save the delta against its state before; return the path."""
    fingerprint = model_fingerprint(model)
    indices = train(model, counts)
    return save_delta(path, model, indices, base_model=base_model, base_fingerprint=fingerprint,
                      strategy={"class_path": "random"}, sparsity=0.99, step=3)


@pytest.fixture
def linear_delta(tmp_path):
    """(untouched untied base, trained copy, delta path) for a delta on Linear weights only."""
    base = make_tiny_lm(tie=False)
    trained = copy.deepcopy(base)
    return base, trained, make_delta(trained, COUNTS, tmp_path / "delta.safetensors")


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def test_adapter_gives_the_merged_exports_logits_and_weights(linear_delta, tmp_path):
    base, _, path = linear_delta
    merged = AutoModelForCausalLM.from_pretrained(export_model(path, tmp_path / "hf", base_model=copy.deepcopy(base)))
    out = export_model(path, tmp_path / "adapter", base_model=copy.deepcopy(base), format="peft")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", ADAPTER]
    adapted = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert not torch.equal(logits(base, IDS), logits(merged, IDS))
    torch.testing.assert_close(logits(adapted, IDS), logits(merged, IDS), rtol=0, atol=1e-6)
    unloaded, expected = adapted.merge_and_unload().state_dict(), merged.state_dict()
    assert unloaded.keys() == expected.keys()
    for name, weight in unloaded.items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=1e-7, msg=name)


def test_adapter_loads_with_peft_alone(linear_delta, tmp_path):
    base, trained, path = linear_delta
    base.save_pretrained(tmp_path / "base")
    out = export_model(path, tmp_path / "adapter", base_model=copy.deepcopy(base), format="peft")
    script = (
        "import sys, torch\n"
        "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r}), {str(out)!r})\n"
        "assert not [m for m in sys.modules if m.startswith('mthlib')], 'mthlib was imported'\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        f"with torch.no_grad():\n    torch.save(model(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits(trained, IDS), rtol=0, atol=1e-6)


def test_config_and_padding_follow_shira_layout(linear_delta, tmp_path):
    base, _, path = linear_delta
    out = export_model(path, tmp_path / "adapter", base_model=base, format="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    shapes, delta = {}, load_delta(path)
    for name in COUNTS:
        shape = delta.shapes[name]
        shapes[name.removesuffix(".weight")] = (shape, math.ceil(COUNTS[name] / sum(shape)))
    r = max(need for _, need in shapes.values())
    assert (config["peft_type"], config["r"], config["base_model_name_or_path"]) == ("SHIRA", r, "tiny-base") and r == 4
    assert sorted(config["target_modules"]) == sorted(shapes)
    with safe_open(str(out / ADAPTER), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    assert len(tensors) == 2 * len(shapes)
    for module, ((rows, cols), _) in shapes.items():
        prefix = f"base_model.model.{module}"
        values, (row, col) = tensors[f"{prefix}.shira_weight"], tensors[f"{prefix}.shira_indices"].long()
        assert values.numel() == row.numel() == r * (rows + cols)
        flat = row * cols + col
        trained = delta.indices[module + ".weight"].long()
        is_trained = torch.isin(flat, trained)
        assert int(is_trained.sum()) == trained.numel() and (values[~is_trained] == 0).all()
        assert (values[is_trained] != 0).all()
        free = torch.ones(rows * cols, dtype=torch.bool)
        free[trained] = False
        expected_padding = free.nonzero().squeeze(1)[: r * (rows + cols) - trained.numel()]
        assert torch.equal(flat[~is_trained].sort().values, expected_padding), f"{module}: not the lowest free entries"
    card = (out / "README.md").read_text()
    assert f"r={r}" in card and "PeftModel.from_pretrained" in card


def refusal(model: nn.Module, counts: dict[str, int], tmp_path) -> str:
    """The one-line error of exporting a delta of ``counts`` over ``model`` as an adapter; checks nothing is written."""
    path = make_delta(copy.deepcopy(model), counts, tmp_path / "refused.safetensors")
    with pytest.raises(ValueError) as error:
        export_model(path, tmp_path / "adapter", base_model=model, format="peft")
    assert not (tmp_path / "adapter").exists()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_untied_embedding_is_refused(tmp_path):
    message = refusal(make_tiny_lm(tie=False), {"model.embed_tokens.weight": 5, **COUNTS}, tmp_path)
    assert "model.embed_tokens.weight" in message and "Embedding" in message and "include_embeddings: false" in message


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight"])
def test_tied_embedding_is_refused_under_either_name(tmp_path, name):
    message = refusal(make_tiny_lm(tie=True), {name: 5}, tmp_path)
    other = "lm_head.weight" if name == "model.embed_tokens.weight" else "model.embed_tokens.weight"
    assert f"cannot export {name}" in message and f"one tensor with {other}" in message
    assert "include_embeddings: false" in message


def test_norm_is_refused(tmp_path):
    message = refusal(make_tiny_lm(tie=False), {"model.layers.0.input_layernorm.weight": 3}, tmp_path)
    assert "model.layers.0.input_layernorm.weight" in message and "include_norms: false" in message


def test_bias_is_refused(tmp_path):
    model = make_tiny_lm(tie=False)
    model.model.layers[0].self_attn.q_proj.bias = nn.Parameter(torch.zeros(32))
    message = refusal(model, {"model.layers.0.self_attn.q_proj.bias": 3}, tmp_path)
    assert "model.layers.0.self_attn.q_proj.bias" in message and "include_biases: false" in message


def test_layer_too_dense_for_any_r_is_refused(tmp_path):
    # q_proj (32x32) fully trained needs r=16: 16 * (32 + 16) = 768 entries overfill k_proj's 16 * 32 = 512.
    counts = {"model.layers.0.self_attn.q_proj.weight": 1024, "model.layers.0.self_attn.k_proj.weight": 2}
    message = refusal(make_tiny_lm(tie=False), counts, tmp_path)
    assert "r=16" in message and "overfills model.layers.0.self_attn.k_proj.weight" in message and "768" in message


def test_missing_peft_is_one_line_before_the_base_loads(linear_delta, tmp_path, monkeypatch):
    _, _, path = linear_delta
    monkeypatch.setitem(sys.modules, "peft", None)
    monkeypatch.setitem(sys.modules, "mthlib.models", types.SimpleNamespace(load_model=None))
    with pytest.raises(ValueError, match=r"^--format peft needs the 'peft' package: pip install peft$"):
        export_model(path, tmp_path / "adapter", format="peft")
    assert not (tmp_path / "adapter").exists()


def test_cli_writes_an_adapter_of_the_recorded_base(tmp_path, capsys):
    tokenizer = make_tiny_tokenizer()
    base = make_tiny_lm(tie=False, vocab_size=len(tokenizer))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    trained = copy.deepcopy(base)
    path = make_delta(trained, COUNTS, tmp_path / "delta.safetensors", base_model=str(tmp_path / "base"))
    main(["export", "--delta", str(path), "--out", str(tmp_path / "adapter"), "--format", "peft"])
    assert "wrote" in capsys.readouterr().out
    adapted = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")  # finds the base in the config
    torch.testing.assert_close(logits(adapted, IDS), logits(trained, IDS), rtol=0, atol=1e-6)
    norm = make_delta(copy.deepcopy(base), {"model.norm.weight": 2}, tmp_path / "norm.safetensors",
                      base_model=str(tmp_path / "base"))
    with pytest.raises(SystemExit) as stop:
        main(["export", "--delta", str(norm), "--out", str(tmp_path / "refused"), "--format", "peft"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # the rest: load progress bars
    assert stop.value.code == 2 and len(errors) == 1 and "include_norms: false" in errors[0]
    assert errors[0].startswith("mth export: error: cannot export model.norm.weight as a PEFT adapter")
