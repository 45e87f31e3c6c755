"""The non-finite guard of a GRPO run: skip a step whose numbers are NaN/Inf, stop after a run of them.

A NaN reward, a loss that overflowed or an infinite gradient would otherwise reach the
optimizer, turn every trained weight into NaN and then into every checkpoint and delta
written afterwards. :class:`NonFiniteGuard` checks the quantities of each optimizer step
(rewards, advantages, loss, gradient norm) before the step is taken; :meth:`NonFiniteGuard.step`
skips a bad step (clears the gradients: no weight and no optimizer state changes) and
counts it. After ``max_bad_steps`` bad steps in a row it raises :class:`NonFiniteError`
(a ``ValueError``, so ``mth fit`` prints it as one line) naming the first bad quantity
and the step it appeared at. The decision is reduced over processes, so every rank
skips or stops together. After each step taken, :meth:`NonFiniteGuard.check_weights`
makes sure the update left every trained value finite, and :meth:`NonFiniteGuard.watch`
warns once when the loss or the KL jumps far above its running median (divergence).

Steps count optimizer steps from 1, as the progress bar and the delta file names do.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from mthlib.distributed import all_reduce_sum_
from mthlib.masking import SparseState

HINTS = {
    "reward": "the environment's score returned a non-finite reward",
    "advantage": "the rewards are too large to normalise",
}
"""Why a quantity is non-finite, where the quantity says it; the others point at the learning rate."""

DEFAULT_HINT = "lower model.learning_rate or set model.max_grad_norm"

WATCHED = ("loss", "kl")
"""The step metrics :meth:`NonFiniteGuard.watch` follows for divergence."""


class NonFiniteError(ValueError):
    """Training cannot go on: too many consecutive non-finite steps, or non-finite weights after a step."""


class NonFiniteGuard:
    """Decide, step by step, whether the optimizer may step, and stop a run that keeps failing.

    Args:
        max_bad_steps: Consecutive non-finite steps after which the run stops (``>= 1``).
        divergence_factor: Warn when ``|loss|`` or the KL exceeds this many times its running
            median (``None``: no divergence warning).
        window: Steps in the running median.
        min_history: Steps of history needed before a jump is judged.
        floor: The median is taken as at least this much. It is the median of the nonzero values
            (a step without learning signal has a loss of exactly 0, the KL is 0 until the policy
            moves), and the floor keeps a history of zeros from making any later value a jump.
    """

    def __init__(
        self,
        max_bad_steps: int = 3,
        divergence_factor: float | None = 100.0,
        window: int = 20,
        min_history: int = 2,
        floor: float = 1e-2,
    ) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1 (consecutive non-finite steps before stopping); got {max_bad_steps}")
        if divergence_factor is not None and not divergence_factor > 1:
            raise ValueError(f"divergence_factor must be > 1 or None (no divergence warning); got {divergence_factor}")
        self.max_bad_steps = max_bad_steps
        self.divergence_factor = divergence_factor
        self.window = window
        self.min_history = min_history
        self.floor = floor
        self.skipped_steps = 0
        self.consecutive = 0
        self.first_bad: tuple[str, str, int] | None = None
        self.history: dict[str, list[float]] = {}
        self.warned: set[str] = set()

    # -- non-finite steps -------------------------------------------------------------------
    def step(
        self,
        optimizer: torch.optim.Optimizer,
        quantities: Mapping[str, torch.Tensor | None],
        metrics: Mapping[str, list[torch.Tensor]],
        step: int,
        model: nn.Module,
        sparse_state: SparseState | None = None,
    ) -> bool:
        """Take the optimizer step if :meth:`check` passes, else skip it; returns whether it was taken.

        A skipped step clears the gradients, then steps the optimizer without any: AdamW and
        :class:`~mthlib.masking.SparseAdamW` then change no weight and no moment, and Lightning
        still counts the step. A step taken is followed by :meth:`check_weights` on the trained
        values (the active entries of ``sparse_state``, else every parameter of ``model``) and by
        :meth:`watch` of the step's ``metrics``.
        """
        if not self.check(quantities, step):
            optimizer.zero_grad()
            optimizer.step()
            return False
        optimizer.step()
        trained = model.named_parameters() if sparse_state is None else sparse_state.trained_values(copy=False).items()
        self.check_weights(trained, step, optimizer.param_groups[0]["lr"])
        self.watch({key: torch.stack(metrics[key]).float().mean().item() for key in WATCHED if key in metrics}, step)
        return True

    def check(self, quantities: Mapping[str, torch.Tensor | None], step: int) -> bool:
        """Whether every value of every quantity is finite on every process.

        A bad step is counted; the consecutive count is reset by a good one.

        Args:
            quantities: Name to values (``None`` entries are ignored), in the order in which
                the first bad one is named.
            step: The optimizer step being checked (counted from 1).

        Raises:
            NonFiniteError: ``max_bad_steps`` bad steps in a row.
        """
        bad = first_nonfinite((name, value) for name, value in quantities.items() if value is not None)
        if bad is None:
            self.consecutive, self.first_bad = 0, None
            return True
        self.skipped_steps += 1
        self.consecutive += 1
        if self.first_bad is None:
            self.first_bad = (*bad, step)
        if self.consecutive >= self.max_bad_steps:
            name, kind, first = self.first_bad
            raise NonFiniteError(
                f"{name} is {kind} at step {first} ({self.consecutive} consecutive non-finite steps; "
                f"model.max_bad_steps is {self.max_bad_steps}): {HINTS.get(name, DEFAULT_HINT)}. The bad steps were "
                f"skipped, so the model and every checkpoint and delta hold the weights of step {first - 1}"
            )
        return False

    def check_weights(self, named: Iterable[tuple[str, torch.Tensor]], step: int, learning_rate: float) -> None:
        """Stop when the optimizer step just taken left a trained value NaN or Inf (it cannot be undone).

        Raises:
            NonFiniteError: Naming the first such parameter; nothing of this step has been saved yet.
        """
        bad = first_nonfinite(named)
        if bad is not None:
            name, kind = bad
            raise NonFiniteError(
                f"weights of {name} are {kind} after the optimizer step at step {step} (learning rate "
                f"{learning_rate:g}): lower model.learning_rate; nothing of step {step} was saved"
            )

    # -- divergence -------------------------------------------------------------------------
    def watch(self, values: Mapping[str, float], step: int) -> None:
        """Log one warning line (once per quantity, rank zero) when a value jumps far above its running median."""
        if self.divergence_factor is None:
            return
        for name, value in values.items():
            history = self.history.setdefault(name, [])
            size = abs(value)
            if name not in self.warned and len(history) >= self.min_history:
                median = max(statistics.median([v for v in history if v] or [0.0]), self.floor)
                if size > self.divergence_factor * median:
                    self.warned.add(name)
                    if rank_zero_only.rank == 0:
                        logging.getLogger(__name__).warning(
                            f"warning: {name} jumped to {value:.3g} at step {step}, {size / median:.0f}x its running "
                            f"median {median:.3g}: training may be diverging ({DEFAULT_HINT})"
                        )
            history.append(size)
            del history[: -self.window]

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, the first bad quantity of the current run of bad steps, and the divergence history."""
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive": self.consecutive,
            "first_bad": None if self.first_bad is None else list(self.first_bad),
            "history": {name: list(values) for name, values in self.history.items()},
            "warned": sorted(self.warned),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive = int(state["consecutive"])
        self.first_bad = None if state["first_bad"] is None else tuple(state["first_bad"])
        self.history = {name: [float(v) for v in values] for name, values in state["history"].items()}
        self.warned = set(state["warned"])


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, str] | None:
    """The first ``(name, "NaN" | "Inf")`` whose tensor holds a non-finite value on any process, else ``None``.

    One collective for all tensors (a sum of NaN and Inf flags), so every process gets the same answer.
    """
    named = list(named)
    if not named:
        return None
    device = named[0][1].device
    counts = torch.stack([torch.stack([t.isnan().any(), t.isinf().any()]).to(device) for _, t in named]).float()
    all_reduce_sum_([counts])
    for (name, _), (nan, inf) in zip(named, counts.tolist()):
        if nan or inf:
            return name, "NaN" if nan else "Inf"
    return None
