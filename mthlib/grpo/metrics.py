"""What a GRPO training step logs, named as TRL logs it, computed from the step's rollout and rewards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mthlib.grpo.objective import batch_reward_std
from mthlib.grpo.rollout import Rollout


def step_metrics(
    rewards: torch.Tensor,
    scores: Sequence[Mapping[str, float]],
    rollout: Rollout,
    num_generations: int,
    generation_time: float,
    step_time: float,
    learning_rate: float,
) -> dict[str, torch.Tensor]:
    """Reward spread, completion lengths, throughput, timing and every extra score key as ``rewards/<key>``.

    Args:
        rewards: ``(P*G,)`` rewards, the completions of each prompt contiguous.
        scores: The environment's score of every completion (``reward`` and its metrics).
        rollout: The sampled completions.
        num_generations: ``G``.
        generation_time: Seconds spent sampling.
        step_time: Seconds of the whole step.
        learning_rate: The optimizer's current learning rate.
    """
    grouped = rewards.view(-1, num_generations)
    lengths = rollout.completion_lengths.float()
    metrics = {
        "reward_std": batch_reward_std(rewards),
        "frac_reward_zero_std": (grouped.std(dim=1) < 1e-6).float().mean(),
        "completions/mean_length": lengths.mean(),
        "completions/clipped_ratio": rollout.truncated.float().mean(),
        "tokens_per_second": lengths.sum() / max(generation_time, 1e-9),
        "timing/generation_s": torch.tensor(generation_time),
        "timing/step_s": torch.tensor(step_time),
        "learning_rate": torch.tensor(learning_rate),
    }
    for key in scores[0]:
        if key != "reward":
            metrics[f"rewards/{key}"] = torch.tensor(sum(s[key] for s in scores) / len(scores))
    return metrics
