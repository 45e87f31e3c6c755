"""Sparse training: mask strategies, the :class:`Masks` container, SparseAdamW and the mask callback.

A strategy (:class:`MaskStrategy`, registered with :func:`register_mask`) chooses which
entries of which parameters are trainable; :class:`SparseAdamW` updates only those;
:class:`MaskCallback` wires both into a Lightning run and proves the frozen entries never move.
"""

from mthlib.masking.base import Allocation, Batch, MaskStrategy, ScoreFn, parameter_kinds
from mthlib.masking.callback import MaskCallback
from mthlib.masking.masks import Masks
from mthlib.masking.optim import SparseAdamW, gathering_paused
from mthlib.masking.registry import (
    available_masks,
    build_mask,
    get_mask_class,
    load_short_names,
    mask_summaries,
    register_mask,
)
from mthlib.masking.swap import base_view, frozen_digests, gather_values, scatter_values, swapped_to_base

__all__ = [
    "Allocation",
    "Batch",
    "MaskCallback",
    "MaskStrategy",
    "Masks",
    "ScoreFn",
    "SparseAdamW",
    "available_masks",
    "base_view",
    "build_mask",
    "frozen_digests",
    "gather_values",
    "gathering_paused",
    "get_mask_class",
    "load_short_names",
    "mask_summaries",
    "parameter_kinds",
    "register_mask",
    "scatter_values",
    "swapped_to_base",
]
