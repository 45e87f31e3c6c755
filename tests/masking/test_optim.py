"""Tests of SparseAdamW: exact AdamW on the active entries, frozen entries bitwise, memory, clipping, state."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from mthlib.masking import Masks, SparseAdamW, SparseState
from tests.conftest import attached, make_tiny_lm

HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}


def random_masks(model: torch.nn.Module, density: float = 0.1, seed: int = 0, skip: tuple[str, ...] = ()) -> Masks:
    """Random masks over all matrices and one norm; parameters in ``skip`` get no active entry."""
    gen = torch.Generator().manual_seed(seed)
    indices, shapes = {}, {}
    for name, param in model.named_parameters():
        if param.dim() < 2 and name != "model.norm.weight":
            continue
        shapes[name] = tuple(param.shape)
        if name not in skip:
            k = max(1, int(param.numel() * density))
            indices[name] = torch.sort(torch.randperm(param.numel(), generator=gen)[:k]).values
    return Masks(indices, shapes)


def batch(seed: int, rows: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (rows, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def dense_mask(masks: Masks, name: str, like: torch.Tensor) -> torch.Tensor:
    return masks.to_dense(name).to(like.device)


@pytest.mark.parametrize("density", [0.1, 1.0])  # 1.0: complete masks, updated in place without index gathers
def test_trajectory_equals_masked_torch_adamw(density):
    sparse_model, dense_model = make_tiny_lm(seed=0), make_tiny_lm(seed=0)
    initial = {n: p.detach().clone() for n, p in sparse_model.named_parameters()}
    masks = random_masks(sparse_model, density, skip=("model.layers.0.mlp.up_proj.weight",))
    optimizer = SparseAdamW(attached(sparse_model, masks), **HYPER)
    params = dict(dense_model.named_parameters())
    reference = torch.optim.AdamW(params.values(), foreach=False, **HYPER)
    for step in range(5):
        sparse_model(**batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dense_model(**batch(step)).loss.backward()
        for name, param in params.items():
            if name in masks and masks.count(name):
                param.grad *= dense_mask(masks, name, param)
            else:
                param.grad = None
        reference.step()
        reference.zero_grad()
        with torch.no_grad():  # AdamW also decays frozen entries; put them back so both forwards agree
            for name, param in params.items():
                keep = dense_mask(masks, name, param) if name in masks else torch.zeros_like(param, dtype=torch.bool)
                param.copy_(torch.where(keep, param, initial[name]))
    for name, param in sparse_model.named_parameters():
        keep = dense_mask(masks, name, param) if name in masks else torch.zeros_like(param, dtype=torch.bool)
        assert torch.equal(param[~keep], initial[name][~keep]), f"frozen entries of {name} moved"
        assert torch.allclose(param[keep], params[name][keep], rtol=1e-5, atol=1e-7), name
        if keep.any():
            assert not torch.equal(param[keep], initial[name][keep]), f"{name} never trained"


def test_memory_dense_grads_are_freed_and_state_is_two_floats_per_entry(tiny_lm):
    masks = random_masks(tiny_lm, skip=("model.layers.1.self_attn.q_proj.weight",))
    optimizer = SparseAdamW(attached(tiny_lm, masks), **HYPER)
    tiny_lm(**batch(0)).loss.backward()
    assert all(p.grad is None for p in tiny_lm.parameters())
    assert not tiny_lm.model.layers[1].self_attn.q_proj.weight.requires_grad  # no active entry
    assert not tiny_lm.model.layers[0].input_layernorm.weight.requires_grad  # not in the masks
    assert tiny_lm.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert sorted(optimizer.sparse_grads) == sorted(n for n in masks if masks.count(n))
    assert all(g.dtype == torch.float32 and g.numel() == masks.count(n) for n, g in optimizer.sparse_grads.items())
    optimizer.step()
    moments = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    assert sum(t.numel() for t in moments) == 2 * masks.total
    assert all(t.dtype == torch.float32 for t in moments)
    active = sum(1 for n in masks if masks.count(n))
    assert optimizer.state_bytes() == 8 * masks.total + 4 * active
    assert len(optimizer.param_groups) == 1 and len(optimizer.param_groups[0]["params"]) == active
    optimizer.zero_grad()
    assert optimizer.sparse_grads  # the last step's gradients stay readable (for RigL)


def test_clipping_matches_masked_dense_clipping(tiny_lm):
    dense_model = copy.deepcopy(tiny_lm)
    masks = random_masks(tiny_lm)
    optimizer = SparseAdamW(attached(tiny_lm, masks), **HYPER)
    tiny_lm(**batch(1)).loss.backward()
    dense_model(**batch(1)).loss.backward()
    params = dict(dense_model.named_parameters())
    masked = []
    for name in masks:
        params[name].grad *= dense_mask(masks, name, params[name])
        masked.append(params[name])
    expected_norm = torch.nn.utils.clip_grad_norm_(masked, 0.01)
    norm = optimizer.clip_grad_norm_(0.01)
    assert torch.allclose(norm, expected_norm, rtol=1e-5)
    assert norm > 0.01  # clipping really happened
    for name, grad in optimizer.sparse_grads.items():
        assert torch.allclose(grad, params[name].grad.view(-1)[masks[name]], rtol=1e-5, atol=1e-9)
    total = torch.linalg.vector_norm(torch.cat(list(optimizer.sparse_grads.values())))
    assert total == pytest.approx(0.01, rel=1e-4)
    assert optimizer.clip_grad_norm_(float("inf")) == pytest.approx(0.01, rel=1e-4)


def test_gradient_accumulation_equals_one_big_batch():
    big, small = make_tiny_lm(seed=0), make_tiny_lm(seed=0)
    masks = random_masks(big)
    opt_big, opt_small = SparseAdamW(attached(big, masks), **HYPER), SparseAdamW(attached(small, masks), **HYPER)
    full = batch(7, rows=4)
    big(**full).loss.backward()
    for rows in (slice(0, 2), slice(2, 4)):
        (0.5 * small(**{k: v[rows] for k, v in full.items()}).loss).backward()
    for name, grad in opt_big.sparse_grads.items():
        assert torch.allclose(grad, opt_small.sparse_grads[name], rtol=1e-4, atol=1e-7), name
    opt_big.step()
    opt_small.step()
    for (name, p), q in zip(big.named_parameters(), small.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name


def _train(model, optimizer, steps, start=0):
    for step in range(start, start + steps):
        model(**batch(step)).loss.backward()
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad()


def test_state_dict_round_trip_resumes_identically():
    straight = make_tiny_lm(seed=0)
    masks = random_masks(straight)
    opt = SparseAdamW(attached(straight, masks), **HYPER)
    _train(straight, opt, 4)

    first = make_tiny_lm(seed=0)
    opt_first = SparseAdamW(attached(first, masks), **HYPER)
    _train(first, opt_first, 2)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["optimizer"]["masks"]["total"] == masks.total and len(saved["optimizer"]["masks"]["digest"]) == 64

    resumed = make_tiny_lm(seed=0)
    resumed.load_state_dict(saved["model"])
    opt_resumed = SparseAdamW(attached(resumed, masks), **HYPER)
    opt_resumed.load_state_dict(saved["optimizer"])
    _train(resumed, opt_resumed, 2, start=2)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name

    other_model = make_tiny_lm(seed=0)
    other = SparseAdamW(attached(other_model, random_masks(straight, seed=1)), **HYPER)
    with pytest.raises(ValueError, match="different masks"):
        other.load_state_dict(saved["optimizer"])
    with pytest.raises(ValueError, match="no 'masks'"):
        other.load_state_dict(torch.optim.SGD(straight.parameters(), lr=0.1).state_dict())


def test_bf16_parameters_keep_fp32_state_and_frozen_bits():
    model = make_tiny_lm(seed=0).to(torch.bfloat16)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = random_masks(model)
    optimizer = SparseAdamW(attached(model, masks), lr=0.1, weight_decay=0.1)
    _train(model, optimizer, 2)
    for name, param in model.named_parameters():
        keep = dense_mask(masks, name, param) if name in masks else torch.zeros_like(param, dtype=torch.bool)
        assert param.dtype == torch.bfloat16
        assert torch.equal(param[~keep], initial[name][~keep]), name
    assert any(not torch.equal(p, initial[n]) for n, p in model.named_parameters())
    state = optimizer.state_dict()
    fresh = SparseAdamW(optimizer.sparse_state, lr=0.1, weight_decay=0.1)
    fresh.load_state_dict(state)
    for param in fresh.param_groups[0]["params"]:
        assert fresh.state[param]["exp_avg"].dtype == torch.float32
        assert torch.equal(fresh.state[param]["exp_avg_sq"], optimizer.state[param]["exp_avg_sq"])


def test_set_masks_keeps_moments_of_kept_entries(tiny_lm):
    name, gone = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"
    grown = "model.layers.0.self_attn.k_proj.weight"
    masks = random_masks(tiny_lm, skip=(grown,))
    optimizer = SparseAdamW(attached(tiny_lm, masks), **HYPER)
    _train(tiny_lm, optimizer, 1)
    old = masks[name]
    param = dict(tiny_lm.named_parameters())[name]
    before = optimizer.state[param]["exp_avg"].clone()
    kept = old[::2]
    new_entries = torch.tensor([i for i in range(param.numel()) if i not in set(old.tolist())][:3])
    indices = {n: masks[n] for n in masks}
    indices[name] = torch.sort(torch.cat([kept, new_entries])).values
    indices[gone] = torch.zeros(0, dtype=torch.long)
    indices[grown] = torch.tensor([0, 5])
    new = Masks(indices, masks.shapes)
    optimizer.sparse_state.replace_masks(new, step=1)
    optimizer.remap(masks)
    state = optimizer.state[param]["exp_avg"]
    lookup = dict(zip(indices[name].tolist(), state.tolist()))
    for i, value in zip(old[::2].tolist(), before[::2].tolist()):
        assert lookup[i] == value
    assert all(lookup[i] == 0.0 for i in new_entries.tolist())
    params = dict(tiny_lm.named_parameters())
    assert not params[gone].requires_grad and params[gone] not in optimizer.state
    assert params[grown].requires_grad and optimizer.state[params[grown]]["exp_avg"].numel() == 2
    assert optimizer.masks is new
    _train(tiny_lm, optimizer, 1, start=1)
    assert sorted(optimizer.sparse_grads) == sorted(n for n in new if new.count(n))


def test_a_state_attaches_once_and_detaching_restores_the_model(tiny_lm):
    masks = random_masks(tiny_lm)
    requires = {n: p.requires_grad for n, p in tiny_lm.named_parameters()}
    layers = {n: type(m) for n, m in tiny_lm.named_modules()}
    state = attached(tiny_lm, masks)
    with pytest.raises(RuntimeError, match="already attached"):
        state.attach(tiny_lm)
    optimizer = SparseAdamW(state, **HYPER)
    tiny_lm(**batch(0)).loss.backward()
    assert len(optimizer.sparse_grads) == sum(1 for n in masks if masks.count(n))
    state.detach()
    state.detach()  # idempotent
    assert {n: type(m) for n, m in tiny_lm.named_modules()} == layers
    assert {n: p.requires_grad for n, p in tiny_lm.named_parameters()} == requires
    tiny_lm.zero_grad()
    tiny_lm(**batch(0)).loss.backward()
    assert tiny_lm.model.embed_tokens.weight.grad is not None and not tiny_lm.model.embed_tokens.weight.grad.is_sparse


def test_scheduler_drives_the_learning_rate(tiny_lm):
    optimizer = SparseAdamW(attached(tiny_lm, random_masks(tiny_lm)), **HYPER)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    _train(tiny_lm, optimizer, 1)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_bad_masks_and_hyper_parameters(tiny_lm):
    with pytest.raises(ValueError, match="does not have"):
        attached(tiny_lm, Masks({"nope.weight": torch.tensor([0])}, {"nope.weight": (2,)}))
    with pytest.raises(ValueError, match="shape"):
        attached(tiny_lm, Masks({"model.norm.weight": torch.tensor([0])}, {"model.norm.weight": (33,)}))
    with pytest.raises(ValueError, match="nothing to train"):
        SparseAdamW(attached(make_tiny_lm(), Masks({}, {"model.norm.weight": (32,)})))
    with pytest.raises(ValueError, match="betas"):
        SparseAdamW(attached(make_tiny_lm(), random_masks(tiny_lm)), betas=(0.9, 1.0))
    with pytest.raises(RuntimeError, match="not attached"):
        SparseAdamW(SparseState.capture(tiny_lm, random_masks(tiny_lm)))


def test_methods_called_through_lightnings_wrapper_reach_the_optimizer(tiny_lm):
    from lightning.pytorch.core.optimizer import LightningOptimizer

    masks = random_masks(tiny_lm)
    optimizer = SparseAdamW(attached(tiny_lm, masks), **HYPER)
    wrapper = LightningOptimizer(optimizer)
    tiny_lm(**batch(0)).loss.backward()
    wrapper.clip_grad_norm_(0.1)
    grads = optimizer.sparse_state.gradients.buffers
    assert torch.linalg.vector_norm(torch.cat(list(grads.values()))) == pytest.approx(0.1, rel=1e-4)
    optimizer.step()
    wrapper.zero_grad()
    assert not optimizer.sparse_state.gradients.buffers  # cleared on the optimizer's state, not on the wrapper
    assert "_last_grads" not in vars(wrapper) and "sparse_state" not in vars(wrapper)
    moved = Masks({n: masks[n][1:] if i % 2 else masks[n] for i, n in enumerate(masks)}, masks.shapes)
    moved = Masks({n: torch.sort(torch.cat([moved[n], torch.tensor([i for i in range(1, 64) if i not in set(masks[n].tolist())][:1])])).values
                   if moved.count(n) < masks.count(n) else moved[n] for n in masks}, masks.shapes)
    optimizer.sparse_state.replace_masks(moved, step=1)
    wrapper.remap(masks)
    assert optimizer.masks is moved and wrapper.masks is moved
    assert "_names" not in vars(wrapper)
    del wrapper
    tiny_lm(**batch(1)).loss.backward()
    assert sorted(optimizer.sparse_grads) == sorted(masks.names)  # hooks of the new masks feed the optimizer


class _ActiveOnly(torch.autograd.Function):
    """y = x @ W.T whose weight gradient is a coalesced sparse tensor at given flat entries (mask order)."""

    @staticmethod
    def forward(ctx, x, weight, flat):
        ctx.save_for_backward(x, flat)
        ctx.shape = weight.shape
        return x @ weight.T

    @staticmethod
    def backward(ctx, grad_out):
        x, flat = ctx.saved_tensors
        rows, cols = flat // ctx.shape[1], flat % ctx.shape[1]
        values = (grad_out[:, rows] * x[:, cols]).sum(dim=0)
        sparse = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), values, ctx.shape, is_coalesced=True, check_invariants=True
        )
        return None, sparse, None


def test_sparse_gradients_are_read_directly_or_densified():
    weight = torch.nn.Parameter(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)))
    model = torch.nn.Module()
    model.weight = weight
    flat = torch.tensor([1, 7, 18])
    optimizer = SparseAdamW(attached(model, Masks({"weight": flat}, {"weight": (4, 5)})))
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    _ActiveOnly.apply(x, weight, flat).sum().backward()
    dense = (torch.ones(3, 4).T @ x).view(-1)[flat]
    assert torch.allclose(optimizer.sparse_grads["weight"], dense)
    optimizer.zero_grad()
    embedding = torch.nn.Embedding(6, 3, sparse=True)
    holder = torch.nn.Module()
    holder.embedding = embedding
    opt = SparseAdamW(attached(holder, Masks({"embedding.weight": torch.tensor([0, 4, 5])}, {"embedding.weight": (6, 3)})))
    embedding(torch.tensor([1, 1, 0])).sum().backward()  # uncoalesced sparse gradient: rows 1, 1, 0
    assert opt.sparse_grads["embedding.weight"].tolist() == [1.0, 2.0, 2.0]
    assert weight.grad is None and embedding.weight.grad is None


def _low_lr_run(model: torch.nn.Module, masks: Masks, keep_master: bool = True) -> SparseAdamW:
    optimizer = SparseAdamW(attached(model, masks), lr=1e-6, weight_decay=0.0)
    params = optimizer.sparse_state.parameters
    for step in range(50):
        model(**batch(step % 4)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if not keep_master:  # the straight write: each update rounded into the bf16 weight on its own
            for name in masks:
                if masks.count(name):
                    master = optimizer.state[params[name]]["master"]
                    master.copy_(params[name].detach().view(-1)[masks[name]].float())
    return optimizer


@pytest.mark.parametrize("density", [0.2, 1.0])
def test_bf16_master_values_learn_at_small_learning_rates_where_straight_writes_round_away(density):
    start = make_tiny_lm(seed=0).to(torch.bfloat16)
    masks = random_masks(start, density=density)
    reference = copy.deepcopy(start).float()  # the same starting values, trained in fp32
    master, straight = copy.deepcopy(start), copy.deepcopy(start)
    _low_lr_run(reference, masks)
    optimizer = _low_lr_run(master, masks)
    _low_lr_run(straight, masks, keep_master=False)
    assert all(state["master"].dtype == torch.float32 for state in optimizer.state.values())
    moved = same_as_fp32 = moved_straight = total = 0
    for (name, before), after, fp32, flat in zip(start.named_parameters(), master.parameters(),
                                                 reference.parameters(), straight.parameters()):
        keep = dense_mask(masks, name, before) if name in masks else torch.zeros_like(before, dtype=torch.bool)
        assert torch.equal(after[~keep], before[~keep]) and torch.equal(flat[~keep], before[~keep]), name
        total += int(keep.sum())
        moved += int((after[keep] != before[keep]).sum())
        moved_straight += int((flat[keep] != before[keep]).sum())
        same_as_fp32 += int((after[keep] == fp32[keep].to(torch.bfloat16)).sum())
    assert moved >= 0.2 * total  # the accumulated updates cross rounding boundaries (measured: 31%)
    assert moved_straight <= 0.1 * moved  # one update is below half an ulp of all but the tiniest weights (2%)
    assert same_as_fp32 >= 0.97 * total  # the bf16 weights are the fp32 run's, rounded


def test_bf16_master_values_survive_state_dict_and_follow_mask_changes(tiny_lm):
    model = tiny_lm.to(torch.bfloat16)
    masks = random_masks(model)
    optimizer = SparseAdamW(attached(model, masks), lr=1e-3, weight_decay=0.0)
    _train(model, optimizer, 2)
    name = "model.layers.0.self_attn.q_proj.weight"
    param = dict(model.named_parameters())[name]
    state = optimizer.state[param]
    assert torch.equal(state["master"].to(torch.bfloat16), param.detach().view(-1)[masks[name]])
    saved = optimizer.state_dict()
    fresh = SparseAdamW(optimizer.sparse_state, lr=1e-3, weight_decay=0.0)
    fresh.load_state_dict(saved)
    assert fresh.state[param]["master"].dtype == torch.float32
    assert torch.equal(fresh.state[param]["master"], state["master"])
    from_fp32 = copy.deepcopy(saved)  # a state saved from fp32 parameters has no master values
    del from_fp32["state"][fresh._names.index(name)]["master"]
    fresh.load_state_dict(from_fp32)
    assert torch.equal(fresh.state[param]["master"], param.detach().view(-1)[masks[name]].float())

    old = masks[name]
    grown = torch.tensor([i for i in range(param.numel()) if i not in set(old.tolist())][:2])
    indices = {n: masks[n] for n in masks}
    indices[name] = torch.sort(torch.cat([old[1:], grown])).values
    new = Masks(indices, masks.shapes)
    before = dict(zip(old.tolist(), state["master"].tolist()))
    optimizer.sparse_state.replace_masks(new, step=2)
    optimizer.remap(masks)
    after = dict(zip(indices[name].tolist(), optimizer.state[param]["master"].tolist()))
    assert all(after[i] == before[i] for i in old[1:].tolist())  # kept entries keep their fp32 values
    assert all(after[i] == float(param.detach().view(-1)[i]) for i in grown.tolist())  # grown ones start at the weight
