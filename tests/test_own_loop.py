"""The docs' own-loop example trains only the mask's entries and leaves the model as it found it."""

import runpy
from pathlib import Path

import torch

from tests.conftest import make_tiny_lm

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "own_loop.py"


def test_the_own_loop_example_trains_the_mask_and_detaches():
    train_sparse = runpy.run_path(str(EXAMPLE))["train_sparse"]
    model, base = make_tiny_lm(seed=0), make_tiny_lm(seed=0)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}] * 3
    layers = [type(m) for m in model.modules()]
    state = train_sparse(model, batches, sparsity=0.9)
    assert not state.attached and [type(m) for m in model.modules()] == layers
    moved = 0
    for (name, param), before in zip(model.named_parameters(), base.parameters()):
        active = state.masks.to_dense(name) if name in state.masks else torch.zeros_like(param, dtype=torch.bool)
        assert torch.equal(param[~active], before[~active]), name
        moved += int((param[active] != before[active]).sum())
    assert moved > 0.9 * state.masks.total
