"""GRPO: rollouts, advantages and losses (pure functions), and the LightningModule."""

from mthlib.grpo.module import GRPOModule

__all__ = ["GRPOModule"]
