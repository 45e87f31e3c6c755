"""The fused log-probability / entropy of chosen tokens equals log-softmax through composed ops, gradient included."""

import pytest
import torch

from mthlib.grpo.rollout import token_logprobs
from mthlib.grpo.token_scores import token_scores
from tests.conftest import make_tiny_chat_lm


def composed(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """Reference: log-softmax of ``logits / T`` in fp32 at ``targets``, and the entropy ``-sum p log p``."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_entropy_and_gradient_equal_log_softmax_of_composed_ops(dtype, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(12, 300, generator=gen)).to(dtype)
    targets = torch.randint(0, 300, (12,), generator=gen)
    upstream = torch.randn(12, generator=gen)
    fused_in = logits.clone().requires_grad_()
    picked, entropy = token_scores(fused_in, targets, temperature)
    (picked * upstream).sum().backward()
    reference_in = logits.clone().requires_grad_()
    expected, expected_entropy = composed(reference_in, targets, temperature)
    (expected * upstream).sum().backward()
    assert picked.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(picked, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)
    assert not entropy.requires_grad
    assert fused_in.grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(fused_in.grad, reference_in.grad, rtol=1e-5, atol=1e-7)
    else:  # both are the fp32 gradient rounded once to bf16: at most one bf16 step apart
        torch.testing.assert_close(fused_in.grad.float(), reference_in.grad.float(), rtol=2 ** -7, atol=1e-7)


def test_gradient_passes_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 17, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 17, (5,), generator=gen)
    assert torch.autograd.gradcheck(lambda x: token_scores(x, targets, 0.7)[0], (logits,))


def test_a_near_certain_target_keeps_its_small_gradient_in_bf16():
    """At p(target) ~ 1 the target's gradient (1 - p) g / T is tiny: it is formed in fp32, then rounded."""
    logits = torch.zeros(2, 1000)
    logits[:, 7] = 12.0  # p(7) = 1 - 999 e^-12 ~ 1 - 6e-3
    targets = torch.tensor([7, 7])
    bf16 = logits.bfloat16().requires_grad_()
    token_scores(bf16, targets, 1.0)[0].sum().backward()
    wide = logits.double()
    expected = 1 - torch.softmax(wide, dim=-1)[:, 7]
    torch.testing.assert_close(bf16.grad[:, 7].double(), expected, rtol=2 ** -8, atol=0)


def test_chunked_token_logprobs_entropy_is_the_full_distributions():
    model, _ = make_tiny_chat_lm()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (3, 9), generator=gen)
    attention = torch.ones_like(ids)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 4:] = 1
    _, entropy = token_logprobs(model, ids, attention, loss_mask, temperature=0.7, chunk_size=4)
    positions = torch.arange(9).expand(3, 9)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / 0.7, dim=-1)
    expected = torch.nn.functional.pad(-(logp.exp() * logp).sum(dim=-1), (1, 0)) * loss_mask
    torch.testing.assert_close(entropy, expected.detach(), rtol=1e-5, atol=1e-6)
