"""The decoder over packed prefix trees, with attention computed only where the tree allows it.

A pack of ``S`` nodes (:mod:`mthlib.grpo.prefix_tree`) is one sequence with a 4-D mask of
the ancestor relation. Attention kernels given such a mask still compute all ``S**2``
scores: for a quickstart group (a 77-token prompt and 8 completions of 48, ``S = 461``)
that is ~4x the ~50k scores the tree needs. On a 2-core CPU, ``sdpa``'s flash kernel took
~38 ms per layer (forward, then forward and backward, as under activation checkpointing),
1.1 s of a 4.6 s training step on that batch; the blocks below take ~20 ms
(``bench/step_parts.py``).

:func:`tree_hidden_states` runs the decoder's modules itself, as the model's forward does
(:func:`~mthlib.grpo.decode_step.layer_forward`: norms, projections, ``apply_rotary_pos_emb``,
MLP, in the same order), and replaces the attention by :func:`block_attention`: the nodes
are cut into blocks of consecutive nodes, and each block's queries meet only the keys some
node of the block may attend to (its ancestors: the prompt and the block's own branch,
:func:`tree_blocks`), in fp32 under the tree's mask. The values equal the masked forward's up to floating-point rounding
(``tests/grpo/test_tree_attention.py``). Activation checkpointing follows the layers'
own setting.

Only decoders written exactly this way qualify (:func:`supports_tree_attention`); every other
model runs its own forward with the 4-D mask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from mthlib.grpo.decode_step import layer_forward, supports_decode_step
from mthlib.grpo.prefix_tree import PrefixTrees

BLOCK_SIZES = (32, 48, 64)
"""Candidate queries per block; :func:`tree_blocks` takes the one with the fewest scores to compute.
Below 32 queries the blocks' batched products run far from this CPU's peak (``bench/step_parts.py``)."""


@dataclass
class TreeBlocks:
    """Blocks of consecutive nodes of each pack and the keys each block's queries may meet.

    Attributes:
        size: Queries per block (the last block of a pack is padded past its ``S`` nodes).
        keys: ``(P, B, K)`` node index (within its pack) of each key slot of each block, ascending;
            slots past a block's keys repeat node 0 and are never allowed.
        allowed: ``(P, B, size, K)`` bool, True where the block's query may attend the key slot.
            A padding query attends to slot 0 only, so no row is empty.
    """

    size: int
    keys: torch.Tensor
    allowed: torch.Tensor

    @property
    def scores(self) -> int:
        """Attention scores per head that the blocks compute."""
        return self.allowed.numel()


def tree_blocks(attention_mask: torch.Tensor, sizes: tuple[int, ...] = BLOCK_SIZES) -> TreeBlocks:
    """Cut the packs of a ``(P, 1, S, S)`` bool ancestor mask into blocks, at the size with the fewest scores.

    A block's key set is the union of what its nodes may attend; smaller blocks have
    smaller unions but more of them, so each size in ``sizes`` is tried.
    """
    mask = attention_mask[:, 0]
    best = None
    for size in sizes:
        blocks = _blocks_of(mask, size)
        if best is None or blocks.scores <= best.scores:  # ties: the larger blocks, fewer of them
            best = blocks
    return best


def _blocks_of(mask: torch.Tensor, size: int) -> TreeBlocks:
    packs, width = mask.shape[0], mask.shape[1]
    count = -(-width // size)
    rows = torch.zeros(packs, count * size, width, dtype=torch.bool, device=mask.device)
    rows[:, :width] = mask
    rows = rows.view(packs, count, size, width)
    union = rows.any(dim=2)  # (P, B, S)
    counts = union.sum(dim=-1, keepdim=True)  # keys of each block
    num_keys = max(int(counts.max()), 1)
    keys = torch.argsort((~union).to(torch.int8), dim=-1, stable=True)[..., :num_keys]  # the union's nodes first
    valid = torch.arange(num_keys, device=mask.device) < counts
    keys = keys.masked_fill(~valid, 0)
    allowed = rows.gather(-1, keys[:, :, None, :].expand(-1, -1, size, -1)) & valid[:, :, None, :]
    padding = torch.arange(count * size, device=mask.device).view(count, size) >= width
    allowed[:, padding, 0] = True
    return TreeBlocks(size, keys, allowed)


def block_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: TreeBlocks, scaling: float,
) -> torch.Tensor:
    """Attention of every node over the keys its block may meet, under the tree's mask, in fp32.

    Args:
        query: ``(P, S, H, D)`` queries (after rotary embedding).
        key: ``(P, S, KV, D)`` keys; ``H`` must be a multiple of ``KV`` (grouped-query attention:
            query head ``h`` reads key head ``h // (H // KV)``, as ``repeat_kv`` arranges).
        value: ``(P, S, KV, D)`` values.
        blocks: :func:`tree_blocks` of the packs' mask.
        scaling: Factor on the query-key products.

    Returns:
        ``(P, S, H * D)`` in the query's dtype, heads concatenated as the model's ``o_proj`` expects.
    """
    packs, width, heads, dim = query.shape
    kv_heads, dtype = key.shape[2], query.dtype
    group, count, size, num_keys = heads // kv_heads, blocks.keys.shape[1], blocks.size, blocks.keys.shape[2]
    query = torch.nn.functional.pad(query, (0, 0, 0, 0, 0, count * size - width))
    query = query.view(packs, count, size, kv_heads, group, dim).permute(0, 1, 3, 4, 2, 5)
    # rows of (P * KV * S, D) keys: pack p, head j, node n at (p * KV + j) * S + n
    rows = (torch.arange(packs * kv_heads, device=key.device).view(packs, 1, kv_heads, 1) * width
            + blocks.keys[:, :, None, :]).view(-1)
    with torch.autocast(query.device.type, enabled=False):
        key, value = (x.float().transpose(1, 2).reshape(-1, dim).index_select(0, rows) for x in (key, value))
        shape = (packs, count, kv_heads, num_keys, dim)
        query = query.float().reshape(packs, count, kv_heads, group * size, dim) * scaling  # fewer entries than scores
        scores = torch.matmul(query, key.view(shape).transpose(-1, -2))
        scores = scores.view(packs, count, kv_heads, group, size, num_keys)
        scores.masked_fill_(~blocks.allowed[:, :, None, None], float("-inf"))  # in place: the product keeps no output
        probs = scores.softmax(dim=-1).view(packs, count, kv_heads, group * size, num_keys)
        out = torch.matmul(probs, value.view(shape))  # (P, B, KV, G * size, D)
    out = out.view(packs, count, kv_heads, group, size, dim).permute(0, 1, 4, 2, 3, 5)
    return out.reshape(packs, count * size, heads * dim)[:, :width].to(dtype)


def supports_tree_attention(model: PreTrainedModel) -> bool:
    """Whether :func:`tree_hidden_states` computes ``model``'s forward: the decoders of
    :func:`~mthlib.grpo.decode_step.supports_decode_step`, without attention dropout."""
    return supports_decode_step(model) and not getattr(model.config, "attention_dropout", 0.0)


def tree_hidden_states(model: PreTrainedModel, trees: PrefixTrees) -> torch.Tensor:
    """The decoder's final (normed) hidden states ``(P, S, hidden)`` of the packs of ``trees``.

    ``model`` must satisfy :func:`supports_tree_attention`. A layer with activation
    checkpointing enabled is recomputed in backward, as the model's forward would do.
    """
    decoder = model.base_model
    blocks = tree_blocks(trees.attention_mask)
    hidden = decoder.embed_tokens(trees.input_ids)
    cos, sin = decoder.rotary_emb(hidden, position_ids=trees.position_ids)
    for layer in decoder.layers:
        attend = functools.partial(block_attention, blocks=blocks, scaling=layer.self_attn.scaling)
        if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            hidden = checkpoint(layer_forward, layer, hidden, cos, sin, attend, use_reentrant=False)
        else:
            hidden = layer_forward(layer, hidden, cos, sin, attend)
    return decoder.norm(hidden)
