"""Group parameters by transformer layer and by type (q, k, v, o, gate, up, down, ...), from their names."""

from __future__ import annotations

import re

KINDS = ("q", "k", "v", "o", "gate", "up", "down", "embeddings", "norms", "biases", "lm_head", "other")
"""Parameter types, in the order reports list them."""

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_MODULE_KINDS = {
    "q_proj": "q", "query": "q", "wq": "q",
    "k_proj": "k", "key": "k", "wk": "k",
    "v_proj": "v", "value": "v", "wv": "v",
    "o_proj": "o", "out_proj": "o", "wo": "o",
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up", "c_fc": "up",
    "down_proj": "down", "w2": "down",
}


def parameter_kind(name: str) -> str:
    """Type of a parameter, one of :data:`KINDS` (e.g. ``model.layers.3.self_attn.q_proj.weight`` → ``"q"``).

    Layer norms (any module whose name contains ``norm`` or starts with ``ln``) are
    ``"norms"``, weight and bias alike; other biases are ``"biases"``.
    """
    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 else parts[0]
    if any("norm" in part.lower() for part in parts[:-1]) or module.startswith("ln"):
        return "norms"
    if parts[-1] == "bias":
        return "biases"
    if "lm_head" in parts or module in ("embed_out", "output"):
        return "lm_head"
    if any("embed" in part for part in parts) or module in ("wte", "wpe"):
        return "embeddings"
    return _MODULE_KINDS.get(module, "other")


def parameter_layer(name: str) -> str:
    """Transformer layer of a parameter (``"0"``, ``"1"``, ...); outside the layers ``"embed"``, ``"head"`` or ``"other"``."""
    match = _LAYER.search(name)
    if match:
        return str(int(match.group(1)))
    kind = parameter_kind(name)
    if kind == "embeddings":
        return "embed"
    if kind == "lm_head":
        return "head"
    return "other"


def layer_order(layers: set[str] | list[str]) -> list[str]:
    """Layers in report order: ``embed``, the numbered layers ascending, ``head``, ``other``."""
    numbered = sorted((layer for layer in layers if layer.isdigit()), key=int)
    return [g for g in ("embed",) if g in layers] + numbered + [g for g in ("head", "other") if g in layers]


def kind_order(kinds: set[str] | list[str]) -> list[str]:
    """Types in the order of :data:`KINDS`."""
    return [kind for kind in KINDS if kind in kinds]
