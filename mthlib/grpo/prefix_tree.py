"""Shared prefixes computed once: the rows of a batch packed into prefix trees.

GRPO samples ``G`` completions of every prompt, so a rollout's rows repeat each prompt
``G`` times (and rows of different prompts often share a system prompt and instructions).
A causal decoder's state at a position depends only on the tokens up to it, so a prefix
that several rows share has the same hidden states in each of them. Packing the rows into
a prefix tree, one node per distinct prefix, and letting every node attend to its
ancestors computes each shared prefix once: a sampled quickstart batch (2 prompts of ~80
tokens, 16 completions of up to 48) is ~350 nodes instead of 16 padded rows of ~125.

The forward pass sees ordinary sequences (one per pack): node tokens, their positions in
their rows, and a 4-D attention mask of the ancestor relation. Rows are read back by
gathering each row's path of nodes from the packed hidden states.

A pack of ``S`` nodes computes ``S`` tokens and ``S**2`` attention scores (the mask
saves no work in the attention kernels; :mod:`mthlib.grpo.tree_attention` computes fewer
for the decoders it supports), so one large pack is not always cheapest: rows
are split into consecutive packs that minimise ``S + S**2 / scores_per_token`` summed
over packs, where ``scores_per_token`` is how many attention scores cost the FLOPs of one
token's matrix products (~3k for SmolLM2-135M). With long completions each prompt's G
rows get a pack of their own; with short ones, prompts that share a system prompt share one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefixTrees:
    """Rows of a right-padded batch packed into prefix trees, ready for a decoder's forward pass.

    Attributes:
        input_ids: ``(P, S)`` the tokens of the nodes of each pack (padded with the row padding's token).
        position_ids: ``(P, S)`` each node's position in its rows (its depth).
        attention_mask: ``(P, 1, S, S)`` bool, True where a node may attend: its ancestors and itself.
            Padding nodes attend to themselves only, so no attention row is empty.
        node_of: ``(N, T)`` index of each row position's node in the flattened ``(P * S)`` packs;
            ``-1`` on the rows' padding.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    node_of: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Nodes in all packs (tokens the decoder computes, padding of packs excluded)."""
        return int(self.node_of[self.node_of >= 0].unique().numel())

    def gather(self, packed: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        """Values at the row positions under ``wanted`` ``(N, T)``, read from ``packed`` ``(P, S, ...)``.

        The same as indexing the unpacked ``(N, T, ...)`` tensor with ``wanted``.
        """
        flat = packed.reshape(-1, *packed.shape[2:])
        return flat[self.node_of[wanted]]


@dataclass
class _Tree:
    """One pack being built: its nodes and the rows in it."""

    children: dict[tuple[int, int], int]  # (parent node, token) -> node
    tokens: list[int]
    depths: list[int]
    rows: list[int]
    paths: list[list[int]]

    def add(self, i: int, row: list[int]) -> None:
        """Put row ``i`` in: new nodes for the tokens past its longest prefix already here."""
        parent, path = -1, []
        for depth, token in enumerate(row):
            node = self.children.get((parent, token))
            if node is None:
                node = self.children[(parent, token)] = len(self.tokens)
                self.tokens.append(token)
                self.depths.append(depth)
            path.append(node)
            parent = node
        self.rows.append(i)
        self.paths.append(path)


def scores_per_token(model: torch.nn.Module) -> float:
    """Attention scores whose FLOPs equal one token's matrix products in a decoder layer, for ``model``.

    A token costs ``2 * P`` FLOPs for the ``P`` weights of a layer; a score (its query-key
    product and its share of the value product) ``4 * heads * head_dim``.
    """
    config = model.config
    embeddings = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    weights = [p for p in model.parameters() if not any(p is e for e in embeddings)]
    layer_weights = sum(p.numel() for p in weights) / config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * layer_weights / (4 * heads * head_dim)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _split_into_packs(rows: list[list[int]], scores_per_token: float) -> list[range]:
    """Consecutive runs of rows whose packs minimise the summed ``S + S**2 / scores_per_token``.

    ``S`` of a run is estimated as its rows' tokens less each row's common prefix with the
    row before it (exact when rows that share a prefix are next to each other).
    """
    new = [len(rows[0])] + [len(b) - _common_prefix(a, b) for a, b in zip(rows, rows[1:])]
    best = [0.0] + [float("inf")] * len(rows)  # best[j]: cheapest packing of rows[:j]
    cut = [0] * (len(rows) + 1)
    for j in range(1, len(rows) + 1):
        size = 0
        for i in range(j - 1, -1, -1):  # the last pack holds rows i..j-1
            size = len(rows[i]) + (size - len(rows[i + 1]) + new[i + 1] if i + 1 < j else 0)
            cost = best[i] + size + size * size / scores_per_token
            if cost <= best[j]:  # ties: the larger pack, which may share more than estimated
                best[j], cut[j] = cost, i
    packs, j = [], len(rows)
    while j > 0:
        packs.append(range(cut[j], j))
        j = cut[j]
    return packs[::-1]


def pack_prefix_trees(input_ids: torch.Tensor, attention_mask: torch.Tensor, scores_per_token: float) -> PrefixTrees:
    """Pack right-padded rows into prefix trees, consecutive rows per tree, at the lowest estimated cost.

    Args:
        input_ids: ``(N, T)`` right-padded token ids.
        attention_mask: ``(N, T)`` 1 on real tokens (a prefix of each row).
        scores_per_token: Attention scores that cost one token (:func:`scores_per_token`);
            larger values favour fewer, larger packs.

    Returns:
        The packs; the rows' paths through them in :attr:`PrefixTrees.node_of`.
    """
    if not scores_per_token > 0:
        raise ValueError(f"scores_per_token must be > 0 (attention scores that cost one token); got {scores_per_token}")
    lengths = attention_mask.sum(dim=1).tolist()
    rows = [ids[:n] for ids, n in zip(input_ids.tolist(), lengths)]
    trees = []
    for pack in _split_into_packs(rows, scores_per_token):
        tree = _Tree({}, [], [], [], [])
        for i in pack:
            tree.add(i, rows[i])
        trees.append(tree)
    width = max(max(len(tree.tokens) for tree in trees), 1)
    num_packs, device = len(trees), input_ids.device
    pad = int(input_ids[attention_mask == 0][0]) if (attention_mask == 0).any() else 0
    packed_ids = torch.full((num_packs, width), pad, dtype=input_ids.dtype)
    positions = torch.zeros((num_packs, width), dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).repeat(num_packs, 1, 1)
    node_of = torch.full(input_ids.shape, -1, dtype=torch.long)
    for p, tree in enumerate(trees):
        packed_ids[p, : len(tree.tokens)] = torch.tensor(tree.tokens, dtype=input_ids.dtype)
        positions[p, : len(tree.depths)] = torch.tensor(tree.depths, dtype=torch.long)
        for i, path in zip(tree.rows, tree.paths):
            if not path:
                continue
            nodes = torch.tensor(path)
            node_of[i, : len(path)] = p * width + nodes
            ancestor = torch.ones(len(path), len(path), dtype=torch.bool).tril()
            mask[p][nodes.unsqueeze(1), nodes.unsqueeze(0)] |= ancestor
    return PrefixTrees(packed_ids.to(device), positions.to(device), mask.unsqueeze(1).to(device), node_of.to(device))
