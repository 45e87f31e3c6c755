"""Fixtures for the strategy tests: seeded calibration batches and a model whose gradients are known."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn


def calibration(seed: int = 0, batches: int = 2, batch_size: int = 2, length: int = 8, vocab: int = 64) -> list[dict]:
    """Causal-LM calibration batches: random token ids in ``[3, vocab)``, labels = inputs."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(3, vocab, (batch_size, length), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


@pytest.fixture
def calibration_batches() -> list[dict]:
    """Two batches of two sequences of 8 tokens below vocabulary 64."""
    return calibration()


class Lookup(nn.Module):
    """``loss = sum_l weight.flat[input_ids[b, l]] * labels[b, l]`` summed over the batch.

    The gradient of one sequence is therefore known exactly: at flat index ``i`` it is
    the sum of the labels at the positions whose input id is ``i``.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone().float())

    def forward(self, input_ids, attention_mask=None, labels=None):
        return SimpleNamespace(loss=(self.weight.reshape(-1)[input_ids] * labels.float()).sum())


def lookup_batch(*sequences: list[tuple[int, int]]) -> dict:
    """A batch for :class:`Lookup`: each sequence is a list of ``(flat index, gradient)`` pairs."""
    ids = torch.tensor([[i for i, _ in seq] for seq in sequences])
    labels = torch.tensor([[g for _, g in seq] for seq in sequences])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
