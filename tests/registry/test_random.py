"""`random` reproduces the blog's numpy selection and behaves like independent uniform draws."""

import numpy as np
import pytest
import torch

from mthlib.masking import build_mask
from tests.conftest import make_tiny_lm


def blog_masks(model, seed, keep_ratio):
    """The blog's code (seed 000), verbatim in substance."""
    rng = np.random.default_rng(seed=seed)
    mask_dict = {}
    for name, param in model.state_dict().items():
        temp_tensor = torch.zeros_like(param, dtype=torch.bool)
        num_to_generate = int(param.numel() * keep_ratio)
        indices = rng.choice(param.numel(), size=num_to_generate, replace=False)
        temp_tensor.view(-1)[indices] = True
        mask_dict[name] = temp_tensor
    return mask_dict


@pytest.mark.parametrize("seed", [0, 2001, 42])
def test_random_equals_the_blogs_numpy_selection(seed):
    model = make_tiny_lm(tie=False)
    expected = blog_masks(model, seed, 0.01)
    masks = build_mask("random", sparsity=0.99, seed=seed, include_norms=True, include_biases=True).compute(model, None)
    assert set(masks.names) == set(expected)
    for name in masks.names:
        assert torch.equal(masks.to_dense(name), expected[name]), name


def test_filters_do_not_change_the_draw_of_the_tensors_they_keep():
    model = make_tiny_lm(tie=False)
    everything = build_mask("random", sparsity=0.9, seed=3, include_norms=True).compute(model, None)
    only_q = build_mask("random", sparsity=0.9, seed=3, include=["*q_proj*"]).compute(model, None)
    assert set(only_q.names) == {n for n in everything.names if "q_proj" in n}
    for name in only_q.names:
        assert torch.equal(only_q[name], everything[name])


def test_tied_embeddings_are_counted_once_with_the_first_names_draw():
    model = make_tiny_lm(tie=True)
    masks = build_mask("random", sparsity=0.5, seed=1).compute(model, None)
    assert "lm_head.weight" not in masks.names and "model.embed_tokens.weight" in masks.names
    assert masks.count("model.embed_tokens.weight") == int(64 * 32 * 0.5)


def test_two_independent_random_masks_overlap_like_chance():
    model = make_tiny_lm(tie=False, vocab_size=4096, hidden=64)
    a = build_mask("random", sparsity=0.99, seed=0).compute(model, None)
    b = build_mask("random", sparsity=0.99, seed=1).compute(model, None)
    overlap = a.overlap(b)
    density = 0.01
    expected = density * density / (2 * density - density * density)  # ~0.005
    sd = (a.total * density) ** 0.5 / a.total  # binomial sd of the intersection, relative to |A|
    assert abs(overlap["jaccard"] - expected) < 5 * sd
    assert abs(overlap["o1"] - density) < 5 * sd
