"""GRPOModule end to end on a tiny model: it learns, and its options change what it does."""

import lightning.pytorch as pl
import pytest
import torch

from mthlib.data import PromptDataModule
from mthlib.grpo import GRPOModule
from tests.conftest import make_tiny_chat_lm, save_tiny_chat_lm
from tests.grpo.toy import LetterA, RewardLog


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_chat_lm(tmp_path / "tiny", seed=3)


def fit(model_dir, tmp_path, steps, env=None, **options):
    pl.seed_everything(0)
    module = GRPOModule(model_name_or_path=model_dir, **options)
    data = PromptDataModule(env=env or LetterA(), batch_size=4, eval_size=4, eval_batch_size=4)
    log = RewardLog()
    trainer = pl.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[log], num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
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


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo"])
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
    assert recomputed.model.is_gradient_checkpointing
    for p, q in zip(plain.model.parameters(), recomputed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
