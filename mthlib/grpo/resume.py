"""What a GRPO checkpoint holds beyond Lightning's own state, and the checks before it is restored.

:class:`~mthlib.grpo.GRPOModule` saves a :class:`ResumeState` under the checkpoint's ``"mthlib"``
key: where the prompt stream stands, the non-finite guard's counters, every random generator the
step uses (CPU, Python, the rollout engine's own and, on a GPU, CUDA, so a resumed run samples
what an uninterrupted one would), which base it trained, and, for a masked run, the trained
entries instead of dense weights.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mthlib.grpo.engines import RolloutEngine
from mthlib.masking import MaskStrategy

KEY = "mthlib"
"""The checkpoint entry that holds a :class:`ResumeState`."""


def capture_rng(device: torch.device, engine: RolloutEngine) -> dict[str, Any]:
    """The state of the CPU, Python, (on a GPU) the device's CUDA and the rollout engine's random generators."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "engine": engine.state_dict()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: Mapping[str, Any], device: torch.device, engine: RolloutEngine) -> None:
    """Put back the generators :func:`capture_rng` saved (CUDA only when it was saved and this run is on a GPU).

    A checkpoint saved before the engine's state was part of it leaves the engine as it is.
    """
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("engine"):
        engine.load_state_dict(rng["engine"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


@dataclass
class ResumeState:
    """The module's part of a checkpoint.

    Attributes:
        prompts_seen: Prompts the training stream has handed out.
        guard: :meth:`~mthlib.grpo.guard.NonFiniteGuard.state_dict` (``None`` in checkpoints older than the guard).
        rng: :func:`capture_rng` at the save.
        base_model: The run's ``model_name_or_path``.
        base_fingerprint: The base weights' fingerprint (:func:`~mthlib.fingerprint.model_fingerprint`).
        trained_values: A masked run's trained entries by parameter name; ``None`` for a dense run.
    """

    prompts_seen: int
    guard: dict[str, Any] | None
    rng: dict[str, Any]
    base_model: str
    base_fingerprint: str
    trained_values: dict[str, torch.Tensor] | None = None

    def to_checkpoint(self) -> dict[str, Any]:
        """The ``"mthlib"`` entry (a dense run has no ``trained_values`` key)."""
        state = {
            "prompts_seen": self.prompts_seen, "guard": self.guard, "rng": self.rng,
            "base_model": self.base_model, "base_fingerprint": self.base_fingerprint,
        }
        if self.trained_values is not None:
            state["trained_values"] = self.trained_values
        return state

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> ResumeState | None:
        """The state saved in a checkpoint, or ``None`` for one that has none (not written by mthlib)."""
        state = checkpoint.get(KEY)
        if state is None:
            return None
        return cls(
            prompts_seen=int(state["prompts_seen"]), guard=state.get("guard"), rng=state["rng"],
            base_model=state["base_model"], base_fingerprint=state["base_fingerprint"],
            trained_values=state.get("trained_values"),
        )

    def check(self, saved_mask: Mapping[str, Any] | None, base_model: str, base_fingerprint: str,
              mask: MaskStrategy | None) -> None:
        """Refuse to resume onto another base model, or across masked and dense training.

        A checkpoint holds no dense weights of a masked run and the base is reloaded from
        ``model_name_or_path``, so the base must be the same weights (the fingerprint decides; a
        moved folder is fine). The mask strategy's own arguments are checked by
        :class:`~mthlib.masking.MaskCallback`.

        Args:
            saved_mask: The checkpoint's ``hyper_parameters["mask"]`` (a strategy config, or ``None``).
            base_model: This run's ``model_name_or_path``.
            base_fingerprint: This run's base fingerprint.
            mask: This run's mask strategy (``None``: dense).

        Raises:
            ValueError: One line naming the setting that differs and both values.
        """
        masked = self.trained_values is not None
        if masked != (mask is not None):
            here = "null" if mask is None else mask.name or type(mask).__name__
            there = ((saved_mask or {}).get("name") or "a mask strategy") if masked else "null"
            raise ValueError(f"resume: model.mask is {here} here but {there} in the checkpoint")
        if self.base_fingerprint != base_fingerprint:
            raise ValueError(
                f"resume: model.model_name_or_path is {base_model} (base fingerprint {base_fingerprint}) here but "
                f"{self.base_model} (base fingerprint {self.base_fingerprint}) in the checkpoint"
            )
