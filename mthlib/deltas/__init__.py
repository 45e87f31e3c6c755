"""Sparse deltas: the trained entries of a run as one safetensors file (:mod:`~mthlib.deltas.format`),
applied to their base or merged with others (:mod:`~mthlib.deltas.combine`).

A delta is one safetensors file. For every parameter with trained entries it holds
``"<param>.indices"`` (flat, sorted, unique; int32 when the parameter has fewer than
2**31 entries, else int64) and ``"<param>.values"`` (the trained values at those
entries, in the parameter's dtype, so applying is an exact scatter), plus string
metadata naming the base (``base_fingerprint``), the strategy, sparsity and step.
"""

from mthlib.deltas.combine import apply_delta, check_base, merge_deltas
from mthlib.deltas.format import (
    FORMAT,
    INDICES_SUFFIX,
    REQUIRED_METADATA,
    VALUES_SUFFIX,
    VERSION,
    SparseDelta,
    build_delta,
    check_entries,
    content_fingerprint,
    index_dtype,
    load_delta,
    parameter_lookup,
    save_delta,
    write_delta,
)

__all__ = [
    "FORMAT",
    "INDICES_SUFFIX",
    "REQUIRED_METADATA",
    "VALUES_SUFFIX",
    "VERSION",
    "SparseDelta",
    "apply_delta",
    "build_delta",
    "check_base",
    "check_entries",
    "content_fingerprint",
    "index_dtype",
    "load_delta",
    "merge_deltas",
    "parameter_lookup",
    "save_delta",
    "write_delta",
]
