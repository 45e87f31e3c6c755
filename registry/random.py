"""Random: uniformly random entries per tensor, bit for bit the blog's NumPy selection."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mthlib.masking import Batch, Masks, MaskStrategy, register_mask


@register_mask("random")
class RandomMask(MaskStrategy):
    """Uniformly random entries in every tensor, seeded (the blog's random masks).

    Source: Adewuyi, "Beyond the Lottery Ticket: Multiple Winning Subnetworks in
    Pretrained LLMs", blog post, 2025 (https://israel-adewuyi.github.io/blog/2025/slim-peft/).

    Selection rule: ``rng = numpy.random.default_rng(seed)``; for every entry of
    ``model.state_dict()`` in order (buffers, norms, biases and tied aliases such as
    ``lm_head.weight`` included) draw
    ``rng.choice(numel, size=int(numel * keep), replace=False)`` with
    ``keep = round(1 - sparsity, 12)``, i.e. ``k = keep_count(numel)`` entries per
    tensor. Every entry is drawn whether or not it is eligible, so the filters
    (``include``, ``exclude``, ``include_*``) never change the entries chosen in a
    tensor; the draws are used only for eligible parameters, and a tied parameter
    takes the draw of its first name. For a model without tied weights and with every
    tensor eligible this is the blog's mask, entry for entry. A tensor holding entries
    of ``exclude_mask`` draws ``k`` of its remaining entries instead (``rng.choice``
    over them), which shifts the random stream for every later tensor.
    No scores, so no ties. Cost: no data, no gradients; one NumPy draw per tensor
    (NumPy builds an index array of the whole tensor when more than 2% of a tensor
    above 10,000 entries is kept, else it draws only the ``k`` entries).

    Allocation is per tensor by nature: ``allocation`` accepts only ``"per_tensor"``
    and any other value raises :class:`ValueError`. ``seed`` seeds
    :func:`numpy.random.default_rng` (the blog uses 0, 2001 and 42).

    Args:
        allocation: Must be ``"per_tensor"``.
        **options: The other shared options (``sparsity``, ``include``, ``seed``, ...) of
            :class:`~mthlib.masking.MaskStrategy`.
    """

    def __init__(self, allocation: Literal["per_tensor"] = "per_tensor", **options: Any) -> None:
        if allocation != "per_tensor":
            raise ValueError(
                f"random masks are drawn tensor by tensor: allocation must be 'per_tensor'; got {allocation!r}"
            )
        super().__init__(allocation=allocation, **options)

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Draw the blog's random selection; returns masks over the eligible parameters."""
        eligible = self.eligible(model)
        state = model.state_dict()
        missing = [name for name in eligible if name not in state]
        if missing:
            raise ValueError(f"eligible parameters missing from model.state_dict(): {', '.join(missing[:5])}")
        exclusion = self.exclusion()
        rng = np.random.default_rng(self.seed)
        indices = {}
        for name, tensor in state.items():
            numel = tensor.numel()
            k = self.keep_count(numel)
            blocked = self._blocked(exclusion, name, eligible)
            if blocked is None:
                drawn = rng.choice(numel, size=k, replace=False)
            else:
                allowed = np.setdiff1d(np.arange(numel), blocked, assume_unique=True)
                if k > allowed.size:
                    raise ValueError(f"cannot keep {k} entries of {name}: only {allowed.size} are not in exclude_mask")
                drawn = allowed[rng.choice(allowed.size, size=k, replace=False)]
            if name in eligible:
                indices[name] = torch.from_numpy(np.sort(drawn).astype(np.int64))
        return Masks(indices, {name: tuple(p.shape) for name, p in eligible.items()})

    @staticmethod
    def _blocked(exclusion: Masks | None, name: str, eligible: dict[str, nn.Parameter]) -> np.ndarray | None:
        """The ``exclude_mask`` entries of eligible parameter ``name``, or ``None`` when it has none."""
        if exclusion is None or name not in eligible or name not in exclusion or not exclusion.count(name):
            return None
        if exclusion.shape(name) != tuple(eligible[name].shape):
            shape = tuple(eligible[name].shape)
            raise ValueError(f"exclude_mask has shape {exclusion.shape(name)} for {name}; the model has {shape}")
        return exclusion[name].numpy()
