"""GRPO math on hand-made rewards and log-probabilities, checked against the formulas."""

import math

import pytest
import torch

from mthlib.grpo.loss import (
    Normalizer,
    aggregate_loss,
    cispo_surrogate,
    clip_fractions,
    clipped_surrogate,
    group_advantages,
    importance_ratio,
    kl_to_reference,
    mask_truncated,
    sapo_surrogate,
    vespo_weights,
    weighted_logp_surrogate,
)
from mthlib.grpo.objective import GRPOObjective, batch_advantages, batch_normalizer, batch_reward_std


def test_group_advantages_normalise_each_group_by_its_own_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(rewards, num_generations=4, scale_rewards="group", eps=1e-4)
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std().item()  # unbiased, as TRL
    expected_first = [(1 - 0.25) / (std + 1e-4)] + [(0 - 0.25) / (std + 1e-4)] * 3
    assert adv[:4].tolist() == pytest.approx(expected_first)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards: no signal, no NaN


def test_batch_scaling_uses_the_std_of_the_whole_batch_and_none_only_centres():
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    batch = group_advantages(rewards, 2, "batch", eps=0.0)
    std = rewards.std().item()
    assert batch.tolist() == pytest.approx([0.5 / std, -0.5 / std, 1.0 / std, -1.0 / std])
    assert group_advantages(rewards, 2, "none").tolist() == [0.5, -0.5, 1.0, -1.0]


def test_batch_std_given_replaces_the_local_one_and_one_process_reduces_to_it():
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    given = group_advantages(rewards, 2, "batch", eps=0.0, batch_std=torch.tensor(2.0))
    assert given.tolist() == pytest.approx([0.25, -0.25, 0.5, -0.5])
    assert batch_reward_std(rewards).item() == pytest.approx(rewards.std().item(), rel=1e-6)
    assert torch.allclose(batch_advantages(rewards, 2, "batch"), group_advantages(rewards, 2, "batch"))


def test_group_advantages_reject_a_batch_that_does_not_split_into_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_clipped_surrogate_clips_the_ratio_on_the_side_the_advantage_rewards():
    ratio = torch.tensor([[1.5, 0.5, 1.1]])
    loss = clipped_surrogate(ratio, torch.tensor([2.0]), epsilon=0.2, epsilon_high=0.28)
    # A > 0: min(r*A, clip(r)*A): 1.5 -> clipped to 1.28; 0.5 -> unclipped 0.5 (min picks it); 1.1 -> 1.1
    assert loss.tolist()[0] == pytest.approx([-1.28 * 2, -0.5 * 2, -1.1 * 2], rel=1e-6)
    neg = clipped_surrogate(ratio, torch.tensor([-1.0]), epsilon=0.2, epsilon_high=0.28)
    # A < 0: -min(r*A, clip(r)*A) = max(r, clip(r)) * |A|: 1.5 -> 1.5; 0.5 -> clipped 0.8
    assert neg.tolist()[0] == pytest.approx([1.5, 0.8, 1.1], rel=1e-6)


def test_delta_caps_the_unclipped_ratio_of_negative_advantages():
    ratio = torch.tensor([[3.0, 1.5]])
    assert clipped_surrogate(ratio, torch.tensor([-1.0]), 0.2, 0.2).tolist()[0] == pytest.approx([3.0, 1.5])
    assert clipped_surrogate(ratio, torch.tensor([-1.0]), 0.2, 0.2, delta=2.0).tolist()[0] == pytest.approx([2.0, 1.5])


def test_gradient_vanishes_where_the_ratio_is_clipped():
    logps = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_(True)
    ratio = importance_ratio(logps, torch.zeros(1, 2), torch.ones(1, 2))
    clipped_surrogate(ratio, torch.tensor([1.0]), 0.2, 0.2).sum().backward()
    assert logps.grad.tolist()[0] == pytest.approx([0.0, -1.1], rel=1e-6)


def test_sequence_ratio_is_the_exponential_of_the_mean_log_ratio_over_loss_tokens():
    logps = torch.tensor([[0.2, 0.4, 9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    ratio = importance_ratio(logps, torch.zeros(2, 3), mask, "sequence")
    assert ratio.shape == (2, 1)
    assert ratio.flatten().tolist() == pytest.approx([math.exp(0.3), 1.0])


def test_cispo_weights_the_log_probability_by_the_detached_capped_ratio():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ratio = torch.tensor([[0.5, 3.0]], requires_grad=True)
    loss = cispo_surrogate(logps, ratio, torch.tensor([2.0]), epsilon_high=2.0)
    assert loss.tolist()[0] == pytest.approx([-0.5 * 2 * -1.0, -2.0 * 2 * -2.0])
    loss.sum().backward()
    assert logps.grad.tolist()[0] == pytest.approx([-1.0, -4.0])  # every token keeps a gradient, capped ones too
    assert ratio.grad is None


def test_sapo_gate_has_slope_one_at_ratio_one_and_its_temperature_by_advantage_sign():
    ratio = torch.ones(2, 1, requires_grad=True)
    loss = sapo_surrogate(ratio, torch.tensor([1.0, -1.0]), temperature_pos=2.0, temperature_neg=4.0)
    assert loss.flatten().tolist() == pytest.approx([-2 / 2.0, 2 / 4.0])  # -(4 / tau) * sigmoid(0) * A
    loss.sum().backward()
    assert ratio.grad.flatten().tolist() == pytest.approx([-1.0, 1.0])  # as the unclipped -ratio * A


def test_vespo_weight_is_one_on_policy_and_a_gamma_shape_off_policy():
    mask = torch.tensor([[1, 1, 0]])
    old = torch.zeros(1, 3)
    on_policy = vespo_weights(old, old, torch.tensor([1.0]), mask, 2.0, 3.0, 3.0, 2.0)
    assert on_policy.tolist() == [[pytest.approx(1.0)]]
    logps = torch.tensor([[0.2, 0.3, 5.0]])  # log w = 0.5: the masked token does not count
    pos = vespo_weights(logps, old, torch.tensor([0.0]), mask, 2.0, 3.0, 3.0, 2.0)  # A = 0 counts as positive
    neg = vespo_weights(logps, old, torch.tensor([-1.0]), mask, 2.0, 3.0, 3.0, 2.0)
    assert pos.item() == pytest.approx(math.exp(3.0 + 2.0 * 0.5 - 3.0 * math.exp(0.5)), rel=1e-6)
    assert neg.item() == pytest.approx(math.exp(2.0 + 3.0 * 0.5 - 2.0 * math.exp(0.5)), rel=1e-6)
    loss = weighted_logp_surrogate(logps, neg, torch.tensor([-1.0]))
    assert loss.tolist()[0] == pytest.approx((neg.item() * logps[0]).tolist(), rel=1e-6)


def test_bias_corrected_kl_gradient_is_the_log_ratio_to_the_reference_on_policy():
    """With kl * ratio, d/dp at p = p_old is 1 - e^(r-p) + kl = p - r (the unbiased reverse-KL gradient)."""
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2)
    norm = Normalizer(num_sequences=1, num_tokens=2, max_completion_length=2)
    loss, metrics = GRPOObjective(beta=1.0).loss(logps, logps.detach(), torch.zeros(1), mask, norm, ref)
    loss.backward()
    assert logps.grad.tolist()[0] == pytest.approx([(-1.0 + 1.5) / 2, (-2.0 + 1.0) / 2])
    assert metrics["kl"].item() == pytest.approx(kl_to_reference(logps, ref).mean().item())
    plain = logps.detach().clone().requires_grad_(True)
    GRPOObjective(beta=1.0, use_bias_correction_kl=False).loss(plain, plain.detach(), torch.zeros(1), mask, norm, ref)[
        0
    ].backward()
    assert plain.grad.tolist()[0] == pytest.approx([(1 - math.exp(-0.5)) / 2, (1 - math.exp(1.0)) / 2])


def test_objective_refuses_unknown_options_and_a_kl_without_reference():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        GRPOObjective(loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level must be one of"):
        GRPOObjective(importance_sampling_level="batch")
    with pytest.raises(ValueError, match="needs the reference"):
        GRPOObjective(beta=0.1).loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), NORM)


def test_kl_k3_estimator():
    logps = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    d = math.log(0.25) - math.log(0.5)
    assert kl_to_reference(logps, ref).item() == pytest.approx(math.exp(d) - d - 1)
    assert kl_to_reference(ref, ref).item() == 0.0


LOSS = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
NORM = Normalizer(num_sequences=2, num_tokens=4, max_completion_length=10)


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        ("grpo", ((1 + 2 + 3) / 3 + 4 / 1) / 2),  # mean of per-sequence token means
        ("sapo", ((1 + 2 + 3) / 3 + 4 / 1) / 2),  # as grpo
        ("luspo", ((1 + 2 + 3) + 4) / 2),  # mean of per-sequence token sums
        ("bnpo", (1 + 2 + 3 + 4) / 4),  # token mean of the batch
        ("dapo", (1 + 2 + 3 + 4) / 4),  # token mean over the whole rollout batch
        ("cispo", (1 + 2 + 3 + 4) / 4),  # as dapo
        ("vespo", (1 + 2 + 3 + 4) / 4),  # as dapo
        ("dr_grpo", (1 + 2 + 3 + 4) / (2 * 10)),  # constant normaliser: sequences x max length
    ],
)
def test_aggregate_loss_formulas(loss_type, expected):
    assert aggregate_loss(LOSS, MASK, loss_type, NORM).item() == pytest.approx(expected)


def test_sequence_level_losses_count_once_per_loss_token():
    per_sequence = torch.tensor([[2.0], [5.0]])
    assert aggregate_loss(per_sequence, MASK, "grpo", NORM).item() == pytest.approx((2 + 5) / 2)
    assert aggregate_loss(per_sequence, MASK, "luspo", NORM).item() == pytest.approx((2 * 3 + 5 * 1) / 2)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "luspo", "sapo", "cispo", "vespo"])
def test_micro_batches_add_up_to_the_whole_batch_loss(loss_type):
    whole = aggregate_loss(LOSS, MASK, loss_type, NORM)
    parts = sum(aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], loss_type, NORM) for i in range(2))
    assert parts.item() == pytest.approx(whole.item())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "luspo"])
def test_each_process_loss_is_its_share_times_the_process_count(loss_type):
    """Gradients are averaged over processes, so each process's loss is scaled by their number."""
    two = Normalizer(num_sequences=2, num_tokens=4, max_completion_length=10, num_processes=2)
    shares = [aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], loss_type, two) for i in range(2)]
    expected = aggregate_loss(LOSS, MASK, loss_type, NORM) if loss_type != "bnpo" else (6 / 3 + 4 / 1) / 2
    assert (sum(shares) / 2).item() == pytest.approx(float(expected))


def test_batch_normalizer_counts_sequences_and_loss_tokens_after_masking_truncated_completions():
    truncated = torch.tensor([False, True])
    masked = mask_truncated(MASK, truncated)
    assert masked.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0]]
    assert batch_normalizer(masked, 10) == Normalizer(num_sequences=2, num_tokens=3, max_completion_length=10)


def test_dapo_and_bnpo_differ_when_micro_batches_hold_different_token_counts():
    dapo = sum(aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], "dapo", NORM) for i in range(2))
    bnpo = sum(aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], "bnpo", NORM) for i in range(2))
    assert dapo.item() == pytest.approx(10 / 4)
    assert bnpo.item() == pytest.approx((6 / 3) * 0.5 + (4 / 1) * 0.5)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        aggregate_loss(LOSS, MASK, "ppo", NORM)


def test_clip_fractions_of_sequence_ratios_count_completions():
    ratio = torch.tensor([[1.5], [1.0], [0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    fractions = clip_fractions(ratio, torch.tensor([1.0, 1.0, -1.0]), mask, 0.2, 0.2)
    assert fractions["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert fractions["clip_ratio/region_mean"].item() == pytest.approx(2 / 3)


def test_clip_fractions_count_masked_tokens_only():
    ratio = torch.tensor([[1.5, 0.5, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    pos = clip_fractions(ratio, torch.tensor([1.0]), mask, 0.2, 0.2)
    neg = clip_fractions(ratio, torch.tensor([-1.0]), mask, 0.2, 0.2)
    assert pos["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert pos["clip_ratio/low_mean"].item() == 0.0
    assert neg["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert neg["clip_ratio/region_mean"].item() == pytest.approx(1 / 3)
