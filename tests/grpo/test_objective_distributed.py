"""Two gloo processes, each with half of a batch, optimise the objective one process has with all of it.

A parameter holding every log-probability stands in for the model: each process computes
its micro-batch losses on its rows, and gradients are averaged as
:class:`~mthlib.grpo.GRPOModule` averages them. The halves differ in token count (9 and 6)
and in reward spread, so a per-process ``dapo`` count or ``scale_rewards="batch"`` std
would give another loss.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mthlib.distributed import all_reduce_mean_
from mthlib.grpo.loss import LOSS_TYPES
from mthlib.grpo.objective import GRPOObjective, batch_advantages, batch_normalizer
from tests.grpo.batches import MAX_COMPLETION_LENGTH, REWARDS, G, make_batch, micro_batches

CASES = [(loss_type, "batch") for loss_type in LOSS_TYPES] + [("dapo", "group"), ("dapo", "none")]
MICRO_BATCH = 3


def objective_on_rank(rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per case, the step's loss (mean over processes) and the averaged gradient, from this rank's rows."""
    batch = make_batch()
    size = len(batch.logps) // world
    first = rank * size
    results = {}
    for loss_type, scale_rewards in CASES:
        weights = torch.nn.Parameter(batch.logps.clone())
        advantages = batch_advantages(REWARDS[first: first + size], G, scale_rewards).double()
        norm = batch_normalizer(batch.mask[first: first + size], MAX_COMPLETION_LENGTH)
        objective = GRPOObjective(loss_type=loss_type, beta=0.1)
        loss = torch.zeros((), dtype=torch.float64)
        for local in micro_batches(size, MICRO_BATCH):
            rows = slice(first + local.start, first + local.stop)
            part, _ = objective.loss(
                weights[rows], batch.old_logps[rows], advantages[local], batch.mask[rows], norm, batch.ref_logps[rows]
            )
            part.backward()
            loss += part.detach()
        all_reduce_mean_([weights.grad, loss])
        results[f"{loss_type}/{scale_rewards}"] = {"loss": loss, "grad": weights.grad}
    return results


def run_rank(rank: int, world: int, port: int, out: Path) -> None:
    """Entry point of a forked process: join the gloo group, save this rank's results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(objective_on_rank(rank, world), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_optimise_the_objective_of_one(tmp_path):
    # forked, not spawned: the processes start with this one's imports (seconds less each)
    mp.start_processes(run_rank, args=(2, free_port(), tmp_path), nprocs=2, start_method="fork")
    single = objective_on_rank(0, 1)
    for rank in (0, 1):
        ranked = torch.load(tmp_path / f"rank{rank}.pt")
        for case, expected in single.items():
            torch.testing.assert_close(ranked[case]["loss"], expected["loss"], rtol=1e-6, atol=1e-6, msg=case)
            torch.testing.assert_close(ranked[case]["grad"], expected["grad"], rtol=1e-6, atol=1e-6, msg=case)
