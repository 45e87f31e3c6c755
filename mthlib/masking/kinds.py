"""What kind of parameter each one is (matrix, embedding, norm, bias), the basis of a strategy's eligibility.

Parameters are named as :meth:`~torch.nn.Module.named_parameters` names them: a tied
parameter (embeddings shared with the LM head) appears once, under its first name, and
every alias of it (``lm_head.weight``) is resolved to that name.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from mthlib.fingerprint import canonical_names

ParameterKind = Literal["matrix", "embedding", "norm", "bias", "other"]


def parameter_kinds(model: nn.Module) -> dict[str, ParameterKind]:
    """Classify each parameter of ``model`` (tied ones once, under their first name).

    ``embedding``: the weight of an :class:`~torch.nn.Embedding` or of the model's output
    embeddings (``get_output_embeddings()``, the LM head); ``matrix``: any other parameter
    with two or more dimensions; ``norm``: a 1-D parameter whose name contains ``norm`` or
    whose module's class name does (``LayerNorm``, ``RMSNorm``), biases of norms included;
    ``bias``: another 1-D parameter named ``*bias``; ``other``: the rest.
    """
    canonical = canonical_names(model)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings: set[str] = set()
    owners: dict[str, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, nn.Embedding) or (output is not None and module is output):
            if f"{prefix}weight" in canonical:
                embeddings.add(canonical[f"{prefix}weight"])
        for param_name, _ in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(canonical[f"{prefix}{param_name}"], type(module).__name__)
    kinds: dict[str, ParameterKind] = {}
    for name, param in model.named_parameters():
        if name in embeddings:
            kinds[name] = "embedding"
        elif param.dim() >= 2:
            kinds[name] = "matrix"
        elif "norm" in name.lower() or "norm" in owners.get(name, "").lower():
            kinds[name] = "norm"
        elif name.rsplit(".", 1)[-1] == "bias":
            kinds[name] = "bias"
        else:
            kinds[name] = "other"
    return kinds
