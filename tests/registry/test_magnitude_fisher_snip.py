"""Magnitude, Fisher and SNIP pick the entries their rules name, on hand-built models."""

import torch
from torch import nn

from mthlib.masking import build_mask


class Bilinear(nn.Module):
    """loss = -(w * x).sum() per sequence: d loss / d w = -x, so gradients are known exactly."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, input_ids, attention_mask=None, labels=None):
        x = input_ids.float().view(-1, *self.weight.shape).mean(0)
        return type("Out", (), {"loss": -(self.weight * x).sum()})()


def batch(values):
    t = torch.tensor(values, dtype=torch.long).view(1, -1)
    return {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t}


WEIGHT = torch.tensor([[0.5, -4.0], [2.0, 0.1]])


def test_magnitude_keeps_the_largest_or_smallest_absolute_weights():
    model = Bilinear(WEIGHT)
    top = build_mask("magnitude", sparsity=0.5).compute(model, None)
    assert top["weight"].tolist() == [1, 2]  # |-4.0|, |2.0|
    bottom = build_mask("magnitude", sparsity=0.5, largest=False).compute(model, None)
    assert bottom["weight"].tolist() == [0, 3]  # |0.5|, |0.1|


def test_fisher_keeps_the_largest_squared_gradients():
    model = Bilinear(WEIGHT)
    batches = [batch([1, 3, 0, 2]), batch([1, -3, 0, 2])]  # grads -x: [-1,-3,0,-2] and [-1,3,0,-2]
    blog = build_mask("fisher", sparsity=0.5, num_samples=2).compute(model, batches)
    assert blog["weight"].tolist() == [0, 3]  # (summed gradient)^2: [4, 0, 0, 16]
    empirical = build_mask("fisher", sparsity=0.5, num_samples=2, estimator="per_sample").compute(model, batches)
    assert empirical["weight"].tolist() == [1, 3]  # sum of per-sequence squares: [2, 18, 0, 8]


def test_snip_keeps_the_largest_gradient_times_weight():
    model = Bilinear(WEIGHT)
    batches = [batch([1, 3, 0, 2]), batch([1, -3, 0, 2])]  # summed grad [-2, 0, 0, -4]
    masks = build_mask("snip", sparsity=0.5, num_samples=2).compute(model, batches)
    assert masks["weight"].tolist() == [0, 3]  # |g * w| = [1.0, 0, 0, 0.4]
    three = build_mask("snip", sparsity=0.25, num_samples=2).compute(model, batches)
    assert three["weight"].tolist() == [0, 1, 3]  # the tie at 0 between entries 1 and 2 goes to the lower index
