"""How a run's weights move between its saved deltas (Mukherjee et al., arXiv:2505.11711, Appendix D).

Checkpoint ``k`` is the base with delta ``k`` scattered in (entries a delta does
not store equal the base). For the base followed by the deltas in step order this
reports, at a tolerance:

* per consecutive pair, the entries that change (``|θ_k - θ_{k-1}| > tol``), as a
  share of the whole model and of the entries either checkpoint stores;
* a split of all entries into *never updated* (equal to the base at every
  checkpoint), *updated then cancelled* (different from the base at some
  checkpoint, equal to it at the last) and *net updated* (different at the last).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mthlib.analysis.compare import changed_mask
from mthlib.analysis.report import Table, percent
from mthlib.analysis.sources import DeltaWeights, Spec, WeightSource, check_base, resolve_weights, run_deltas, total_entries
from mthlib.deltas import SparseDelta, load_delta


@dataclass(frozen=True)
class Transition:
    """Changes from one checkpoint to the next.

    Attributes:
        start: Step of the earlier checkpoint (None for the base).
        end: Step of the later checkpoint.
        changed: Entries whose value changed by more than the tolerance.
        stored: Entries that either checkpoint's delta stores.
    """

    start: int | None
    end: int
    changed: int
    stored: int


@dataclass
class ConsecutiveResult:
    """Consecutive-checkpoint changes of one run and the never/cancelled/net split."""

    run_dir: str
    base: str
    tol: float
    total: int
    transitions: list[Transition] = field(default_factory=list)
    ever_updated: int = 0
    net_updated: int = 0

    @property
    def never_updated(self) -> int:
        """Entries equal to the base at every checkpoint."""
        return self.total - self.ever_updated

    @property
    def cancelled(self) -> int:
        """Entries that differed from the base at some checkpoint but equal it at the last."""
        return self.ever_updated - self.net_updated

    def tables(self) -> list[Table]:
        """Transitions, then the split of entries."""
        transitions = Table(
            f"Changes between consecutive checkpoints of {self.run_dir} (tol={self.tol:g}, n={self.total})",
            ["from step", "to step", "changed", "% of model", "% of stored"],
            [["base" if t.start is None else t.start, t.end, t.changed, percent(t.changed / self.total),
              percent(t.changed / t.stored) if t.stored else None] for t in self.transitions],
        )
        split = Table(
            "Entries over the whole run",
            ["entries", "count", "% of model"],
            [[label, count, percent(count / self.total)] for label, count in (
                ("never updated", self.never_updated),
                ("updated then cancelled", self.cancelled),
                ("net updated", self.net_updated),
            )],
        )
        return [transitions, split]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "run_dir": self.run_dir,
            "base": self.base,
            "tol": self.tol,
            "total": self.total,
            "transitions": [
                {"from_step": t.start, "to_step": t.end, "changed": t.changed, "stored": t.stored,
                 "fraction_of_model": t.changed / self.total}
                for t in self.transitions
            ],
            "never_updated": self.never_updated,
            "cancelled": self.cancelled,
            "net_updated": self.net_updated,
        }


def consecutive_changes(
    run_dir: str | os.PathLike,
    base: Spec | WeightSource | None = None,
    *,
    tol: float = 1e-5,
    check_fingerprint: bool = True,
) -> ConsecutiveResult:
    """Measure changes between a run's consecutive deltas (sorted by their ``step`` metadata).

    Args:
        run_dir: A run folder with ``deltas/*.safetensors`` (and/or ``last.safetensors``).
        base: The base the deltas apply to; defaults to their recorded ``base_model``.
        tol: Values within ``tol`` of each other count as equal.
        check_fingerprint: Refuse a base whose fingerprint differs from the deltas'.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    found = run_deltas(run)
    if not found:
        raise ValueError(f"{run} holds no sparse deltas (looked for deltas/*.safetensors and last.safetensors)")
    steps = [step for step, _ in found]
    deltas = [load_delta(path) for _, path in found]
    fingerprints = sorted({d.base_fingerprint for d in deltas})
    if len(fingerprints) > 1:
        raise ValueError(f"{run} mixes deltas of different bases: fingerprints {fingerprints}")
    base_source = resolve_weights(base if base is not None else deltas[0].base_model)
    if check_fingerprint:
        check_base(deltas[0], base_source, str(run))
    for (_, path), delta in zip(found, deltas):
        DeltaWeights(delta, base_source, str(path))
    result = ConsecutiveResult(str(run), base_source.label, tol, total_entries(base_source))
    changed = [0] * len(deltas)
    stored = [0] * len(deltas)
    for name in sorted({name for d in deltas for name in d.indices}):
        ever, net = _scan_parameter(name, deltas, base_source, tol, changed, stored)
        result.ever_updated += ever
        result.net_updated += net
    starts: list[int | None] = [None, *steps[:-1]]
    result.transitions = [Transition(s, e, c, n) for s, e, c, n in zip(starts, steps, changed, stored)]
    return result


def _scan_parameter(
    name: str, deltas: list[SparseDelta], base: WeightSource, tol: float, changed: list[int], stored: list[int]
) -> tuple[int, int]:
    """Walk one parameter through the checkpoints over the entries any delta stores; add to the counters."""
    union = torch.unique(torch.cat([d.indices[name].to(torch.int64) for d in deltas if name in d.indices]))
    base_values = base.get(name).reshape(-1)[union].to(torch.float64)
    previous, previous_in = base_values, torch.zeros(union.numel(), dtype=torch.bool)
    ever = torch.zeros(union.numel(), dtype=torch.bool)
    for k, delta in enumerate(deltas):
        current, current_in = base_values.clone(), torch.zeros(union.numel(), dtype=torch.bool)
        if name in delta.indices:
            positions = torch.searchsorted(union, delta.indices[name].to(torch.int64))
            current[positions] = delta.values[name].to(torch.float64)
            current_in[positions] = True
        changed[k] += int(changed_mask(previous, current, tol).sum())
        stored[k] += int(torch.count_nonzero(previous_in | current_in))
        ever |= changed_mask(base_values, current, tol)
        previous, previous_in = current, current_in
    return int(ever.sum()), int(changed_mask(base_values, previous, tol).sum())
