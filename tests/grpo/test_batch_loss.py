"""The batch loss, micro-batch by micro-batch: the gradients and the loss of the whole batch at once."""

import pytest
import torch

from mthlib.envs.base import Episode
from mthlib.grpo.batch_loss import backward_micro_batches
from mthlib.grpo.engines import SamplingConfig
from mthlib.grpo.objective import GRPOObjective, batch_normalizer
from mthlib.grpo.rollout import generate_rollout
from tests.conftest import make_tiny_chat_lm


@pytest.mark.parametrize("pack_prefixes", [False, True])
def test_micro_batches_add_up_to_the_whole_batch(pack_prefixes):
    model, tok = make_tiny_chat_lm(seed=5)
    torch.manual_seed(5)
    episodes = [Episode(user_turns=("abc",), answer=None)] * 3 + [Episode(user_turns=("wxyz",), answer=None)] * 3
    rollout = generate_rollout(model, tok, episodes, SamplingConfig(max_completion_length=5, temperature=0.7))
    advantages = torch.linspace(-1.0, 1.0, len(rollout))
    norm = batch_normalizer(rollout.loss_mask, 5)
    objective = GRPOObjective(loss_type="dapo", beta=0.1)
    old = torch.randn(rollout.loss_mask.shape) * 0.1 - 2.0
    ref = old + 0.05
    model.train()
    results = []
    for size in (len(rollout), 4, 1):
        model.zero_grad()
        calls = []
        loss, stats = backward_micro_batches(model, objective, rollout, advantages, norm,
                                             lambda l: (calls.append(l), l.backward()), size, old, ref, 0.7, 3,
                                             pack_prefixes)
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
        assert len(calls) == len(stats["entropy"]) == -(-len(rollout) // size)
        assert torch.allclose(sum(c.detach() for c in calls), loss)
        assert {"entropy", "kl", "clip_ratio/region_mean"} <= set(stats)
    (whole, whole_grads), *parts = results
    assert whole.item() != 0
    for loss, grads in parts:
        torch.testing.assert_close(loss, whole, rtol=1e-5, atol=1e-7)
        for g, w in zip(grads, whole_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
