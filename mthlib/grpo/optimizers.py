"""The optimizer and learning-rate schedule of a GRPO run: AdamW (sparse when masked) with a linear warmup."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mthlib.masking import SparseAdamW, SparseState


def grpo_optimizers(
    model: torch.nn.Module,
    sparse_state: SparseState | None,
    learning_rate: float,
    adam_betas: Sequence[float],
    adam_epsilon: float,
    weight_decay: float,
    warmup_steps: int,
) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: AdamW over ``model``, or :class:`SparseAdamW` over the
    active entries of ``sparse_state``, with the learning rate rising linearly over ``warmup_steps``
    optimizer steps (the scheduler steps every optimizer step).
    """
    adam = {"lr": learning_rate, "betas": tuple(adam_betas), "eps": adam_epsilon, "weight_decay": weight_decay}
    if sparse_state is not None:
        optimizer: torch.optim.Optimizer = SparseAdamW(sparse_state, **adam)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), **adam)
    warmup = max(warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
