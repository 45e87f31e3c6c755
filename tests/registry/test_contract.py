"""The contract every registered mask strategy keeps (PEFT's TEST_CASES pattern).

One row per strategy: its arguments and its documented count. Every registered name runs
(the built-ins, a user-defined strategy registered below, and any installed plugin; test
strategies registered by other test modules are skipped): exact count, sorted unique
int64 indices, same seed -> same masks, tied embeddings counted once, and frozen entries
bitwise equal to the base after SparseAdamW steps with weight decay, clipping and
gradient accumulation. Every strategy's ``config()`` records exactly the arguments the
command line shows, and the built-in ones record the keys and defaults that checkpoints
already hold. The built-in modules import only the public API.
"""

from __future__ import annotations

import ast
import importlib.metadata
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn

from mthlib.masking import (
    Allocation,
    Masks,
    MaskStrategy,
    SparseAdamW,
    SparseState,
    available_masks,
    build_mask,
    gather_values,
    register_mask,
)
from tests.conftest import make_tiny_lm
from tests.registry.conftest import calibration


@register_mask("contract_user_mask")
class FirstEntries(MaskStrategy):
    """User-defined test strategy: the first entries of every tensor.

    Args:
        allocation: ``global`` or ``per_tensor`` (default: ``per_tensor``).
        **options: The other shared options of :class:`~mthlib.masking.MaskStrategy`.
    """

    def __init__(self, allocation: Allocation = "per_tensor", **options: Any) -> None:
        super().__init__(allocation=allocation, **options)

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


def _saved(strategy: MaskStrategy, params: dict[str, nn.Parameter]) -> int:
    return sum(strategy.keep_count(p.numel()) for p in params.values())  # the file holds a 0.9 random mask


def _nm(strategy: MaskStrategy, params: dict[str, nn.Parameter]) -> int:
    return sum(p.numel() * strategy.n // strategy.m for p in params.values())  # n of every m, in every tensor


def _whole_tiles(strategy: MaskStrategy, params: dict[str, nn.Parameter]) -> int:
    tile = strategy.block_size ** 2  # every dimension of the contract model is a multiple of the block size
    return tile * (_global(strategy, params) // tile)


CASES: dict[str, tuple[dict[str, Any], CountRule]] = {
    "random": ({"sparsity": 0.9, "seed": 3}, _per_tensor),
    "fisher": ({"sparsity": 0.9, "num_samples": 4}, _global),
    "snip": ({"sparsity": 0.9, "num_samples": 4}, _global),
    "magnitude": ({"sparsity": 0.9}, _global),
    "expander": ({"sparsity": 0.9, "seed": 3}, _expander),
    "rigl": ({"sparsity": 0.9, "seed": 3, "num_samples": 4}, _per_tensor),
    "diff": ({"finetuned": "{tuned}"}, _changed),
    "file": ({"path": "{mask_file}"}, _saved),
    "grasp": ({"sparsity": 0.9, "num_samples": 4}, _global),
    "synflow": ({"sparsity": 0.9, "rounds": 4}, _global),
    "continuous": ({"sparsity": 0.9, "num_samples": 4, "steps": 3}, _global),
    "nm": ({"n": 1, "m": 4, "score": "fisher", "num_samples": 4}, _nm),
    "block": ({"sparsity": 0.9, "block_size": 16, "score": "random", "seed": 3}, _whole_tiles),
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
    build_mask("random", sparsity=0.9, seed=5).compute(make_tiny_lm(seed=0), None).save(folder.parent / "mask.safetensors")
    return str(folder)


def _build(name: str, tuned: str) -> tuple[MaskStrategy, CountRule]:
    kwargs, rule = CASES.get(name, ({}, None))
    mask_file = str(Path(tuned).parent / "mask.safetensors")
    kwargs = {k: v.format(tuned=tuned, mask_file=mask_file) if isinstance(v, str) else v for k, v in kwargs.items()}
    strategy = available_masks()[name](**kwargs)
    return strategy, rule or (_global if strategy.allocation == "global" else _per_tensor)


def _compute(strategy: MaskStrategy, model: nn.Module) -> Masks:
    return strategy.compute(model, calibration(seed=1) if strategy.needs_calibration else None)


def test_every_built_in_strategy_has_a_contract_row():
    built_in = {ep.name for ep in importlib.metadata.entry_points(group="mthlib.masks")
                if ep.value.startswith("mthlib.registry.")}
    assert built_in == {"random", "fisher", "snip", "magnitude", "expander", "rigl", "diff", "file", "grasp", "synflow",
                        "continuous", "nm", "block"}
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
    state = SparseState.capture(model, masks).attach(model)
    optimizer = SparseAdamW(state, lr=1e-2, weight_decay=0.1)
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
    state.verify()
    state.detach()


SHARED = {"sparsity": 0.99, "allocation": "global", "include": None, "exclude": None, "include_norms": False,
          "include_biases": False, "include_embeddings": True, "seed": 0, "exclude_mask": None}
"""The shared options and their defaults, as :meth:`MaskStrategy.__init__` declares them."""

RECORDED_DEFAULTS: dict[str, dict[str, Any]] = {
    "random": {**SHARED, "allocation": "per_tensor"},
    "fisher": {**SHARED, "num_samples": 1024, "estimator": "batch"},
    "snip": {**SHARED, "num_samples": 128},
    "magnitude": {**SHARED, "largest": True},
    "expander": {**{k: v for k, v in SHARED.items() if k != "allocation"}, "spectral_report": True},
    "rigl": {**SHARED, "allocation": "per_tensor", "drop_fraction": 0.3, "update_every": 10, "total_steps": 1000,
             "init": "random", "num_samples": 16},
    "diff": {**SHARED, "sparsity": 0.0, "finetuned": "(required)", "tolerance": 1e-5},
    "grasp": {**SHARED, "num_samples": 128},
    "synflow": {**SHARED, "rounds": 20},
    "continuous": {**SHARED, "candidates": 10, "steps": 100, "gate_lr": 0.1, "update_lr": 1e-4, "penalty": 0.1,
                   "temperature_start": 1.0, "temperature_end": 0.01, "num_samples": 64},
    "nm": {**{k: v for k, v in SHARED.items() if k not in ("sparsity", "allocation")}, "n": 2, "m": 4,
           "score": "magnitude", "num_samples": 128},
    "block": {**SHARED, "block_size": 32, "score": "magnitude", "num_samples": 128},
}
"""``config()["init_args"]`` of each built-in strategy with its defaults, as checkpoints and deltas recorded it
before the shared options moved to ``**options``: resuming compares these, so neither keys nor values may change."""


def test_fisher_records_the_same_keys_as_before():
    assert set(available_masks()["fisher"]().config()["init_args"]) == {
        "sparsity", "num_samples", "estimator", "allocation", "include", "exclude", "include_norms",
        "include_biases", "include_embeddings", "seed", "exclude_mask",
    }


@pytest.mark.parametrize("name", sorted(RECORDED_DEFAULTS))
def test_built_in_configs_record_the_same_keys_and_defaults(name, tuned):
    required = {"finetuned": tuned} if name == "diff" else {}
    strategy = available_masks()[name](**required)
    assert strategy.config()["init_args"] == {**RECORDED_DEFAULTS[name], **required}


@pytest.mark.parametrize("name", _contract_names())
def test_config_records_exactly_what_the_command_line_shows(name, tuned):
    """The keys of ``config()`` are jsonargparse's parameters of the class, in the same order."""
    cls = available_masks()[name]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "mask")
    shown = list(vars(parser.get_defaults().mask))
    strategy, _ = _build(name, tuned)
    assert list(strategy.config()["init_args"]) == shown
    if name != "file":  # a saved mask is taken whole: the file strategy has none of the shared options
        fixed = {"sparsity", "allocation"} if name == "nm" else {"allocation"}  # n:m fixes the density
        assert set(SHARED) - fixed <= set(shown)


REGISTRY = Path(__file__).resolve().parents[2] / "registry"
PUBLIC_MODULES = {"mthlib.masking", "mthlib.analysis", "mthlib.fingerprint"}


def _mthlib_imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every import of an ``mthlib`` module in ``path`` (name ``None`` for ``import x``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "mthlib"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mthlib":
            found += [(node.module, alias.name) for alias in node.names]
    return found


def test_built_in_strategies_import_only_the_public_api():
    """Every ``registry/*.py`` imports from mthlib only public names of the public modules.

    Allowed (:data:`PUBLIC_MODULES`): ``from M import X`` with ``X`` not starting with
    ``_`` and ``M`` one of ``mthlib.masking`` (the base class, :class:`Masks`, the
    registry), ``mthlib.analysis`` (reading and comparing weights) and
    ``mthlib.fingerprint`` (which base a mask belongs to): a package's ``__init__`` is its
    public API, and these are what a strategy in another package can rely on. Refused:
    submodules (``mthlib.analysis.sources``, ``mthlib.masking.strategy``: internals even
    where their names have no underscore), other mthlib modules (``mthlib.utils``,
    ``mthlib.grpo``, ...), ``import mthlib...`` statements, and private names.
    """
    files = sorted(REGISTRY.glob("*.py"))
    assert len(files) >= 8
    bad = []
    for path in files:
        for module, name in _mthlib_imports(path):
            if name is None or module not in PUBLIC_MODULES or name.startswith("_"):
                bad.append(f"{path.name}: {'import ' + module if name is None else f'from {module} import {name}'}")
    assert not bad, "registry modules must use the public API only: " + "; ".join(bad)


def test_the_import_check_catches_private_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from mthlib.analysis.compare import changed_indices\nfrom mthlib.masking import _x, Masks\n"
                      "import mthlib.utils\nfrom torch import nn\n")
    assert _mthlib_imports(sample) == [("mthlib.analysis.compare", "changed_indices"), ("mthlib.masking", "_x"),
                                       ("mthlib.masking", "Masks"), ("mthlib.utils", None)]
