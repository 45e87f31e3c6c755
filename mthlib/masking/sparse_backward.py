"""Weight gradients at the active entries only, for linear layers whose weight is masked.

A dense backward computes ``grad_W = grad_out^T @ input`` (``N * out * in`` multiply-adds)
and then throws away all but the ``k`` active entries. Here a masked linear layer's
backward computes the active entries directly, ``grad_W[r, c] = sum_n grad_out[n, r] * input[n, c]``
(``N * k`` multiply-adds, a sampled dense-dense product, :func:`torch.sparse.sampled_addmm`), and hands them to autograd as a coalesced sparse gradient whose
values are in the mask's (sorted flat index) order; :class:`~mthlib.masking.SparseAdamW`'s
gradient hook reads them without touching a dense matrix. The input gradient stays dense.
Layers where the mask is dense enough that the dense product is cheaper keep the dense path.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

DENSE_FRACTION = 0.25
"""Above this density a layer keeps the dense weight gradient (the gather costs more than the matmul)."""



class _ActiveEntryLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pattern, rows, cols):  # noqa: ANN001, ANN205 - autograd signature
        ctx.save_for_backward(x, weight)
        ctx.pattern, ctx.rows, ctx.cols = pattern, rows, cols
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205 - autograd signature
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            flat_x = x.reshape(-1, x.shape[-1]).float()
            sampled = torch.sparse.sampled_addmm(ctx.pattern, flat_grad.t().float().contiguous(), flat_x, beta=0.0)
            grad_w = torch.sparse_coo_tensor(
                torch.stack([ctx.rows, ctx.cols]), sampled.values().to(weight.dtype), weight.shape,
                is_coalesced=True, check_invariants=False,
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_grad.sum(dim=0)
        return grad_x, grad_w, grad_b, None, None, None


_dense_depth = 0


@contextlib.contextmanager
def dense_weight_gradients() -> Iterator[None]:
    """Within this block patched layers compute ordinary dense weight gradients (e.g. for calibration)."""
    global _dense_depth
    _dense_depth += 1
    try:
        yield
    finally:
        _dense_depth -= 1


def _masked_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if _dense_depth or not torch.is_grad_enabled() or not module.weight.requires_grad:
        return F.linear(x, module.weight, module.bias)
    return _ActiveEntryLinear.apply(
        x, module.weight, module.bias, module._mth_pattern, module._mth_rows, module._mth_cols
    )


def install(model: nn.Module, indices: Mapping[str, torch.Tensor]) -> list[str]:
    """Give every ``nn.Linear`` whose weight has sparse enough active entries the active-entry backward.

    Args:
        model: The model being trained.
        indices: Parameter name to sorted flat indices of active entries.

    Returns:
        Names of the patched modules.
    """
    uninstall(model)
    patched = []
    for name, module in model.named_modules():
        idx = indices.get(f"{name}.weight" if name else "weight")
        if not isinstance(module, nn.Linear) or idx is None or not idx.numel():
            continue
        if idx.numel() > DENSE_FRACTION * module.weight.numel():
            continue
        idx = idx.to(module.weight.device, torch.int64)
        rows, cols = idx // module.in_features, idx % module.in_features
        crow = torch.zeros(module.out_features + 1, dtype=torch.int64, device=idx.device)
        crow[1:] = torch.bincount(rows, minlength=module.out_features).cumsum(0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            module._mth_pattern = torch.sparse_csr_tensor(
                crow, cols, torch.zeros(idx.numel(), device=idx.device), (module.out_features, module.in_features),
                check_invariants=False,
            )
        module._mth_rows, module._mth_cols = rows, cols
        module.forward = functools.partial(_masked_forward, module)
        patched.append(name)
    return patched


def uninstall(model: nn.Module) -> None:
    """Restore the ordinary forward of every patched linear layer."""
    for module in model.modules():
        if "_mth_rows" in vars(module):
            del module.forward, module._mth_pattern, module._mth_rows, module._mth_cols
