"""Measure fine-tunes: update sparsity, rank of updates, subnetwork overlap and change between checkpoints.

Every measurement streams weights one tensor at a time from HF folders, safetensors
files, sparse deltas, mask files or run folders (:mod:`mthlib.analysis.sources`).
The ``mth analyze`` subcommands are in :mod:`mthlib.analysis.commands`.

The names below are the public API (the built-in mask strategies in ``registry/`` use
nothing else): the measurements and their results; :func:`resolve_weights`,
:func:`open_weights` and :class:`ModuleWeights` to read weights; :func:`spec_kind` to tell
what a path holds; :func:`resolve_index_sets` and :func:`update_indices` for index sets;
:func:`changed_indices` to compare two tensors at a tolerance.
"""

from mthlib.analysis.compare import changed_indices
from mthlib.analysis.consecutive import ConsecutiveResult, consecutive_changes
from mthlib.analysis.overlap import OverlapResult, PairOverlap, overlap_sets, subnetwork_overlap
from mthlib.analysis.rank import RankResult, update_rank
from mthlib.analysis.index_sets import resolve_index_sets
from mthlib.analysis.sources import ModuleWeights, open_weights, resolve_weights, spec_kind, update_indices
from mthlib.analysis.sparsity import SparsityResult, update_sparsity

__all__ = [
    "ConsecutiveResult",
    "ModuleWeights",
    "OverlapResult",
    "PairOverlap",
    "RankResult",
    "SparsityResult",
    "changed_indices",
    "consecutive_changes",
    "open_weights",
    "overlap_sets",
    "resolve_index_sets",
    "resolve_weights",
    "spec_kind",
    "subnetwork_overlap",
    "update_indices",
    "update_rank",
    "update_sparsity",
]
