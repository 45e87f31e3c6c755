"""`rigl` keeps its count, moves the entries its rule names, and follows the cosine schedule."""

import math

import pytest
import torch

from mthlib.masking import MaskCallback, Masks, gather_values
from mthlib.registry.magnitude import Magnitude
from mthlib.registry.rigl import RigL
from tests.conftest import make_tiny_lm
from tests.masking.test_callback import TinyData, TinyModule, frozen_and_active, trainer

Q0, Q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"


def dense_abs_grads(model, batches, names):
    """|summed log-likelihood gradient|, computed independently with autograd."""
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(params[name]) for name in names}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for name in names:
            total[name] += params[name].grad
    model.zero_grad()
    return {name: g.abs().reshape(-1) for name, g in total.items()}


def top_frozen(grad, active, count, blocked=None):
    """Flat indices of the ``count`` largest ``grad`` entries outside ``active`` (ties: lower index)."""
    score = grad.clone()
    score[active] = -math.inf
    if blocked is not None:
        score[blocked] = -math.inf
    return sorted(torch.sort(score, descending=True, stable=True).indices[:count].tolist())


def move(model, name, indices, amounts):
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[indices] += amounts


def test_drop_fraction_follows_the_cosine_schedule():
    rigl = RigL(drop_fraction=0.4, total_steps=100)
    assert rigl.fraction_at(0) == pytest.approx(0.4)
    assert rigl.fraction_at(50) == pytest.approx(0.2)
    assert rigl.fraction_at(25) == pytest.approx(0.4 * (1 + math.cos(math.pi / 4)) / 2)
    assert rigl.fraction_at(100) == pytest.approx(0.0) and rigl.fraction_at(500) == pytest.approx(0.0)
    assert [rigl.drop_count(1000, s) for s in (0, 25, 50, 75, 100)] == [400, 341, 200, 58, 0]


def test_update_drops_least_moved_and_grows_largest_gradient_per_tensor(tiny_lm, calibration_batches):
    rigl = RigL(sparsity=0.9, drop_fraction=0.5, total_steps=100, include=["*q_proj*"])
    masks = rigl.compute(tiny_lm, None)
    base = gather_values(tiny_lm, masks)
    active = masks[Q0]
    count = active.numel()
    move(tiny_lm, Q0, active, torch.arange(count, 0, -1, dtype=torch.float32) * 1e-3)  # later entries moved less
    new = rigl.update(masks, tiny_lm, 0, None, base, calibration_batches)
    n = rigl.drop_count(count, 0)
    assert n == count // 2 and new.count(Q0) == count and new.count(Q1) == masks.count(Q1)
    grads = dense_abs_grads(tiny_lm, calibration_batches, [Q0, Q1])
    assert set(new[Q0].tolist()) == set(active[: count - n].tolist()) | set(top_frozen(grads[Q0], active, n))
    # layer 1 did not move: all changes tie at 0, so the lowest indices are dropped
    assert set(new[Q1].tolist()) == set(masks[Q1][n:].tolist()) | set(top_frozen(grads[Q1], masks[Q1], n))


def test_global_allocation_keeps_the_total_and_moves_entries_between_tensors(tiny_lm, calibration_batches):
    rigl = RigL(sparsity=0.9, drop_fraction=0.4, total_steps=100, include=["*q_proj*"], allocation="global")
    masks = rigl.compute(tiny_lm, None)
    base = gather_values(tiny_lm, masks)
    move(tiny_lm, Q0, masks[Q0], torch.full((masks.count(Q0),), 0.01))
    new = rigl.update(masks, tiny_lm, 0, None, base, calibration_batches)
    n = rigl.drop_count(masks.total, 0)
    assert new.total == masks.total and n <= masks.count(Q1)
    assert set(masks[Q0].tolist()) <= set(new[Q0].tolist())  # every moved entry survives
    assert len(set(masks[Q1].tolist()) - set(new[Q1].tolist())) == n  # the n unmoved drops come from layer 1
    grads = dense_abs_grads(tiny_lm, calibration_batches, [Q0, Q1])
    scores = torch.cat([grads[Q0].clone(), grads[Q1].clone()])
    scores[masks[Q0]] = -math.inf
    scores[masks[Q1] + grads[Q0].numel()] = -math.inf
    grown = torch.sort(scores, descending=True, stable=True).indices[:n]
    expected_q0 = set(masks[Q0].tolist()) | {i for i in grown.tolist() if i < grads[Q0].numel()}
    assert set(new[Q0].tolist()) == expected_q0


def test_grown_entries_avoid_exclude_mask(tiny_lm, calibration_batches, tmp_path):
    plain = RigL(sparsity=0.9, include=["*q_proj*"])
    masks = plain.compute(tiny_lm, None)
    grads = dense_abs_grads(tiny_lm, calibration_batches, [Q0])
    favourites = torch.tensor(top_frozen(grads[Q0], masks[Q0], 100))  # the entries rigl would grow first
    Masks({Q0: favourites}, {Q0: (32, 32)}).save(tmp_path / "task1.safetensors")
    rigl = RigL(sparsity=0.9, include=["*q_proj*"], exclude_mask=str(tmp_path / "task1.safetensors"))
    new = rigl.update(masks, tiny_lm, 0, None, gather_values(tiny_lm, masks), calibration_batches)
    grown = sorted(set(new[Q0].tolist()) - set(masks[Q0].tolist()))
    n = rigl.drop_count(masks.count(Q0), 0)
    assert len(grown) == n and not set(grown) & set(favourites.tolist())
    assert grown == top_frozen(grads[Q0], masks[Q0], n, blocked=favourites)


def test_no_change_after_total_steps_and_batches_are_required(tiny_lm, calibration_batches):
    rigl = RigL(sparsity=0.9, total_steps=10)
    masks = rigl.compute(tiny_lm, None)
    base = gather_values(tiny_lm, masks)
    assert rigl.update(masks, tiny_lm, 10, None, base, calibration_batches) == masks
    with pytest.raises(ValueError, match="rigl needs calibration batches"):
        rigl.update(masks, tiny_lm, 0, None, base, None)


def test_initial_masks(tiny_lm):
    a = RigL(sparsity=0.9, seed=0).compute(tiny_lm, None)
    assert a == RigL(sparsity=0.9, seed=0).compute(tiny_lm, None)
    assert a != RigL(sparsity=0.9, seed=1).compute(tiny_lm, None)
    assert all(a.count(n) == int(math.prod(a.shape(n)) * 0.1) for n in a.names)  # per tensor by default
    init = RigL(sparsity=0.9, init="magnitude").compute(tiny_lm, None)
    assert init == Magnitude(sparsity=0.9, allocation="per_tensor").compute(tiny_lm, None)
    assert RigL.dynamic and RigL.needs_calibration and RigL().update_every == 10


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="drop_fraction must be in"):
        RigL(drop_fraction=1.5)
    with pytest.raises(ValueError, match="update_every and total_steps must be >= 1"):
        RigL(total_steps=0)
    with pytest.raises(ValueError, match=r"num_samples must be >= 1 \(calibration sequences\); got 0"):
        RigL(num_samples=0)
    with pytest.raises(ValueError, match="init must be"):
        RigL(init="snip")


def test_rigl_in_a_lightning_fit_keeps_counts_and_the_frozen_part_bitwise(tmp_path):
    strategy = RigL(sparsity=0.9, drop_fraction=0.3, update_every=2, total_steps=10, num_samples=4)
    callback = MaskCallback(strategy, verify_every=1)
    module = TinyModule(callback)
    trainer(tmp_path, 5, callback).fit(module, datamodule=TinyData())
    initial = strategy.compute(make_tiny_lm(seed=0), None)
    masks = callback.state.masks
    assert callback.state.last_update_step == 4 and masks != initial
    assert all(masks.count(n) == initial.count(n) for n in initial.names)
    for name, param, base, keep in frozen_and_active(module.model, masks):
        assert torch.equal(param[~keep], base[~keep]), f"frozen (or dropped) entries of {name} are not the base"
