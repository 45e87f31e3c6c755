"""GRPO advantages and policy losses as pure functions on tensors.

Shapes: ``B`` completions in the (micro-)batch, ``L`` completion positions, ``G``
completions per prompt. Names and meanings follow TRL's ``GRPOConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]
ScaleRewards = Literal["group", "batch", "none"]


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: ScaleRewards = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages ``(r - mean_group) / (std + eps)``.

    Args:
        rewards: ``(P*G,)`` rewards, the ``G`` completions of each prompt contiguous.
        num_generations: ``G``.
        scale_rewards: ``group`` divides by each group's std (GRPO, DeepSeekMath);
            ``batch`` by the std of the whole batch (more robust, Liu et al. 2025 suggest it);
            ``none`` does not scale (Dr. GRPO, arXiv:2503.20783), removing the bias towards
            prompts with low reward variance.
        eps: Added to the std so groups with equal rewards get advantage 0, not NaN.

    Returns:
        ``(P*G,)`` advantages. Std is the unbiased sample std, as in TRL.
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(dim=1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        raise ValueError(f"scale_rewards must be one of group, batch, none; got {scale_rewards!r}")
    return centred / (std + eps)


@dataclass(frozen=True)
class Normalizer:
    """Whole-batch totals, so micro-batch losses add up to the loss of the whole rollout batch.

    Attributes:
        num_sequences: Completions in the rollout batch.
        num_tokens: Loss tokens (mask ones) in the rollout batch.
        max_completion_length: The constant length Dr. GRPO divides by.
    """

    num_sequences: int
    num_tokens: int
    max_completion_length: int


def clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss ``-min(ratio * A, clip(ratio, 1-eps, 1+eps_high) * A)``.

    Args:
        logps: ``(B, L)`` log-probabilities of the sampled tokens under the current policy.
        old_logps: ``(B, L)`` the same under the policy that sampled them (detached).
        advantages: ``(B,)`` one advantage per completion.
        epsilon: Lower clipping bound ``1 - epsilon``.
        epsilon_high: Upper clipping bound ``1 + epsilon_high`` (DAPO's clip-higher).

    Returns:
        ``(B, L)`` per-token loss and ``(B, L)`` ratio (detached) for clip metrics.
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv
    return -torch.min(unclipped, clipped), ratio.detach()


def kl_to_reference(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(r - p) - (r - p) - 1``."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def aggregate_loss(
    per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: LossType, norm: Normalizer
) -> torch.Tensor:
    """Reduce a micro-batch's per-token loss so that summing over micro-batches gives the batch loss.

    Args:
        per_token_loss: ``(B, L)``.
        mask: ``(B, L)`` 1 on tokens that carry loss (assistant tokens).
        loss_type: ``grpo``: mean over completions of each completion's token mean (length bias);
            ``bnpo``: token mean of the micro-batch, weighted by its share of completions;
            ``dr_grpo``: token sum divided by ``num_sequences * max_completion_length`` (Dr. GRPO);
            ``dapo``: token sum divided by all loss tokens of the batch (DAPO's token-level mean).
        norm: Totals over the whole rollout batch.
    """
    mask = mask.to(per_token_loss.dtype)
    summed = (per_token_loss * mask).sum(dim=1)
    if loss_type == "grpo":
        return (summed / mask.sum(dim=1).clamp(min=1)).sum() / norm.num_sequences
    if loss_type == "bnpo":
        share = per_token_loss.shape[0] / norm.num_sequences
        return summed.sum() / mask.sum().clamp(min=1) * share
    if loss_type == "dr_grpo":
        return summed.sum() / (norm.num_sequences * norm.max_completion_length)
    if loss_type == "dapo":
        return summed.sum() / max(norm.num_tokens, 1)
    raise ValueError(f"loss_type must be one of grpo, dr_grpo, dapo, bnpo; got {loss_type!r}")


def clip_fractions(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon: float, epsilon_high: float
) -> dict[str, torch.Tensor]:
    """Fractions of loss tokens whose ratio was clipped, named as TRL logs them."""
    adv = advantages.unsqueeze(1)
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    tokens = mask.sum().clamp(min=1)
    return {
        "clip_ratio/low_mean": (low & mask.bool()).sum() / tokens,
        "clip_ratio/high_mean": (high & mask.bool()).sum() / tokens,
        "clip_ratio/region_mean": ((low | high) & mask.bool()).sum() / tokens,
    }
