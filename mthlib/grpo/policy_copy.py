"""A copy of a policy in a given dtype to sample from, with its matrices pre-packed for the CPU's bf16 units.

The native rollout engine can sample from a bf16 copy of an fp32 policy (``rollout_dtype``):
bf16 matrix products run ~2.3x faster on CPUs with avx512_bf16 or AMX, while the loss still
scores the samples in fp32. A bf16 policy gets a copy only for the packed layout below (its
weights bitwise). On such CPUs ``torch.nn.functional.linear`` with a bf16 weight
re-lays the weight out into oneDNN's blocked format on every call; at decode batch sizes (16
rows) that is a large part of the product. :class:`PackedLinear` keeps the weight in that
layout, packed once per batch of rollouts, which takes a decode step of SmolLM2-135M from 57
to 45 ms with bitwise the same logits (``tests/grpo/test_policy_copy.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :class:`PackedLinear` runs here: a bf16 weight on a CPU whose oneDNN has bf16 kernels."""
    return (
        dtype == torch.bfloat16 and device.type == "cpu" and torch.backends.mkldnn.enabled
        and torch.backends.mkldnn.is_available()
        and all(hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored in oneDNN's packed layout: an inference-only stand-in for ``nn.Linear``.

    The weight and bias are buffers, not parameters (nothing trains them); :meth:`load` packs
    new values in.
    """

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)

    @torch.no_grad()
    def load(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Pack ``weight`` ``(out, in)`` (any dtype; rounded to bf16) and keep ``bias``."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for a PackedLinear of "
                             f"({self.out_features}, {self.in_features})")
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16).contiguous())
        self.bias = None if bias is None else bias.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            raise RuntimeError("PackedLinear.load(weight, bias) must run before its forward")
        flat = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


class PolicyCopy:
    """A copy of ``policy`` in ``dtype``, brought to the policy's current weights (rounded) by :meth:`load`.

    Where :func:`packing_supported`, every ``nn.Linear`` of the copy is a :class:`PackedLinear`.
    Each load copies every weight: packing needs the whole matrix, and a dense copy of
    SmolLM2-135M's weights costs ~0.25 s against the ~0.5 s packing saves over one batch of
    48 decode steps. Since every load packs anew, :meth:`release` frees the packed weights
    between batches, so the training step that follows does not hold them.
    """

    def __init__(self, policy: PreTrainedModel, dtype: torch.dtype) -> None:
        self.policy = policy
        with no_init_weights():  # every parameter is overwritten by load(): initialising them took 1.6 s of 1.8
            self.model = AutoModelForCausalLM.from_config(policy.config, dtype=dtype).to(policy.device).eval()
        if packing_supported(dtype, policy.device):
            for name, module in list(self.model.named_modules()):
                if isinstance(module, nn.Linear):
                    self.model.set_submodule(name, PackedLinear(module.out_features, module.in_features))
        self.loaded = False

    @torch.no_grad()
    def load(self) -> None:
        """Make the copy hold the policy's current weights, rounded to its dtype."""
        sources = dict(self.policy.named_parameters(remove_duplicate=False))
        for name, parameter in self.model.named_parameters():
            parameter.copy_(sources[name])
        for name, module in self.model.named_modules():
            if isinstance(module, PackedLinear):
                module.load(sources[f"{name}.weight"], sources.get(f"{name}.bias"))
        self.loaded = True

    def release(self) -> None:
        """Free the packed weights until the next :meth:`load` (plain layers keep theirs: a load only overwrites them)."""
        self.loaded = False
        for module in self.model.modules():
            if isinstance(module, PackedLinear):
                module.packed = None


def copy_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of a (packed) copy as a plain tensor, by the policy's parameter names (tied ones repeated)."""
    weights = dict(model.named_parameters(remove_duplicate=False))
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear) and module.packed is not None:
            weights[f"{name}.weight"] = module.packed.to_dense()
            if module.bias is not None:
                weights[f"{name}.bias"] = module.bias
    return weights
