"""`snip` keeps the entries with the largest |summed gradient x weight|."""

import pytest
import torch

from mthlib.registry.snip import Snip
from tests.registry.conftest import Lookup, lookup_batch

WEIGHT = torch.tensor([[0.5, -4.0, 2.0, 0.0], [1.0, 3.0, -0.25, 8.0]])


def test_scores_are_abs_summed_gradient_times_weight():
    # Summed gradient over both batches: {0: 2, 1: 0 (+1 - 1), 2: -1, 3: 5, 4: 3, 6: 4}.
    batches = [
        lookup_batch([(0, 2), (1, 1), (2, -1)], [(3, 5), (4, 3), (6, 4)]),
        lookup_batch([(1, -1), (5, 0), (7, 0)]),
    ]
    # |g * w| = [1.0, 0, 2.0, 0, 3.0, 0, 1.0, 0]: entry 1 has the largest |w| but its gradients cancel.
    model = Lookup(WEIGHT)
    assert Snip(sparsity=0.75).compute(model, batches)["weight"].tolist() == [2, 4]
    # keep 3: 3.0, 2.0, then the tie at 1.0 between entries 0 and 6 goes to the lower index
    assert Snip(sparsity=5 / 8).compute(model, batches)["weight"].tolist() == [0, 2, 4]


def test_matches_autograd_on_a_tiny_lm(tiny_lm, calibration_batches):
    strategy = Snip(sparsity=0.9, allocation="per_tensor")
    params = strategy.eligible(tiny_lm)
    summed = {name: torch.zeros_like(p) for name, p in params.items()}
    for batch in calibration_batches:
        tiny_lm.zero_grad()
        tiny_lm(**batch).loss.backward()
        for name, p in params.items():
            summed[name] += p.grad
    tiny_lm.zero_grad()
    masks = strategy.compute(tiny_lm, calibration_batches)
    for name, p in params.items():
        score = (summed[name] * p.detach()).abs().reshape(-1)
        k = strategy.keep_count(p.numel())
        assert masks.count(name) == k
        assert torch.equal(masks[name], torch.sort(torch.topk(score, k).indices).values), name


def test_defaults_and_bad_arguments():
    assert Snip().num_samples == 128 and Snip.needs_calibration
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        Snip(num_samples=0)
