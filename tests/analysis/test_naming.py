"""Parameter names map to layers and types the way the paper's per-layer and per-type tables group them."""

from __future__ import annotations

import pytest

from mthlib.analysis.naming import layer_order, parameter_kind, parameter_layer


@pytest.mark.parametrize(
    ("name", "layer", "kind"),
    [
        ("model.layers.3.self_attn.q_proj.weight", "3", "q"),
        ("model.layers.3.self_attn.k_proj.bias", "3", "biases"),
        ("model.layers.12.self_attn.v_proj.weight", "12", "v"),
        ("model.layers.0.self_attn.o_proj.weight", "0", "o"),
        ("model.layers.0.mlp.gate_proj.weight", "0", "gate"),
        ("model.layers.0.mlp.up_proj.weight", "0", "up"),
        ("model.layers.0.mlp.down_proj.weight", "0", "down"),
        ("model.layers.0.input_layernorm.weight", "0", "norms"),
        ("model.layers.0.self_attn.q_norm.weight", "0", "norms"),
        ("transformer.h.5.ln_1.bias", "5", "norms"),
        ("model.embed_tokens.weight", "embed", "embeddings"),
        ("transformer.wte.weight", "embed", "embeddings"),
        ("lm_head.weight", "head", "lm_head"),
        ("model.norm.weight", "other", "norms"),
        ("model.layers.1.mlp.experts.gate", "1", "other"),
    ],
)
def test_layer_and_kind(name, layer, kind):
    assert (parameter_layer(name), parameter_kind(name)) == (layer, kind)


def test_layer_order():
    assert layer_order({"other", "10", "2", "head", "embed"}) == ["embed", "2", "10", "head", "other"]
