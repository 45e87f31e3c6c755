"""The GRPO objective of a rollout batch, the same on one process as on many.

:class:`GRPOObjective` holds the loss options (TRL 1.16's names and defaults) and turns a
micro-batch's log-probabilities into its share of the batch loss. :func:`batch_advantages`
and :func:`batch_normalizer` compute what spans the whole batch (the reward std of
``scale_rewards="batch"``, the completion and token counts), summed over the processes of a
running process group: N processes then optimise the objective of their joint batch, as
TRL does by gathering rewards and token counts across processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch
import torch.distributed as dist

from mthlib.distributed import all_reduce_sum_, is_distributed
from mthlib.grpo.loss import (
    LOSS_TYPES,
    ImportanceSamplingLevel,
    LossType,
    Normalizer,
    ScaleRewards,
    aggregate_loss,
    cispo_surrogate,
    clip_fractions,
    clipped_surrogate,
    group_advantages,
    importance_ratio,
    kl_to_reference,
    masked_mean,
    sapo_surrogate,
    vespo_weights,
    weighted_logp_surrogate,
)


@dataclass(frozen=True)
class GRPOObjective:
    """The GRPO loss of one micro-batch, with every loss option of TRL 1.16.

    Attributes:
        loss_type: The surrogate and its normalisation; see :func:`~mthlib.grpo.loss.aggregate_loss`.
            ``grpo``, ``dr_grpo``, ``dapo``, ``bnpo`` and ``luspo`` use the PPO-clip surrogate,
            ``cispo``, ``sapo`` and ``vespo`` their own (see :mod:`mthlib.grpo.loss`).
        epsilon: Lower clip range of the ratio, ``1 - epsilon``.
        epsilon_high: Upper clip range ``1 + epsilon_high``; for ``cispo`` the cap of the ratio
            itself (ScaleRL recommends 5.0). ``None``: ``epsilon``, as in TRL.
        delta: Cap of the unclipped ratio (two-sided clipping, INTELLECT-2); ``None``: off.
        beta: Coefficient of the k3 KL estimate towards the reference policy.
        use_bias_correction_kl: Multiply the per-token KL by the importance ratio (with its
            gradient), making it the unbiased reverse-KL gradient off-policy (DeepSeek-V3.2,
            arXiv:2512.02556); it changes the gradient even on-policy.
        importance_sampling_level: ``token`` or ``sequence`` ratios (GSPO); see
            :func:`~mthlib.grpo.loss.importance_ratio`.
        sapo_temperature_pos: SAPO gate temperature for positive advantages.
        sapo_temperature_neg: SAPO gate temperature for other advantages.
        vespo_k_pos: VESPO exponent for advantages ``>= 0``.
        vespo_lambda_pos: VESPO decay for advantages ``>= 0``.
        vespo_k_neg: VESPO exponent for negative advantages.
        vespo_lambda_neg: VESPO decay for negative advantages.
    """

    loss_type: LossType = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    importance_sampling_level: ImportanceSamplingLevel = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r}")
        levels = get_args(ImportanceSamplingLevel)
        if self.importance_sampling_level not in levels:
            raise ValueError(
                f"importance_sampling_level must be one of {', '.join(levels)}; got {self.importance_sampling_level!r}"
            )

    @property
    def clip_high(self) -> float:
        """The upper clip range: ``epsilon_high``, or ``epsilon`` when it is unset."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def loss(
        self,
        logps: torch.Tensor,
        old_logps: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        norm: Normalizer,
        ref_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's share of the batch loss, and its metrics under TRL's names.

        Args:
            logps: ``(B, L)`` log-probabilities of the sampled tokens under the current policy.
            old_logps: ``(B, L)`` the same under the policy that sampled them (detached).
            advantages: ``(B,)`` one advantage per completion.
            mask: ``(B, L)`` 1 on loss tokens.
            norm: Totals over the rollout batches of all processes (:func:`batch_normalizer`).
            ref_logps: ``(B, L)`` reference log-probabilities; needed when ``beta != 0``.

        Returns:
            The scalar loss (micro-batch losses add up to the batch loss) and detached metrics.
        """
        ratio = importance_ratio(logps, old_logps, mask, self.importance_sampling_level)
        per_token, metrics = self._surrogate(logps, old_logps, ratio, advantages, mask)
        if self.beta != 0.0:
            if ref_logps is None:
                raise ValueError("beta != 0 needs the reference log-probabilities (ref_logps)")
            kl = kl_to_reference(logps, ref_logps)
            if self.use_bias_correction_kl:
                kl = kl * ratio
            per_token = per_token + self.beta * kl
            metrics["kl"] = masked_mean(kl.detach(), mask)
        return aggregate_loss(per_token, mask, self.loss_type, norm), metrics

    def _surrogate(
        self,
        logps: torch.Tensor,
        old_logps: torch.Tensor,
        ratio: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The per-token policy loss of ``loss_type``, with the clipping metric TRL logs for it."""
        if self.loss_type == "cispo":
            capped = (ratio.detach() > self.clip_high) & (advantages.unsqueeze(1) > 0)
            loss = cispo_surrogate(logps, ratio, advantages, self.clip_high)
            return loss, {"cispo_clip_ratio": masked_mean(capped.float(), mask)}
        if self.loss_type == "sapo":
            return sapo_surrogate(ratio, advantages, self.sapo_temperature_pos, self.sapo_temperature_neg), {}
        if self.loss_type == "vespo":
            phi = vespo_weights(
                logps, old_logps, advantages, mask,
                self.vespo_k_pos, self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg,
            )
            return weighted_logp_surrogate(logps, phi, advantages), {"vespo/phi_seq_mean": phi.mean()}
        loss = clipped_surrogate(ratio, advantages, self.epsilon, self.clip_high, self.delta)
        return loss, clip_fractions(ratio.detach(), advantages, mask, self.epsilon, self.clip_high)


def num_processes() -> int:
    """Processes of the running process group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def batch_normalizer(loss_mask: torch.Tensor, max_completion_length: int) -> Normalizer:
    """Completions and loss tokens of the rollout batches of all processes.

    Args:
        loss_mask: ``(N, T)`` this process's loss mask (after any masking of truncated completions).
        max_completion_length: Dr. GRPO's constant.

    Returns:
        The :class:`~mthlib.grpo.loss.Normalizer` every process shares.
    """
    counts = torch.tensor([loss_mask.shape[0], int(loss_mask.sum())], dtype=torch.int64, device=loss_mask.device)
    all_reduce_sum_([counts])
    return Normalizer(int(counts[0]), int(counts[1]), max_completion_length, num_processes())


def batch_reward_std(rewards: torch.Tensor) -> torch.Tensor:
    """Unbiased std of the rewards of all processes (two reductions: the mean, then the squared deviations).

    Args:
        rewards: ``(N,)`` this process's rewards.

    Returns:
        A scalar, the same on every process.
    """
    totals = torch.stack([rewards.sum(), torch.tensor(float(rewards.numel()), device=rewards.device)])
    all_reduce_sum_([totals])
    squares = ((rewards - totals[0] / totals[1]) ** 2).sum().reshape(1)
    all_reduce_sum_([squares])
    return (squares[0] / (totals[1] - 1)).sqrt()


def batch_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: ScaleRewards) -> torch.Tensor:
    """Group-relative advantages, scaled by the std of every process's rewards when ``scale_rewards="batch"``.

    Args:
        rewards: ``(P*G,)`` this process's rewards, groups contiguous (a group never spans processes).
        num_generations: ``G``.
        scale_rewards: See :func:`~mthlib.grpo.loss.group_advantages`.

    Returns:
        ``(P*G,)`` advantages of this process's completions.
    """
    batch_std = batch_reward_std(rewards) if scale_rewards == "batch" else None
    return group_advantages(rewards, num_generations, scale_rewards, batch_std=batch_std)
