"""Sparse training: mask strategies, the :class:`Masks` container, the run's :class:`SparseState`, SparseAdamW and the mask callback.

A strategy (:class:`MaskStrategy`, registered with :func:`register_mask`) chooses which
entries of which parameters are trainable (:func:`compute_masks`); a :class:`SparseState`
records the base and, attached to the model, gathers the gradients of those entries;
:class:`SparseAdamW` updates only them; :class:`MaskCallback` wires all of it into a
Lightning run and proves the frozen entries never move.
"""

from mthlib.masking.calibration import Batch, calibration_batches, compute_masks, gradient_sums
from mthlib.masking.callback import MaskCallback
from mthlib.masking.gradients import ActiveGradients
from mthlib.masking.layers import ActiveEntryLinear
from mthlib.masking.masks import Masks
from mthlib.masking.optim import SparseAdamW
from mthlib.masking.registry import (
    available_masks,
    build_mask,
    get_mask_class,
    load_short_names,
    mask_summaries,
    register_mask,
)
from mthlib.masking.scores import DATA_SCORES, EntryScore, check_entry_score, entry_scores
from mthlib.masking.state import SparseState
from mthlib.masking.kinds import parameter_kinds
from mthlib.masking.strategy import Allocation, MaskStrategy, ScoreFn
from mthlib.masking.swap import base_view, frozen_digests, gather_values, scatter_values, swapped_to_base

__all__ = [
    "ActiveEntryLinear",
    "ActiveGradients",
    "Allocation",
    "Batch",
    "DATA_SCORES",
    "EntryScore",
    "MaskCallback",
    "MaskStrategy",
    "Masks",
    "ScoreFn",
    "SparseAdamW",
    "SparseState",
    "available_masks",
    "base_view",
    "build_mask",
    "calibration_batches",
    "check_entry_score",
    "compute_masks",
    "entry_scores",
    "frozen_digests",
    "gather_values",
    "get_mask_class",
    "gradient_sums",
    "load_short_names",
    "mask_summaries",
    "parameter_kinds",
    "register_mask",
    "scatter_values",
    "swapped_to_base",
]
