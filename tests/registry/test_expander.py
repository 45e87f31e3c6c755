"""Expander masks: exact degrees, one pattern per shape, a spectral report, and disjoint second masks."""

import torch

from mthlib.masking import build_mask
from tests.conftest import make_tiny_lm


def degrees(masks, name):
    dense = masks.to_dense(name)
    return dense.sum(dim=1), dense.sum(dim=0)


def test_rows_have_exactly_d_entries_and_columns_are_balanced():
    model = make_tiny_lm(hidden=64, vocab_size=128)
    strategy = build_mask("expander", sparsity=0.9, seed=0)
    masks = strategy.compute(model, None)
    for name in masks.names:
        rows, cols = degrees(masks, name)
        d = strategy.row_degree(masks.shape(name)[1])
        assert (rows == d).all(), name
        assert cols.max() - cols.min() <= 1, name
        assert masks.count(name) == masks.shape(name)[0] * d


def test_one_pattern_per_shape_shared_by_layers_and_projections():
    model = make_tiny_lm(hidden=64, vocab_size=128, layers=3)
    masks = build_mask("expander", sparsity=0.9, seed=1).compute(model, None)
    q = [masks[f"model.layers.{i}.self_attn.q_proj.weight"] for i in range(3)]
    assert all(torch.equal(q[0], other) for other in q[1:])
    assert torch.equal(masks["model.layers.0.self_attn.q_proj.weight"], masks["model.layers.2.self_attn.o_proj.weight"])
    assert torch.equal(masks["model.layers.0.self_attn.k_proj.weight"], masks["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(masks["model.layers.0.mlp.gate_proj.weight"], masks["model.layers.0.mlp.up_proj.weight"])


def test_spectral_gap_is_reported_for_every_shape():
    model = make_tiny_lm(hidden=64, vocab_size=128)
    strategy = build_mask("expander", sparsity=0.9, seed=0)
    strategy.compute(model, None)
    report = strategy.report["64x64"]
    assert report["d_row"] == 6 and report["d_col"] == 6
    assert abs(report["sigma1"] - 6.0) < 1e-4  # sqrt(d_row * d_col) for a biregular graph
    assert 0 < report["sigma2"] < report["sigma1"]
    assert report["ramanujan_bound"] == 2 * 5 ** 0.5


def test_a_second_mask_excluding_the_first_shares_under_ten_percent(tmp_path):
    model = make_tiny_lm(hidden=64, vocab_size=128)
    first = build_mask("expander", sparsity=0.9, seed=0).compute(model, None)
    first.save(tmp_path / "first.safetensors")
    second = build_mask("expander", sparsity=0.9, seed=1, exclude_mask=str(tmp_path / "first.safetensors")).compute(model, None)
    assert first.overlap(second)["o1"] < 0.10
    assert second.total == first.total
    for name in second.names:
        rows, _ = degrees(second, name)
        assert (rows == rows[0]).all()
