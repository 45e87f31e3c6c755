"""`random` reproduces the blog's NumPy selection and behaves like independent uniform draws."""

import math

import numpy as np
import pytest
import torch

from mthlib.masking import Masks, build_mask
from mthlib.registry.random import RandomMask
from tests.conftest import make_tiny_lm


def blog_masks(model, seed, keep_ratio):
    """The blog's code (seed 000), verbatim apart from the bookkeeping of ``active``."""
    rng = np.random.default_rng(seed=seed)
    mask_dict = {}
    for name, param in model.state_dict().items():
        if param is None:
            mask_dict[name] = None
            continue

        temp_tensor = torch.zeros_like(param, dtype=torch.bool)
        num_to_generate = int(param.numel() * keep_ratio)
        indices = rng.choice(param.numel(), size=num_to_generate, replace=False)
        temp_tensor.view(-1)[indices] = True
        mask_dict[name] = temp_tensor
    return mask_dict


@pytest.mark.parametrize("seed", [0, 2001, 42])
def test_random_equals_the_blogs_numpy_selection(tiny_lm_untied, seed):
    expected = blog_masks(tiny_lm_untied, seed, 0.01)
    masks = RandomMask(sparsity=0.99, seed=seed, include_norms=True, include_biases=True).compute(tiny_lm_untied, None)
    assert list(masks.names) == list(expected)  # every state_dict entry of this model is eligible
    for name in masks.names:
        assert torch.equal(masks.to_dense(name), expected[name]), name
        assert masks.count(name) == int(expected[name].numel() * 0.01)


def test_filters_do_not_change_the_draw_of_the_tensors_they_keep(tiny_lm_untied):
    everything = RandomMask(sparsity=0.9, seed=3, include_norms=True).compute(tiny_lm_untied, None)
    only_q = RandomMask(sparsity=0.9, seed=3, include=["*q_proj*"]).compute(tiny_lm_untied, None)
    assert list(only_q.names) == [n for n in everything.names if "q_proj" in n]
    for name in only_q.names:
        assert torch.equal(only_q[name], everything[name])


def test_tied_embeddings_take_the_first_names_draw_and_count_once(tiny_lm):
    masks = RandomMask(sparsity=0.5, seed=1).compute(tiny_lm, None)
    blog = blog_masks(tiny_lm, 1, 0.5)
    assert "lm_head.weight" in blog and "lm_head.weight" not in masks.names
    assert torch.equal(masks.to_dense("model.embed_tokens.weight"), blog["model.embed_tokens.weight"])
    assert masks.count("model.embed_tokens.weight") == 64 * 32 // 2
    assert masks.numel == sum(p.numel() for p in tiny_lm.parameters() if p.dim() == 2)


def test_allocation_is_per_tensor_only():
    with pytest.raises(ValueError, match="allocation must be 'per_tensor'"):
        RandomMask(allocation="global")
    assert RandomMask().allocation == "per_tensor"
    assert isinstance(build_mask("random"), RandomMask)


def test_exclude_mask_entries_are_never_drawn(tiny_lm_untied, tmp_path):
    head = "lm_head.weight"  # the last state_dict entry: every earlier draw stays the blog's
    blocked = torch.arange(0, 64 * 32, 2)
    Masks({head: blocked}, {head: (64, 32)}).save(tmp_path / "first.safetensors")
    strategy = RandomMask(sparsity=0.9, seed=0, exclude_mask=str(tmp_path / "first.safetensors"))
    masks = strategy.compute(tiny_lm_untied, None)
    plain = RandomMask(sparsity=0.9, seed=0).compute(tiny_lm_untied, None)
    assert masks.count(head) == int(64 * 32 * 0.1)
    assert not torch.isin(masks[head], blocked).any()
    assert all(torch.equal(masks[n], plain[n]) for n in masks.names if n != head)
    Masks({head: torch.arange(2040)}, {head: (64, 32)}).save(tmp_path / "full.safetensors")
    with pytest.raises(ValueError, match="only 8 are not in exclude_mask"):
        RandomMask(sparsity=0.9, exclude_mask=str(tmp_path / "full.safetensors")).compute(tiny_lm_untied, None)


def test_two_independent_99_percent_masks_overlap_like_chance():
    model = make_tiny_lm(tie=False, vocab_size=1024, hidden=256)
    a = RandomMask(sparsity=0.99, seed=0).compute(model, None)
    b = RandomMask(sparsity=0.99, seed=1).compute(model, None)
    overlap = a.overlap(b)
    # Per tensor the intersection of two uniform k-subsets of n is hypergeometric: mean k^2/n, variance <= mean.
    mean = sum(a.count(n) ** 2 / math.prod(a.shape(n)) for n in a.names)
    assert a.total == b.total > 15_000 and mean > 150
    assert abs(overlap["intersection"] - mean) < 5 * math.sqrt(mean)
    jaccard = mean / (2 * a.total - mean)
    assert abs(jaccard - 0.005) < 1e-4
    assert abs(overlap["jaccard"] - jaccard) < 5 * math.sqrt(mean) / (2 * a.total - mean - 5 * math.sqrt(mean))
    assert abs(overlap["jaccard"] - overlap["jaccard_random"]) < 0.001
