"""`continuous` learns a gate on each candidate entry's update and keeps the k most open gates.

The planted model is linear with a weighted squared error: changing only the planted
entries lowers the loss by a lot; decoys have a much steeper gradient at the base but
reach their target after a tiny change, so first-order ``|g|`` prefers them while the
gates, which measure what an entry's update achieves, prefer the planted ones.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mthlib.data import PromptDataModule
from mthlib.envs import AlphabetSort
from mthlib.masking import Masks, compute_masks
from mthlib.registry.continuous import Continuous
from tests.conftest import make_tiny_chat_lm, make_tiny_lm
from tests.registry.conftest import calibration

PLANTED = {"a": [3, 17, 40], "b": [9]}
"""Entries whose change lowers the loss by 1.0 each (``a``) and 0.25 (``b``)."""
DECOYS = {"a": [5, 22], "b": [2]}
"""Entries with 3x (``a``) and 6x (``b``) the planted gradient at the base, worth only 0.09 each."""
SPARSITY = 1 - 1 / 16
"""Keeps 4 of the 64 entries globally; 3 of ``a``'s 48 and 1 of ``b``'s 16 per tensor."""
SETTINGS = {"steps": 40, "gate_lr": 0.1, "update_lr": 0.05, "penalty": 0.1}
"""Gate settings for the planted model (weights of order 1, so a larger update step than an LM's)."""


class Planted(nn.Module):
    """``y = W x`` with one-hot inputs ``x = e_c`` (``c``: the batch's input ids), for two matrices ``a`` (6x8), ``b`` (2x8).

    ``loss = sum over a, b of mean_c sum_r curvature[r, c] * (W[r, c] - target[r, c]) ** 2``.
    The target equals the base except at the planted entries (offset 1 in ``a``, 0.5 in
    ``b``, curvature 1: gradient 2 and 1, achievable decrease 1 and 0.25) and the decoys
    (offset 0.03, curvature 100: gradient 6, achievable decrease 0.09).
    """

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(6, 8, generator=generator))
        self.b = nn.Parameter(torch.randn(2, 8, generator=generator))
        self.target = {name: p.detach().clone() for name, p in self.named_parameters()}
        self.curvature = {name: torch.ones_like(p) for name, p in self.named_parameters()}
        for name, offset in (("a", 1.0), ("b", 0.5)):
            self.target[name].view(-1)[PLANTED[name]] += offset
            self.target[name].view(-1)[DECOYS[name]] += 0.03
            self.curvature[name].view(-1)[DECOYS[name]] = 100.0

    def forward(self, input_ids, attention_mask=None, labels=None):
        columns = input_ids.reshape(-1)
        loss = sum((self.curvature[name][:, columns] * (w[:, columns] - self.target[name][:, columns]) ** 2).sum(0).mean()
                   for name, w in self.named_parameters())
        return SimpleNamespace(loss=loss)


def columns_batch(*columns: int) -> dict[str, torch.Tensor]:
    """A batch whose input ids are ``columns`` (one row)."""
    ids = torch.tensor([columns])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros_like(ids)}


ALL_COLUMNS = [columns_batch(*range(8))]


def chosen(masks: Masks) -> dict[str, list[int]]:
    return {name: idx.tolist() for name, idx in masks.items()}


@pytest.mark.parametrize("allocation", ["global", "per_tensor"])
def test_gates_choose_the_planted_entries_where_the_steepest_gradients_are_decoys(allocation):
    model = Planted()
    gated = Continuous(sparsity=SPARSITY, allocation=allocation, candidates=None, **SETTINGS).compute(model, ALL_COLUMNS)
    assert chosen(gated) == PLANTED and gated.total == 4
    # candidates=1: the candidates are the k entries of largest |g|, so the gates have no choice left
    steepest = Continuous(sparsity=SPARSITY, allocation=allocation, candidates=1, **SETTINGS).compute(model, ALL_COLUMNS)
    assert chosen(steepest) == {"a": [3, 5, 22], "b": [2]} and steepest.total == 4


def test_the_penalty_closes_the_gate_of_a_decoy_its_update_alone_can_serve():
    """Without a penalty b's decoy keeps the gate it opened early; with one, delta grows and the gate closes."""
    model = Planted()
    free = Continuous(sparsity=SPARSITY, allocation="per_tensor", candidates=None, **{**SETTINGS, "penalty": 0.0})
    assert free.compute(model, ALL_COLUMNS)["b"].tolist() == DECOYS["b"]
    penalised = Continuous(sparsity=SPARSITY, allocation="per_tensor", candidates=None, **SETTINGS)
    assert penalised.compute(model, ALL_COLUMNS)["b"].tolist() == PLANTED["b"]


def test_candidates_are_the_entries_of_largest_gradient():
    model = Planted()
    pool, logits = Continuous(sparsity=SPARSITY, candidates=2, **SETTINGS).train_gates(model, ALL_COLUMNS)
    # 2 x 4 = 8 candidates: the 7 entries with a gradient, then the zero-gradient tie goes to a's index 0
    assert chosen(pool) == {"a": [0, 3, 5, 17, 22, 40], "b": [2, 9]}
    assert [v.numel() for v in logits.values()] == [6, 2]
    # per tensor: int(48 / 8) = 6 of a (5 with a gradient, then index 0), int(16 / 8) = 2 of b
    per_tensor, _ = Continuous(sparsity=SPARSITY, allocation="per_tensor", candidates=2, **SETTINGS).train_gates(
        model, ALL_COLUMNS)
    assert chosen(per_tensor) == {"a": [0, 3, 5, 17, 22, 40], "b": [2, 9]}


def test_exact_count_on_a_tiny_lm_global_and_per_tensor():
    model = make_tiny_lm(seed=0)
    for allocation in ("global", "per_tensor"):
        strategy = Continuous(sparsity=0.99, allocation=allocation, candidates=3, steps=3)
        params = strategy.eligible(model)
        masks = strategy.compute(model, calibration(seed=1))
        if allocation == "global":
            assert masks.total == strategy.keep_count(sum(p.numel() for p in params.values()))
        else:
            assert all(masks.count(name) == strategy.keep_count(p.numel()) for name, p in params.items())


def test_the_base_model_is_bitwise_unchanged():
    model = make_tiny_lm(seed=0).train()
    model.model.norm.weight.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for candidates in (None, 3):  # every entry gated; the top |g| (a gradient pass first)
        Continuous(sparsity=0.99, candidates=candidates, steps=3, update_lr=0.1).compute(model, calibration(seed=1))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.int32), before[name].view(torch.int32)), name
        assert p.grad is None
    assert model.training and not model.model.norm.weight.requires_grad
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_temperature_falls_exponentially_from_start_to_end():
    strategy = Continuous(steps=5, temperature_start=2.0, temperature_end=0.02)
    assert strategy.temperature(0) == 2.0
    assert strategy.temperature(4) == pytest.approx(0.02, rel=1e-12)
    assert strategy.temperature(2) == pytest.approx(0.2, rel=1e-12)  # half way: the geometric mean
    ratios = [strategy.temperature(t + 1) / strategy.temperature(t) for t in range(4)]
    assert ratios == pytest.approx([0.01 ** 0.25] * 4, rel=1e-12)
    assert Continuous(steps=1, temperature_start=3.0, temperature_end=0.5).temperature(0) == 3.0


def test_a_larger_penalty_leaves_fewer_gates_open():
    model = make_tiny_lm(seed=0)
    densities = []
    for penalty in (0.0, 1.0, 100.0):
        strategy = Continuous(sparsity=0.9, candidates=None, steps=6, update_lr=1e-2, penalty=penalty)
        _, logits = strategy.train_gates(model, calibration(seed=1))
        gates = torch.sigmoid(torch.cat(list(logits.values())) / strategy.temperature_end)
        densities.append(float(gates.mean()))
    assert densities[0] > densities[1] > densities[2]
    assert densities[0] > 0.3 and densities[2] < 0.05


def test_same_seed_same_mask():
    first = Continuous(sparsity=0.99, candidates=3, steps=3, seed=4).compute(make_tiny_lm(seed=0), calibration(seed=1))
    again = Continuous(sparsity=0.99, candidates=3, steps=3, seed=4).compute(make_tiny_lm(seed=0), calibration(seed=1))
    assert first == again


def test_exclude_mask_entries_are_never_chosen(tmp_path):
    path = tmp_path / "task1.safetensors"
    Masks({"a": torch.tensor([3]), "b": torch.tensor([9])}, {"a": (6, 8), "b": (2, 8)}).save(path)
    masks = Continuous(sparsity=SPARSITY, candidates=None, exclude_mask=str(path), **SETTINGS).compute(
        Planted(), ALL_COLUMNS)
    assert masks.total == 4 and 3 not in masks["a"].tolist() and 9 not in masks["b"].tolist()
    assert {17, 40} <= set(masks["a"].tolist())


def test_runs_on_a_tiny_chat_lm_with_environment_batches():
    model, tokenizer = make_tiny_chat_lm()
    strategy = Continuous(sparsity=0.99, candidates=4, steps=4, num_samples=4)
    data = PromptDataModule(env=AlphabetSort(max_turns=1))
    batches = list(data.calibration_batches(tokenizer, num_samples=4, batch_size=2, seed=0))
    pool, logits = strategy.train_gates(model, batches)
    assert all(bool(torch.isfinite(v).all()) for v in logits.values())
    assert pool.total == Continuous(sparsity=0.96).keep_count(pool.numel)  # 4 x the kept density
    masks = compute_masks(strategy, model, data, tokenizer, batch_size=2)
    assert masks.total == strategy.keep_count(masks.numel)
    assert set(masks.names) == set(pool.names)
    for name, idx in masks.items():
        assert bool(torch.isin(idx, pool[name]).all()), name  # only candidates are kept


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"candidates": 0}, "candidates must be >= 1"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"num_samples": 0}, "num_samples must be >= 1"),
    ({"gate_lr": 0.0}, "gate_lr and update_lr must be > 0"),
    ({"update_lr": -1.0}, "gate_lr and update_lr must be > 0"),
    ({"penalty": -0.1}, "penalty must be >= 0"),
    ({"penalty": math.nan}, "penalty must be >= 0"),
    ({"temperature_end": 2.0}, "0 < temperature_end <= temperature_start"),
    ({"temperature_end": 0.0}, "0 < temperature_end <= temperature_start"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        Continuous(**kwargs)
    assert "\n" not in str(err.value)


def test_batches_without_targets_are_one_line_errors():
    unlabelled = {**columns_batch(0, 1), "labels": torch.full((1, 2), -100)}
    for batches, message in ((None, "needs calibration batches"), ([unlabelled], "no calibration batches with target")):
        with pytest.raises(ValueError, match=message) as err:
            Continuous(candidates=None).compute(Planted(), batches)
        assert "\n" not in str(err.value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gates_on_rank(rank: int, world: int, port: int, out: Path) -> None:
    """A gloo process holding half of the columns (rank 0: 0-3, with every planted entry of ``a``; rank 1: 4-7)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        share = [columns_batch(*range(4 * rank, 4 * rank + 4))]
        strategy = Continuous(sparsity=SPARSITY, candidates=None, **SETTINGS)
        torch.save(chosen(strategy.compute(Planted(), share)), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_processes_average_gate_gradients_and_agree(tmp_path):
    # forked, not spawned: the processes start with this one's imports
    mp.start_processes(_gates_on_rank, args=(2, _free_port(), tmp_path), nprocs=2, start_method="fork")
    # a process alone with rank 1's columns sees no planted entry of a; together they find all of them
    alone = chosen(Continuous(sparsity=SPARSITY, candidates=None, **SETTINGS).compute(Planted(), [columns_batch(4, 5, 6, 7)]))
    assert alone != PLANTED
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == PLANTED
