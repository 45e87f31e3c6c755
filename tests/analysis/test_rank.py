"""Rank of update matrices: a sum of k outer products has rank k; embeddings only on request."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mthlib.analysis.rank import update_rank

Q = "model.layers.0.self_attn.q_proj.weight"


def _pair(tmp_path, ranks, *, extra=None):
    gen = torch.Generator().manual_seed(0)
    base, ft = {}, {}
    for layer, k in enumerate(ranks):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        base[name] = torch.randn(16, 12, generator=gen)
        update = sum((torch.randn(16, 1, generator=gen) @ torch.randn(1, 12, generator=gen) for _ in range(k)),
                     torch.zeros(16, 12))
        ft[name] = base[name] + update
    for name, (b, f) in (extra or {}).items():
        base[name], ft[name] = b, f
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


def test_sum_of_k_outer_products_has_rank_k(tmp_path):
    ranks = [0, 1, 3, 7, 12]
    base, ft = _pair(tmp_path, ranks)
    result = update_rank(base, ft)
    by_name = {m.name: m for m in result.matrices}
    for layer, k in enumerate(ranks):
        matrix = by_name[f"model.layers.{layer}.self_attn.q_proj.weight"]
        assert (matrix.rank, matrix.full, matrix.shape) == (k, 12, (16, 12))
        assert matrix.percent == pytest.approx(100 * k / 12)
    assert result.mean_percent() == pytest.approx(100 * sum(ranks) / (12 * len(ranks)))
    assert result.mean_percent("q") == result.mean_percent()
    assert "eps(float32)" in result.tolerance


def test_float64_and_explicit_rtol(tmp_path):
    base, ft = _pair(tmp_path, [4])
    # float64 resolves the fp32 rounding of W0 + ΔW on a dense update as extra rank; float32 (default) does not
    assert update_rank(base, ft, dtype="float64").matrices[0].rank == 12
    assert update_rank(base, ft, dtype="float64", rtol=1e-5).matrices[0].rank == 4
    assert update_rank(base, ft, rtol=0.99).matrices[0].rank == 1  # only the largest singular value survives
    with pytest.raises(ValueError, match="dtype must be one of"):
        update_rank(base, ft, dtype="float16")


def test_vectors_skipped_and_embeddings_opt_in(tmp_path):
    eye = torch.eye(8)
    extra = {"model.embed_tokens.weight": (torch.zeros(8, 8), eye), "model.norm.weight": (torch.zeros(8), torch.ones(8))}
    base, ft = _pair(tmp_path, [2], extra=extra)
    assert [m.name for m in update_rank(base, ft).matrices] == [Q]
    with_embed = update_rank(base, ft, include_embeddings=True)
    assert {m.name: m.rank for m in with_embed.matrices} == {"model.embed_tokens.weight": 8, Q: 2}
    data = with_embed.to_dict()
    assert data["per_type"] == {"q": pytest.approx(100 * 2 / 12), "embeddings": 100.0}
