"""What a GRPO run logs: each training step's metrics, named as TRL logs them, and evaluation means."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchmetrics import MeanMetric

from mthlib.envs.base import Environment, Episode
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


class EvaluationMetrics(torch.nn.ModuleDict):
    """The mean, over an evaluation epoch, of every metric an environment declares (``Environment.metrics``).

    A module attribute, so the running means move to the module's device and sum across processes.

    Args:
        keys: The metric names (``env.metrics``); none before the environment is known.
    """

    def __init__(self, keys: Sequence[str] = ()) -> None:
        super().__init__({key: MeanMetric() for key in keys})

    def add(self, env: Environment, episodes: Sequence[Episode], replies: Sequence[list[str]]) -> None:
        """Score each episode's replies and add every declared metric to its mean.

        Raises:
            ValueError: ``env.score`` left out a metric the environment declares.
        """
        for episode, turns in zip(episodes, replies):
            score = env.score(episode, turns)
            missing = [key for key in self if key not in score]
            if missing:
                raise ValueError(f"{type(env).__name__}.score returned {sorted(score)}, without the declared metrics {missing}")
            for key, metric in self.items():
                metric.update(score[key])

    def compute_and_reset(self) -> dict[str, torch.Tensor]:
        """Each metric's mean over the epoch (metrics with no update left out); every mean starts again."""
        means = {key: metric.compute() for key, metric in self.items() if metric.update_count}
        for metric in self.values():
            metric.reset()
        return means
