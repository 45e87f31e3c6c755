"""Log-probability and entropy of one chosen token per row of vocabulary logits, in few passes over them.

A GRPO step needs, for every sampled token, ``log softmax(logits / T)`` at that token (with its
gradient) and the distribution's entropy (without). Composed from ``torch`` ops (divide,
``logsumexp``, ``softmax``, product, sum, and their backward) that is some fifteen full passes over
a ``(tokens, vocabulary)`` fp32 tensor, each allocating a new one. On a CPU a tensor of a
256-token chunk at a 49k vocabulary is 48 MiB: above glibc's largest ``mmap`` threshold
(32 MiB), every such allocation is fresh pages that the kernel faults in and zeroes, which cost
more than the arithmetic (a product: 14 ms, against 1.4 ms in place). :class:`TokenScores`
computes the same values in one fp32 copy of the logits, worked on in place, and one tensor of
exponentials kept for the backward.
"""

from __future__ import annotations

import torch


class TokenScores(torch.autograd.Function):
    """``(log p(target), entropy)`` of every row of ``logits / temperature``; the entropy carries no gradient.

    The work is in fp32 (or the logits' dtype when wider). Forward: ``z = logits / T - max``,
    ``e = exp(z)``, ``s = sum e``; ``log p(target) = z[target] - log s`` and
    ``entropy = log s - sum(e z) / s``. Backward: ``d/d logits = (onehot(target) - e / s) g / T``,
    computed in fp32 and rounded once to the logits' dtype, as autograd through the composed ops
    rounds it.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float):
        work = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
        work.div_(temperature)
        work.sub_(work.amax(dim=-1, keepdim=True))
        picked = work.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        exps = torch.exp(work)
        total = exps.sum(dim=-1)
        log_total = total.log()
        weighted = work.mul_(exps).sum(dim=-1)  # sum(e z) per row, in place: z is not needed past here
        ctx.save_for_backward(exps, total, targets)
        ctx.temperature = temperature
        ctx.logits_dtype = logits.dtype
        entropy = log_total - weighted / total
        ctx.mark_non_differentiable(entropy)
        return picked - log_total, entropy

    @staticmethod
    def backward(ctx, grad_picked: torch.Tensor, grad_entropy: torch.Tensor):
        exps, total, targets = ctx.saved_tensors
        scale = grad_picked / ctx.temperature
        coefficient = (-scale / total).unsqueeze(-1)
        grad = torch.mul(exps, coefficient, out=torch.empty_like(exps, dtype=ctx.logits_dtype))
        index = targets.unsqueeze(-1)
        at_targets = exps.gather(-1, index) * coefficient + scale.unsqueeze(-1)  # 1 - p, in fp32 before rounding
        return grad.scatter_(-1, index, at_targets.to(grad.dtype)), None, None


def token_scores(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N,)`` log-probabilities of ``targets`` ``(N,)`` under ``softmax(logits / temperature)`` and ``(N,)`` entropies.

    Equal to ``log_softmax(logits.float() / temperature)`` gathered at ``targets`` (and its
    gradient) up to fp32 rounding; the entropy is detached.
    """
    return TokenScores.apply(logits, targets, temperature)
