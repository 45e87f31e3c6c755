"""GRPOModule end to end on a tiny model: it learns, and its options change what it does."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import lightning.pytorch as pl
import pytest
import torch

from mthlib.data import PromptDataModule
from mthlib.grpo import GRPOModule
from mthlib.grpo import rollout as rollout_module
from mthlib.grpo.loss import Normalizer, group_advantages
from mthlib.grpo.objective import GRPOObjective
from mthlib.grpo.policy_copy import copy_weights
from mthlib.grpo.prefix_tree import pack_prefix_trees
from mthlib.grpo.rollout import generate_rollout
from mthlib.masking import build_mask
from tests.conftest import make_tiny_chat_lm, save_tiny_chat_lm
from tests.grpo.toy import LetterA, RewardLog


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_chat_lm(tmp_path / "tiny", seed=3)


def fit(model_dir, tmp_path, steps, env=None, module_class=GRPOModule, precision="32-true", **options):
    pl.seed_everything(0)
    module = module_class(model_name_or_path=model_dir, **options)
    data = PromptDataModule(env=env or LetterA(), batch_size=4, eval_size=4, eval_batch_size=4)
    log = RewardLog()
    trainer = pl.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[log], num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path, precision=precision,
    )
    trainer.fit(module, datamodule=data)
    return module, log.rewards


def test_grpo_raises_the_reward_of_a_tiny_model(tiny_model_dir, tmp_path):
    _, rewards = fit(
        tiny_model_dir, tmp_path, steps=30, learning_rate=3e-2, num_generations=8,
        max_completion_length=8, micro_batch_size=16, loss_type="dapo",
    )
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, (first, last)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"])
def test_every_loss_type_trains_with_iterations_and_kl(tiny_model_dir, tmp_path, loss_type):
    module, rewards = fit(
        tiny_model_dir, tmp_path, steps=4, env=LetterA("abcdefghijklmnopqrstuvwxyz"), learning_rate=1e-3, num_generations=4, max_completion_length=4,
        micro_batch_size=3, loss_type=loss_type, num_iterations=2, beta=0.1,
    )
    base, _ = make_tiny_chat_lm(seed=3)
    changed = any(not torch.equal(p, q) for p, q in zip(module.model.parameters(), base.parameters()))
    assert len(rewards) == 2 and changed, rewards  # max_steps counts optimizer steps: 2 per rollout
    assert module.reference is not None  # beta > 0 without a mask keeps a frozen copy
    assert all(torch.equal(p, q) for p, q in zip(module.reference.parameters(), base.parameters()))


def test_num_generations_below_two_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        GRPOModule(model_name_or_path=tiny_model_dir, num_generations=1)


def test_missing_model_path_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load model"):
        GRPOModule(model_name_or_path=str(tmp_path / "nowhere"))


def test_gradient_checkpointing_gives_the_same_update(tiny_model_dir, tmp_path):
    plain, _ = fit(tiny_model_dir, tmp_path / "a", steps=1, learning_rate=1e-2, num_generations=4,
                   max_completion_length=4, env=LetterA("abcdefghijklm"))
    recomputed, _ = fit(tiny_model_dir, tmp_path / "b", steps=1, learning_rate=1e-2, num_generations=4,
                        max_completion_length=4, env=LetterA("abcdefghijklm"), gradient_checkpointing=True)
    assert recomputed.model.is_activation_checkpointing  # transformers >= 5.24 name: no deprecation warning
    for p, q in zip(plain.model.parameters(), recomputed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)



def test_packed_prefixes_give_the_update_of_unpacked_rows_in_every_log_prob_pass(tiny_model_dir, tmp_path, monkeypatch):
    packings = []  # every log-prob pass on packed rows packs them once, the KL reference's included

    def counted(*args, **kwargs):
        packings.append(1)
        return pack_prefix_trees(*args, **kwargs)

    monkeypatch.setattr(rollout_module, "pack_prefix_trees", counted)
    options = dict(steps=2, learning_rate=1e-2, num_generations=4, max_completion_length=4, micro_batch_size=3,
                   env=LetterA("abcdefghijklm"), num_iterations=2, beta=0.1)
    packed, _ = fit(tiny_model_dir, tmp_path / "a", pack_prefixes=True, **options)
    packed_calls = len(packings)
    rows, _ = fit(tiny_model_dir, tmp_path / "b", pack_prefixes=False, **options)
    # one rollout of 16 completions in 6 micro-batches: sampling-policy and reference log-probs, then two steps
    assert packed_calls == 6 * 4 and len(packings) == packed_calls
    base, _ = make_tiny_chat_lm(seed=3)
    for p, q, b in zip(packed.model.parameters(), rows.model.parameters(), base.parameters()):
        assert not torch.equal(p, b)
        # Adam's first steps are ~lr * sign(gradient): 1e-4 is 1% of one, rounding where a gradient is ~0
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)


# -- the module hands its loss options to the objective it optimises ---------------------------
QUICK = {"num_generations": 4, "max_completion_length": 4, "micro_batch_size": 3, "learning_rate": 1e-2}


@dataclass(frozen=True)
class Call:
    """One micro-batch the objective saw, detached."""

    logps: torch.Tensor
    old_logps: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    norm: Normalizer
    loss: torch.Tensor


@dataclass(frozen=True)
class RecordingObjective(GRPOObjective):
    """A :class:`GRPOObjective` that records each micro-batch it computes."""

    calls: list[Call] = field(default_factory=list, compare=False)

    def loss(self, logps, old_logps, advantages, mask, norm, ref_logps=None):
        loss, metrics = super().loss(logps, old_logps, advantages, mask, norm, ref_logps)
        self.calls.append(Call(logps.detach(), old_logps.detach(), advantages.clone(), mask.clone(), norm, loss.detach()))
        return loss, metrics


class RecordingModule(GRPOModule):
    """A :class:`GRPOModule` that keeps its objective, the (truncated, loss mask) of each optimiser step and the rewards."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.objective: RecordingObjective | None = None
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rewards: list[torch.Tensor] = []

    def _objective(self) -> RecordingObjective:
        built = super()._objective()
        self.objective = RecordingObjective(**{f.name: getattr(built, f.name) for f in fields(GRPOObjective)})
        return self.objective

    def _optimise(self, objective, rollout, *args) -> None:
        self.steps.append((rollout.truncated.clone(), rollout.loss_mask.clone()))
        super()._optimise(objective, rollout, *args)

    def _log_step(self, rewards, *args) -> None:
        self.rewards.append(rewards.clone())
        super()._log_step(rewards, *args)


def fit_recording(model_dir, tmp_path, steps: int, **options) -> RecordingModule:
    """A few steps of a :class:`RecordingModule` on a task whose rewards differ inside groups."""
    module, _ = fit(model_dir, tmp_path, steps, env=LetterA("abcdefghijklm"), module_class=RecordingModule,
                    **{**QUICK, **options})
    return module


def options_of(objective: GRPOObjective) -> dict:
    return {f.name: getattr(objective, f.name) for f in fields(GRPOObjective)}


@pytest.mark.parametrize(
    ("options", "metric"),
    [
        ({"loss_type": "cispo", "epsilon_high": 4.0}, "cispo_clip_ratio"),
        ({"loss_type": "vespo", "vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 2.0,
          "vespo_lambda_neg": 1.0}, "vespo/phi_seq_mean"),
        ({"loss_type": "sapo", "sapo_temperature_pos": 0.7, "sapo_temperature_neg": 1.3}, "entropy"),
        ({"loss_type": "luspo", "importance_sampling_level": "sequence", "delta": 1.5}, "clip_ratio/high_mean"),
        ({"loss_type": "grpo", "epsilon": 0.1, "epsilon_high": 0.3, "beta": 0.05, "use_bias_correction_kl": False},
         "kl"),
    ],
    ids=lambda value: value if isinstance(value, str) else value["loss_type"],
)
def test_the_module_optimises_the_objective_of_its_loss_options(tiny_model_dir, tmp_path, options, metric):
    module = fit_recording(tiny_model_dir, tmp_path, 1, **options)
    assert options_of(module.objective) == options_of(GRPOObjective(**options))
    calls = module.objective.calls
    assert len(calls) == 6  # 16 completions in micro-batches of 3
    logged = module.trainer.callback_metrics
    assert metric in logged
    assert logged["loss"].item() == pytest.approx(sum(call.loss for call in calls).item(), rel=1e-5, abs=1e-7)


def test_num_iterations_steps_again_on_the_same_rollout_against_its_sampling_log_probs(tiny_model_dir, tmp_path):
    module = fit_recording(tiny_model_dir, tmp_path, 2, num_iterations=2)
    assert len(module.steps) == 2 and torch.equal(module.steps[0][1], module.steps[1][1])  # one rollout, two steps
    first, second = module.objective.calls[:6], module.objective.calls[6:]
    assert len(second) == 6
    for before, after in zip(first, second):
        torch.testing.assert_close(before.old_logps, before.logps, rtol=1e-5, atol=1e-6)  # sampled by these weights
        torch.testing.assert_close(after.old_logps, before.logps, rtol=1e-5, atol=1e-6)  # still the sampling policy
    assert any(not torch.allclose(after.logps, after.old_logps) for after in second)  # the first step moved the policy


@pytest.mark.parametrize("masked", [False, True])
def test_mask_truncated_completions_removes_them_from_the_loss_and_the_token_count(tiny_model_dir, tmp_path, masked):
    module = fit_recording(tiny_model_dir, tmp_path, 1, mask_truncated_completions=masked, max_completion_length=6)
    (truncated, loss_mask), = module.steps
    assert truncated.any() and not truncated.all()
    assert (loss_mask[truncated].sum() == 0) == masked
    assert (loss_mask[~truncated].sum(dim=1) > 0).all()
    calls = module.objective.calls
    assert torch.equal(torch.cat([call.mask.sum(dim=1) for call in calls]), loss_mask.sum(dim=1))
    assert calls[0].norm == Normalizer(16, int(loss_mask.sum()), 6)


def test_a_step_whose_completions_are_all_masked_changes_nothing(tiny_model_dir, tmp_path):
    module = fit_recording(tiny_model_dir, tmp_path, 1, mask_truncated_completions=True, max_completion_length=1)
    (truncated, loss_mask), = module.steps
    assert truncated.all() and loss_mask.sum() == 0
    base, _ = make_tiny_chat_lm(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(module.model.parameters(), base.parameters()))


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_are_scaled_as_scale_rewards_says(tiny_model_dir, tmp_path, scale_rewards):
    module = fit_recording(tiny_model_dir, tmp_path, 1, scale_rewards=scale_rewards)
    (rewards,) = module.rewards
    advantages = torch.cat([call.advantages for call in module.objective.calls])
    torch.testing.assert_close(advantages, group_advantages(rewards, QUICK["num_generations"], scale_rewards))
    assert advantages.abs().sum() > 0


def test_a_bad_loss_option_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="loss_type must be one of"):
        GRPOModule(model_name_or_path=str(tmp_path / "never_loaded"), loss_type="ppo")


class KLLog(pl.Callback):
    """Records the logged ``kl`` of every training step."""

    def __init__(self) -> None:
        self.kl: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.kl.append(float(trainer.callback_metrics["kl"]))


@pytest.mark.parametrize("reinit", [False, True])
def test_reinit_starts_the_mask_from_new_values_and_keeps_the_base_as_kl_reference(tiny_model_dir, tmp_path, reinit):
    from mthlib.masking import build_mask

    pl.seed_everything(0)
    module = GRPOModule(model_name_or_path=tiny_model_dir, mask=build_mask("random", sparsity=0.9, seed=2), reinit=reinit,
                        beta=0.1, learning_rate=1e-3, num_generations=2, max_completion_length=4, micro_batch_size=4)
    assert module.hparams.reinit is reinit and module.mask_callback.reinit is reinit
    kl = KLLog()
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[kl],
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=PromptDataModule(env=LetterA(), batch_size=2, eval_size=2))
    base = dict(make_tiny_chat_lm(seed=3)[0].named_parameters())
    masks = module.sparse_state.masks
    moved = sum(int((p.detach().view(-1)[masks[n]] != base[n].detach().view(-1)[masks[n]]).sum())
                for n, p in module.model.named_parameters() if n in masks)
    # one step of lr 1e-3 moves the base values a little; re-initialised ones differ everywhere
    assert (moved == masks.total) if reinit else (moved < masks.total)
    # the KL of the first step is to the base: zero when the policy is the base, positive from new values
    assert (kl.kl[0] > 1e-3) if reinit else (kl.kl[0] == pytest.approx(0.0, abs=1e-6))


def test_reinit_without_a_mask_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="reinit re-initialises the entries of a mask: set model.mask too"):
        GRPOModule(model_name_or_path=tiny_model_dir, reinit=True)


def test_the_native_rollout_engine_learns_and_evaluates_as_generate_does(tiny_model_dir, tmp_path):
    module, rewards = fit(
        tiny_model_dir, tmp_path, steps=30, learning_rate=3e-2, num_generations=8,
        max_completion_length=8, micro_batch_size=16, rollout_engine="native",
    )
    assert type(module.engine).__name__ == "NativeEngine"
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
    # greedy evaluation through either engine writes the same replies
    episodes = LetterA().evaluation_episodes(0, 4)
    replies = {}
    for engine in ("hf", "native"):
        other = GRPOModule(model_name_or_path=tiny_model_dir, rollout_engine=engine, max_completion_length=6)
        other.model.load_state_dict(module.model.state_dict())
        replies[engine] = generate_rollout(other.model, other.tokenizer, episodes, other.eval_sampling, other.engine).replies
    assert replies["hf"] == replies["native"]


def test_sampling_from_a_bf16_copy_learns_while_the_policy_trains_in_fp32(tiny_model_dir, tmp_path):
    module, rewards = fit(
        tiny_model_dir, tmp_path, steps=30, learning_rate=3e-2, num_generations=8,
        max_completion_length=8, micro_batch_size=16, rollout_engine="native", rollout_dtype="bfloat16",
    )
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
    with pytest.raises(RuntimeError, match="must run before sampling"):  # released after every rollout
        module.engine.policy_copy(module.model)
    module.engine.load_weights(module.model, module.sparse_state)
    sampler = module.engine.policy_copy(module.model)
    assert module.model.dtype == torch.float32 and sampler.dtype == torch.bfloat16
    trained = module.model.get_parameter("model.layers.0.mlp.down_proj.weight")
    assert torch.equal(copy_weights(sampler)["model.layers.0.mlp.down_proj.weight"], trained.to(torch.bfloat16))


def test_bf16_mixed_precision_trains_a_masked_run_in_fp32_weights_with_frozen_entries_intact(tiny_model_dir, tmp_path):
    options = dict(mask=build_mask("random", sparsity=0.9, seed=1), learning_rate=3e-2, num_generations=8,
                   max_completion_length=8, micro_batch_size=16, verify_every=1)  # frozen entries checked bitwise every step
    mixed, rewards = fit(tiny_model_dir, tmp_path / "mixed", steps=30, precision="bf16-mixed", **options)
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    full, _ = fit(tiny_model_dir, tmp_path / "full", steps=30, **options)
    weight = "model.layers.0.mlp.down_proj.weight"  # autocast was on: the runs differ
    assert not torch.equal(mixed.model.get_parameter(weight), full.model.get_parameter(weight))


def test_a_rollout_dtype_without_the_native_engine_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match="rollout_dtype 'bfloat16' needs rollout_engine native"):
        GRPOModule(model_name_or_path=str(tmp_path / "never_loaded"), rollout_dtype="bfloat16")


def test_an_unknown_rollout_engine_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match="unknown rollout engine 'fast'; allowed: hf, native, vllm"):
        GRPOModule(model_name_or_path=str(tmp_path / "never_loaded"), rollout_engine="fast")
