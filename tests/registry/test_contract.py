"""The contract every registered mask strategy keeps (PEFT's TEST_CASES pattern).

One row per strategy: its arguments and its documented count. Every registered name runs
(the built-ins, a user-defined strategy registered below, and any installed plugin; test
strategies registered by other test modules are skipped): exact count, sorted unique
int64 indices, same seed -> same masks, tied embeddings counted once, and frozen entries
bitwise equal to the base after SparseAdamW steps with weight decay, clipping and
gradient accumulation.
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from mthlib.masking import Masks, MaskStrategy, SparseAdamW, available_masks, gather_values, register_mask
from tests.conftest import make_tiny_lm
from tests.registry.conftest import calibration


@register_mask("contract_user_mask")
class FirstEntries(MaskStrategy):
    """User-defined test strategy: the first entries of every tensor.

    Args:
        sparsity: Fraction of eligible entries that stay frozen.
        allocation: ``global`` or ``per_tensor``.
    """

    def __init__(self, sparsity: float = 0.99, allocation: str = "per_tensor") -> None:
        super().__init__(sparsity, allocation=allocation)

    def compute(self, model: nn.Module, batches: Any) -> Masks:
        params = self.eligible(model)
        return self.top_k({n: -torch.arange(p.numel(), dtype=torch.float32).view(p.shape) for n, p in params.items()})


TUNED_CHANGES = {"model.layers.0.mlp.down_proj.weight": [1, 50, 999], "model.embed_tokens.weight": [7, 8]}

CountRule = Callable[[MaskStrategy, dict[str, nn.Parameter]], int]


def _global(strategy: MaskStrategy, params: dict[str, nn.Parameter]) -> int:
    return strategy.keep_count(sum(p.numel() for p in params.values()))


def _per_tensor(strategy: MaskStrategy, params: dict[str, nn.Parameter]) -> int:
    return sum(strategy.keep_count(p.numel()) for p in params.values())


def _expander(strategy: MaskStrategy, params: dict[str, nn.Parameter]) -> int:
    return sum(p.shape[0] * strategy.row_degree(p.numel() // p.shape[0]) for p in params.values())


def _changed(strategy: MaskStrategy, params: dict[str, nn.Parameter]) -> int:
    return sum(len(entries) for entries in TUNED_CHANGES.values())


CASES: dict[str, tuple[dict[str, Any], CountRule]] = {
    "random": ({"sparsity": 0.9, "seed": 3}, _per_tensor),
    "fisher": ({"sparsity": 0.9, "num_samples": 4}, _global),
    "snip": ({"sparsity": 0.9, "num_samples": 4}, _global),
    "magnitude": ({"sparsity": 0.9}, _global),
    "expander": ({"sparsity": 0.9, "seed": 3}, _expander),
    "rigl": ({"sparsity": 0.9, "seed": 3, "num_samples": 4}, _per_tensor),
    "diff": ({"finetuned": "{tuned}"}, _changed),
    "contract_user_mask": ({"sparsity": 0.9}, _per_tensor),
}


def _contract_names() -> list[str]:
    """Registered names, except test strategies that other test modules registered."""
    return [name for name, cls in available_masks().items()
            if name in CASES or not cls.__module__.startswith(("tests.", "test_"))]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> str:
    """An HF folder of the contract model with :data:`TUNED_CHANGES` applied (for ``diff``)."""
    model = make_tiny_lm(seed=0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, entries in TUNED_CHANGES.items():
            params[name].view(-1)[entries] += 0.01
    folder = tmp_path_factory.mktemp("tuned") / "model"
    model.save_pretrained(folder)
    return str(folder)


def _build(name: str, tuned: str) -> tuple[MaskStrategy, CountRule]:
    kwargs, rule = CASES.get(name, ({}, None))
    kwargs = {k: v.format(tuned=tuned) if isinstance(v, str) else v for k, v in kwargs.items()}
    strategy = available_masks()[name](**kwargs)
    return strategy, rule or (_global if strategy.allocation == "global" else _per_tensor)


def _compute(strategy: MaskStrategy, model: nn.Module) -> Masks:
    return strategy.compute(model, calibration(seed=1) if strategy.needs_calibration else None)


def test_every_built_in_strategy_has_a_contract_row():
    built_in = {ep.name for ep in importlib.metadata.entry_points(group="mthlib.masks")
                if ep.value.startswith("mthlib.registry.")}
    assert built_in == {"random", "fisher", "snip", "magnitude", "expander", "rigl", "diff"}
    assert built_in <= set(CASES) and set(CASES) <= set(available_masks())


@pytest.mark.parametrize("name", _contract_names())
def test_strategy_contract(name, tuned):
    model = make_tiny_lm(seed=0)  # tied embeddings
    strategy, rule = _build(name, tuned)
    params = strategy.eligible(model)
    masks = _compute(strategy, model)

    # parameters: the eligible ones, tied embeddings once
    assert list(masks.names) == list(params)
    assert "lm_head.weight" not in masks.names and "model.embed_tokens.weight" in masks.names
    assert masks.numel == sum(p.numel() for p in params.values())
    # indices: int64, flat, sorted, unique, in range; exact documented count
    for param_name, idx in masks.items():
        assert idx.dtype == torch.int64 and idx.dim() == 1
        assert bool((idx[1:] > idx[:-1]).all())
        assert not idx.numel() or 0 <= int(idx[0]) <= int(idx[-1]) < math.prod(masks.shape(param_name))
    assert masks.total == rule(strategy, params) > 0
    # same seed, same masks (a fresh instance on a fresh copy of the model)
    again, _ = _build(name, tuned)
    assert _compute(again, make_tiny_lm(seed=0)) == masks

    if strategy.dynamic:
        new = strategy.update(masks, model, 0, None, gather_values(model, masks), calibration(seed=2))
        assert new.total == masks.total and new != masks
        if strategy.allocation == "per_tensor":
            assert all(new.count(n) == masks.count(n) for n in masks.names)

    _train_and_check_frozen(model, masks)


def _train_and_check_frozen(model: nn.Module, masks: Masks) -> None:
    """Three SparseAdamW steps (weight decay, clipping, two accumulated micro-batches); frozen entries stay bitwise."""
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    optimizer = SparseAdamW(model, masks, lr=1e-2, weight_decay=0.1)
    batches = calibration(seed=4, batches=6)
    for step in range(3):
        for micro in batches[2 * step: 2 * step + 2]:
            (model(**micro).loss / 2).backward()
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad()
    moved = 0
    for name, param in model.named_parameters():
        now, before = param.detach().reshape(-1), base[name].reshape(-1)
        frozen = ~masks.to_dense(name).reshape(-1) if name in masks else torch.ones_like(now, dtype=torch.bool)
        assert torch.equal(now[frozen].view(torch.int32), before[frozen].view(torch.int32)), name
        moved += int((now[~frozen] != before[~frozen]).sum())
    assert moved > 0
