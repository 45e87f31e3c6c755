"""Content fingerprints of weights: which base model a sparse delta belongs to.

A fingerprint is the first :data:`FINGERPRINT_CHARS` hex characters (128 bits) of a
SHA-256 over, for each tensor in turn, its name, dtype, shape and raw little-endian
bytes. Two rules make it identify the *values* of a base rather than how they
happen to be held in memory:

* 16-bit floats (``bfloat16``, ``float16``) are hashed as their exact ``float32``
  upcast, so a checkpoint stored in bf16 and the same checkpoint loaded in fp32
  have one fingerprint. (Applying a delta still requires equal dtypes; that is
  checked separately by :func:`~mthlib.deltas.apply_delta`.)
* :func:`model_fingerprint` hashes parameters sorted by name, so the order in which
  modules were registered, or in which a safetensors file lists its keys, does not
  matter. Tied parameters are counted once, under their first name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import torch
from torch import Tensor, nn

FINGERPRINT_CHARS = 32
"""Hex characters kept from the SHA-256 digest (128 bits)."""

CACHE_ATTR = "_mth_base_fingerprint"
"""Attribute on a model that caches :func:`model_fingerprint` of its untouched base."""

_UPCAST = {torch.bfloat16: torch.float32, torch.float16: torch.float32}


def canonical(tensor: Tensor) -> Tensor:
    """The tensor as it is hashed: detached, on the CPU, contiguous, 16-bit floats upcast to fp32."""
    tensor = tensor.detach()
    if tensor.dtype in _UPCAST:
        tensor = tensor.to(_UPCAST[tensor.dtype])
    return tensor.cpu().contiguous()


def state_fingerprint(named_tensors: Iterable[tuple[str, Tensor]]) -> str:
    """Fingerprint of named tensors, hashed in the order given.

    Each tensor contributes a length-prefixed JSON header ``[name, dtype, shape]``
    and its length-prefixed raw bytes, so no two different sequences of tensors
    share a byte stream. Tensors are hashed one at a time: memory stays at one
    tensor's copy at most.

    Args:
        named_tensors: ``(name, tensor)`` pairs; callers that want an
            order-independent fingerprint sort them by name first.

    Returns:
        The first :data:`FINGERPRINT_CHARS` hex characters of the SHA-256 digest.
    """
    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        tensor = canonical(tensor)
        header = json.dumps([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]).encode()
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header)
        digest.update(raw.size.to_bytes(8, "little"))
        digest.update(memoryview(raw))
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def unique_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """``model.named_parameters()`` with tied parameters once (first name), sorted by name."""
    return sorted(model.named_parameters(remove_duplicate=True), key=lambda item: item[0])


def model_fingerprint(model: nn.Module, refresh: bool = False) -> str:
    """Fingerprint of a model's parameters, cached on the model.

    Call this on the untouched base, before training changes any weight: the
    value is cached as ``model._mth_base_fingerprint`` and later calls return the
    cache, so a delta saved after training still names the base it started from.

    Args:
        model: The model whose :meth:`~torch.nn.Module.named_parameters` are hashed
            (tied parameters once, sorted by name).
        refresh: Recompute from the current weights and replace the cache.

    Returns:
        The fingerprint, as :func:`state_fingerprint`.
    """
    cached = getattr(model, CACHE_ATTR, None)
    if cached is not None and not refresh:
        return cached
    fingerprint = state_fingerprint(unique_parameters(model))
    setattr(model, CACHE_ATTR, fingerprint)
    return fingerprint
