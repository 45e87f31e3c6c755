"""A toy environment for learning tests: the reward is the share of ``a`` characters in the reply."""

import random

import lightning.pytorch as pl

from mthlib.envs.base import Environment, Episode


class LetterA(Environment):
    """Reward = fraction of the reply's characters that are in ``letters``; any prompt works."""

    def __init__(self, letters: str = "a") -> None:
        self.letters = letters

    def sample(self, rng: random.Random) -> Episode:
        return Episode(user_turns=(rng.choice(["go", "say", "write"]),), answer="a")

    def score(self, episode: Episode, replies: list[str]) -> dict[str, float]:
        reply = replies[0] if replies else ""
        share = sum(c in self.letters for c in reply) / len(reply) if reply else 0.0
        return {"reward": share, "accuracy": float(share == 1.0)}

    def reference(self, episode: Episode) -> list[str]:
        return ["aaaa"]


class RewardLog(pl.Callback):
    """Records the logged mean ``reward`` of every training step."""

    def __init__(self) -> None:
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rewards.append(float(trainer.callback_metrics["reward"]))
