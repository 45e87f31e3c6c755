"""`magnitude` keeps the largest (or smallest) |w|: hand-computed 4x4 cases."""

import torch
from torch import nn

from mthlib.registry.magnitude import Magnitude

A = torch.tensor([
    [0.5, -4.0, 2.0, 0.1],
    [-2.0, 3.0, 0.0, 1.5],
    [0.2, -0.3, 5.0, -1.0],
    [0.05, 2.0, -0.7, 0.9],
])
B = torch.tensor([[6.0, -0.01], [0.4, -2.0]])


class TwoMatrices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(A.clone())
        self.b = nn.Parameter(B.clone())


def test_largest_magnitudes_with_ties_to_the_lower_index():
    model = TwoMatrices()
    masks = Magnitude(sparsity=0.75, allocation="per_tensor", include=["a"]).compute(model, None)
    # keep 4 of 16: |5.0| (10), |-4.0| (1), |3.0| (5), then |2.0| at 2, 4 and 13 -> index 2
    assert masks["a"].tolist() == [1, 2, 5, 10]


def test_smallest_magnitudes():
    model = TwoMatrices()
    masks = Magnitude(sparsity=0.75, largest=False, include=["a"]).compute(model, None)
    # |0.0| (6), |0.05| (12), |0.1| (3), |0.2| (8)
    assert masks["a"].tolist() == [3, 6, 8, 12]


def test_global_versus_per_tensor_allocation():
    model = TwoMatrices()
    both = Magnitude(sparsity=0.8).compute(model, None)  # keep_count(20) = 4 over both tensors
    assert both["a"].tolist() == [1, 5, 10] and both["b"].tolist() == [0]  # 6.0 in b; 5.0, 4.0, 3.0 in a
    both = Magnitude(sparsity=0.75).compute(model, None)  # keep 5: then 2.0 ties in a and b -> a (earlier), index 2
    assert both["a"].tolist() == [1, 2, 5, 10] and both["b"].tolist() == [0]
    per = Magnitude(sparsity=0.5, allocation="per_tensor").compute(model, None)
    assert per.count("a") == 8 and per["b"].tolist() == [0, 3]  # 6.0, 2.0
