"""The decoder over prefix trees with block attention gives the values and gradients of the masked forward."""

import pytest
import torch

from mthlib.grpo.prefix_tree import pack_prefix_trees
from mthlib.grpo.tree_attention import TreeBlocks, supports_tree_attention, tree_blocks, tree_hidden_states
from mthlib.models import enable_activation_checkpointing
from tests.grpo.test_decode_step import tiny as decode_tiny
from tests.grpo.test_prefix_tree import batch, group_rows


def tiny(kind: str) -> torch.nn.Module:
    """The decode step's tiny models, the Qwen2 with 6 query heads on 2 key heads: groups of 3, so a
    head-to-group mix-up shows."""
    return decode_tiny(kind, qwen2_heads=6)


def trees_of(packs_per_prompt_cost: float = 1e9, seed: int = 0):
    """Two long prompts (one shared start) with 5 completions each, some of which share their first tokens."""
    prompts = [list(range(3, 40)), list(range(3, 20)) + list(range(40, 60))]
    rows = group_rows(prompts, generations=5, seed=seed)
    rows[1] = rows[0][:40] + [61, 62, 63]  # a completion branching off another's second token
    rows = [row + [7] * (i % 3) * 9 for i, row in enumerate(rows)]  # some long completions: blocks past one
    ids, attention, _ = batch(rows, [37] * 5 + [37] * 5)
    return pack_prefix_trees(ids, attention, packs_per_prompt_cost)


def masked_forward(model, trees) -> torch.Tensor:
    return model.base_model(input_ids=trees.input_ids, attention_mask=trees.attention_mask,
                            position_ids=trees.position_ids, use_cache=False).last_hidden_state


@pytest.mark.parametrize("size", [4, 16, 32, 64])
@pytest.mark.parametrize("cost", [1e9, 50.0], ids=["one-pack", "packs"])
def test_blocks_allow_exactly_what_the_tree_mask_allows(size, cost):
    trees = trees_of(cost)
    mask = trees.attention_mask[:, 0]
    packs, width = mask.shape[:2]
    blocks = tree_blocks(trees.attention_mask, sizes=(size,))
    assert isinstance(blocks, TreeBlocks) and blocks.size == size
    count = blocks.keys.shape[1]
    assert count == -(-width // size)
    rebuilt = torch.zeros(packs, count * size, width, dtype=torch.int64)
    query = torch.arange(count * size).view(count, size)
    for p in range(packs):
        for b in range(count):
            rows, cols = blocks.allowed[p, b].nonzero(as_tuple=True)
            rebuilt[p].index_put_((query[b][rows], blocks.keys[p, b][cols]), torch.ones_like(rows), accumulate=True)
    assert torch.equal(rebuilt[:, :width], mask.long())  # every allowed pair once, nothing else
    padding = blocks.allowed.view(packs, count * size, -1)[:, width:]  # queries past the pack: key slot 0 only
    assert bool(padding[..., 0].all()) and int(padding.sum()) == packs * (count * size - width)
    assert bool((blocks.keys.diff(dim=-1)[blocks.allowed.any(dim=2)[..., 1:]] > 0).all())  # ascending keys
    assert blocks.scores == blocks.allowed.numel() < packs * width * width or size >= width


def test_the_block_size_with_the_fewest_scores_is_taken_ties_to_the_larger():
    trees = trees_of()
    candidates = {size: tree_blocks(trees.attention_mask, sizes=(size,)).scores for size in (4, 8, 16, 32, 64)}
    chosen = tree_blocks(trees.attention_mask, sizes=tuple(candidates))
    fewest = min(candidates.values())
    assert chosen.size == max(size for size, scores in candidates.items() if scores == fewest)
    assert chosen.scores == fewest < candidates[64]
    causal = torch.ones(1, 1, 16, 16, dtype=torch.bool).tril()  # 2 x 8 x 16 scores or 1 x 16 x 16: a tie
    assert tree_blocks(causal, sizes=(8, 16)).size == 16
    two_chains = causal & torch.block_diag(torch.ones(8, 8), torch.ones(8, 8)).bool()  # 2 x 8 x 8 against 16 x 16
    assert tree_blocks(two_chains, sizes=(8, 16)).size == 8


@pytest.mark.parametrize("kind", ["llama", "untied", "qwen2"])
@pytest.mark.parametrize("cost", [1e9, 50.0], ids=["one-pack", "packs"])
def test_hidden_states_and_gradients_equal_the_masked_forward(kind, cost):
    model = tiny(kind).train()
    trees = trees_of(cost)
    assert supports_tree_attention(model)
    weights = torch.randn(*trees.input_ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    results = []
    for forward in (masked_forward, tree_hidden_states):
        model.zero_grad()
        hidden = forward(model, trees)
        (hidden * weights).sum().backward()
        results.append((hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (theirs, their_grads), (ours, our_grads) = results
    assert ours.shape == theirs.shape and our_grads.keys() == their_grads.keys()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for name, grad in their_grads.items():  # sums over ~300 positions in another order: 1e-4 of the largest entry
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()))


def test_bf16_under_autocast_stays_within_bf16_rounding_of_the_fp32_forward():
    model = tiny("llama")
    trees = trees_of()
    with torch.no_grad():
        reference = masked_forward(model, trees)
        model.bfloat16()
        with torch.autocast("cpu", torch.bfloat16):
            ours = tree_hidden_states(model, trees)
            theirs = masked_forward(model, trees)
    assert ours.dtype == torch.bfloat16
    ours_error = (ours.float() - reference).abs().mean()
    assert ours_error <= 1.5 * (theirs.float() - reference).abs().mean() + 1e-3
    torch.testing.assert_close(ours.float(), reference, rtol=0.05, atol=0.05)


def test_checkpointed_layers_are_recomputed_in_backward_with_the_same_gradients():
    results = []
    for checkpointed in (False, True):
        model = tiny("llama").train()
        if checkpointed:
            enable_activation_checkpointing(model)
        calls = []
        for layer in model.model.layers:  # the first module a layer runs (a recompute may stop early)
            layer.input_layernorm.register_forward_pre_hook(lambda module, args: calls.append(1))
        hidden = tree_hidden_states(model, trees_of())
        forward_calls = len(calls)
        hidden.square().sum().backward()
        results.append((forward_calls, len(calls), {n: p.grad for n, p in model.named_parameters()}))
    (plain_forward, plain_total, plain_grads), (ckpt_forward, ckpt_total, ckpt_grads) = results
    assert plain_forward == plain_total == ckpt_forward == 3 and ckpt_total == 6  # each layer once more in backward
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad)


def test_models_with_attention_dropout_or_other_attention_are_not_supported():
    eager = tiny("llama")
    eager.config._attn_implementation = "eager"
    assert not supports_tree_attention(eager)
    dropout = tiny("llama")
    dropout.config.attention_dropout = 0.1
    assert not supports_tree_attention(dropout)
