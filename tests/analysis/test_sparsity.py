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


def save_pair(tmp_path, base: dict, finetuned: dict):
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(finetuned, str(tmp_path / "ft.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


def test_layer_average_pooled_or_unweighted_as_the_papers_script(tmp_path):
    ln0 = "model.layers.0.input_layernorm.weight"
    base = {Q: torch.zeros(10, 10), ln0: torch.zeros(10), UP: torch.zeros(4, 4)}
    ft = {name: t.clone() for name, t in base.items()}
    ft[Q].view(-1)[:10] = 1.0  # 10 of 100 changed
    ft[ln0][:5] = 1.0  # 5 of 10 changed
    ft[UP].view(-1)[:4] = 1.0  # 4 of 16: layer 1 has one parameter
    paths = save_pair(tmp_path, base, ft)
    pooled = update_sparsity(*paths, tolerances=[1e-5], views=["stored"])
    unweighted = update_sparsity(*paths, tolerances=[1e-5], views=["stored"], layer_average="unweighted")
    assert pooled.layer_sparsity("stored", 1e-5, "0") == pytest.approx(1 - 15 / 110)  # entries pooled: 0.8636
    assert unweighted.layer_sparsity("stored", 1e-5, "0") == pytest.approx(1 - (10 / 100 + 5 / 10) / 2)  # 0.7
    gap = pooled.layer_sparsity("stored", 1e-5, "0") - unweighted.layer_sparsity("stored", 1e-5, "0")
    assert gap == pytest.approx(0.16363636, abs=1e-8)  # unweighted: the 10-entry norm weighs as much as the matrix
    assert pooled.layer_sparsity("stored", 1e-5, "1") == unweighted.layer_sparsity("stored", 1e-5, "1") == 0.75
    for result in (pooled, unweighted):  # the total and the types are pooled whatever the layer average
        assert result.sparsity("stored", 1e-5) == pytest.approx(1 - 19 / 126)
        assert result.sparsity("stored", 1e-5, kind="norms") == 0.5
    data, tables = unweighted.to_dict(), unweighted.tables()
    assert data["layer_average"] == "unweighted" and "mean over the layer's parameters" in data["layer_average_definition"]
    assert data["per_layer"]["0"]["stored"]["1e-05"] == pytest.approx(0.7)
    assert pooled.to_dict()["per_layer"]["0"]["stored"]["1e-05"] == pytest.approx(1 - 15 / 110)
    layer_table = next(t for t in tables if "per layer" in t.title)
    assert "unweighted: mean over the layer's parameters of 1 - changed / n" in layer_table.title
    assert layer_table.rows[0][:3] == ["0", 110, pytest.approx(70.0)]
    assert "pooled: 1 - changed / n over all entries" in next(t for t in pooled.tables() if "per layer" in t.title).title
    with pytest.raises(ValueError, match="layer_average must be one of \\['pooled', 'unweighted'\\], not 'mean'"):
        update_sparsity(*paths, layer_average="mean")


TOL16 = 1.0013580322265625e-05  # 1e-5 rounded to bf16: rounds up
BOUNDARY = [  # (θ0, θ1), all exact in bf16, and whether each comparison counts the entry as changed at tol 1e-5
    (0.0, TOL16, True, False),  # |d| = 1.00136e-5 > 1e-5 exactly, but not > bf16(1e-5): the tolerance's rounding
    (-2.428889274597168e-06, 7.599592208862305e-06, True, False),  # |d| = 1.00285e-5, bf16 subtraction: 1.00136e-5
    (0.0, 9.953975677490234e-06, False, False),  # just below 1e-5 either way
    (0.0, 2.002716064453125e-05, True, True),  # clearly above either way
    (3.0, 3.0, False, False),  # unchanged
]


def test_compare_dtype_bf16_takes_difference_and_tolerance_in_bf16_as_the_papers_script(tmp_path):
    a = torch.tensor([row[0] for row in BOUNDARY])
    b = torch.tensor([row[1] for row in BOUNDARY])
    assert torch.equal(a.bfloat16().float(), a) and torch.equal(b.bfloat16().float(), b)  # no rounding of the values
    paths = save_pair(tmp_path, {UP: a}, {UP: b})
    exact = update_sparsity(*paths, tolerances=[1e-5])
    paper = update_sparsity(*paths, tolerances=[1e-5], compare_dtype="bf16")
    assert exact.changed("bf16", 1e-5) == sum(row[2] for row in BOUNDARY) == 3
    assert paper.changed("bf16", 1e-5) == sum(row[3] for row in BOUNDARY) == 1
    spec = (b.bfloat16() - a.bfloat16()).abs() > torch.tensor(1e-5, dtype=torch.bfloat16)
    assert paper.changed("bf16", 1e-5) == int(spec.sum())  # the script's arithmetic, entry for entry
    isclose = torch.isclose(b.bfloat16() - a.bfloat16(), torch.zeros(len(BOUNDARY), dtype=torch.bfloat16), atol=1e-5)
    assert paper.changed("bf16", 1e-5) == int((~isclose).sum())
    assert paper.changed("stored", 1e-5) == exact.changed("stored", 1e-5) == 3  # the stored view stays float64
    assert paper.to_dict()["compare_dtype"] == "bf16" and "rounded to bf16" in paper.tables()[0].title
    assert "compared in float64" in exact.to_dict()["compare_definition"]
    with pytest.raises(ValueError, match="compare_dtype bf16 computes the bf16 view's differences in bf16"):
        update_sparsity(*paths, views=["stored"], compare_dtype="bf16")
    with pytest.raises(ValueError, match="compare_dtype must be one of \\['float64', 'bf16'\\], not 'fp16'"):
        update_sparsity(*paths, compare_dtype="fp16")
