"""RigL keeps its count, moves the entries its rule names, and follows the cosine schedule."""

import math

import torch

from mthlib.masking import Masks, build_mask
from tests.conftest import make_tiny_lm


def calibration(n=2, vocab=64):
    ids = torch.randint(3, vocab, (n, 10), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


def test_drop_count_follows_the_cosine_schedule():
    rigl = build_mask("rigl", sparsity=0.9, drop_fraction=0.4, total_steps=100)
    assert rigl.drop_count(100, 0) == 40
    assert rigl.drop_count(100, 50) == int(0.4 * (1 + math.cos(math.pi / 2)) / 2 * 100)
    assert rigl.drop_count(100, 100) == 0 and rigl.drop_count(100, 500) == 0


def test_update_keeps_counts_and_swaps_least_moved_for_largest_gradient():
    model = make_tiny_lm()
    rigl = build_mask("rigl", sparsity=0.9, drop_fraction=0.5, total_steps=100, include=["*q_proj*"])
    masks = rigl.compute(model, None)
    params = dict(model.named_parameters())
    base = {n: params[n].detach().reshape(-1)[i].clone() for n, i in masks.items()}
    name = "model.layers.0.self_attn.q_proj.weight"
    active = masks[name]
    with torch.no_grad():  # move every active entry by a known amount: entry j by j+1
        moves = torch.arange(1, active.numel() + 1, dtype=torch.float32) * 1e-3
        params[name].view(-1)[active] += moves
    new = rigl.update(masks, model, 0, None, base, calibration())
    assert new.total == masks.total and all(new.count(n) == masks.count(n) for n in masks.names)
    n = rigl.drop_count(active.numel(), 0)
    dropped = set(active[:n].tolist())  # the n least-moved entries
    assert dropped.isdisjoint(new[name].tolist())
    assert set(active[n:].tolist()) <= set(new[name].tolist())
    grown = sorted(set(new[name].tolist()) - set(active.tolist()))
    grads = rigl.accumulate(model, calibration(), lambda w, g: g.abs())[name].reshape(-1)
    frozen = torch.ones_like(grads, dtype=torch.bool)
    frozen[active] = False
    expected = torch.sort(torch.where(frozen, grads, -math.inf), descending=True, stable=True).indices[:n]
    assert grown == sorted(expected.tolist())


def test_no_update_after_total_steps():
    model = make_tiny_lm()
    rigl = build_mask("rigl", sparsity=0.9, total_steps=10)
    masks = rigl.compute(model, None)
    base = {n: torch.zeros(i.numel()) for n, i in masks.items()}
    assert rigl.update(masks, model, 10, None, base, calibration()) == masks
    assert isinstance(masks, Masks)
