"""`fisher` keeps the entries with the largest squared gradients, by either estimator."""

import pytest
import torch

from mthlib.masking import Masks
from mthlib.registry.fisher import Fisher
from tests.registry.conftest import Lookup, lookup_batch


def _batches():
    """Per-sequence gradients over a 4x4 weight (flat index: gradient).

    Batch 1, sequence A: {0: +3, 5: +2, 7: +1}; batch 2, sequence B: {0: -3, 7: +1}.
    Summed gradient: {0: 0, 5: 2, 7: 2}; squared: {5: 4, 7: 4}.
    Per-sequence squares summed (empirical Fisher): {0: 18, 5: 4, 7: 2}.
    """
    return [lookup_batch([(0, 3), (5, 2), (7, 1)]), lookup_batch([(0, -3), (7, 1), (7, 0)])]


def test_batch_estimator_squares_the_summed_gradient():
    model = Lookup(torch.zeros(4, 4))
    one = Fisher(sparsity=15 / 16).compute(model, _batches())  # keep_count(16) = 1
    assert one["weight"].tolist() == [5]  # 5 and 7 tie at 4: the lower index
    two = Fisher(sparsity=14 / 16).compute(model, _batches())
    assert two["weight"].tolist() == [5, 7]  # entry 0's gradients cancel: (3 - 3)^2 = 0


def test_per_sample_estimator_sums_squared_sequence_gradients():
    model = Lookup(torch.zeros(4, 4))
    one = Fisher(sparsity=15 / 16, estimator="per_sample").compute(model, _batches())
    assert one["weight"].tolist() == [0]  # 3^2 + 3^2 = 18
    two = Fisher(sparsity=14 / 16, estimator="per_sample").compute(model, _batches())
    assert two["weight"].tolist() == [0, 5]


def _top(scores: dict[str, torch.Tensor], k: int) -> Masks:
    """Global top-k by an independent sort (ties: parameter order, then index)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]
    chosen, offset = {}, 0
    for name, s in scores.items():
        mine = sorted(i - offset for i in order if offset <= i < offset + s.numel())
        chosen[name] = torch.tensor(mine, dtype=torch.int64)
        offset += s.numel()
    return Masks(chosen, {name: tuple(s.shape) for name, s in scores.items()})


@pytest.mark.parametrize("estimator", ["batch", "per_sample"])
def test_matches_squared_gradients_computed_by_autograd(tiny_lm, calibration_batches, estimator):
    strategy = Fisher(sparsity=0.95, estimator=estimator, num_samples=4)
    params = strategy.eligible(tiny_lm)
    pieces = calibration_batches if estimator == "batch" else [
        {k: v[i:i + 1] for k, v in b.items()} for b in calibration_batches for i in range(2)
    ]
    summed = {name: torch.zeros_like(p) for name, p in params.items()}
    squares = {name: torch.zeros_like(p) for name, p in params.items()}
    for piece in pieces:
        tiny_lm.zero_grad()
        tiny_lm(**piece).loss.backward()
        for name, p in params.items():
            summed[name] += p.grad
            squares[name] += p.grad ** 2
    tiny_lm.zero_grad()
    expected = {n: g ** 2 for n, g in summed.items()} if estimator == "batch" else squares
    masks = strategy.compute(tiny_lm, calibration_batches)
    k = strategy.keep_count(sum(p.numel() for p in params.values()))
    assert masks.total == k
    reference = _top(expected, k)
    assert masks == reference


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="estimator must be 'batch' or 'per_sample'"):
        Fisher(estimator="diagonal")
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        Fisher(num_samples=0)
    assert Fisher().num_samples == 1024 and Fisher.needs_calibration
