"""Rollouts on a tiny model: batched sampling, multi-turn sequences, chunked log-probs."""

import torch

from mthlib.envs.base import Episode
from mthlib.grpo.engines import SamplingConfig
from mthlib.grpo.rollout import (
    generate_rollout,
    next_turn_tokens,
    prompt_tokens,
    token_logprobs,
)
from tests.conftest import make_tiny_chat_lm


def full_logprobs(model, ids, attention, loss_mask, temperature=1.0):
    """Reference: log-softmax of the full logits, gathered at the next tokens."""
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids).logits.float() / temperature
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.pad(logp, (1, 0)) * loss_mask


def test_single_turn_rollout_marks_only_sampled_tokens_for_loss():
    model, tok = make_tiny_chat_lm()
    torch.manual_seed(0)
    episodes = [Episode(user_turns=("abc",), answer="a")] * 3
    rollout = generate_rollout(model, tok, episodes, SamplingConfig(max_completion_length=6))
    prompt = prompt_tokens(tok, episodes[0])
    assert rollout.input_ids.shape[0] == 3
    for row in range(3):
        n = int(rollout.attention_mask[row].sum())
        assert rollout.input_ids[row, : len(prompt)].tolist() == prompt
        assert rollout.loss_mask[row, : len(prompt)].sum() == 0
        assert rollout.loss_mask[row, len(prompt) : n].all()
        assert rollout.loss_mask[row, n:].sum() == 0
        length = int(rollout.completion_lengths[row])
        assert length == n - len(prompt) <= 6
        ended = rollout.input_ids[row, n - 1].item() == tok.eos_token_id
        assert bool(rollout.truncated[row]) == (not ended)
        assert length == 6 or ended


def test_multi_turn_rollout_appends_scripted_user_turns_without_loss():
    model, tok = make_tiny_chat_lm()
    torch.manual_seed(1)
    two = Episode(user_turns=("first", "second"), answer=None)
    one = Episode(user_turns=("only",), answer=None)
    rollout = generate_rollout(model, tok, [two, one], SamplingConfig(max_completion_length=4))
    assert len(rollout.replies[0]) == 2 and len(rollout.replies[1]) == 1
    row = rollout.input_ids[0][rollout.attention_mask[0].bool()].tolist()
    text = tok.decode(row)
    assert text.count("<|im_start|>user") == 2 and "second" in text
    # the follow-up user turn carries no loss
    follow = next_turn_tokens(tok, two, rollout.replies[0][:1])
    start = len(prompt_tokens(tok, two))
    first_len = next(i for i in range(start, len(row)) if rollout.loss_mask[0, i] == 0) - start
    assert rollout.loss_mask[0, start + first_len + (0 if row[start + first_len - 1] == tok.eos_token_id else 1) :][: len(follow)].sum() == 0
    assert int(rollout.loss_mask[0].sum()) == int(rollout.completion_lengths[0])


def test_chunked_logprobs_equal_full_logits_and_their_gradients():
    model, tok = make_tiny_chat_lm()
    torch.manual_seed(2)
    episodes = [Episode(user_turns=("xyz",), answer=None)] * 4
    r = generate_rollout(model, tok, episodes, SamplingConfig(max_completion_length=5, temperature=0.7))
    mask = r.loss_mask
    logps, entropy = token_logprobs(model, r.input_ids, r.attention_mask, mask, temperature=0.7, chunk_size=3)
    expected = full_logprobs(model, r.input_ids, r.attention_mask, mask, temperature=0.7)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert (entropy[mask == 0] == 0).all() and (entropy[mask.bool()] > 0).all()
    logps.sum().backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full_logprobs(model, r.input_ids, r.attention_mask, mask, temperature=0.7).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(chunked[name], param.grad, rtol=1e-4, atol=1e-6)


def test_greedy_sampling_is_deterministic():
    model, tok = make_tiny_chat_lm()
    episodes = [Episode(user_turns=("hello",), answer=None)] * 2
    greedy = SamplingConfig(max_completion_length=5, greedy=True)
    a = generate_rollout(model, tok, episodes, greedy)
    b = generate_rollout(model, tok, episodes, greedy)
    assert torch.equal(a.input_ids, b.input_ids) and a.replies[0] == a.replies[1]
