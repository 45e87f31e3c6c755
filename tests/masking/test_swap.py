"""Tests of the base swap helpers: swapped_to_base, base_view and frozen_digests."""

from __future__ import annotations

import pytest
import torch

from mthlib.fingerprint import model_fingerprint, state_fingerprint
from mthlib.masking import Masks, SparseAdamW, base_view, frozen_digests, gather_values, swapped_to_base
from tests.conftest import attached, make_tiny_lm

IDS = torch.tensor([[5, 9, 17, 33, 2, 40]])


def _trained(seed: int = 0):
    """A tiny LM, its masks and base values, after three SparseAdamW steps."""
    model = make_tiny_lm(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    masks = Masks(
        {n: torch.sort(torch.randperm(p.numel(), generator=gen)[: p.numel() // 20]).values
         for n, p in model.named_parameters() if p.dim() == 2},
        {n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 2},
    )
    base_values = gather_values(model, masks)
    state = attached(model, masks)
    optimizer = SparseAdamW(state, lr=0.05)
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state.detach()
    return model, masks, base_values


def test_gather_values_reads_the_active_entries(tiny_lm):
    masks = Masks({"model.norm.weight": torch.tensor([1, 4])}, {"model.norm.weight": (32,)})
    values = gather_values(tiny_lm, masks)
    assert torch.equal(values["model.norm.weight"], tiny_lm.model.norm.weight.detach()[[1, 4]])
    with pytest.raises(ValueError, match="does not have"):
        gather_values(tiny_lm, Masks({}, {"nope": (3,)}))


def test_gather_values_copies_unless_asked_to_read_a_complete_mask_in_place(tiny_lm):
    """``copy=False`` hands out a complete mask's parameter itself (no gather, no copy); anything else is a copy."""
    norm, head = tiny_lm.model.norm.weight, tiny_lm.model.layers[0].mlp.up_proj.weight
    masks = Masks({"model.norm.weight": torch.arange(32), "model.layers.0.mlp.up_proj.weight": torch.tensor([0, 7])},
                  {"model.norm.weight": (32,), "model.layers.0.mlp.up_proj.weight": tuple(head.shape)})
    read = gather_values(tiny_lm, masks, copy=False)
    assert read["model.norm.weight"].data_ptr() == norm.data_ptr()
    assert torch.equal(read["model.norm.weight"], norm.detach())
    assert torch.equal(read["model.layers.0.mlp.up_proj.weight"], head.detach().reshape(-1)[[0, 7]])
    copied = gather_values(tiny_lm, masks)
    assert copied["model.norm.weight"].data_ptr() != norm.data_ptr()
    copied["model.norm.weight"].add_(1.0)
    read["model.layers.0.mlp.up_proj.weight"].add_(1.0)
    assert torch.equal(read["model.norm.weight"], norm.detach())  # the copies changed, the model did not
    assert torch.equal(gather_values(tiny_lm, masks)["model.layers.0.mlp.up_proj.weight"],
                       head.detach().reshape(-1)[[0, 7]])


def test_swapped_to_base_computes_the_base_and_restores_the_trained_values():
    model, masks, base_values = _trained()
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        base_logits = make_tiny_lm(seed=0)(input_ids=IDS).logits
        assert not torch.allclose(model(input_ids=IDS).logits, base_logits)
        with swapped_to_base(model, masks, base_values) as swapped:
            assert swapped is model
            assert torch.equal(model(input_ids=IDS).logits, base_logits)
    for name, param in model.named_parameters():
        assert torch.equal(param, trained[name]), name
    with pytest.raises(KeyError), swapped_to_base(model, masks, base_values):
        raise KeyError("boom")
    for name, param in model.named_parameters():
        assert torch.equal(param, trained[name]), name


def test_base_view_gives_the_base_fingerprint_and_leaves_the_model_alone():
    model, masks, base_values = _trained()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert state_fingerprint(base_view(model, masks, base_values)) == model_fingerprint(make_tiny_lm(seed=0))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    names = [name for name, _ in frozen_digests(model, masks, base_values)]
    assert names == sorted(n for n, _ in model.named_parameters())
    base_digests = dict(frozen_digests(make_tiny_lm(seed=0), masks, base_values))
    assert dict(frozen_digests(model, masks, base_values)) == base_digests
    with torch.no_grad():
        frozen = (~masks.to_dense("model.layers.0.mlp.up_proj.weight")).nonzero()[0]
        model.model.layers[0].mlp.up_proj.weight[tuple(frozen)] += 1.0
    changed = {n for n, d in frozen_digests(model, masks, base_values) if d != base_digests[n]}
    assert changed == {"model.layers.0.mlp.up_proj.weight"}
