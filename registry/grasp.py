"""GraSP: keep the entries whose removal would shrink the gradient flow ``g·g`` the most."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mthlib.masking import Batch, Masks, MaskStrategy, gradient_sums, register_mask


@register_mask("grasp")
class GraSP(MaskStrategy):
    """Train the entries whose removal would cut the gradient flow most (GraSP's kept set: highest w * Hg).

    Source: Wang, Zhang, Grosse, "Picking Winning Tickets Before Training by Preserving
    Gradient Flow", ICLR 2020 (arXiv:2002.07376).

    Selection rule: ``g`` is the log-likelihood gradient of the eligible parameters summed
    over the calibration batches (each batch's Hugging Face mean loss), ``H`` the Hessian
    of that summed loss in the eligible parameters, and the paper's score is
    ``S = -w * (H g)``. Removing the entries ``w_i`` changes the gradient flow ``g·g`` by
    about ``2 * sum_i S_i``, so the paper *prunes* the entries of highest ``S`` (their
    removal reduces the flow least, or even increases it) and keeps the rest. A mask here
    names the entries to *train*, so it keeps the paper's kept set: the ``k = keep_count(n)``
    entries of *lowest* ``S``, i.e. the top ``k`` of ``-S = w * (H g)`` (:meth:`scores`
    returns ``S`` itself), ``n`` being all eligible entries (``global``) or each tensor's
    (``per_tensor``); ties go to the earlier parameter, then the lower flat index. The
    paper divides the logits by a temperature (200) before the loss; here the loss is the
    plain causal-LM loss, as for :class:`~mthlib.registry.snip.Snip` and
    :class:`~mthlib.registry.fisher.Fisher`, so the three rank the same gradients.

    ``H g`` is exact, by double backward: for each batch ``b`` autograd gives
    ``grad L_b`` with its graph kept, and the gradient of ``g_fixed · grad L_b`` is
    ``H_b g``; summed over batches that is ``H g``. A finite difference
    ``(grad L(w + eps g) - grad L(w)) / eps`` would need no second-order graph but
    moves the weights, needs an ``eps`` trading truncation for rounding error (poor in
    fp32 and worse in bf16) and two extra passes over the batches; the second-order graph
    of one calibration batch fits easily for the small models this library trains, so
    exactness wins. Hugging Face's ``sdpa`` attention on CPU dispatches to a fused kernel
    without a second derivative ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"), so
    the pass runs under :func:`torch.nn.attention.sdpa_kernel` with the math backend,
    which is plain differentiable tensor algebra; ``eager`` attention needs nothing.
    Kernels outside PyTorch (``flash_attention_2``) have no second derivative: a clear
    error names the fix. The model's weights are never written.

    Cost: two passes over the ``num_samples`` calibration sequences: a forward and
    backward pass per batch for ``g``, then a forward pass, a backward pass keeping its
    graph and a backward pass through that graph (together about 3.5 times the first);
    one fp32 buffer per eligible parameter for ``g`` and one for ``H g``. The embedded
    model with 8 sequences took 95 s at 10.4 GiB peak resident memory in one batch of 8
    (``model.calibration_batch_size``, default 8), and 11 minutes at 3.8 GiB in batches of
    one, on a 2-core CPU that other jobs shared (``bench/strategy_rewards.py``): lower the
    batch size when memory is short. ``seed`` seeds the calibration stream.

    Args:
        num_samples: Calibration sequences over which ``g`` and ``H g`` are summed (128, as
            :class:`~mthlib.registry.snip.Snip`, so both rank gradients of the same data).
        **options: The shared options (``sparsity``, ``allocation``, ``include``, ``seed``, ...)
            of :class:`~mthlib.masking.MaskStrategy`.
    """

    needs_calibration = True

    def __init__(self, num_samples: int = 128, **options: Any) -> None:
        super().__init__(**options)
        self.use_calibration(num_samples)

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Keep the ``k`` entries of lowest GraSP score ``S`` (highest ``w * H g``)."""
        return self.top_k({name: score.neg_() for name, score in self.scores(model, batches).items()})

    def scores(self, model: nn.Module, batches: Iterable[Batch] | None) -> dict[str, torch.Tensor]:
        """The paper's score ``S = -w * (H g)`` (fp32) of every eligible entry; the paper prunes the highest.

        Raises:
            ValueError: No batches, a model whose loss has no second derivative in the
                eligible parameters, or an attention kernel without double backward.
        """
        if batches is None:
            raise ValueError("grasp needs calibration batches (input_ids, attention_mask, labels); got None")
        batches = list(batches)
        params = self.eligible(model)
        grads = gradient_sums(model, params, batches, squared=False, per_sample=False)
        flow = _GradientFlow(model, params, grads)
        prefixed = {f"{_GradientFlow.PREFIX}.{name}": p for name, p in params.items()}
        try:
            with sdpa_kernel([SDPBackend.MATH]):
                products = gradient_sums(flow, prefixed, batches, squared=False, per_sample=False)
        except RuntimeError as err:
            if "derivative for" not in str(err):
                raise
            raise ValueError(
                f"grasp needs second derivatives, but the model's attention has none ({str(err).splitlines()[0]}); "
                "load it with attn_implementation='eager' or 'sdpa'"
            ) from None
        return {name: products[f"{_GradientFlow.PREFIX}.{name}"].mul_(p.detach().float()).neg_()
                for name, p in params.items()}


class _GradientFlow(nn.Module):
    """A model whose "loss" on batch ``b`` is ``g · grad L_b(w)``, so its gradient is the product ``H_b g``.

    Wrapping the causal LM this way lets :func:`~mthlib.masking.gradient_sums` do the
    second pass (eval mode, ``requires_grad`` and ``.grad`` restored, batches without a
    target skipped, sums over data-parallel processes) exactly as it does the first.

    Args:
        model: The causal LM (registered under :attr:`PREFIX`, so parameter names gain that prefix).
        params: Name (unprefixed) to the eligible parameters of ``model``.
        grads: Name to the summed first-order gradient ``g`` (fp32), held fixed.
    """

    PREFIX = "lm"

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], grads: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.lm = model
        self.training = model.training  # gradient_sums restores the mode it finds, i.e. the model's own
        self._params = params
        self._grads = grads

    def forward(self, **batch: Any) -> SimpleNamespace:
        """``loss = sum over eligible parameters of g · dL_b/dw``, differentiable in ``w``."""
        names = list(self._params)
        first = torch.autograd.grad(self.lm(**batch).loss, [self._params[n] for n in names],
                                    create_graph=True, allow_unused=True)
        terms = [(self._grads[n] * d.float()).sum() for n, d in zip(names, first) if d is not None and d.requires_grad]
        if not terms:
            raise ValueError("grasp needs a loss with curvature in the eligible parameters; its Hessian is zero here")
        return SimpleNamespace(loss=torch.stack(terms).sum())
