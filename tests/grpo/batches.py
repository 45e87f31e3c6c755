"""Hand-made GRPO batches shared by the objective tests (pure tensors, no model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

G = 3
MAX_COMPLETION_LENGTH = 8
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
ADVANTAGES = torch.tensor([1.3, -0.7, 0.0, -1.1, 0.4, 0.9], dtype=torch.float64)
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.3, 0.9])


@dataclass
class Batch:
    """Six completions of two prompts (``G`` = 3): current, sampling and reference log-probabilities.

    Rows have 5, 3, 1, 4, 0 (a masked truncated completion) and 2 loss tokens; the sampling
    log-probabilities differ from the current ones enough to put ratios beyond both clip bounds.
    """

    logps: torch.Tensor
    old_logps: torch.Tensor
    ref_logps: torch.Tensor
    mask: torch.Tensor = MASK
    advantages: torch.Tensor = ADVANTAGES


def make_batch(seed: int = 0) -> Batch:
    """A seeded float64 :class:`Batch`."""
    gen = torch.Generator().manual_seed(seed)
    shape = MASK.shape
    logps = -0.05 - 2 * torch.rand(shape, generator=gen, dtype=torch.float64)
    old = logps + 0.4 * torch.randn(shape, generator=gen, dtype=torch.float64)
    ref = logps + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return Batch(logps, old, ref)


def micro_batches(size: int, micro: int) -> list[slice]:
    """Consecutive row slices of ``micro`` rows covering ``size`` rows."""
    return [slice(first, first + micro) for first in range(0, size, micro)]
