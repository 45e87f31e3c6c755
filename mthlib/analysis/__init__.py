"""Measure fine-tunes: update sparsity, rank of updates, subnetwork overlap and change between checkpoints.

Every measurement streams weights one tensor at a time from HF folders, safetensors
files, sparse deltas, mask files or run folders (:mod:`mthlib.analysis.sources`).
The ``mth analyze`` subcommands are in :mod:`mthlib.analysis.commands`.
"""

from mthlib.analysis.consecutive import ConsecutiveResult, consecutive_changes
from mthlib.analysis.overlap import OverlapResult, PairOverlap, overlap_sets, subnetwork_overlap
from mthlib.analysis.rank import RankResult, update_rank
from mthlib.analysis.index_sets import resolve_index_sets
from mthlib.analysis.sources import open_weights, resolve_weights, update_indices
from mthlib.analysis.sparsity import SparsityResult, update_sparsity

__all__ = [
    "ConsecutiveResult",
    "OverlapResult",
    "PairOverlap",
    "RankResult",
    "SparsityResult",
    "consecutive_changes",
    "open_weights",
    "overlap_sets",
    "resolve_index_sets",
    "resolve_weights",
    "subnetwork_overlap",
    "update_indices",
    "update_rank",
    "update_sparsity",
]
