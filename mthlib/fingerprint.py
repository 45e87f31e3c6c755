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
import os
from collections.abc import Iterable

import torch
from torch import Tensor, nn

FINGERPRINT_CHARS = 32
"""Hex characters kept from the SHA-256 digest (128 bits)."""

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


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks: which file a mask or a run was made from.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unique_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """``model.named_parameters()`` with tied parameters once (first name), sorted by name."""
    return sorted(model.named_parameters(remove_duplicate=True), key=lambda item: item[0])


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name a parameter answers to (tied aliases included) mapped to its first name."""
    first: list[tuple[str, nn.Parameter]] = []
    names = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = next((seen for seen, other in first if other is param), None)
        if owner is None:
            first.append((name, param))
            owner = name
        names[name] = owner
    return names


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of a model's parameters (tied ones once, sorted by name), as :func:`state_fingerprint`.

    Nothing is cached on the model: whoever needs the base's fingerprint after training
    started keeps the value it computed on the untouched base (the GRPO module's
    ``base_fingerprint``, :attr:`~mthlib.masking.SparseState.base_fingerprint`).
    """
    return state_fingerprint(unique_parameters(model))
