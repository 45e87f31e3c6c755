"""Masked linear layers: active-entry weight gradients equal the dense gradient there; nothing else changes."""

import copy

import pytest
import torch
from torch import nn

from mthlib.masking import ActiveEntryLinear, Masks, SparseAdamW
from mthlib.masking.layers import wrap_linear_layers
from tests.conftest import attached, make_tiny_lm


def test_active_entry_gradient_equals_dense_gradient_at_the_mask():
    torch.manual_seed(0)
    layer = nn.Linear(16, 12, bias=True)
    idx = torch.randperm(16 * 12)[:20].sort().values
    x = torch.randn(3, 5, 16, requires_grad=True)
    grad_out = torch.randn(3, 5, 12)
    torch.nn.functional.linear(x, layer.weight, layer.bias).backward(grad_out)
    dense_w, dense_x, dense_b = layer.weight.grad.clone(), x.grad.clone(), layer.bias.grad.clone()
    layer.weight.grad = layer.bias.grad = x.grad = None
    model = nn.Sequential(layer)
    swap = wrap_linear_layers(model, {"0.weight": idx})
    assert list(swap.wrappers) == ["0"] and isinstance(model[0], ActiveEntryLinear)
    assert model[0].weight is layer.weight and model[0].bias is layer.bias  # shared, not copied
    assert list(model.state_dict()) == ["0.weight", "0.bias"]  # names and keys unchanged
    model(x).backward(grad_out)
    sparse = layer.weight.grad
    assert sparse.is_sparse and sparse._nnz() == 20
    flat = sparse.coalesce()
    torch.testing.assert_close(flat.values(), dense_w.reshape(-1)[idx])
    assert torch.equal(flat.indices()[0] * 16 + flat.indices()[1], idx)
    torch.testing.assert_close(x.grad, dense_x)
    torch.testing.assert_close(layer.bias.grad, dense_b)
    swap.restore()
    assert model[0] is layer


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_under_bf16_autocast_a_masked_layer_computes_what_autocast_computes_and_fp32_active_gradients(weight_dtype):
    """The output and the input and bias gradients are bitwise those of the same ``nn.Linear`` under
    autocast; the active entries get sum_n grad_out[n, r] * x[n, c] of the bf16 factors in fp32."""
    torch.manual_seed(1)
    layer = nn.Linear(24, 40).to(weight_dtype)
    plain = copy.deepcopy(layer)
    idx = torch.randperm(24 * 40)[:30].sort().values
    x = torch.randn(2, 7, 24, dtype=weight_dtype, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    grad_out = torch.randn(2, 7, 40).bfloat16()
    model = nn.Sequential(layer)
    wrap_linear_layers(model, {"0.weight": idx})
    with torch.autocast("cpu", torch.bfloat16):
        out, out_plain = model(x), plain(x_plain)
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_plain)
    out.backward(grad_out)
    out_plain.backward(grad_out)
    assert x.grad.dtype == weight_dtype and torch.equal(x.grad, x_plain.grad)
    assert layer.bias.grad.dtype == weight_dtype and torch.equal(layer.bias.grad, plain.bias.grad)
    factors = grad_out.reshape(-1, 40).float().t(), x.detach().bfloat16().reshape(-1, 24).float()
    expected = (factors[0] @ factors[1]).reshape(-1)[idx]
    values = layer.weight.grad.coalesce().values()
    assert values.dtype == weight_dtype
    tolerance = 1e-6 if weight_dtype == torch.float32 else 2 ** -8  # fp32 summation order; one bf16 rounding
    torch.testing.assert_close(values.float(), expected, rtol=tolerance, atol=1e-6)


def test_dense_mode_and_dense_masks_keep_the_ordinary_backward():
    layer = nn.Linear(8, 8)
    model = nn.Sequential(layer)
    assert not wrap_linear_layers(model, {"0.weight": torch.arange(40)}).wrappers  # 40/64 active: dense is cheaper
    swap = wrap_linear_layers(model, {"0.weight": torch.tensor([3, 9])})
    swap.use_dense_gradients(True)
    model(torch.randn(2, 8)).sum().backward()
    assert not layer.weight.grad.is_sparse
    layer.weight.grad = None
    swap.use_dense_gradients(False)
    model(torch.randn(2, 8)).sum().backward()
    assert layer.weight.grad.is_sparse


def _random_masks(model: nn.Module, seed: int = 7) -> Masks:
    params = {n: p for n, p in model.named_parameters() if p.ndim == 2}
    return Masks(
        {n: torch.randperm(p.numel(), generator=torch.Generator().manual_seed(seed))[: p.numel() // 50].sort().values
         for n, p in params.items()},
        {n: tuple(p.shape) for n, p in params.items()},
    )


def test_sparse_adamw_trains_identically_with_and_without_sparse_backward():
    torch.manual_seed(1)
    batch = torch.randint(0, 64, (2, 12))
    results = []
    for sparse in (True, False):
        model = make_tiny_lm(seed=4)
        state = attached(model, _random_masks(model), sparse_backward=sparse)
        assert state.sparse_backward is sparse
        assert any(isinstance(m, ActiveEntryLinear) for m in model.modules()) is sparse
        opt = SparseAdamW(state, lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            model(input_ids=batch, labels=batch).loss.backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
        state.detach()
        assert not any(isinstance(m, ActiveEntryLinear) for m in model.modules())
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)


def test_a_masked_model_leaves_a_dense_model_in_the_same_process_untouched():
    batch = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    reference = make_tiny_lm(seed=5)
    reference(input_ids=batch, labels=batch).loss.backward()
    expected = {n: p.grad.clone() for n, p in reference.named_parameters()}

    masked, dense = make_tiny_lm(seed=0), make_tiny_lm(seed=5)
    state = attached(masked, _random_masks(masked))
    optimizer = SparseAdamW(state, lr=1e-2)
    with state.calibrating():  # the masked model's modes must not leak into the other model either
        masked(input_ids=batch, labels=batch).loss.backward()
    masked.zero_grad()
    masked(input_ids=batch, labels=batch).loss.backward()
    dense(input_ids=batch, labels=batch).loss.backward()
    assert not any(isinstance(m, ActiveEntryLinear) for m in dense.modules())
    for name, param in dense.named_parameters():
        assert param.requires_grad and not param.grad.is_sparse, name
        torch.testing.assert_close(param.grad, expected[name], rtol=0, atol=0, msg=name)
    assert optimizer.sparse_grads  # and the masked model's hooks fed its own optimizer only
    state.detach()


def test_every_masked_matrix_gets_its_gradient_at_the_active_entries_tied_head_included():
    """Attention, MLP, input embedding and LM head (tied or not): sparse weight gradients equal the dense ones there."""
    for tie in (True, False):
        sparse_model, dense_model = make_tiny_lm(seed=3, tie=tie), make_tiny_lm(seed=3, tie=tie)
        masks = _random_masks(sparse_model)
        state = attached(sparse_model, masks)
        wrapped = {n for n, m in sparse_model.named_modules() if isinstance(m, ActiveEntryLinear)}
        linear_names = {n for n, m in dense_model.named_modules() if isinstance(m, nn.Linear)}
        assert wrapped == linear_names and "lm_head" in wrapped, (tie, linear_names - wrapped)
        ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
        sparse_model(input_ids=ids, labels=ids).loss.backward()
        dense_model(input_ids=ids, labels=ids).loss.backward()
        dense = dict(dense_model.named_parameters())
        for name, values in state.gradients.buffers.items():
            torch.testing.assert_close(values, dense[name].grad.reshape(-1)[masks[name]].float(), msg=name)
        assert set(state.gradients.buffers) == set(masks.names)
        assert (not tie) or "model.embed_tokens.weight" in masks.names


def test_grpo_log_probabilities_give_a_masked_lm_head_its_gradient_at_the_active_entries_only():
    """``token_logprobs`` runs the output projection through the head module, so a masked head's
    weight gradient is the sampled product at its active entries (a sparse gradient), equal to
    the dense gradient there, instead of a dense vocabulary-by-hidden product."""
    from mthlib.grpo.rollout import token_logprobs

    sparse_model, dense_model = make_tiny_lm(seed=4, tie=False), make_tiny_lm(seed=4, tie=False)
    masks = _random_masks(sparse_model)
    state = attached(sparse_model, masks)
    head_gradients = []
    sparse_model.lm_head.weight.register_hook(lambda grad: head_gradients.append(grad.is_sparse))
    ids = torch.randint(3, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    attention, loss_mask = torch.ones_like(ids), torch.zeros_like(ids)
    loss_mask[:, 4:] = 1
    for model in (sparse_model, dense_model):
        logps, _ = token_logprobs(model, ids, attention, loss_mask, temperature=0.7, chunk_size=5)
        logps.sum().backward()
    assert head_gradients == [True]  # the three chunks (5, 5, 2 of the 12 loss tokens) summed, still sparse
    dense = dict(dense_model.named_parameters())
    for name, values in state.gradients.buffers.items():
        torch.testing.assert_close(values, dense[name].grad.reshape(-1)[masks[name]].float(), msg=name)
