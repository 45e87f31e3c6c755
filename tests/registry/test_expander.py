"""`expander`: exact degrees, one pattern per shape, a spectral report, and disjoint second masks."""

import math

import numpy as np
import pytest
import torch

from mthlib.masking import Masks
from mthlib.registry.expander import Expander, biregular_edges, singular_values
from tests.conftest import make_tiny_lm


def degrees(masks: Masks, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    dense = masks.to_dense(name).reshape(masks.shape(name)[0], -1)
    return dense.sum(dim=1), dense.sum(dim=0)


@pytest.fixture
def model():
    """hidden 64, vocab 128: shapes 128x64 (embeddings), 64x64 (q, o), 32x64 (k, v), 128x64 / 64x128 (MLP)."""
    return make_tiny_lm(hidden=64, vocab_size=128, layers=3)


def test_rows_have_exactly_d_entries_and_columns_are_regular(model):
    strategy = Expander(sparsity=0.9, seed=0)
    masks = strategy.compute(model, None)
    assert list(masks.names) == list(strategy.eligible(model))
    for name in masks.names:
        out, inn = masks.shape(name)
        d = strategy.row_degree(inn)
        assert d == max(1, round(0.1 * inn))
        rows, cols = degrees(masks, name)
        assert (rows == d).all(), name
        if out * d % inn == 0:  # every shape here divides: exactly biregular
            assert (cols == out * d // inn).all(), name
        assert masks.count(name) == out * d


def test_columns_are_balanced_when_degrees_do_not_divide():
    edges = biregular_edges(10, 7, 3, np.random.default_rng(0), np.empty(0, dtype=np.int64))
    dense = np.zeros(70, dtype=int)
    dense[edges] = 1
    dense = dense.reshape(10, 7)
    assert (dense.sum(1) == 3).all() and set(dense.sum(0).tolist()) == {4, 5}  # 30 edges over 7 columns
    assert np.unique(edges).size == edges.size == 30


def test_count_differs_from_keep_count_as_documented(model):
    strategy = Expander(sparsity=0.99)
    masks = strategy.compute(model, None)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert strategy.row_degree(64) == 1  # round(0.64) = 1
    assert masks.count(q) == 64 != strategy.keep_count(64 * 64)  # keep_count = 40


def test_dense_patterns_use_the_complement_and_stay_regular():
    strategy = Expander(sparsity=0.25, include=["*q_proj*"])
    masks = strategy.compute(make_tiny_lm(hidden=64), None)
    rows, cols = degrees(masks, "model.layers.0.self_attn.q_proj.weight")
    assert (rows == 48).all() and (cols == 48).all()


def test_one_pattern_per_shape_shared_by_layers_and_projections(model):
    masks = Expander(sparsity=0.9, seed=1).compute(model, None)
    q = [masks[f"model.layers.{i}.self_attn.q_proj.weight"] for i in range(3)]
    assert all(torch.equal(q[0], other) for other in q[1:])
    assert torch.equal(q[0], masks["model.layers.2.self_attn.o_proj.weight"])
    assert torch.equal(masks["model.layers.0.self_attn.k_proj.weight"], masks["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(masks["model.layers.0.mlp.gate_proj.weight"], masks["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(masks["model.embed_tokens.weight"], masks["model.layers.0.mlp.gate_proj.weight"])  # 128x64 both
    other = Expander(sparsity=0.9, seed=2).compute(model, None)
    assert not torch.equal(other["model.layers.0.self_attn.q_proj.weight"], q[0])
    another_model = make_tiny_lm(seed=5, hidden=64, vocab_size=128, layers=3)
    assert other == Expander(sparsity=0.9, seed=2).compute(another_model, None)  # weights do not matter


def test_spectral_report_for_every_shape(model):
    strategy = Expander(sparsity=0.9, seed=0)
    masks = strategy.compute(model, None)
    assert set(strategy.report) == {"128x64", "64x64", "32x64", "64x128"}
    square = strategy.report["64x64"]
    assert square["d_row"] == 6 and square["d_col"] == 6 and square["edges"] == 384 and square["tensors"] == 6
    assert square["sigma1"] == pytest.approx(6.0)  # sqrt(d_row * d_col) for a biregular graph
    assert square["ramanujan_bound"] == pytest.approx(2 * math.sqrt(5))
    for shape, info in strategy.report.items():
        assert all(math.isfinite(v) for v in info.values()), shape
        assert 0 < info["sigma2"] < info["sigma1"]
        assert info["spectral_gap"] == pytest.approx(info["sigma1"] - info["sigma2"])
        assert info["sigma2_over_bound"] < 1.5  # random regular graphs are near-Ramanujan
    dense = masks.to_dense("model.layers.0.mlp.down_proj.weight").double()
    exact = torch.linalg.svdvals(dense)
    flat = masks["model.layers.0.mlp.down_proj.weight"].numpy()
    assert singular_values(64, 128, flat) == pytest.approx((float(exact[0]), float(exact[1])))
    assert strategy.report["64x128"]["sigma2"] == pytest.approx(float(exact[1]))
    quiet = Expander(sparsity=0.9, spectral_report=False)
    quiet.compute(model, None)
    assert "sigma2" not in quiet.report["64x64"]


def test_a_second_mask_shares_no_edge_with_the_first(model, tmp_path):
    first = Expander(sparsity=0.9, seed=0).compute(model, None)
    first.save(tmp_path / "first.safetensors")
    second = Expander(sparsity=0.9, seed=0, exclude_mask=str(tmp_path / "first.safetensors")).compute(model, None)
    overlap = first.overlap(second)
    assert overlap["o1"] < 0.10 and overlap["intersection"] == 0
    assert second.total == first.total
    for name in second.names:
        rows, _ = degrees(second, name)
        assert (rows == rows[0]).all(), name


def test_a_pattern_that_cannot_avoid_the_first_is_an_error():
    forbidden = np.arange(0, 40, dtype=np.int64)  # rows 0-4 of an 8x8 matrix fully forbidden
    with pytest.raises(ValueError, match="row 0 of a 8x8 matrix has 0 allowed columns; needs 2"):
        biregular_edges(8, 8, 2, np.random.default_rng(0), forbidden)


def test_one_dimensional_parameters_get_a_one_row_pattern(model):
    strategy = Expander(sparsity=0.9, include=["*norm*"], include_norms=True)
    masks = strategy.compute(model, None)
    assert all(masks.count(name) == round(0.1 * 64) for name in masks.names)
    assert strategy.report["1x64"]["sigma2"] == 0.0
