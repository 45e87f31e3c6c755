"""Prefix trees: rows packed so shared prefixes run once, giving the log-probs and gradients of unpacked rows."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from mthlib.grpo.padding import attention_rows, pad_rows
from mthlib.grpo.prefix_tree import pack_prefix_trees, scores_per_token
from mthlib.grpo.rollout import token_logprobs
from tests.conftest import attached, make_tiny_lm
from tests.masking.test_optim import random_masks

PAD = 0


def group_rows(prompts: list[list[int]], generations: int, seed: int = 0) -> list[list[int]]:
    """``generations`` rows per prompt: the prompt, then random completions of 3-8 tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for prompt in prompts:
        for _ in range(generations):
            n = int(torch.randint(3, 9, (), generator=gen))
            rows.append(prompt + torch.randint(3, 60, (n,), generator=gen).tolist())
    return rows


def batch(rows: list[list[int]], prompt_lengths: list[int]):
    """Right-padded ids and attention, loss on every token after the row's prompt."""
    loss = [[0] * p + [1] * (len(r) - p) for r, p in zip(rows, prompt_lengths)]
    return pad_rows(rows, PAD), attention_rows(rows), pad_rows(loss, 0)


def test_every_row_is_a_path_of_nodes_with_its_tokens_positions_and_ancestors():
    rows = group_rows([[5, 6, 7, 8, 9], [5, 6, 10, 11]], generations=3) + [[5], []]
    ids, attention = pad_rows(rows, PAD), attention_rows(rows)
    trees = pack_prefix_trees(ids, attention, scores_per_token=1e9)
    flat_ids, flat_pos = trees.input_ids.reshape(-1), trees.position_ids.reshape(-1)
    width = trees.input_ids.shape[1]
    for i, row in enumerate(rows):
        path = trees.node_of[i, : len(row)]
        assert (trees.node_of[i, len(row):] == -1).all()
        assert flat_ids[path].tolist() == row
        assert flat_pos[path].tolist() == list(range(len(row)))
        for t in range(len(row)):  # a node attends to its ancestors and itself, nothing else
            pack, node = divmod(int(path[t]), width)
            allowed = trees.attention_mask[pack, 0, node].nonzero().squeeze(1)
            assert sorted(allowed.tolist()) == sorted((path[: t + 1] - pack * width).tolist())
    # one node per distinct prefix: the trie's size
    assert trees.num_tokens == len({tuple(r[:t + 1]) for r in rows for t in range(len(r))})
    # padding nodes attend to themselves only, so no attention row is empty
    assert trees.attention_mask.any(dim=-1).all()


def test_completions_of_one_prompt_share_a_pack_and_different_prompts_get_their_own():
    head = list(range(60, 80))  # 20 tokens both prompts start with (a system prompt)
    prompts = [head + list(range(10, 40)), head + list(range(30, 60))]
    rows = group_rows(prompts, generations=4, seed=1)
    ids, attention = pad_rows(rows, PAD), attention_rows(rows)
    completions = sum(len(r) - 50 for r in rows)
    trees = pack_prefix_trees(ids, attention, scores_per_token=100.0)
    assert trees.input_ids.shape[0] == 2
    packs = trees.node_of[:, 0] // trees.input_ids.shape[1]
    assert packs.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert trees.num_tokens <= 100 + completions  # each prompt once (completions may share first tokens too)
    # attention cheap against tokens: one pack, the common head once too
    cheap = pack_prefix_trees(ids, attention, scores_per_token=1e9)
    assert cheap.input_ids.shape[0] == 1 and cheap.num_tokens <= 80 + completions
    # rows with nothing in common never share a pack: it would cost the same tokens and more scores
    apart = pack_prefix_trees(ids[:, 20:], attention[:, 20:], scores_per_token=1e9)
    assert apart.input_ids.shape[0] == 2


def test_bad_cost_is_refused_in_one_line():
    ids, attention = pad_rows([[5, 6]], PAD), attention_rows([[5, 6]])
    with pytest.raises(ValueError, match="scores_per_token must be > 0"):
        pack_prefix_trees(ids, attention, scores_per_token=0.0)


def test_scores_per_token_counts_a_layers_weights_against_its_attention():
    model = make_tiny_lm(tie=False, hidden=32, layers=2)
    c = model.config
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) + model.model.norm.weight.numel() / 2
    assert scores_per_token(model) == pytest.approx(2 * layer / (4 * c.num_attention_heads * 8))


def qwen2_lm():
    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("kind", ["llama", "llama-eager", "qwen2", "masked"])
def test_packed_logprobs_and_gradients_equal_unpacked_rows(kind):
    model = qwen2_lm() if kind == "qwen2" else make_tiny_lm(tie=kind != "masked")
    if kind == "llama-eager":
        model.set_attn_implementation("eager")
    state = None
    if kind == "masked":  # active-entry layers: weight gradients at 20% of every matrix's entries
        state = attached(model, random_masks(model, density=0.2, seed=1))
    model.train()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 12, 13, 14]]
    rows = group_rows(prompts, generations=3, seed=2)
    # a second turn: a scripted span without loss, then sampled tokens again
    rows[1] = rows[1] + [20, 21, 22, 23]
    ids, attention, loss = batch(rows, [7, 7, 7, 5, 5, 5])
    loss[1, len(rows[1]) - 4: len(rows[1]) - 2] = 0
    results = []
    for packed in (False, True):
        model.zero_grad()
        logps, entropy = token_logprobs(model, ids, attention, loss, temperature=0.7, chunk_size=4,
                                        pack_prefixes=packed)
        (logps * torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if state is not None:
            grads = {n: values.clone() for n, values in state.gradients.buffers.items()}
            state.gradients.clear()
        results.append((logps.detach(), entropy, grads))
    (rows_logps, rows_entropy, rows_grads), (tree_logps, tree_entropy, tree_grads) = results
    assert (rows_logps[loss == 0] == 0).all() and (tree_logps[loss == 0] == 0).all()
    torch.testing.assert_close(tree_logps, rows_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tree_entropy, rows_entropy, rtol=1e-5, atol=1e-5)
    assert tree_grads.keys() == rows_grads.keys() and rows_grads
    for name in rows_grads:
        torch.testing.assert_close(tree_grads[name], rows_grads[name], rtol=1e-4, atol=1e-6)


def test_the_decoder_sees_the_packed_tokens():
    model = make_tiny_lm()
    rows = group_rows([list(range(10, 30))], generations=4)
    ids, attention, loss = batch(rows, [20] * 4)
    seen = []
    handle = model.model.embed_tokens.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    token_logprobs(model, ids, attention, loss, pack_prefixes=True)
    token_logprobs(model, ids, attention, loss, pack_prefixes=False)
    handle.remove()
    assert seen[1] == ids.shape
    assert seen[0][0] == 1 and seen[0][1] < 20 + sum(len(r) - 20 for r in rows) + 1
