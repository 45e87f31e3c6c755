"""Data-parallel training where each process synchronises only the gradients it trains.

PyTorch's ``DistributedDataParallel`` all-reduces every parameter's dense gradient from
hooks of its own. A sparse fine-tune keeps gradients only at the active entries of its
mask (:class:`~mthlib.masking.SparseAdamW` frees the dense ones as they appear), so the
reducer would both move ~100x more data than needed and find gradients already gone.
:class:`SparseDDPStrategy` is Lightning's DDP (process launch, process group, sharded
evaluation, metric reduction, rank-zero checkpointing) without that wrapper: the module
averages its own gradients with :func:`all_reduce_mean_` once per optimizer step, before
clipping, so every rank takes the same step and ends with the same weights.

Select it as ``--trainer.strategy ddp_sparse`` (or ``strategy: ddp_sparse`` in YAML).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy, StrategyRegistry

STRATEGY_NAME = "ddp_sparse"


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean_(tensors: Iterable[torch.Tensor], bucket_numel: int = 1 << 24) -> None:
    """Replace each tensor by its mean over all processes, in place (a no-op in a single process).

    Tensors are flattened into buckets of at most ``bucket_numel`` elements (one
    collective per bucket, not per tensor); every process must pass tensors of the same
    shapes and dtypes in the same order.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    bucket: list[torch.Tensor] = []
    filled = 0
    for tensor in list(tensors) + [None]:
        if bucket and (tensor is None or filled + tensor.numel() > bucket_numel or tensor.dtype != bucket[0].dtype):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()
            bucket, filled = [], 0
        if tensor is not None:
            bucket.append(tensor)
            filled += tensor.numel()


def all_reduce_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each tensor by its sum over all processes, in place (a no-op in a single process)."""
    if is_distributed():
        for tensor in tensors:
            dist.all_reduce(tensor)


class SparseDDPStrategy(DDPStrategy):
    """Lightning's DDP for modules that average their own gradients (sparse fine-tunes).

    Identical to :class:`~lightning.pytorch.strategies.DDPStrategy` (same arguments: the
    launch method, process group backend, timeout) except that the LightningModule is not
    wrapped in ``DistributedDataParallel``. Every rank loads the same base and computes the
    same mask, so no initial broadcast of weights is needed; a module trained with it must
    call :func:`all_reduce_mean_` on its gradients before each optimizer step, as
    :class:`~mthlib.grpo.GRPOModule` does.
    """

    def configure_ddp(self) -> None:
        """Keep the module unwrapped: gradients are synchronised by the module, active entries only."""


def check_masked_strategy(strategy: Strategy) -> None:
    """Refuse a training strategy that cannot train a masked module.

    A masked run trains on one device or under :class:`SparseDDPStrategy`. Sharding strategies
    (FSDP, ``ModelParallelStrategy``, DeepSpeed) are refused rather than run: the mask, the base
    values and SparseAdamW's state are indexed by whole parameters, which a sharded parameter is
    not, so a run would train the wrong entries or none.

    Raises:
        ValueError: Lightning's ``DistributedDataParallel`` strategy (use ``ddp_sparse``) or any
            other strategy that is neither one device nor ``ddp_sparse``.
    """
    if isinstance(strategy, (SingleDeviceStrategy, SparseDDPStrategy)):
        return
    name = type(strategy).__name__
    if isinstance(strategy, DDPStrategy):
        raise ValueError(
            f"a masked run cannot use {name}: DistributedDataParallel all-reduces dense gradients "
            f"that SparseAdamW frees; use strategy '{STRATEGY_NAME}' (mthlib.distributed.SparseDDPStrategy)"
        )
    raise ValueError(
        f"a masked run cannot use {name}: masks, base values and SparseAdamW state are kept per whole parameter, "
        f"not per shard; use one device or strategy '{STRATEGY_NAME}' (data parallel, every rank holds the model)"
    )


StrategyRegistry.register(
    STRATEGY_NAME, SparseDDPStrategy, description="DDP without the dense gradient reducer (mthlib sparse fine-tunes)",
    override=True,
)
