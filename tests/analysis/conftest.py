"""Fixtures for analysis tests: hand-built weight pairs with known differences, and a tiny trained run."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mthlib.deltas import save_delta
from mthlib.export import export_model
from mthlib.fingerprint import model_fingerprint

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"
LN = "model.layers.1.input_layernorm.weight"
BIAS = "model.layers.1.self_attn.k_proj.bias"
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
NORM = "model.norm.weight"


@dataclass
class HandPair:
    """Two state-dict files and the number of entries that differ, per parameter and tolerance.

    ``changed[view][name]`` lists counts at tolerances 1e-8, 1e-7, 1e-6, 1e-5.
    """

    base: Path
    finetuned: Path
    numel: dict[str, int]
    changed: dict[str, dict[str, list[int]]]


@pytest.fixture
def hand_pair(tmp_path) -> HandPair:
    """Base zeros (``UP`` ones); differences chosen to straddle each tolerance and bf16 rounding."""
    base = {Q: torch.zeros(4, 4), DOWN: torch.zeros(4, 4), UP: torch.ones(4, 4), LN: torch.zeros(4),
            BIAS: torch.zeros(4), EMBED: torch.zeros(6, 4), HEAD: torch.zeros(6, 4), NORM: torch.zeros(4)}
    ft = {name: t.clone() for name, t in base.items()}
    ft[Q].view(-1)[:5] = torch.tensor([5e-8, 5e-7, 5e-6, 5e-5, 1.0])
    ft[DOWN].view(-1)[[3, 9]] = 1.0
    ft[UP].view(-1)[:4] = torch.tensor([1.001, 1.001, 1.001, 1.5])  # bf16 rounds the 1.001s back to 1.0
    ft[LN][2] = 5e-5
    ft[BIAS][0] = -2.0
    ft[EMBED].view(-1)[7] = 5e-6
    ft[NORM][1] = 5e-7
    stored = {Q: [5, 4, 3, 2], DOWN: [2, 2, 2, 2], UP: [4, 4, 4, 4], LN: [1, 1, 1, 1], BIAS: [1, 1, 1, 1],
              EMBED: [1, 1, 1, 0], HEAD: [0, 0, 0, 0], NORM: [1, 1, 0, 0]}
    bf16 = {**stored, UP: [1, 1, 1, 1]}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    return HandPair(tmp_path / "base.safetensors", tmp_path / "ft.safetensors",
                    {name: t.numel() for name, t in base.items()}, {"stored": stored, "bf16": bf16})


@dataclass
class TinyRun:
    """A tiny model's base folder, a trained copy, its delta, the exported folder and the trained indices."""

    base_dir: Path
    trained: torch.nn.Module
    delta: Path
    exported: Path
    indices: dict[str, torch.Tensor]


@pytest.fixture
def tiny_run(tiny_lm, tmp_path) -> TinyRun:
    """Perturb 5% of every parameter of a tied tiny Llama (seeded) and write delta + exported folder."""
    base = copy.deepcopy(tiny_lm)
    base.save_pretrained(tmp_path / "base")
    fingerprint = model_fingerprint(tiny_lm)
    gen = torch.Generator().manual_seed(0)
    indices = {}
    with torch.no_grad():
        for name, param in tiny_lm.named_parameters():
            idx = torch.randperm(param.numel(), generator=gen)[: max(1, param.numel() // 20)].sort().values
            param.view(-1)[idx] += 0.05 + torch.rand(idx.numel(), generator=gen)
            indices[name] = idx
    delta = save_delta(tmp_path / "run" / "deltas" / "step_000010.safetensors", tiny_lm, indices,
                       base_model=str(tmp_path / "base"), base_fingerprint=fingerprint,
                       strategy={"name": "random"}, sparsity=0.95, step=10)
    exported = export_model(delta, tmp_path / "exported", base_model=base)
    return TinyRun(tmp_path / "base", tiny_lm, delta, exported, indices)
