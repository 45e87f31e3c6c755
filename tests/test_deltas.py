"""The sparse delta contract: exact round trip, full metadata, strict validation, atomic writes, merging."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import mthlib
import mthlib.utils
from mthlib.deltas import (
    FORMAT,
    SparseDelta,
    apply_delta,
    build_delta,
    check_entries,
    index_dtype,
    load_delta,
    merge_deltas,
    save_delta,
    write_delta,
)
from mthlib.fingerprint import model_fingerprint

STRATEGY = {"class_path": "mthlib.registry.random.Random", "init_args": {"sparsity": 0.9, "seed": 3}}


def random_indices(model, density: float, seed: int) -> dict[str, torch.Tensor]:
    """Seeded sorted unique flat indices per (untied) parameter."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, param in model.named_parameters():
        k = max(1, int(param.numel() * density))
        out[name] = torch.randperm(param.numel(), generator=gen)[:k].sort().values
    return out


def masked_train(model, indices, steps: int = 3, lr: float = 0.05) -> None:
    """A few SGD steps that only move the masked entries."""
    params = dict(model.named_parameters())
    masks = {}
    for name, param in params.items():
        mask = torch.zeros(param.numel(), dtype=torch.bool)
        mask[indices[name]] = True
        masks[name] = mask.view_as(param)
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(7))
    for _ in range(steps):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for name, param in params.items():
                param -= lr * param.grad * masks[name]


@pytest.fixture
def trained(tiny_lm):
    """(untouched base copy, trained model, trained indices, base fingerprint)."""
    base = copy.deepcopy(tiny_lm)
    fingerprint = model_fingerprint(tiny_lm)
    indices = random_indices(tiny_lm, 0.1, seed=0)
    masked_train(tiny_lm, indices)
    return base, tiny_lm, indices, fingerprint


def save(path, model, indices, fingerprint, step=5):
    return save_delta(path, model, indices, base_model="tiny-base", base_fingerprint=fingerprint,
                      strategy=STRATEGY, sparsity=0.9, step=step)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unchanged(model, before):
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_train_save_apply_round_trip_is_bitwise(trained, tmp_path):
    base, model, indices, fingerprint = trained
    path = save(tmp_path / "d.safetensors", model, indices, fingerprint)
    changed = sum(int((p != q).sum()) for p, q in zip(base.parameters(), model.parameters()))
    assert changed > 0
    apply_delta(base, path)
    for (name, p), q in zip(base.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name


def test_metadata_has_every_field(trained, tmp_path):
    _, model, indices, fingerprint = trained
    delta = load_delta(save(tmp_path / "d.safetensors", model, indices, fingerprint, step=42))
    meta = delta.metadata
    assert meta["format"] == FORMAT and meta["version"] == "1"
    assert meta["base_model"] == "tiny-base" and meta["base_fingerprint"] == fingerprint
    assert json.loads(meta["strategy"]) == STRATEGY and delta.strategy == STRATEGY
    assert float(meta["sparsity"]) == 0.9 and int(meta["step"]) == 42 and delta.step == 42
    assert meta["mthlib_version"] == mthlib.__version__
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert {k: tuple(v) for k, v in json.loads(meta["shapes"]).items()} == shapes == delta.shapes
    assert delta.num_entries == sum(int(i.numel()) for i in indices.values())
    for name, idx in delta.indices.items():
        assert idx.dtype == torch.int32
        assert torch.equal(idx.long(), indices[name])
        assert delta.values[name].dtype == torch.float32


def test_index_dtype_rule_without_allocating():
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64
    values = torch.ones(2)
    check_entries("big", torch.tensor([0, 2**31 + 5], dtype=torch.int64), values, (2**16, 2**16))
    with pytest.raises(ValueError, match="requires torch.int64"):
        check_entries("big", torch.tensor([0, 5], dtype=torch.int32), values, (2**16, 2**16))
    with pytest.raises(ValueError, match="requires torch.int32"):
        check_entries("small", torch.tensor([0, 5], dtype=torch.int64), values, (4, 4))


def test_bf16_model_stores_bf16_values_and_round_trips(tiny_lm, tmp_path):
    model = tiny_lm.to(torch.bfloat16)
    base = copy.deepcopy(model)
    fingerprint = model_fingerprint(model)
    indices = random_indices(model, 0.05, seed=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.view(-1)[indices[name]] += 0.25
    path = save(tmp_path / "d.safetensors", model, indices, fingerprint)
    assert all(v.dtype == torch.bfloat16 for v in load_delta(path).values.values())
    apply_delta(base, path)
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), model.parameters()))


def _write_raw(path, tensors, **meta_overrides):
    meta = {"format": FORMAT, "version": "1", "base_model": "b", "base_fingerprint": "f", "strategy": "null",
            "sparsity": "0.5", "step": "1", "mthlib_version": "0", "shapes": json.dumps({"w": [2, 4]})}
    meta.update(meta_overrides)
    save_file(tensors, str(path), metadata=meta)
    return path


GOOD = {"w.indices": torch.tensor([1, 5], dtype=torch.int32), "w.values": torch.tensor([1.0, 2.0])}


@pytest.mark.parametrize(
    ("tensors", "overrides", "reason"),
    [
        (GOOD, {"format": "pt"}, "format"),
        (GOOD, {"version": "2"}, "version"),
        (GOOD, {"step": "ten"}, "step"),
        (GOOD, {"shapes": "{not json"}, "shapes"),
        (GOOD, {"shapes": json.dumps({"w": [2, 4], "x": [3]})}, "shapes"),
        ({"w.indices": GOOD["w.indices"]}, {}, "unpaired"),
        ({**GOOD, "w.values": torch.tensor([1.0])}, {}, "2 indices but 1 values"),
        ({**GOOD, "w.indices": torch.tensor([5, 1], dtype=torch.int32)}, {}, "sorted"),
        ({**GOOD, "w.indices": torch.tensor([5, 5], dtype=torch.int32)}, {}, "sorted and unique"),
        ({**GOOD, "w.indices": torch.tensor([1, 8], dtype=torch.int32)}, {}, "out of range"),
        ({**GOOD, "w.indices": torch.tensor([-1, 2], dtype=torch.int32)}, {}, "out of range"),
        ({**GOOD, "w.indices": torch.tensor([1, 5], dtype=torch.int64)}, {}, "requires torch.int32"),
        ({**GOOD, "w.values": torch.tensor([1, 2], dtype=torch.int32)}, {}, "floating-point"),
        ({**GOOD, "w.extra": torch.zeros(1)}, {}, "unexpected tensor"),
    ],
)
def test_invalid_files_are_refused_with_the_reason(tmp_path, tensors, overrides, reason):
    path = _write_raw(tmp_path / "bad.safetensors", tensors, **overrides)
    with pytest.raises(ValueError, match="not a valid mthlib sparse delta") as err:
        load_delta(path)
    assert str(path) in str(err.value) and reason in str(err.value)


def test_handwritten_valid_file_without_checksum_loads(tmp_path):
    delta = load_delta(_write_raw(tmp_path / "ok.safetensors", GOOD))
    assert delta.shapes == {"w": (2, 4)} and delta.num_entries == 2


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_delta(tmp_path / "nope.safetensors")


def test_truncated_delta_refused_and_model_untouched(trained, tmp_path):
    base, model, indices, fingerprint = trained
    path = save(tmp_path / "d.safetensors", model, indices, fingerprint)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    before = snapshot(base)
    with pytest.raises(ValueError, match="not a valid mthlib sparse delta"):
        apply_delta(base, path)
    assert_unchanged(base, before)


def test_flipped_byte_in_values_is_caught_by_the_checksum(trained, tmp_path):
    _, model, indices, fingerprint = trained
    path = save(tmp_path / "d.safetensors", model, indices, fingerprint)
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + header_len])["model.norm.weight.values"]["data_offsets"]
    data[8 + header_len + start] ^= 0x01  # lowest mantissa bit of one stored value
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_delta(path)


def test_other_base_refused_naming_both_fingerprints(trained, tmp_path):
    base, model, indices, fingerprint = trained
    path = save(tmp_path / "d.safetensors", model, indices, fingerprint)
    with torch.no_grad():
        base.model.norm.weight[0] += 1.0
    other = model_fingerprint(base)
    before = snapshot(base)
    with pytest.raises(ValueError) as err:
        apply_delta(base, path)
    assert fingerprint in str(err.value) and other in str(err.value)
    assert_unchanged(base, before)
    apply_delta(base, path, check_fingerprint=False)
    trained_params = dict(model.named_parameters())
    for name, param in base.named_parameters():
        assert torch.equal(param.view(-1)[indices[name]], trained_params[name].view(-1)[indices[name]])


def test_wrong_dtype_refused_and_model_untouched(trained, tmp_path):
    base, model, indices, fingerprint = trained
    path = save(tmp_path / "d.safetensors", model, indices, fingerprint)
    base = base.to(torch.bfloat16)
    before = snapshot(base)
    with pytest.raises(ValueError, match="bfloat16"):
        apply_delta(base, path)
    assert_unchanged(base, before)


def test_shape_mismatch_and_out_of_range_refused(tiny_lm, tmp_path):
    fingerprint = model_fingerprint(tiny_lm)
    numel = tiny_lm.model.norm.weight.numel()
    before = snapshot(tiny_lm)
    too_big = build_delta({"model.norm.weight": torch.tensor([numel + 3])}, {"model.norm.weight": torch.ones(1)},
                          {"model.norm.weight": (numel + 10,)}, base_model="b", base_fingerprint=fingerprint,
                          strategy=None, sparsity=0.5, step=0)
    with pytest.raises(ValueError, match="shape"):
        apply_delta(tiny_lm, too_big)
    with pytest.raises(ValueError, match="out of range"):
        build_delta({"model.norm.weight": torch.tensor([numel])}, {"model.norm.weight": torch.ones(1)},
                    {"model.norm.weight": (numel,)}, base_model="b", base_fingerprint=fingerprint,
                    strategy=None, sparsity=0.5, step=0)
    unknown = build_delta({"nope.weight": torch.tensor([0])}, {"nope.weight": torch.ones(1)}, {"nope.weight": (2,)},
                          base_model="b", base_fingerprint=fingerprint, strategy=None, sparsity=0.5, step=0)
    with pytest.raises(ValueError, match="no parameter 'nope.weight'"):
        apply_delta(tiny_lm, unknown)
    assert_unchanged(tiny_lm, before)


def test_save_refuses_bad_indices(tiny_lm, tmp_path):
    fingerprint = model_fingerprint(tiny_lm)
    with pytest.raises(ValueError, match="sorted"):
        save(tmp_path / "d.safetensors", tiny_lm, {"model.norm.weight": torch.tensor([3, 1])}, fingerprint)
    with pytest.raises(ValueError, match="no parameter"):
        save(tmp_path / "d.safetensors", tiny_lm, {"missing.weight": torch.tensor([0])}, fingerprint)
    assert not (tmp_path / "d.safetensors").exists()


def test_tied_alias_gathers_and_applies_through_the_shared_weight(tiny_lm, tmp_path):
    base = copy.deepcopy(tiny_lm)
    fingerprint = model_fingerprint(tiny_lm)
    with torch.no_grad():
        tiny_lm.lm_head.weight.view(-1)[[0, 7]] = 3.0
    path = save(tmp_path / "d.safetensors", tiny_lm, {"lm_head.weight": torch.tensor([0, 7])}, fingerprint)
    apply_delta(base, path)
    assert torch.equal(base.model.embed_tokens.weight, tiny_lm.model.embed_tokens.weight)


def test_killed_write_leaves_previous_file_loadable(trained, tmp_path, monkeypatch):
    _, model, indices, fingerprint = trained
    path = save(tmp_path / "d.safetensors", model, indices, fingerprint, step=1)

    def killed(*_args, **_kwargs):
        raise OSError("killed")

    for target in ("replace", "fsync"):
        with monkeypatch.context() as patch:
            patch.setattr(mthlib.utils.os, target, killed)
            with pytest.raises(OSError, match="killed"):
                save(path, model, indices, fingerprint, step=2)
        assert load_delta(path).step == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]


def _delta(indices, values, step=0, fingerprint="fp", shape=(10,)):
    return build_delta({"w": torch.tensor(indices)}, {"w": torch.tensor(values)}, {"w": shape},
                       base_model="b", base_fingerprint=fingerprint, strategy={"s": step}, sparsity=0.8, step=step)


def test_merge_disjoint_deltas(tmp_path):
    merged = merge_deltas([_delta([1, 4], [1.0, 4.0], step=3), write_delta(_delta([0, 9], [0.5, 9.0], step=7),
                                                                        tmp_path / "b.safetensors")])
    assert merged.indices["w"].tolist() == [0, 1, 4, 9]
    assert merged.values["w"].tolist() == [0.5, 1.0, 4.0, 9.0]
    assert merged.step == 7 and merged.base_fingerprint == "fp"
    assert merged.strategy == {"merged": [{"s": 3}, {"s": 7}], "on_overlap": "error"}
    assert math.isclose(merged.sparsity, 0.6)  # each implies 10 eligible entries; 4 are stored
    write_delta(merged, tmp_path / "m.safetensors")
    assert load_delta(tmp_path / "m.safetensors").indices["w"].tolist() == [0, 1, 4, 9]


def test_merge_overlap_rules():
    first, second = _delta([1, 4], [1.0, 4.0]), _delta([4, 6], [8.0, 6.0])
    with pytest.raises(ValueError, match="1 entries of w"):
        merge_deltas([first, second])
    last = merge_deltas([first, second], on_overlap="last")
    assert last.indices["w"].tolist() == [1, 4, 6] and last.values["w"].tolist() == [1.0, 8.0, 6.0]
    mean = merge_deltas([first, second], on_overlap="mean")
    assert mean.values["w"].tolist() == [1.0, 6.0, 6.0]


def test_merge_refuses_different_bases_and_shapes():
    with pytest.raises(ValueError, match="different bases"):
        merge_deltas([_delta([1], [1.0]), _delta([2], [2.0], fingerprint="other")])
    with pytest.raises(ValueError, match="different shapes"):
        merge_deltas([_delta([1], [1.0]), _delta([2], [2.0], shape=(12,))])


def test_sparse_delta_properties_parse_metadata():
    delta = _delta([2], [1.5], step=9)
    assert isinstance(delta, SparseDelta)
    assert (delta.step, delta.sparsity, delta.base_model, delta.strategy) == (9, 0.8, "b", {"s": 9})
