"""One decode step of a Llama-family decoder, computed from its modules without the model's forward.

A CPU decode step of SmolLM2-135M at batch 16 is ~45 ms, of which the weight products are
~22 ms and attention ~7 ms. Another ~2.5 ms is the model forward's per-call machinery (mask
building, output recording and argument handling, at every layer), which one query token
per row does not need. :func:`decode_logits` runs the same modules and functions in the
same order (norms, projections, ``apply_rotary_pos_emb``, transformers' ``sdpa`` attention,
MLP) with the padding mask the forward would build (none when no row is padded), so its
logits are bitwise those of the forward
(``tests/grpo/test_decode_step.py``).

:func:`layer_forward` is that layer with its attention kernel supplied;
:mod:`mthlib.grpo.tree_attention` runs it with attention over prefix trees.

Only the architectures written exactly this way qualify (:func:`supports_decode_step`):
Llama and Qwen2 (q/k/v biases) decoders whose layers all use full attention through
``sdpa``. Every other model decodes through its own forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

_LAYERS = (LlamaDecoderLayer, Qwen2DecoderLayer)


def supports_decode_step(model: PreTrainedModel) -> bool:
    """Whether :func:`decode_logits` equals ``model``'s forward: Llama / Qwen2 layers, full ``sdpa`` attention."""
    config = model.config
    decoder = model.base_model
    layers = getattr(decoder, "layers", None)
    return (
        config._attn_implementation == "sdpa"
        and getattr(config, "pretraining_tp", 1) == 1
        and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ["full_attention"])
        and layers is not None and len(layers) == config.num_hidden_layers
        and all(type(layer) in _LAYERS for layer in layers)
        and all(hasattr(decoder, name) for name in ("embed_tokens", "rotary_emb", "norm"))
    )


def decode_logits(
    model: PreTrainedModel, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor, cache: Cache,
) -> torch.Tensor:
    """Next-token logits ``(B, V)`` after feeding one token per row, the KV cache extended by it.

    Args:
        model: A model for which :func:`supports_decode_step` holds.
        tokens: ``(B,)`` the token each row feeds.
        positions: ``(B,)`` its position id.
        attention_mask: ``(B, T)`` 1 at the cached tokens each row attends to, this one included.
        cache: The KV cache of the tokens before (``T - 1`` of them).
    """
    decoder = model.base_model
    hidden = decoder.embed_tokens(tokens[:, None])
    cos, sin = decoder.rotary_emb(hidden, position_ids=positions[:, None])
    # as the forward does: no mask when no row is padded (attention then takes another kernel path)
    mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
    for index, layer in enumerate(decoder.layers):
        attend = functools.partial(_cached_sdpa, layer.self_attn, cache, index, mask)
        hidden = layer_forward(layer, hidden, cos, sin, attend)
    return model.get_output_embeddings()(decoder.norm(hidden))[:, -1]


def layer_forward(
    layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """One Llama / Qwen2 decoder layer from its modules, in the forward's order, with the attention kernel supplied.

    ``attend(query, key, value)`` receives ``(B, S, heads, D)`` queries and ``(B, S, kv_heads, D)``
    keys and values, rotary embedding applied, and returns ``(B, S, heads * D)``: the decode
    step's cached ``sdpa`` here, :func:`~mthlib.grpo.tree_attention.block_attention` on prefix trees.
    """
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    heads = (*normed.shape[:-1], -1, attention.head_dim)
    query = attention.q_proj(normed).view(heads)
    key = attention.k_proj(normed).view(heads)
    value = attention.v_proj(normed).view(heads)
    query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=2)
    hidden = hidden + attention.o_proj(attend(query, key, value))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _cached_sdpa(
    attention: torch.nn.Module, cache: Cache, index: int, mask: torch.Tensor | None,
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
) -> torch.Tensor:
    """Layer ``index``'s attention of the new tokens over the cache extended by them, through transformers' ``sdpa``."""
    key, value = cache.update(key.transpose(1, 2), value.transpose(1, 2), index)
    attended, _ = sdpa_attention_forward(attention, query.transpose(1, 2), key, value, mask, dropout=0.0,
                                         scaling=attention.scaling)
    return attended.reshape(*query.shape[:2], -1).contiguous()
