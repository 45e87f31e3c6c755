"""mthlib's GRPO objective against TRL 1.16's own code on the same tensors: values and gradients.

TRL runs through :mod:`tests.grpo.trl_reference` (its ``_compute_loss`` and
``_generate_and_score_completions`` with a stand-in trainer). Every option of the objective
appears in at least one case; data are chosen so that each changes the result: ratios on
both sides of both clip bounds, a zero advantage, completions of different lengths and one
fully masked completion.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from mthlib.grpo import GRPOModule
from mthlib.grpo.loss import LOSS_TYPES, Normalizer, group_advantages, mask_truncated
from mthlib.grpo.objective import GRPOObjective, batch_advantages, batch_normalizer, batch_reward_std
from tests.grpo.batches import MAX_COMPLETION_LENGTH, G, Batch, make_batch, micro_batches
from tests.grpo.trl_reference import EOS_ID, grpo_config, trl_loss, trl_scored_batch


def mthlib_loss(batch: Batch, options: dict, micro: int, on_policy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """mthlib: micro-batch losses with a whole-batch Normalizer, summed; and the gradient w.r.t. the log-probs."""
    objective = GRPOObjective(**options)
    logps = batch.logps.clone().requires_grad_(True)
    norm = Normalizer(len(logps), int(batch.mask.sum()), MAX_COMPLETION_LENGTH)
    total = 0.0
    for rows in micro_batches(len(logps), micro):
        old = logps[rows].detach() if on_policy else batch.old_logps[rows]
        loss, _ = objective.loss(logps[rows], old, batch.advantages[rows], batch.mask[rows], norm, batch.ref_logps[rows])
        total = total + loss
    total.backward()
    return total.detach(), logps.grad


def trl_total_loss(tmp_path, batch: Batch, options: dict, micro: int, on_policy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL: ``_compute_loss`` on each micro-batch of one accumulation window, summed (what its backward sees)."""
    steps = len(batch.logps) // micro
    args = grpo_config(
        tmp_path, num_generations=G, per_device_train_batch_size=micro, gradient_accumulation_steps=steps,
        max_completion_length=MAX_COMPLETION_LENGTH, **options,
    )
    logps = batch.logps.clone().requires_grad_(True)
    total = 0.0
    for rows in micro_batches(len(logps), micro):
        total = total + trl_loss(
            args, logps[rows], batch.mask[rows], batch.advantages[rows], int(batch.mask.sum()),
            old_logps=None if on_policy else batch.old_logps[rows],
            ref_logps=batch.ref_logps[rows] if args.beta != 0 else None, accumulation_steps=steps,
        )
    total.backward()
    return total.detach(), logps.grad


CASES = [
    *[{"loss_type": loss_type} for loss_type in LOSS_TYPES],
    {"loss_type": "dapo", "epsilon": 0.1, "epsilon_high": 0.35},
    {"loss_type": "grpo", "epsilon": 0.35, "epsilon_high": 0.1},
    {"loss_type": "bnpo", "epsilon": 0.15, "epsilon_high": 0.28},
    {"loss_type": "dr_grpo", "epsilon": 0.25, "epsilon_high": 0.3},
    {"loss_type": "dapo", "delta": 1.2},
    {"loss_type": "cispo", "epsilon_high": 5.0},
    {"loss_type": "cispo", "epsilon_high": 1.1},
    {"loss_type": "sapo", "sapo_temperature_pos": 2.0, "sapo_temperature_neg": 0.5},
    {"loss_type": "vespo", "vespo_k_pos": 1.0, "vespo_lambda_pos": 0.5},
    {"loss_type": "vespo", "vespo_k_neg": 4.5, "vespo_lambda_neg": 1.2},
    *[{"loss_type": loss_type, "importance_sampling_level": "sequence"} for loss_type in LOSS_TYPES],
    {"loss_type": "dapo", "beta": 0.05},
    {"loss_type": "dapo", "beta": 0.05, "use_bias_correction_kl": False},
    {"loss_type": "grpo", "beta": 0.2, "epsilon_high": 0.28},
    {"loss_type": "grpo", "beta": 0.2, "use_bias_correction_kl": False},
    {"loss_type": "luspo", "beta": 0.1, "importance_sampling_level": "sequence"},
    {"loss_type": "sapo", "beta": 0.1, "importance_sampling_level": "sequence", "use_bias_correction_kl": False},
    {"loss_type": "vespo", "beta": 0.1},
    {"loss_type": "cispo", "beta": 0.1, "use_bias_correction_kl": False},
]


def case_id(options: dict) -> str:
    return "-".join(f"{key}={value}" for key, value in options.items())


@pytest.mark.parametrize("on_policy", [False, True], ids=["off_policy", "on_policy"])
@pytest.mark.parametrize("micro", [6, 2], ids=["one_micro_batch", "three_micro_batches"])
@pytest.mark.parametrize("options", CASES, ids=case_id)
def test_loss_and_gradient_match_trl(tmp_path, options, micro, on_policy):
    batch = make_batch()
    ours, our_grad = mthlib_loss(batch, options, micro, on_policy)
    theirs, their_grad = trl_total_loss(tmp_path, batch, options, micro, on_policy)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-6, atol=1e-6)
    assert our_grad.abs().sum() > 0


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "bnpo"])
def test_micro_batch_sum_is_trls_single_batch_loss(tmp_path, loss_type):
    batch = make_batch(seed=1)
    options = {"loss_type": loss_type, "beta": 0.1}
    ours, our_grad = mthlib_loss(batch, options, micro=2, on_policy=False)
    theirs, their_grad = trl_total_loss(tmp_path, batch, options, micro=6, on_policy=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-6, atol=1e-6)


def test_bnpo_normalises_each_micro_batch_locally_as_trl_does(tmp_path):
    """bnpo is TRL's local token mean: three micro-batches are not the single-batch loss (token counts differ)."""
    batch = make_batch(seed=1)
    split, _ = mthlib_loss(batch, {"loss_type": "bnpo"}, micro=2, on_policy=False)
    whole, _ = trl_total_loss(tmp_path, batch, {"loss_type": "bnpo"}, micro=6, on_policy=False)
    assert abs(split - whole) > 1e-3


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_process_loss_matches_trl_on_two_processes(tmp_path, loss_type):
    """Per process, with the totals of both: TRL divides the global token count by the process count."""
    batch = make_batch(seed=2)
    args = grpo_config(tmp_path, num_generations=G, per_device_train_batch_size=3, loss_type=loss_type, beta=0.1,
                       max_completion_length=MAX_COMPLETION_LENGTH)
    norm = Normalizer(len(batch.logps), int(batch.mask.sum()), MAX_COMPLETION_LENGTH, num_processes=2)
    objective = GRPOObjective(loss_type=loss_type, beta=0.1)
    for rows in micro_batches(len(batch.logps), 3):
        logps = batch.logps[rows].clone().requires_grad_(True)
        ours, _ = objective.loss(logps, batch.old_logps[rows], batch.advantages[rows], batch.mask[rows], norm,
                                 batch.ref_logps[rows])
        ours.backward()
        their_logps = batch.logps[rows].clone().requires_grad_(True)
        theirs = trl_loss(args, their_logps, batch.mask[rows], batch.advantages[rows], int(batch.mask.sum()),
                          batch.old_logps[rows], batch.ref_logps[rows], num_processes=2)
        theirs.backward()
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logps.grad, their_logps.grad, rtol=1e-6, atol=1e-6)


SCORED_REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.2, 0.9, 0.1, 0.3, 0.0, 0.7, 0.6])
COMPLETIONS = [[5, EOS_ID], [5, 6, 7], [EOS_ID], [3, 3, 3, 3], [4, EOS_ID], [9], [7, 7, EOS_ID], [8, 8],
               [6, 5, 4, EOS_ID], [6], [1, 1, 1, 1, EOS_ID], [3, EOS_ID]]


def completion_tensors(completions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """mthlib's view of the completions: loss mask over the sampled tokens, and which ended without EOS."""
    mask = torch.zeros(len(completions), max(map(len, completions)), dtype=torch.long)
    for row, ids in enumerate(completions):
        mask[row, : len(ids)] = 1
    return mask, torch.tensor([ids[-1] != EOS_ID for ids in completions])


@pytest.mark.parametrize("masked", [False, True], ids=["all_completions", "mask_truncated_completions"])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_mask_and_loss_match_trls_scoring(tmp_path, scale_rewards, masked):
    """From rewards and sampled ids to the loss: TRL's scoring then TRL's loss, against mthlib's."""
    args = grpo_config(tmp_path, num_generations=G, per_device_train_batch_size=len(COMPLETIONS),
                       scale_rewards=scale_rewards, mask_truncated_completions=masked)
    scored = trl_scored_batch(args, SCORED_REWARDS, COMPLETIONS)
    mask, truncated = completion_tensors(COMPLETIONS)
    if masked:
        mask = mask_truncated(mask, truncated)
    advantages = batch_advantages(SCORED_REWARDS, G, scale_rewards)
    norm = batch_normalizer(mask, args.max_completion_length)
    torch.testing.assert_close(advantages, scored["advantages"], rtol=1e-6, atol=1e-6)
    assert torch.equal(mask, scored["completion_mask"])
    assert norm.num_tokens == int(scored["num_items_in_batch"]) and norm.num_sequences == len(COMPLETIONS)

    logps = -torch.rand(mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours_in, theirs_in = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    ours, _ = GRPOObjective().loss(ours_in, ours_in.detach(), advantages.double(), mask, norm)
    theirs = trl_loss(args, theirs_in, scored["completion_mask"], scored["advantages"].double(),
                      int(scored["num_items_in_batch"]))
    ours.backward(), theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_of_each_process_match_trls_slice_of_the_whole_batch(tmp_path, scale_rewards):
    """TRL scales by the std of the rewards of all processes, then keeps this process's slice."""
    args = grpo_config(tmp_path, num_generations=G, per_device_train_batch_size=6, scale_rewards=scale_rewards)
    std = batch_reward_std(SCORED_REWARDS)  # what batch_advantages reduces over both processes
    for rank, rows in enumerate(micro_batches(len(SCORED_REWARDS), 6)):
        scored = trl_scored_batch(args, SCORED_REWARDS, COMPLETIONS[rows], num_processes=2, process_index=rank)
        ours = group_advantages(SCORED_REWARDS[rows], G, scale_rewards, batch_std=std)
        torch.testing.assert_close(ours, scored["advantages"], rtol=1e-6, atol=1e-6)


LOSS_OPTIONS = [f.name for f in fields(GRPOObjective)] + ["scale_rewards", "num_iterations", "mask_truncated_completions"]


def test_loss_options_have_trls_names_and_defaults(tmp_path):
    config = grpo_config(tmp_path)
    module_defaults = inspect.signature(GRPOModule).parameters
    for name in LOSS_OPTIONS:
        assert module_defaults[name].default == getattr(config, name), name
        assert f"        {name}: " in GRPOModule.__doc__, f"{name} is not documented in GRPOModule's Args"
    assert GRPOObjective() == GRPOObjective(**{f.name: getattr(config, f.name) for f in fields(GRPOObjective)})


def test_mthlib_never_imports_trl():
    """TRL is a test-only extra: the package must work without it."""
    package = Path(__file__).parents[2] / "mthlib"
    importing = [path.name for path in package.rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+trl\b", path.read_text(encoding="utf-8"), re.M)]
    assert not importing
