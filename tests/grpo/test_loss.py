"""GRPO math on hand-made rewards and log-probabilities, checked against the formulas."""

import math

import pytest
import torch

from mthlib.grpo.loss import (
    Normalizer,
    aggregate_loss,
    clip_fractions,
    clipped_surrogate,
    group_advantages,
    kl_to_reference,
)


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


def test_group_advantages_reject_a_batch_that_does_not_split_into_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_clipped_surrogate_clips_the_ratio_on_the_side_the_advantage_rewards():
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    loss, ratio = clipped_surrogate(logps, old, torch.tensor([2.0]), epsilon=0.2, epsilon_high=0.28)
    # A > 0: min(r*A, clip(r)*A): 1.5 -> clipped to 1.28; 0.5 -> unclipped 0.5 (min picks it); 1.1 -> 1.1
    assert loss.tolist()[0] == pytest.approx([-1.28 * 2, -0.5 * 2, -1.1 * 2], rel=1e-6)
    neg, _ = clipped_surrogate(logps, old, torch.tensor([-1.0]), epsilon=0.2, epsilon_high=0.28)
    # A < 0: -min(r*A, clip(r)*A) = max(r, clip(r)) * |A|: 1.5 -> 1.5; 0.5 -> clipped 0.8
    assert neg.tolist()[0] == pytest.approx([1.5, 0.8, 1.1], rel=1e-6)
    assert ratio.tolist()[0] == pytest.approx([1.5, 0.5, 1.1], rel=1e-6)


def test_gradient_vanishes_where_the_ratio_is_clipped():
    logps = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_(True)
    loss, _ = clipped_surrogate(logps, torch.zeros(1, 2), torch.tensor([1.0]), 0.2, 0.2)
    loss.sum().backward()
    assert logps.grad.tolist()[0] == pytest.approx([0.0, -1.1], rel=1e-6)


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
        ("bnpo", (1 + 2 + 3 + 4) / 4),  # token mean of the batch
        ("dapo", (1 + 2 + 3 + 4) / 4),  # token mean over the whole rollout batch
        ("dr_grpo", (1 + 2 + 3 + 4) / (2 * 10)),  # constant normaliser: sequences x max length
    ],
)
def test_aggregate_loss_formulas(loss_type, expected):
    assert aggregate_loss(LOSS, MASK, loss_type, NORM).item() == pytest.approx(expected)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_add_up_to_the_whole_batch_loss(loss_type):
    whole = aggregate_loss(LOSS, MASK, loss_type, NORM)
    parts = sum(aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], loss_type, NORM) for i in range(2))
    assert parts.item() == pytest.approx(whole.item())


def test_dapo_and_bnpo_differ_when_micro_batches_hold_different_token_counts():
    dapo = sum(aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], "dapo", NORM) for i in range(2))
    bnpo = sum(aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], "bnpo", NORM) for i in range(2))
    assert dapo.item() == pytest.approx(10 / 4)
    assert bnpo.item() == pytest.approx((6 / 3) * 0.5 + (4 / 1) * 0.5)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        aggregate_loss(LOSS, MASK, "ppo", NORM)


def test_clip_fractions_count_masked_tokens_only():
    ratio = torch.tensor([[1.5, 0.5, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    pos = clip_fractions(ratio, torch.tensor([1.0]), mask, 0.2, 0.2)
    neg = clip_fractions(ratio, torch.tensor([-1.0]), mask, 0.2, 0.2)
    assert pos["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert pos["clip_ratio/low_mean"].item() == 0.0
    assert neg["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert neg["clip_ratio/region_mean"].item() == pytest.approx(1 / 3)
