"""Tests of the Masks container: validation, counts, overlap statistics, set algebra and files."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mthlib.masking import Masks
from mthlib.masking.masks import index_dtype


def _masks(**indices: list[int]) -> Masks:
    return Masks({k: torch.tensor(v, dtype=torch.int64) for k, v in indices.items()}, {k: (4, 5) for k in indices})


def test_counts_density_and_order():
    masks = Masks({"b": torch.tensor([0, 3, 19])}, {"b": (4, 5), "a": (10,)})
    assert masks.names == ("b", "a")
    assert list(masks) == ["b", "a"] and len(masks) == 2
    assert masks.count("b") == 3 and masks.count("a") == 0
    assert masks.total == 3 and masks.numel == 30
    assert masks.density == pytest.approx(0.1)
    assert "a" in masks and "c" not in masks
    assert masks["a"].dtype == torch.int64 and masks["a"].numel() == 0
    assert [name for name, _ in masks.items()] == ["b", "a"]


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([3, 1], "not sorted"),
        ([1, 1], "duplicates"),
        ([0, 20], "out of range"),
        ([-1, 2], "out of range"),
        ([[1, 2]], "1-D"),
    ],
)
def test_validation_rejects_bad_indices(indices, message):
    with pytest.raises(ValueError, match=message):
        Masks({"w": torch.tensor(indices)}, {"w": (4, 5)})


def test_validation_rejects_float_indices_and_unknown_names():
    with pytest.raises(ValueError, match="integer"):
        Masks({"w": torch.tensor([1.0])}, {"w": (4, 5)})
    with pytest.raises(ValueError, match="without a shape"):
        Masks({"v": torch.tensor([1])}, {"w": (4, 5)})


def test_dense_round_trip():
    dense = {"w": torch.zeros(4, 5, dtype=torch.bool), "v": torch.ones(3, dtype=torch.bool)}
    dense["w"][1, 2] = dense["w"][3, 4] = True
    masks = Masks.from_dense(dense)
    assert masks["w"].tolist() == [7, 19]
    assert masks["v"].tolist() == [0, 1, 2]
    assert torch.equal(masks.to_dense("w"), dense["w"])
    assert masks.shape("w") == (4, 5)


def test_overlap_exact_on_hand_made_sets():
    a = _masks(w=[0, 1, 2, 3], v=[5])           # |A| = 5
    b = _masks(w=[2, 3, 4, 5, 6, 7], v=[5, 6])  # |B| = 8, |A∩B| = 3
    stats = a.overlap(b)
    assert stats["intersection"] == 3
    assert stats["o1"] == pytest.approx(3 / 5)
    assert stats["o2"] == pytest.approx(3 / 8)
    assert stats["jaccard"] == pytest.approx(3 / 10)
    da, db = 5 / 40, 8 / 40
    assert stats["o1_random"] == pytest.approx(db)
    assert stats["o2_random"] == pytest.approx(da)
    assert stats["jaccard_random"] == pytest.approx(da * db / (da + db - da * db))


def test_overlap_uses_only_common_parameters_and_checks_shapes():
    a = Masks({"w": torch.tensor([0, 1]), "only_a": torch.tensor([0])}, {"w": (4,), "only_a": (2,)})
    b = Masks({"w": torch.tensor([1, 2])}, {"w": (4,)})
    stats = a.overlap(b)
    assert stats["count_a"] == 2 and stats["numel"] == 4 and stats["o1"] == 0.5
    with pytest.raises(ValueError, match="shape"):
        a.overlap(Masks({"w": torch.tensor([1])}, {"w": (5,)}))
    with pytest.raises(ValueError, match="no parameter in common"):
        a.overlap(Masks({"x": torch.tensor([1])}, {"x": (5,)}))
    assert math.isnan(Masks({"w": torch.tensor([], dtype=torch.long)}, {"w": (4,)}).overlap(b)["o1"])


def test_independent_random_masks_have_baseline_jaccard():
    n, k = 2_000_000, 20_000  # 99% sparsity
    gen = torch.Generator().manual_seed(0)
    a = Masks({"w": torch.sort(torch.randperm(n, generator=gen)[:k]).values}, {"w": (n,)})
    b = Masks({"w": torch.sort(torch.randperm(n, generator=gen)[:k]).values}, {"w": (n,)})
    stats = a.overlap(b)
    # |A∩B| is hypergeometric with mean k*k/n = 200 and sd ~ sqrt(200) ~ 14: allow 5 sd.
    assert abs(stats["intersection"] - 200) < 5 * math.sqrt(200)
    assert stats["jaccard_random"] == pytest.approx(0.01 * 0.01 / (0.02 - 0.0001))
    assert stats["jaccard"] == pytest.approx(stats["jaccard_random"], rel=0.4)
    assert stats["o1"] == pytest.approx(0.01, rel=0.4)


def test_union_difference_and_equality():
    a = _masks(w=[0, 1, 2])
    b = Masks({"w": torch.tensor([2, 3]), "x": torch.tensor([1])}, {"w": (4, 5), "x": (3,)})
    union = a.union(b)
    assert union.names == ("w", "x")
    assert union["w"].tolist() == [0, 1, 2, 3] and union["x"].tolist() == [1]
    diff = a.difference(b)
    assert diff.names == ("w",) and diff["w"].tolist() == [0, 1]
    assert a == _masks(w=[0, 1, 2])
    assert a != _masks(w=[0, 1, 3])
    assert a != Masks({"w": torch.tensor([0, 1, 2])}, {"w": (20,)})


def test_save_load_round_trip(tmp_path):
    masks = Masks({"layer.weight": torch.tensor([0, 5, 19]), "bias": torch.tensor([1])},
                  {"layer.weight": (4, 5), "bias": (3,), "empty.weight": (2, 2)})
    path = tmp_path / "sub" / "masks.safetensors"
    masks.save(path, metadata={"strategy": '{"name": "toy"}'})
    loaded = Masks.load(path)
    assert loaded == masks
    assert loaded.names == masks.names
    assert loaded.metadata == {"strategy": '{"name": "toy"}'}
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format"] == "mthlib.masks"
        assert handle.get_tensor("layer.weight.indices").dtype == torch.int32
        assert handle.get_tensor("layer.weight.shape").tolist() == [4, 5]
    assert [p.name for p in path.parent.iterdir()] == ["masks.safetensors"]  # no temp file left


def test_equal_masks_and_metadata_give_equal_bytes(tmp_path):
    masks = Masks({"w": torch.tensor([1, 7]), "v": torch.tensor([0])}, {"w": (4, 5), "v": (3,)})
    metadata = {f"key{i}": str(i) for i in range(12)}  # safetensors writes metadata in hash-map order
    paths = [tmp_path / f"{n}.safetensors" for n in range(4)]
    for n, path in enumerate(paths):
        masks.save(path, metadata=dict(reversed(metadata.items())) if n % 2 else metadata)
    assert len({path.read_bytes() for path in paths}) == 1
    blob = paths[0].read_bytes()
    header_length = int.from_bytes(blob[:8], "little")
    assert header_length % 8 == 0 and blob[8:8 + header_length].startswith(b'{"__metadata__":{"format":')
    loaded = Masks.load(paths[0])
    assert loaded == masks and loaded.metadata == metadata


def test_index_dtype_switches_at_two_to_the_31():
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64


def test_save_refuses_reserved_or_non_string_metadata(tmp_path):
    masks = _masks(w=[1])
    with pytest.raises(ValueError, match="reserved"):
        masks.save(tmp_path / "m.safetensors", metadata={"format": "x"})
    with pytest.raises(ValueError, match="strings"):
        masks.save(tmp_path / "m.safetensors", metadata={"sparsity": 0.99})


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="mask file not found"):
        Masks.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        Masks.load(junk)
    broken_delta = tmp_path / "delta.safetensors"
    save_file({"w.values": torch.zeros(2)}, str(broken_delta), metadata={"format": "mthlib.sparse_delta"})
    with pytest.raises(ValueError, match="not a valid mthlib sparse delta"):
        Masks.load(broken_delta)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "something.else"})
    with pytest.raises(ValueError, match="not an mthlib mask file"):
        Masks.load(other)


def test_shuffled_keeps_every_count_and_draws_new_positions_reproducibly():
    planted = Masks({"w": torch.arange(100), "b": torch.tensor([2, 3]), "v": torch.arange(50)},
                    {"w": (100, 100), "b": (8,), "v": (5, 10), "empty": (7,)})
    planted.metadata["strategy"] = "not carried over"
    shuffled = planted.shuffled(seed=1)
    assert shuffled.shapes == planted.shapes and shuffled.metadata == {}
    assert {n: shuffled.count(n) for n in shuffled} == {"w": 100, "b": 2, "v": 50, "empty": 0}
    # the first 100 of 10,000 entries: a uniform draw keeps all of them with probability 1 / C(10000, 100)
    assert not torch.equal(shuffled["w"], planted["w"])
    assert torch.equal(shuffled["v"], planted["v"])  # every entry active: nowhere else to go
    for name, idx in shuffled.items():  # valid indices: sorted, unique, in range (Masks validates them)
        assert torch.equal(idx, torch.unique(idx))
    again, other = planted.shuffled(seed=1), planted.shuffled(seed=2)
    assert again == shuffled and other != shuffled
    generator = torch.Generator().manual_seed(1)  # the rule: parameters in order, first k of one randperm each
    expected_w = torch.sort(torch.randperm(10_000, generator=generator)[:100]).values
    expected_b = torch.sort(torch.randperm(8, generator=generator)[:2]).values
    assert torch.equal(shuffled["w"], expected_w) and torch.equal(shuffled["b"], expected_b)


def test_shuffled_positions_are_uniform_whatever_the_source():
    source = Masks({"w": torch.arange(5)}, {"w": (50,)})  # always the first 5 of 50 entries
    hits = torch.zeros(50)
    for seed in range(400):
        hits[source.shuffled(seed)["w"]] += 1
    # each entry is drawn with probability 5/50: 40 hits expected in 400 draws, sd 6; allow 5 sd
    assert hits.sum() == 2000 and hits.min() > 10 and hits.max() < 70
    assert hits[:5].mean() == pytest.approx(40, abs=10)  # the source's own positions are not favoured
