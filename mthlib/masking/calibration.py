"""Calibration: the data a gradient-based strategy scores with, and the one function that builds a mask.

``mth masks build`` and ``mth fit`` both reach a mask through :func:`compute_masks` with the
same arguments read from the same config (the strategy, the calibration batch size, the
data module's environment), so one config gives one mask whichever command builds it.

:func:`gradient_sums` is the gradient pass behind :meth:`~mthlib.masking.MaskStrategy.accumulate`
and :meth:`~mthlib.masking.MaskStrategy.squared_grads`: it folds each parameter's gradient
into an fp32 buffer as soon as autograd produces it, so dense ``.grad`` tensors never pile up.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from mthlib.distributed import all_reduce_sum_
from mthlib.masking.masks import Masks

Batch = Mapping[str, torch.Tensor]
"""A calibration batch: ``input_ids`` and ``attention_mask`` ``(B, L)``, ``labels`` ``(B, L)`` (-100 = no loss)."""


class CalibrationSource(Protocol):
    """What gives calibration batches: :class:`~mthlib.data.PromptDataModule` or a user's data module."""

    def calibration_batches(self, tokenizer: Any, num_samples: int, batch_size: int, seed: int) -> Iterator[Batch]:
        """Tokenized prompts with reference replies as labels; see :meth:`mthlib.data.PromptDataModule.calibration_batches`."""


def calibration_batches(
    strategy: Any, source: CalibrationSource | None, tokenizer: Any, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterable[Batch] | None:
    """The calibration batches ``strategy`` asks for, or ``None`` when it needs none.

    Args:
        strategy: The :class:`~mthlib.masking.MaskStrategy` (its ``needs_calibration``,
            ``num_samples`` and ``seed`` decide the stream).
        source: The data module that makes batches.
        tokenizer: The model's tokenizer.
        batch_size: Sequences per batch (``GRPOModule.calibration_batch_size``).
        rank: This process's rank: with several processes each takes every
            ``world_size``-th batch starting at its rank (the gradient passes sum over processes).
        world_size: Number of processes.

    Raises:
        ValueError: ``batch_size`` < 1, or the strategy needs batches and ``source`` cannot make them.
    """
    if batch_size < 1:
        raise ValueError(f"calibration_batch_size must be >= 1; got {batch_size}")
    if not strategy.needs_calibration:
        return None
    make = getattr(source, "calibration_batches", None)
    if make is None:
        raise ValueError(
            f"mask strategy {strategy.name!r} needs calibration batches: the data module must define "
            "calibration_batches(tokenizer, num_samples, batch_size, seed)"
        )
    batches = make(tokenizer, num_samples=strategy.num_samples, batch_size=batch_size, seed=strategy.seed)
    return itertools.islice(batches, rank, None, world_size)


def compute_masks(
    strategy: Any, model: nn.Module, source: CalibrationSource | None, tokenizer: Any, batch_size: int,
    rank: int = 0, world_size: int = 1,
) -> Masks:
    """Run ``strategy.compute`` on ``model`` with its calibration batches: the one way a run gets its mask.

    Args:
        strategy: The mask strategy.
        model: The base model (untouched).
        source: The data module giving calibration batches (unused by strategies without calibration).
        tokenizer: The model's tokenizer.
        batch_size: Sequences per calibration batch.
        rank: This process's rank (data-parallel runs).
        world_size: Number of processes.
    """
    return strategy.compute(model, calibration_batches(strategy, source, tokenizer, batch_size, rank, world_size))


def gradient_sums(
    model: nn.Module, params: Mapping[str, nn.Parameter], batches: Iterable[Batch], squared: bool, per_sample: bool
) -> dict[str, torch.Tensor]:
    """Fold the causal-LM loss gradients of ``params`` into fp32 buffers (sum of g, or of g**2).

    Each batch contributes the gradient of ``model(**batch).loss`` (Hugging Face's mean over
    label tokens); batches without a label token are skipped (their mean would be NaN). The
    model runs in eval mode; ``requires_grad``, existing ``.grad`` and the train/eval mode
    are restored afterwards. Under ``torch.distributed`` each process passes its own share
    of the batches and the sums are all-reduced, so every process gets the statistics of
    all batches and chooses the same mask. During sparse training call it inside
    :meth:`~mthlib.masking.SparseState.calibrating`, so the training hooks neither take nor
    lose these gradients.

    Args:
        model: The causal LM.
        params: Name to the parameters whose gradients are summed.
        batches: Calibration batches (see :data:`Batch`).
        squared: Sum ``g**2`` instead of ``g``.
        per_sample: One backward pass per sequence (the empirical Fisher with ``squared``).

    Raises:
        ValueError: No batch has a target token, or the model returns no loss.
    """
    buffers = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    everything = list(model.named_parameters())
    saved = [(p, p.requires_grad, p.grad) for _, p in everything]
    was_training = model.training
    handles = []
    device = everything[0][1].device
    passes = 0
    try:
        for name, p in everything:
            p.grad = None
            p.requires_grad_(name in buffers)
        handles = [p.register_post_accumulate_grad_hook(_folder(buffers[name], squared)) for name, p in params.items()]
        model.eval()
        with torch.enable_grad():
            for batch in batches:
                for piece in (_rows(batch) if per_sample else [batch]):
                    if "labels" in piece and bool((piece["labels"] == -100).all()):
                        continue
                    loss = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in piece.items()}).loss
                    if loss is None:
                        raise ValueError("calibration batches need 'labels' so the model returns a loss")
                    loss.backward()
                    passes += 1
        counted = torch.tensor([passes], dtype=torch.int64, device=device)
        all_reduce_sum_([counted, *buffers.values()])
        if int(counted) == 0:
            raise ValueError("no calibration batches with target tokens were given; the strategy needs at least one")
    finally:
        for handle in handles:
            handle.remove()
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
        model.train(was_training)
    return buffers


def _folder(buffer: torch.Tensor, squared: bool) -> Callable[[torch.Tensor], None]:
    """A post-accumulate-grad hook adding a parameter's gradient (or its square) into ``buffer``, then freeing it."""

    def fold(param: torch.Tensor) -> None:
        grad = param.grad.float()
        if grad.is_sparse:
            grad = grad.to_dense()
        if squared:
            buffer.addcmul_(grad, grad)
        else:
            buffer.add_(grad)
        param.grad = None

    return fold


def _rows(batch: Batch) -> Iterator[dict[str, Any]]:
    """Split a batch into single-sequence batches (tensors whose first dimension is the batch)."""
    size = int(batch["input_ids"].shape[0])
    for i in range(size):
        yield {k: v[i: i + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size else v
               for k, v in batch.items()}
