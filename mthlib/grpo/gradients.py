"""Gradients of a GRPO step, dense or sparse: averaged over processes, then clipped.

A sparse fine-tune's gradients live in its :class:`~mthlib.masking.SparseAdamW` (active entries
only); a dense one's in ``.grad``. These functions treat both the same way for the module.
"""

from __future__ import annotations

import torch
from torch import nn

from mthlib.distributed import all_reduce_mean_, is_distributed
from mthlib.masking import SparseAdamW


def synchronise_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, reduced_by_ddp: bool) -> None:
    """Average gradients over processes, unless ``DistributedDataParallel`` already did (``reduced_by_ddp``).

    A parameter without a gradient on this process contributes zeros, so every process
    takes the same step.
    """
    if not is_distributed() or reduced_by_ddp:
        return
    if isinstance(optimizer, SparseAdamW):
        optimizer.all_reduce_gradients()
        return
    for param in model.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)
    all_reduce_mean_(p.grad for p in model.parameters() if p.grad is not None)


def clip_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
    """Clip the total gradient norm to ``max_norm`` (``None``: no clipping); returns the norm before."""
    limit = max_norm or float("inf")
    if isinstance(optimizer, SparseAdamW):
        return optimizer.clip_grad_norm_(limit)
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, limit)
