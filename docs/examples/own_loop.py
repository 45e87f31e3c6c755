"""Sparse fine-tuning in a plain PyTorch loop: a mask, a SparseState, SparseAdamW (no Lightning)."""

from collections.abc import Iterable

import torch
from torch import nn

from mthlib.masking import SparseAdamW, SparseState, build_mask


def train_sparse(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], sparsity: float = 0.99) -> SparseState:
    """Train the entries a random mask picks on ``batches`` (causal-LM loss); returns the run's state."""
    masks = build_mask("random", sparsity=sparsity, seed=0).compute(model, None)
    state = SparseState.capture(model, masks)  # records the base: values, fingerprint, digests
    state.attach(model)  # masked layers and gradient hooks; only masked parameters require grad
    optimizer = SparseAdamW(state, lr=1e-3, weight_decay=0.01)
    try:
        for batch in batches:
            model(**batch).loss.backward()  # gradients land at the active entries only
            optimizer.clip_grad_norm_(1.0)
            optimizer.step()
            optimizer.zero_grad()
        state.verify()  # raises if any frozen entry moved
    finally:
        state.detach()  # original layers, no hooks, requires_grad as before
    return state
