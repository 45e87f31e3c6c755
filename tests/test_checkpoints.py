"""Masked runs: sparse deltas during fit, checkpoints without dense weights, bitwise resume."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mthlib.data import PromptDataModule
from mthlib.deltas import load_delta
from mthlib.grpo import GRPOModule
from mthlib.masking import build_mask
from tests.conftest import make_tiny_chat_lm, save_tiny_chat_lm
from tests.grpo.toy import LetterA, RewardLog


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_chat_lm(tmp_path / "tiny", seed=5)


def fit(model_dir, root, steps, ckpt_path=None, every=2, **options):
    pl.seed_everything(0)
    module = GRPOModule(
        model_name_or_path=model_dir, mask=build_mask("random", sparsity=0.9, seed=1), learning_rate=1e-2,
        weight_decay=0.1, num_generations=4, max_completion_length=6, micro_batch_size=3,
        delta_every_n_steps=every, delta_keep_last=2, **options,
    )
    data = PromptDataModule(env=LetterA("abcdefghij"), batch_size=2, eval_size=2)
    rewards = RewardLog()
    trainer = pl.Trainer(
        max_steps=steps, default_root_dir=root, logger=False, enable_progress_bar=False, limit_val_batches=0,
        callbacks=[rewards, ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_last=True,
                                            save_top_k=-1)],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, rewards.rewards


def test_deltas_are_written_kept_last_k_and_last_resolves(tiny_model_dir, tmp_path):
    module, _ = fit(tiny_model_dir, tmp_path, steps=6)
    folder = tmp_path / "deltas"
    steps = sorted(p.name for p in folder.glob("step=*.safetensors"))
    assert steps == ["step=000004.safetensors", "step=000006.safetensors"]  # keep_last=2
    last = load_delta(folder / "last.safetensors")
    assert last.metadata["step"] == "6"
    params = dict(module.model.named_parameters())
    for name, idx in last.indices.items():
        assert torch.equal(last.values[name], params[name].detach().reshape(-1)[idx.long()])


def test_checkpoint_holds_no_dense_weights(tiny_model_dir, tmp_path):
    fit(tiny_model_dir, tmp_path, steps=2)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] == {}
    dense = sum(p.numel() for p in make_tiny_chat_lm(seed=5)[0].parameters())
    stored = sum(v.numel() for v in checkpoint["mthlib"]["trained_values"].values())
    assert 0 < stored <= 0.11 * dense  # 10% of the entries train at sparsity 0.9


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluating_a_masked_checkpoint_evaluates_its_trained_weights(tiny_model_dir, tmp_path, stage):
    """``mth validate --ckpt_path``: the checkpoint holds no dense weights, so its trained entries are written in."""
    trained, _ = fit(tiny_model_dir, tmp_path, steps=2)
    module = GRPOModule(model_name_or_path=tiny_model_dir, mask=build_mask("random", sparsity=0.9, seed=1),
                        max_completion_length=6)
    base = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    data = PromptDataModule(env=LetterA("abcdefghij"), batch_size=2, eval_size=2)
    trainer = pl.Trainer(default_root_dir=tmp_path / stage, logger=False, enable_progress_bar=False)
    getattr(trainer, stage)(module, datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt", verbose=False)
    evaluated = dict(module.model.named_parameters())
    changed = 0
    for name, parameter in trained.model.named_parameters():
        assert torch.equal(evaluated[name], parameter), name
        changed += int(not torch.equal(parameter, base[name]))
    assert changed > 0  # training moved entries, and the evaluated model has them


@pytest.mark.parametrize("engine", [{}, {"rollout_engine": "native"}, {"rollout_engine": "native", "rollout_dtype": "bfloat16"}],
                         ids=["hf", "native", "native-bf16-copy"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tiny_model_dir, tmp_path, engine):
    """The native engine draws from its own generator: the checkpoint carries its state too."""
    straight, straight_rewards = fit(tiny_model_dir, tmp_path / "a", steps=4, **engine)
    fit(tiny_model_dir, tmp_path / "b", steps=2, **engine)
    resumed, resumed_rewards = fit(tiny_model_dir, tmp_path / "b", steps=4, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt",
                                   **engine)
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert resumed_rewards == straight_rewards[2:]
    a = load_delta(tmp_path / "a" / "deltas" / "last.safetensors")
    b = load_delta(tmp_path / "b" / "deltas" / "last.safetensors")
    assert all(torch.equal(a.values[n], b.values[n]) for n in a.values)


def test_resume_onto_another_base_is_refused(tiny_model_dir, tmp_path):
    fit(tiny_model_dir, tmp_path, steps=2)
    save_tiny_chat_lm(tmp_path / "other", seed=6)
    with pytest.raises(Exception, match="fingerprint"):
        fit(str(tmp_path / "other"), tmp_path, steps=4, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
