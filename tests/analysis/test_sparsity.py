"""Update sparsity: exact counts per tolerance, view, layer and type on hand-built pairs; clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mthlib.analysis.sparsity import DEFAULT_TOLERANCES, update_sparsity

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"
LN = "model.layers.1.input_layernorm.weight"
BIAS = "model.layers.1.self_attn.k_proj.bias"
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
NORM = "model.norm.weight"

LAYERS = {"embed": [EMBED], "0": [Q, DOWN], "1": [UP, LN, BIAS], "head": [HEAD], "other": [NORM]}
TYPES = {"q": [Q], "up": [UP], "down": [DOWN], "embeddings": [EMBED], "norms": [LN, NORM], "biases": [BIAS],
         "lm_head": [HEAD]}


def expected(pair, view, i, names):
    n = sum(pair.numel[name] for name in names)
    changed = sum(pair.changed[view][name][i] for name in names)
    return changed, 1.0 - changed / n


@pytest.mark.parametrize("view", ["stored", "bf16"])
def test_exact_sparsity_overall_per_layer_per_type(hand_pair, view):
    result = update_sparsity(hand_pair.base, hand_pair.finetuned)
    assert result.total == sum(hand_pair.numel.values()) == 108
    assert result.groups("layer") == list(LAYERS)
    assert result.groups("kind") == ["q", "up", "down", "embeddings", "norms", "biases", "lm_head"]
    for i, tol in enumerate(DEFAULT_TOLERANCES):
        changed, sparsity = expected(hand_pair, view, i, list(hand_pair.numel))
        assert result.changed(view, tol) == changed
        assert result.sparsity(view, tol) == pytest.approx(sparsity, abs=1e-15)
        for layer, names in LAYERS.items():
            changed, sparsity = expected(hand_pair, view, i, names)
            assert result.changed(view, tol, layer=layer) == changed, (layer, tol)
            assert result.sparsity(view, tol, layer=layer) == pytest.approx(sparsity, abs=1e-15)
        for kind, names in TYPES.items():
            changed, _ = expected(hand_pair, view, i, names)
            assert result.changed(view, tol, kind=kind) == changed, (kind, tol)


def test_known_totals(hand_pair):
    result = update_sparsity(hand_pair.base, hand_pair.finetuned)
    assert [result.changed("stored", t) for t in DEFAULT_TOLERANCES] == [15, 14, 12, 10]
    assert [result.changed("bf16", t) for t in DEFAULT_TOLERANCES] == [12, 11, 9, 7]
    assert result.sparsity("stored", 1e-5) == pytest.approx(1 - 10 / 108)
    assert result.changed("stored", 1e-5, layer="1", kind="up") == 4


def test_identical_models_are_fully_sparse_and_views_can_be_chosen(hand_pair):
    result = update_sparsity(hand_pair.base, hand_pair.base, tolerances=[0.0], views=["bf16"])
    assert result.views == ["bf16"] and result.sparsity("bf16", 0.0) == 1.0
    with pytest.raises(ValueError, match="was not measured"):
        result.sparsity("bf16", 1e-5)


def test_to_dict_and_tables_agree(hand_pair):
    result = update_sparsity(hand_pair.base, hand_pair.finetuned)
    data = result.to_dict()
    assert data["overall"]["stored"]["1e-05"] == result.sparsity("stored", 1e-5)
    assert data["per_layer"]["0"]["bf16"]["1e-08"] == result.sparsity("bf16", 1e-8, layer="0")
    assert data["per_type"]["norms"]["stored"]["1e-06"] == result.sparsity("stored", 1e-6, kind="norms")
    assert {p["name"] for p in data["params"]} == set(hand_pair.numel)
    tables = result.tables()
    assert len(tables) == 5 and tables[0].rows[0][0] == "stored"


def test_shape_mismatch_names_the_parameter(hand_pair, tmp_path):
    other = {name: torch.zeros(n) for name, n in hand_pair.numel.items()}
    save_file(other, str(tmp_path / "flat.safetensors"))
    with pytest.raises(ValueError, match=r"lm_head\.weight has shape \(6, 4\) in .* but \(24,\) in"):
        update_sparsity(hand_pair.base, tmp_path / "flat.safetensors")


def test_missing_parameter_is_named(hand_pair, tmp_path):
    fewer = {name: torch.zeros(4) for name in (LN, NORM)}
    save_file(fewer, str(tmp_path / "fewer.safetensors"))
    with pytest.raises(ValueError, match=r"parameters differ .*lm_head\.weight is in .* only"):
        update_sparsity(hand_pair.base, tmp_path / "fewer.safetensors")


def test_missing_file_and_bad_arguments(hand_pair, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        update_sparsity(hand_pair.base, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="views must be among"):
        update_sparsity(hand_pair.base, hand_pair.finetuned, views=["fp8"])
    with pytest.raises(ValueError, match="at least one"):
        update_sparsity(hand_pair.base, hand_pair.finetuned, tolerances=[])
