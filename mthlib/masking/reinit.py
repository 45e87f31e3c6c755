"""Re-initialised values for the active entries: the lottery-ticket "reinit" sanity check.

A sparse fine-tune starts its active entries from the base values. The sanity check asks
whether those values matter or only the positions do: train the same entries from fresh
random values instead, and compare. :class:`~mthlib.masking.MaskCallback` (``reinit=True``)
writes :func:`reinitialised_values` into the active entries once, right after the mask is
computed and its base values recorded; frozen entries, the recorded base values (the KL
reference, the frozen-entry digests) and resumed runs are untouched.

Distribution: per parameter, a normal with the base tensor's own mean and standard
deviation (over all its entries, in float64). It keeps each tensor's scale and centre, so a
norm weight near 1 stays near 1 and a projection keeps its spread, and a worse result can be
put down to losing the base values, not to a badly scaled layer. A model's pre-training
initialiser (Hugging Face ``config.initializer_range``, 0.02 for Llama-style models) would
instead put every matrix at one scale unrelated to the trained tensors it is mixed into, and
every norm weight at a constant 1; the per-tensor normal needs no model-specific rule.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from mthlib.masking.masks import Masks


def reinit_generator(seed: int) -> torch.Generator:
    """A CPU generator for re-initialisation, seeded from ``seed`` through SHA-256.

    The strategy's own random choices may use ``torch.Generator().manual_seed(seed)``; a
    derived seed keeps the new values out of that stream, so they are independent of where
    the strategy put the entries.
    """
    digest = hashlib.sha256(f"mthlib.reinit:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@torch.no_grad()
def reinitialised_values(model: nn.Module, masks: Masks, seed: int) -> dict[str, torch.Tensor]:
    """New values for the active entries: ``mean + std * N(0, 1)`` with each base tensor's mean and std.

    Parameters are taken in :attr:`Masks.names` order, each drawing as many standard normals
    (float64, from :func:`reinit_generator`) as it has active entries; values are then
    cast to the parameter's dtype and device. Reading ``model`` only: scatter the result with
    :func:`~mthlib.masking.scatter_values`.

    Args:
        model: The base model (its tensors give the means and standard deviations).
        masks: The active entries.
        seed: The seed (the mask strategy's ``seed``).

    Returns:
        Name to a 1-D tensor aligned with ``masks[name]``, for every parameter with active entries.
    """
    params = dict(model.named_parameters())
    generator = reinit_generator(seed)
    values = {}
    for name, idx in masks.items():
        if not idx.numel():
            continue
        param = params[name]
        std, mean = torch.std_mean(param.detach().to(torch.float64), correction=0)
        draws = torch.randn(idx.numel(), generator=generator, dtype=torch.float64)
        values[name] = (mean.cpu() + std.cpu() * draws).to(device=param.device, dtype=param.dtype)
    return values
