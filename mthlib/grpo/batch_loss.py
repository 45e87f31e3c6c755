"""The GRPO loss of a rollout batch, micro-batch by micro-batch, with its backward passes.

Each micro-batch's log-probabilities are computed with gradient, its share of the batch
loss (:class:`~mthlib.grpo.objective.GRPOObjective` with the batch's
:class:`~mthlib.grpo.loss.Normalizer`) is backpropagated at once, and the gradients add up
to those of the whole batch's loss; only one micro-batch's activations exist at a time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from mthlib.grpo.loss import Normalizer, masked_mean
from mthlib.grpo.objective import GRPOObjective
from mthlib.grpo.rollout import Rollout, token_logprobs


def backward_micro_batches(
    model: PreTrainedModel,
    objective: GRPOObjective,
    rollout: Rollout,
    advantages: torch.Tensor,
    norm: Normalizer,
    backward: Callable[[torch.Tensor], None],
    micro_batch_size: int,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    pack_prefixes: bool = False,
) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Backpropagate the batch loss of ``rollout`` micro-batch by micro-batch.

    Args:
        backward: Runs the backward pass of one micro-batch's loss (Lightning's ``manual_backward``).
        old_logps: ``(N, T)`` log-probs of the sampling policy; ``None`` on-policy (the current
            ones, detached, stand in).
        ref_logps: ``(N, T)`` log-probs of the KL reference, if any.
        temperature, chunk_size, pack_prefixes: As in :func:`~mthlib.grpo.rollout.token_logprobs`.

    Returns:
        The batch loss (detached), and each micro-batch's ``entropy`` and objective metrics.
    """
    stats: dict[str, list[torch.Tensor]] = defaultdict(list)
    total = torch.zeros((), device=advantages.device)
    for first in range(0, len(rollout), micro_batch_size):
        rows = slice(first, first + micro_batch_size)
        part = rollout.select(rows)
        logps, entropy = token_logprobs(
            model, part.input_ids, part.attention_mask, part.loss_mask, temperature, chunk_size, pack_prefixes
        )
        width = logps.shape[1]
        old = logps.detach() if old_logps is None else old_logps[rows, :width]
        ref = None if ref_logps is None else ref_logps[rows, :width]
        loss, metrics = objective.loss(logps, old, advantages[rows], part.loss_mask, norm, ref)
        if loss.requires_grad:  # no loss token (all truncated and masked): no graph, and nothing to add
            backward(loss)
        total += loss.detach()
        stats["entropy"].append(masked_mean(entropy, part.loss_mask))
        for key, value in metrics.items():
            stats[key].append(value)
    return total, stats
