"""GRPO advantages and policy losses as pure functions on tensors.

Shapes: ``B`` completions in the (micro-)batch, ``L`` completion positions, ``G``
completions per prompt. Names, meanings and defaults follow TRL 1.16's ``GRPOConfig``.
Quantities that span the whole batch of every process (the reward std of
``scale_rewards="batch"``, the token and completion counts of :class:`Normalizer`) arrive
as arguments; :mod:`mthlib.grpo.objective` reduces them across processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]
ScaleRewards = Literal["group", "batch", "none"]
ImportanceSamplingLevel = Literal["token", "sequence"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
CLIPPED_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "luspo")


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
    batch_std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-relative advantages ``(r - mean_group) / (std + eps)``.

    Args:
        rewards: ``(P*G,)`` rewards, the ``G`` completions of each prompt contiguous.
        num_generations: ``G``.
        scale_rewards: ``group`` divides by each group's std (GRPO, DeepSeekMath);
            ``batch`` by the std of the whole batch (PPO Lite, arXiv:2508.08221);
            ``none`` does not scale (Dr. GRPO, arXiv:2503.20783), removing the bias towards
            prompts with low reward variance.
        eps: Added to the std so groups with equal rewards get advantage 0, not NaN.
        batch_std: With ``scale_rewards="batch"``, the std of the rewards of every process
            (``None``: the std of ``rewards``, right on one process).

    Returns:
        ``(P*G,)`` advantages. Stds are unbiased sample stds, as in TRL.
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
        std = (rewards.std() if batch_std is None else batch_std).expand_as(rewards)
    else:
        raise ValueError(f"scale_rewards must be one of group, batch, none; got {scale_rewards!r}")
    return centred / (std + eps)


def mask_truncated(loss_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """The loss mask without completions cut at ``max_completion_length`` (DAPO's overlong filtering).

    Args:
        loss_mask: ``(B, L)`` 1 on loss tokens.
        truncated: ``(B,)`` True where a completion ended without an end token.

    Returns:
        ``(B, L)``: truncated completions carry no loss and count no tokens.
    """
    return loss_mask * (~truncated).to(loss_mask.dtype).unsqueeze(1)


@dataclass(frozen=True)
class Normalizer:
    """Totals over the rollout batches of all processes, so micro-batch losses add up to the batch loss.

    Attributes:
        num_sequences: Completions in the rollout batches of all processes.
        num_tokens: Loss tokens (mask ones) in the rollout batches of all processes.
        max_completion_length: The constant length Dr. GRPO divides by.
        num_processes: Processes whose gradients are averaged; each process's loss is
            multiplied by it, so the average is the gradient of the whole-batch loss.
    """

    num_sequences: int
    num_tokens: int
    max_completion_length: int
    num_processes: int = 1


def importance_ratio(
    logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: ImportanceSamplingLevel = "token"
) -> torch.Tensor:
    """Ratio ``pi / pi_old`` of the current to the sampling policy, per token or per sequence.

    Args:
        logps: ``(B, L)`` log-probabilities under the current policy (with gradient).
        old_logps: ``(B, L)`` the same under the policy that sampled the tokens.
        mask: ``(B, L)`` 1 on loss tokens.
        level: ``token`` keeps one ratio per token (GRPO); ``sequence`` takes the exponential
            of the mean log-ratio over a completion's loss tokens (GSPO, arXiv:2507.18071).

    Returns:
        ``(B, L)`` ratios, or ``(B, 1)`` with ``level="sequence"``.
    """
    log_ratio = logps - old_logps
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        mask = mask.to(log_ratio.dtype)
        return torch.exp((log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1))
    raise ValueError(f"importance_sampling_level must be token or sequence; got {level!r}")


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float, delta: float | None = None
) -> torch.Tensor:
    """PPO-clip loss ``-min(ratio * A, clip(ratio, 1-eps, 1+eps_high) * A)`` (grpo, dr_grpo, dapo, bnpo, luspo).

    Args:
        ratio: ``(B, L)`` or ``(B, 1)`` importance ratios (:func:`importance_ratio`).
        advantages: ``(B,)`` one advantage per completion.
        epsilon: Lower clipping bound ``1 - epsilon``.
        epsilon_high: Upper clipping bound ``1 + epsilon_high`` (DAPO's clip-higher).
        delta: If set, the unclipped ratio is also capped at ``delta`` (two-sided clipping,
            INTELLECT-2, arXiv:2505.07291), bounding the loss of negative advantages.

    Returns:
        Per-token loss, shaped as ``ratio``.
    """
    adv = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    return -torch.min(ratio * adv, clipped * adv)


def cispo_surrogate(
    logps: torch.Tensor, ratio: torch.Tensor, advantages: torch.Tensor, epsilon_high: float
) -> torch.Tensor:
    """CISPO loss ``-sg(min(ratio, eps_max)) * A * log pi``: clip the weight, keep every token's gradient.

    Source: MiniMax-M1 (arXiv:2506.13585). The clipped ratio is detached, so it scales the
    policy gradient instead of zeroing it where PPO would clip.

    Args:
        logps: ``(B, L)`` log-probabilities under the current policy.
        ratio: ``(B, L)`` or ``(B, 1)`` importance ratios.
        advantages: ``(B,)``.
        epsilon_high: ``eps_max``, the cap of the ratio itself (not ``1 + eps``).

    Returns:
        ``(B, L)`` per-token loss.
    """
    return -torch.clamp(ratio, max=epsilon_high).detach() * advantages.unsqueeze(1) * logps


def sapo_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, temperature_pos: float, temperature_neg: float
) -> torch.Tensor:
    """SAPO loss ``-(4 / tau) * sigmoid(tau * (ratio - 1)) * A``: a smooth gate instead of a hard clip.

    Source: Soft Adaptive Policy Optimization (arXiv:2511.20347). The gate's slope is 1 at
    ``ratio = 1`` and fades as the ratio leaves 1, faster for larger ``tau``.

    Args:
        ratio: ``(B, L)`` or ``(B, 1)`` importance ratios.
        advantages: ``(B,)``.
        temperature_pos: ``tau`` of completions with positive advantage.
        temperature_neg: ``tau`` of completions with zero or negative advantage.

    Returns:
        Per-token loss, shaped as ``ratio``.
    """
    adv = advantages.unsqueeze(1)
    tau = torch.where(adv > 0, temperature_pos, temperature_neg)
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv


def vespo_weights(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
) -> torch.Tensor:
    """VESPO's gamma weight ``phi(w) = exp(lambda) * w**k * exp(-lambda * w)`` of each completion (no gradient).

    Source: Variational Sequence-Level Soft Policy Optimization (arXiv:2602.10693).
    ``w`` is the sequence importance ratio ``exp(sum of token log-ratios)``, log-ratios
    clamped to ``[-20, 20]`` and ``log w`` to ``[log 1e-8, 20]``; ``phi(1) = 1``, and ``k``
    and ``lambda`` (by the sign of the advantage, zero counting as positive) set how fast
    the weight falls for ``w`` below and above 1.

    Args:
        logps: ``(B, L)`` log-probabilities under the current policy.
        old_logps: ``(B, L)`` the same under the sampling policy.
        advantages: ``(B,)``.
        mask: ``(B, L)`` 1 on loss tokens.
        k_pos, lambda_pos: Exponent and decay for advantages ``>= 0``.
        k_neg, lambda_neg: Exponent and decay for negative advantages.

    Returns:
        ``(B, 1)`` detached weights; non-finite ones become 0.
    """
    log_ratio = (logps - old_logps).detach().clamp(-20.0, 20.0)
    log_w = (log_ratio * mask).sum(dim=1, keepdim=True).clamp(math.log(1e-8), 20.0)
    nonneg = advantages.unsqueeze(1) >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def weighted_logp_surrogate(logps: torch.Tensor, weights: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Policy-gradient loss ``-w * A * log pi`` with a detached weight ``w`` (VESPO).

    Args:
        logps: ``(B, L)`` log-probabilities under the current policy.
        weights: ``(B, 1)`` detached weights (:func:`vespo_weights`).
        advantages: ``(B,)``.

    Returns:
        ``(B, L)`` per-token loss.
    """
    return -weights * advantages.unsqueeze(1) * logps


def kl_to_reference(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(r - p) - (r - p) - 1``."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def aggregate_loss(
    per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: LossType, norm: Normalizer
) -> torch.Tensor:
    """Reduce a micro-batch's per-token loss so that summing over micro-batches gives the batch loss.

    The result is this process's share of the loss of the batch of all processes, times
    ``norm.num_processes`` (gradients are averaged over processes, TRL scales the same way).

    Args:
        per_token_loss: ``(B, L)``, or ``(B, 1)`` for sequence-level losses (counted once per loss token).
        mask: ``(B, L)`` 1 on tokens that carry loss (assistant tokens).
        loss_type: ``grpo`` and ``sapo``: mean over completions of each completion's token mean
            (length bias); ``luspo``: mean over completions of each completion's token sum
            (LUSPO, arXiv:2602.05261); ``bnpo``: token mean of the micro-batch, weighted by its
            share of completions (local, as in TRL); ``dr_grpo``: token sum divided by
            ``num_sequences * max_completion_length`` (Dr. GRPO); ``dapo``, ``cispo`` and
            ``vespo``: token sum divided by all loss tokens of the batch (DAPO's token-level mean).
        norm: Totals over the rollout batches of all processes.
    """
    mask = mask.to(per_token_loss.dtype)
    per_sequence = (per_token_loss * mask).sum(dim=1)
    if loss_type in ("grpo", "sapo"):
        total = (per_sequence / mask.sum(dim=1).clamp(min=1)).sum() / norm.num_sequences
    elif loss_type == "luspo":
        total = per_sequence.sum() / norm.num_sequences
    elif loss_type == "bnpo":
        total = per_sequence.sum() / mask.sum().clamp(min=1) * (mask.shape[0] / norm.num_sequences)
    elif loss_type == "dr_grpo":
        total = per_sequence.sum() / (norm.num_sequences * norm.max_completion_length)
    elif loss_type in ("dapo", "cispo", "vespo"):
        total = per_sequence.sum() / max(norm.num_tokens, 1)
    else:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    return total * norm.num_processes


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over loss tokens; a ``(B, 1)`` per-completion value is averaged over completions, as TRL logs it."""
    if values.shape[1] == 1 and mask.shape[1] != 1:
        return values.float().mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def clip_fractions(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon: float, epsilon_high: float
) -> dict[str, torch.Tensor]:
    """Fractions of loss tokens (or completions, for sequence ratios) whose ratio was clipped, named as TRL logs them."""
    adv = advantages.unsqueeze(1)
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    return {
        "clip_ratio/low_mean": masked_mean(low.float(), mask),
        "clip_ratio/high_mean": masked_mean(high.float(), mask),
        "clip_ratio/region_mean": masked_mean((low | high).float(), mask),
    }
