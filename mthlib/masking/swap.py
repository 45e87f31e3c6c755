"""Reach the base model from a sparsely trained one by swapping the active entries.

Only the active entries of a masked model differ from its base, and their base values
take ``k`` numbers per parameter. So the base needs no second model copy: writing the
base values into the active entries gives the base back (:func:`swapped_to_base`, used
for the KL term of GRPO), and hashing each parameter with its active entries replaced
(:func:`base_view`, :func:`frozen_digests`) proves the frozen entries never moved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from mthlib.fingerprint import state_fingerprint
from mthlib.masking.masks import Masks, holds_every_entry


def _parameters(model: nn.Module, masks: Masks) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [name for name in masks if name not in params]
    if missing:
        raise ValueError(f"the masks name parameters the model does not have: {', '.join(missing[:5])}")
    return params


@torch.no_grad()
def gather_values(model: nn.Module, masks: Masks, copy: bool = True) -> dict[str, torch.Tensor]:
    """Current values at the active entries: name to a 1-D copy (parameter dtype and device).

    With ``copy=False``, a mask holding every entry gives the parameter's own flattened
    values, not a copy (no index gather either): for reading them at once, e.g. a finiteness check.
    """
    params = _parameters(model, masks)
    values = {}
    for name, idx in masks.items():
        flat = params[name].detach().reshape(-1)
        if not copy and holds_every_entry(idx, flat.numel()):
            values[name] = flat
        else:
            values[name] = flat.index_select(0, idx.to(flat.device))
    return values


@torch.no_grad()
def scatter_values(model: nn.Module, masks: Masks, values: Mapping[str, torch.Tensor]) -> None:
    """Write ``values[name]`` into the active entries ``masks[name]`` (the inverse of :func:`gather_values`)."""
    params = _parameters(model, masks)
    for name, idx in masks.items():
        if idx.numel():
            flat = params[name].view(-1)
            flat.index_copy_(0, idx.to(flat.device), values[name].to(device=flat.device, dtype=flat.dtype))


@contextlib.contextmanager
def swapped_to_base(model: nn.Module, masks: Masks, base_values: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily write the base values into the active entries; restore the trained values on exit.

    Inside the block ``model`` computes exactly what the base model computes (its frozen
    entries were never written), e.g. reference log-probabilities for a KL penalty. The
    trained values are restored bitwise even if the block raises. Do not step an
    optimizer inside the block.

    Args:
        model: The sparsely trained model.
        masks: Its masks.
        base_values: Name to the base values at ``masks[name]`` (as from :func:`gather_values` before training).

    Yields:
        ``model``.
    """
    trained = gather_values(model, masks)
    try:
        scatter_values(model, masks, base_values)
        yield model
    finally:
        scatter_values(model, masks, trained)


@torch.no_grad()
def base_view(
    model: nn.Module, masks: Masks, base_values: Mapping[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter (tied once), sorted by name, with its active entries set back to base values.

    Parameters with active entries are copied one at a time, so memory stays at one
    parameter's copy; the model itself is not touched. Feeding this to
    :func:`~mthlib.fingerprint.state_fingerprint` gives the base model's fingerprint.
    """
    params = _parameters(model, masks)
    for name in sorted(params):
        tensor = params[name].detach()
        if name in masks and masks.count(name):
            tensor = tensor.clone()
            idx = masks[name].to(tensor.device)
            tensor.view(-1).index_copy_(0, idx, base_values[name].to(device=tensor.device, dtype=tensor.dtype))
        yield name, tensor


def frozen_digests(
    model: nn.Module, masks: Masks, base_values: Mapping[str, torch.Tensor]
) -> Iterator[tuple[str, str]]:
    """``(name, digest)`` of each parameter of :func:`base_view`: equal digests mean frozen entries unchanged."""
    for name, tensor in base_view(model, masks, base_values):
        yield name, state_fingerprint([(name, tensor)])
