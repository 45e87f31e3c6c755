"""Calibration data and the one calibration path: which tokens carry loss, and one mask per config."""

from __future__ import annotations

import torch

from mthlib.data import PromptDataModule, conversation_tokens
from mthlib.envs.base import Episode
from mthlib.masking import calibration_batches, compute_masks, gradient_sums
from tests.conftest import make_tiny_chat_lm


def _labelled_text(tokenizer, ids, labels) -> tuple[str, str]:
    """The text of the tokens that carry loss, and of those that do not."""
    carried = [i for i, label in zip(ids, labels) if label != -100]
    context = [i for i, label in zip(ids, labels) if label == -100]
    assert [label for label in labels if label != -100] == carried  # a label is the token itself
    return tokenizer.decode(carried), tokenizer.decode(context)


def test_only_the_assistant_replies_carry_loss(tiny_tokenizer):
    one = Episode(user_turns=("sort: b a",), answer=None, system_prompt="be brief")
    ids, labels = conversation_tokens(tiny_tokenizer, one, ["a b"])
    assert tiny_tokenizer.decode(ids) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsort: b a<|im_end|>\n"
        "<|im_start|>assistant\na b<|im_end|>\n"
    )
    carried, context = _labelled_text(tiny_tokenizer, ids, labels)
    assert carried == "a b<|im_end|>\n"  # the reply and its end-of-turn token; never the prompt
    assert context.endswith("<|im_start|>assistant\n") and "sort: b a" in context

    two = Episode(user_turns=("x y", "again"), answer=None)
    ids, labels = conversation_tokens(tiny_tokenizer, two, ["r1", "r2"])
    carried, context = _labelled_text(tiny_tokenizer, ids, labels)
    assert carried == "r1<|im_end|>\nr2<|im_end|>\n"  # both replies; the second user turn is context
    assert "again" in context and "again" not in carried


class _Echo:
    """An environment whose reference reply repeats the prompt (enough for calibration)."""

    def episode(self, seed: int, index: int) -> Episode:
        return Episode(user_turns=(f"p{seed % 7}{index}",), answer=None)

    def reference(self, episode: Episode) -> list[str]:
        return [episode.user_turns[0][::-1]]


def test_calibration_loss_is_the_reply_nll_and_batches_pad_with_no_loss():
    model, tokenizer = make_tiny_chat_lm(seed=1)
    data = PromptDataModule(env=_Echo())
    batches = list(data.calibration_batches(tokenizer, num_samples=3, batch_size=2, seed=0))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    first = batches[0]
    padded = first["attention_mask"] == 0
    assert bool((first["labels"][padded] == -100).all())
    logits = model(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits.float()
    targets = first["labels"][:, 1:]
    carried = targets != -100
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = -(logp * carried).sum() / carried.sum()
    assert torch.allclose(model(**first).loss, expected, atol=1e-5)


class _Strategy:
    """The attributes calibration reads from a strategy."""

    name = "probe"
    needs_calibration = True
    num_samples = 5
    seed = 3

    def compute(self, model, batches):
        return list(batches)


def test_one_calibration_path_deals_batches_over_ranks_and_checks_its_inputs():
    model, tokenizer = make_tiny_chat_lm(seed=1)
    data = PromptDataModule(env=_Echo())
    every = compute_masks(_Strategy(), model, data, tokenizer, batch_size=2)
    assert [b["input_ids"].shape[0] for b in every] == [2, 2, 1]
    shards = [compute_masks(_Strategy(), model, data, tokenizer, 2, rank, 2) for rank in (0, 1)]
    assert [len(s) for s in shards] == [2, 1]
    assert torch.equal(shards[1][0]["input_ids"], every[1]["input_ids"])
    static = type("Static", (), {"needs_calibration": False})()
    assert calibration_batches(static, None, tokenizer, 4) is None
    for bad, match in ((lambda: calibration_batches(_Strategy(), object(), tokenizer, 2), "calibration_batches"),
                       (lambda: calibration_batches(_Strategy(), data, tokenizer, 0), "calibration_batch_size")):
        try:
            bad()
        except ValueError as err:
            assert match in str(err)
        else:
            raise AssertionError("expected a ValueError")


def test_gradient_sums_restore_the_model_and_square_per_sample(tiny_lm_untied):
    model = tiny_lm_untied.train()
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    params = {"lm_head.weight": model.lm_head.weight}
    sums = gradient_sums(model, params, [batch], squared=False, per_sample=False)
    model(**batch).loss.backward()
    assert torch.allclose(sums["lm_head.weight"], model.lm_head.weight.grad, atol=1e-6)
    model.zero_grad(set_to_none=True)
    squares = gradient_sums(model, params, [batch], squared=True, per_sample=True)["lm_head.weight"]
    rows = []
    for i in range(2):
        model.zero_grad(set_to_none=True)
        model(**{k: v[i: i + 1] for k, v in batch.items()}).loss.backward()
        rows.append(model.lm_head.weight.grad.clone() ** 2)
    assert torch.allclose(squares, rows[0] + rows[1], atol=1e-7)
    assert model.training and all(p.requires_grad for p in model.parameters())
