"""Entry-wise comparison of two tensors at tolerances, in bounded memory.

An entry counts as *changed* at tolerance ``tol`` when ``|b - a| > tol``, computed
in float64 so the comparison is exact for 16- and 32-bit inputs. NaN differences
count as changed. Two views exist: ``"stored"`` compares the values as stored,
``"bf16"`` first rounds both sides to bfloat16 (the paper's models are bf16).
Tensors are processed in chunks of :data:`CHUNK` entries, so the float64 copies
never exceed a few tens of MiB whatever the parameter's size.

``compare_dtype="bf16"`` (bf16 view only) is the arithmetic of the paper's script
(Mukherjee et al., ``check_sparsity.py``: both models loaded in bf16, ``θ1 - θ0``
taken in bf16, ``torch.isclose(θ1 - θ0, 0, atol=tol)``): the difference is computed by
torch in bf16 (so it is rounded to bf16) and compared with ``tol`` rounded to bf16. An
entry is changed when ``a != b`` and not ``|b - a| <= bf16(tol)``, i.e., for finite
values, exactly ``(b.bfloat16() - a.bfloat16()).abs() > torch.tensor(tol, dtype=torch.bfloat16)``;
NaN differences count as changed, as ``isclose`` counts them not close. Entries near
``tol`` can flip: bf16 rounds 1e-5 up to 1.00136e-05, and a difference just above ``tol``
can round down to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor

View = Literal["stored", "bf16"]
VIEWS: tuple[View, ...] = ("stored", "bf16")
CompareDtype = Literal["float64", "bf16"]
COMPARE_DTYPES: tuple[CompareDtype, ...] = ("float64", "bf16")
CHUNK = 1 << 22


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {list(VIEWS)}, not {view!r}")


def check_compare_dtype(compare_dtype: str, views: Sequence[str]) -> None:
    """Refuse an unknown ``compare_dtype``, and ``"bf16"`` without the bf16 view (the only one it changes)."""
    if compare_dtype not in COMPARE_DTYPES:
        raise ValueError(f"compare_dtype must be one of {list(COMPARE_DTYPES)}, not {compare_dtype!r}")
    if compare_dtype == "bf16" and "bf16" not in views:
        raise ValueError("compare_dtype bf16 computes the bf16 view's differences in bf16 (the stored view always "
                         f"compares in float64); views are {list(views)}: add bf16")


def _chunks(
    a: Tensor, b: Tensor, view: View, dtype: torch.dtype = torch.float64
) -> Iterator[tuple[int, Tensor, Tensor]]:
    flat_a, flat_b = a.detach().reshape(-1), b.detach().reshape(-1)
    for start in range(0, flat_a.numel(), CHUNK):
        ca, cb = flat_a[start:start + CHUNK], flat_b[start:start + CHUNK]
        if view == "bf16":
            ca, cb = ca.to(torch.bfloat16), cb.to(torch.bfloat16)
        yield start, ca.to(dtype), cb.to(dtype)


def _changed(a: Tensor, b: Tensor, diff: Tensor, tol: float | Tensor) -> Tensor:
    return (a != b) & ~(diff <= tol)


def count_changed(
    a: Tensor, b: Tensor, tolerances: Sequence[float], view: View = "stored", compare_dtype: CompareDtype = "float64"
) -> list[int]:
    """Number of entries with ``|b - a| > tol``, one count per tolerance.

    ``compare_dtype="bf16"`` (with ``view="bf16"``) takes the difference in bf16 and compares it
    with ``tol`` rounded to bf16, as the paper's script (see the module docstring).
    """
    _check_view(view)
    check_compare_dtype(compare_dtype, [view])
    dtype = torch.bfloat16 if compare_dtype == "bf16" else torch.float64
    limits = [torch.tensor(tol, dtype=dtype) for tol in tolerances]
    counts = [0] * len(tolerances)
    for _, ca, cb in _chunks(a, b, view, dtype):
        diff = (cb - ca).abs()
        for i, limit in enumerate(limits):
            counts[i] += int(torch.count_nonzero(_changed(ca, cb, diff, limit)))
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
