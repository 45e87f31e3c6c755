"""Entry-wise comparison of two tensors at tolerances, in bounded memory.

An entry counts as *changed* at tolerance ``tol`` when ``|b - a| > tol``, computed
in float64 so the comparison is exact for 16- and 32-bit inputs. NaN differences
count as changed. Two views exist: ``"stored"`` compares the values as stored,
``"bf16"`` first rounds both sides to bfloat16 (the paper's models are bf16).
Tensors are processed in chunks of :data:`CHUNK` entries, so the float64 copies
never exceed a few tens of MiB whatever the parameter's size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor

View = Literal["stored", "bf16"]
VIEWS: tuple[View, ...] = ("stored", "bf16")
CHUNK = 1 << 22


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {list(VIEWS)}, not {view!r}")


def _chunks(a: Tensor, b: Tensor, view: View) -> Iterator[tuple[int, Tensor, Tensor]]:
    flat_a, flat_b = a.detach().reshape(-1), b.detach().reshape(-1)
    for start in range(0, flat_a.numel(), CHUNK):
        ca, cb = flat_a[start:start + CHUNK], flat_b[start:start + CHUNK]
        if view == "bf16":
            ca, cb = ca.to(torch.bfloat16), cb.to(torch.bfloat16)
        yield start, ca.to(torch.float64), cb.to(torch.float64)


def _changed(a: Tensor, b: Tensor, diff: Tensor, tol: float) -> Tensor:
    return (a != b) & ~(diff <= tol)


def count_changed(a: Tensor, b: Tensor, tolerances: Sequence[float], view: View = "stored") -> list[int]:
    """Number of entries with ``|b - a| > tol``, one count per tolerance."""
    _check_view(view)
    counts = [0] * len(tolerances)
    for _, ca, cb in _chunks(a, b, view):
        diff = (cb - ca).abs()
        for i, tol in enumerate(tolerances):
            counts[i] += int(torch.count_nonzero(_changed(ca, cb, diff, tol)))
    return counts


def changed_indices(a: Tensor, b: Tensor, tol: float, view: View = "stored") -> Tensor:
    """Flat sorted int64 indices of the entries with ``|b - a| > tol``."""
    _check_view(view)
    found = []
    for start, ca, cb in _chunks(a, b, view):
        found.append(torch.nonzero(_changed(ca, cb, (cb - ca).abs(), tol)).reshape(-1) + start)
    return torch.cat(found) if found else torch.empty(0, dtype=torch.int64)


def changed_mask(a: Tensor, b: Tensor, tol: float) -> Tensor:
    """Boolean mask of ``|b - a| > tol`` for two 1-D tensors (stored view, float64)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return _changed(a64, b64, (b64 - a64).abs(), tol)
