"""Sequential tickets: task 2 trains a mask disjoint from task 1's and never moves task 1's entries."""

import lightning.pytorch as pl
import torch

from mthlib.data import PromptDataModule
from mthlib.export import export_model
from mthlib.grpo import GRPOModule
from mthlib.masking import Masks, build_mask
from tests.conftest import make_tiny_chat_lm
from tests.grpo.toy import LetterA


def train(model_dir, root, mask, letters):
    pl.seed_everything(0)
    module = GRPOModule(model_name_or_path=model_dir, mask=mask, learning_rate=1e-2, weight_decay=0.1,
                        num_generations=4, max_completion_length=6, delta_every_n_steps=0)
    trainer = pl.Trainer(max_steps=3, default_root_dir=root, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(module, datamodule=PromptDataModule(env=LetterA(letters), batch_size=2, eval_size=2))
    return module


def test_task_two_leaves_every_task_one_entry_bitwise_unchanged(tmp_path):
    model, tokenizer = make_tiny_chat_lm(seed=7, hidden=64)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    first = train(str(tmp_path / "base"), tmp_path / "t1", build_mask("expander", sparsity=0.9, seed=0), "abc")
    delta1 = tmp_path / "t1" / "deltas" / "last.safetensors"
    export_model(delta1, tmp_path / "task1_model", base=str(tmp_path / "base"))
    task1 = {n: p.detach().clone() for n, p in first.model.named_parameters()}
    second = train(str(tmp_path / "task1_model"), tmp_path / "t2",
                   build_mask("expander", sparsity=0.9, seed=1, exclude_mask=str(delta1)), "xyz")
    mask_a, mask_b = Masks.load(delta1), second.sparse_state.masks
    assert mask_a.overlap(mask_b)["o1"] < 0.10
    params = dict(second.model.named_parameters())
    for name, idx in mask_a.items():
        assert torch.equal(params[name].detach().reshape(-1)[idx], task1[name].reshape(-1)[idx]), name
    moved = sum(int((params[n].detach() != task1[n]).sum()) for n in task1)
    assert moved > 0
