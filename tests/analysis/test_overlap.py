"""Overlap o1, o2, Jaccard and their random baselines: exact on hand-built sets, right on random ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mthlib.analysis.overlap import PairOverlap, intersection_size, subnetwork_overlap


def write_masks(path, sets: dict[str, tuple[list[int] | np.ndarray, tuple[int, ...]]]):
    tensors = {}
    for name, (indices, shape) in sets.items():
        tensors[f"{name}.indices"] = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        tensors[f"{name}.shape"] = torch.tensor(shape, dtype=torch.int64)
    save_file(tensors, str(path), metadata={"format": "mthlib.masks"})
    return path


def test_intersection_size():
    a, b = torch.tensor([1, 3, 5, 7, 100]), torch.tensor([0, 3, 7, 8, 99, 100, 200])
    assert intersection_size(a, b) == intersection_size(b, a) == 3
    assert intersection_size(a, torch.empty(0, dtype=torch.int64)) == 0


def test_exact_overlap_of_hand_built_masks(tmp_path):
    one = write_masks(tmp_path / "one.safetensors", {"a": (list(range(10)), (10, 10)), "b": ([0, 1], (50,))})
    two = write_masks(tmp_path / "two.safetensors", {"a": (list(range(5, 20)), (10, 10)), "b": ([1, 2, 3], (50,))})
    result = subnetwork_overlap([one, two])
    pair = result.pair(0, 1)
    assert (pair.size1, pair.size2, pair.intersection, pair.total) == (12, 18, 6, 150)
    assert pair.o1 == 6 / 12 and pair.o2 == 6 / 18 and pair.jaccard == 6 / 24
    assert pair.o1_random == 18 / 150 and pair.o2_random == 12 / 150
    d1, d2 = 12 / 150, 18 / 150
    assert pair.jaccard_random == pytest.approx(d1 * d2 / (d1 + d2 - d1 * d2))


def test_pairwise_matrix_for_three_inputs_and_missing_parameters(tmp_path):
    one = write_masks(tmp_path / "1.safetensors", {"a": ([0, 1, 2, 3], (20,))})
    two = write_masks(tmp_path / "2.safetensors", {"a": ([2, 3], (20,)), "b": ([0, 1], (10,))})
    three = write_masks(tmp_path / "3.safetensors", {"b": ([1, 2, 3], (10,))})
    result = subnetwork_overlap([one, two, three])
    assert result.total == 30 and result.sizes == [4, 4, 3]
    assert result.intersections == [[4, 2, 0], [2, 4, 1], [0, 1, 3]]
    o1 = result.matrix("o1")
    assert o1[0][1] == 0.5 and o1[1][0] == 0.5 and o1[2][1] == pytest.approx(1 / 3) and o1[1][1] == 1.0
    jac = result.matrix("jaccard")
    assert jac[1][2] == jac[2][1] == pytest.approx(1 / 6)
    assert len(result.pairs()) == 3 and len(result.tables()[1].rows) == 3


def test_independent_random_99_percent_sparse_sets_match_the_baseline(tmp_path):
    rng = np.random.default_rng(0)
    shapes = {"a": (2000, 2500), "b": (5_000_000,)}
    masks = []
    for i in range(2):
        sets = {name: (np.sort(rng.choice(int(np.prod(s)), int(np.prod(s) * 0.01), replace=False)), s)
                for name, s in shapes.items()}
        masks.append(write_masks(tmp_path / f"{i}.safetensors", sets))
    pair = subnetwork_overlap(masks).pair(0, 1)
    assert pair.d1 == pair.d2 == 0.01
    assert pair.jaccard == pytest.approx(0.005, abs=0.0005)
    assert pair.o1 == pytest.approx(0.01, abs=0.001) and pair.o2 == pytest.approx(0.01, abs=0.001)
    assert pair.jaccard_random == pytest.approx(0.01 * 0.01 / (0.02 - 0.0001))


def test_finetuned_weights_need_a_base_and_use_the_tolerance(hand_pair):
    with pytest.raises(ValueError, match="pass base="):
        subnetwork_overlap([hand_pair.finetuned, hand_pair.base])
    loose = subnetwork_overlap([hand_pair.finetuned, hand_pair.finetuned], hand_pair.base, tol=1e-5)
    strict = subnetwork_overlap([hand_pair.finetuned, hand_pair.finetuned], hand_pair.base, tol=1e-8)
    assert loose.sizes == [10, 10] and strict.sizes == [15, 15]
    assert loose.total == 108 and loose.pair(0, 1).o1 == 1.0


def test_mismatched_shapes_and_single_input_refused(tmp_path):
    one = write_masks(tmp_path / "1.safetensors", {"a": ([0], (20,))})
    two = write_masks(tmp_path / "2.safetensors", {"a": ([0], (4, 5))})
    with pytest.raises(ValueError, match=r"a has shape \(4, 5\)"):
        subnetwork_overlap([one, two])
    with pytest.raises(ValueError, match="at least two"):
        subnetwork_overlap([one])


def test_empty_sets_give_nan_ratios_not_errors():
    pair = PairOverlap("x", "y", 0, 5, 0, 10)
    assert np.isnan(pair.o1) and pair.o2 == 0.0 and pair.jaccard == 0.0
