"""Fingerprints: stable, sensitive to every field, value-based for 16-bit floats, cached on models."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import torch

from mthlib.fingerprint import FINGERPRINT_CHARS, model_fingerprint, state_fingerprint

PINNED_TENSORS = textwrap.dedent(
    """
    import torch
    from mthlib.fingerprint import state_fingerprint
    tensors = [("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)), ("b", torch.tensor([1, -2], dtype=torch.int64))]
    print(state_fingerprint(tensors))
    """
)
PINNED = "9e6b23c57e31168a654c1ea3fb443829"


def _pinned_tensors():
    return [("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)), ("b", torch.tensor([1, -2], dtype=torch.int64))]


def test_fingerprint_is_pinned_and_stable_across_processes():
    here = state_fingerprint(_pinned_tensors())
    other = subprocess.run([sys.executable, "-c", PINNED_TENSORS], capture_output=True, text=True, check=True)
    assert len(here) == FINGERPRINT_CHARS
    assert other.stdout.strip() == here == PINNED


@pytest.mark.parametrize(
    "change",
    [
        lambda ts: [("c", ts[0][1]), ts[1]],  # name
        lambda ts: [(ts[0][0], ts[0][1].reshape(3, 2)), ts[1]],  # shape
        lambda ts: [(ts[0][0], ts[0][1].to(torch.float64)), ts[1]],  # dtype
        lambda ts: [(ts[0][0], ts[0][1] + torch.tensor([[0, 0, 0], [0, 0, 1e-6]])), ts[1]],  # one value
        lambda ts: [ts[1], ts[0]],  # order
        lambda ts: [ts[0]],  # a tensor dropped
    ],
)
def test_every_field_changes_the_fingerprint(change):
    assert state_fingerprint(change(_pinned_tensors())) != state_fingerprint(_pinned_tensors())


def test_sixteen_bit_floats_hash_as_their_exact_fp32_values():
    values = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    bf16 = values.to(torch.bfloat16)
    assert state_fingerprint([("w", bf16)]) == state_fingerprint([("w", bf16.float())])
    assert state_fingerprint([("w", bf16)]) != state_fingerprint([("w", values)])
    half = values.to(torch.float16)
    assert state_fingerprint([("w", half)]) == state_fingerprint([("w", half.float())])


def test_non_contiguous_and_empty_tensors_hash_like_their_contiguous_copies():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert state_fingerprint([("t", t)]) == state_fingerprint([("t", t.contiguous())])
    assert state_fingerprint([("e", torch.zeros(0, 3))]) != state_fingerprint([("e", torch.zeros(3, 0))])


def test_model_fingerprint_counts_tied_once_sorted_and_follows_the_weights(tiny_lm):
    expected = state_fingerprint(sorted(tiny_lm.named_parameters(), key=lambda kv: kv[0]))
    assert "lm_head.weight" not in dict(tiny_lm.named_parameters())
    attributes = set(vars(tiny_lm))
    assert model_fingerprint(tiny_lm) == expected
    assert set(vars(tiny_lm)) == attributes, "nothing is cached on the model"
    with torch.no_grad():
        tiny_lm.model.norm.weight[0] += 1.0
    assert model_fingerprint(tiny_lm) != expected


def test_tied_and_untied_models_differ(tiny_lm, tiny_lm_untied):
    assert model_fingerprint(tiny_lm) != model_fingerprint(tiny_lm_untied)


def test_fingerprint_is_fast():
    big = torch.randn(4_000_000)
    start = time.perf_counter()
    state_fingerprint([("big", big), ("big_bf16", big.to(torch.bfloat16))])
    assert time.perf_counter() - start < 5.0
