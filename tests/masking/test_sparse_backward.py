"""Active-entry weight gradients equal the dense gradient at those entries; inputs' gradients are unchanged."""

import torch
from torch import nn

from mthlib.masking import Masks, SparseAdamW
from mthlib.masking.sparse_backward import dense_weight_gradients, install, uninstall
from tests.conftest import make_tiny_lm


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
    assert install(model, {"0.weight": idx}) == ["0"]
    layer(x).backward(grad_out)
    sparse = layer.weight.grad
    assert sparse.is_sparse and sparse._nnz() == 20
    flat = sparse.coalesce()
    torch.testing.assert_close(flat.values(), dense_w.reshape(-1)[idx])
    assert torch.equal(flat.indices()[0] * 16 + flat.indices()[1], idx)
    torch.testing.assert_close(x.grad, dense_x)
    torch.testing.assert_close(layer.bias.grad, dense_b)
    uninstall(model)
    assert "forward" not in vars(layer)


def test_dense_mode_and_dense_masks_keep_the_ordinary_backward():
    layer = nn.Linear(8, 8)
    model = nn.Sequential(layer)
    assert install(model, {"0.weight": torch.arange(40)}) == []  # 40/64 active: dense is cheaper
    install(model, {"0.weight": torch.tensor([3, 9])})
    with dense_weight_gradients():
        layer(torch.randn(2, 8)).sum().backward()
    assert not layer.weight.grad.is_sparse


def test_sparse_adamw_trains_identically_with_and_without_sparse_backward():
    torch.manual_seed(1)
    batch = torch.randint(0, 64, (2, 12))
    results = []
    for sparse in (True, False):
        model = make_tiny_lm(seed=4)
        params = dict(model.named_parameters())
        masks = Masks(
            {n: torch.randperm(p.numel(), generator=torch.Generator().manual_seed(7))[: p.numel() // 50].sort().values
             for n, p in params.items() if p.ndim == 2},
            {n: tuple(p.shape) for n, p in params.items() if p.ndim == 2},
        )
        opt = SparseAdamW(model, masks, lr=1e-2, weight_decay=0.1, sparse_backward=sparse)
        for _ in range(3):
            model(input_ids=batch, labels=batch).loss.backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
        opt.remove_hooks()
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)
