"""Apply sparse deltas to a base model, and merge several deltas of one base into one."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mthlib.deltas.format import SparseDelta, build_delta, load_delta, parameter_lookup
from mthlib.fingerprint import canonical_names, state_fingerprint, unique_parameters


def _as_delta(delta: SparseDelta | str | os.PathLike) -> tuple[SparseDelta, str]:
    if isinstance(delta, SparseDelta):
        delta.validate()
        return delta, "sparse delta"
    return load_delta(delta), str(delta)


def apply_delta(
    model: nn.Module, delta: SparseDelta | str | os.PathLike, *, check_fingerprint: bool = True
) -> nn.Module:
    """Scatter a delta's values into ``model`` in place; all checks pass before any write.

    The model must be the untouched base: its fingerprint is computed from the
    current weights and compared with the delta's ``base_fingerprint``.

    Args:
        model: The base model; modified in place.
        delta: A :class:`SparseDelta` or a path to one.
        check_fingerprint: Refuse a base whose fingerprint differs from the delta's.

    Returns:
        ``model``, with the delta applied.

    Raises:
        ValueError: Names that the model lacks, a shape or dtype that differs, or
            (with ``check_fingerprint``) a different base; nothing is written then.
    """
    delta, label = _as_delta(delta)
    params = check_base(model, delta, label, check_fingerprint=check_fingerprint)
    with torch.no_grad():
        for name in sorted(delta.indices):
            _scatter(params[name], delta.indices[name], delta.values[name])
    return model


def check_base(
    model: nn.Module, delta: SparseDelta, label: str = "sparse delta", *, check_fingerprint: bool = True
) -> dict[str, nn.Parameter]:
    """Check that ``delta`` applies to ``model`` (the checks of :func:`apply_delta`); return its parameters by name.

    Shared by every consumer that lays a delta over its base (``apply_delta``, the PEFT export),
    so they refuse the same bases with the same lines.

    Raises:
        ValueError: ``"cannot apply <label>: ..."``: a name the model lacks, a shape or dtype
            that differs, two names of one tied parameter, or (with ``check_fingerprint``) a different base.
    """
    params = parameter_lookup(model)
    canonical = canonical_names(model)
    targets: dict[str, str] = {}
    for name in sorted(delta.indices):
        if name not in params:
            raise ValueError(f"cannot apply {label}: the model has no parameter {name!r}")
        param = params[name]
        if tuple(param.shape) != delta.shapes[name]:
            raise ValueError(f"cannot apply {label}: {name} has shape {tuple(param.shape)} in the model, "
                             f"{delta.shapes[name]} in the delta")
        if param.dtype != delta.values[name].dtype:
            raise ValueError(f"cannot apply {label}: {name} is {param.dtype} in the model but its values are "
                             f"{delta.values[name].dtype}; load the base in the dtype it was trained in")
        owner = canonical[name]
        if owner in targets:
            raise ValueError(f"cannot apply {label}: {name} and {targets[owner]} are the same tied parameter")
        targets[owner] = name
    if check_fingerprint:
        actual = state_fingerprint(unique_parameters(model))
        if actual != delta.base_fingerprint:
            raise ValueError(f"cannot apply {label}: it was made for base fingerprint {delta.base_fingerprint} "
                             f"({delta.base_model}) but this model has fingerprint {actual}")
    return params


def _scatter(param: Tensor, indices: Tensor, values: Tensor) -> None:
    idx = indices.to(device=param.device, dtype=torch.int64)
    vals = values.to(param.device)
    if param.is_contiguous():
        param.data.view(-1)[idx] = vals
    else:
        flat = param.data.reshape(-1).clone()
        flat[idx] = vals
        param.data.copy_(flat.view_as(param))


def merge_deltas(
    deltas: Iterable[SparseDelta | str | os.PathLike], on_overlap: Literal["error", "last", "mean"] = "error"
) -> SparseDelta:
    """Combine deltas of one base into one.

    Args:
        deltas: Deltas (or paths) made from the same base fingerprint, in order.
        on_overlap: What to do where two deltas store the same entry: ``"error"``
            refuses, ``"last"`` keeps the later delta's value, ``"mean"`` averages
            (in float64, cast back to the parameter's dtype).

    Returns:
        The merged delta. Its ``strategy`` lists the inputs' strategies, its
        ``step`` is the largest input step, and its ``sparsity`` is measured
        against the largest eligible count the inputs imply (``nnz / (1 - sparsity)``).
    """
    loaded = [_as_delta(d)[0] for d in deltas]
    if not loaded:
        raise ValueError("merge_deltas needs at least one delta")
    bases = {d.base_fingerprint for d in loaded}
    if len(bases) > 1:
        raise ValueError(f"cannot merge deltas of different bases: fingerprints {sorted(bases)}")
    names = sorted({name for d in loaded for name in d.indices})
    indices, values, shapes = {}, {}, {}
    for name in names:
        parts = [d for d in loaded if name in d.indices]
        _check_compatible(name, parts)
        shapes[name] = parts[0].shapes[name]
        indices[name], values[name] = _merge_entries(
            name, [d.indices[name] for d in parts], [d.values[name] for d in parts], on_overlap
        )
    return build_delta(
        indices, values, shapes,
        base_model=loaded[0].base_model,
        base_fingerprint=loaded[0].base_fingerprint,
        strategy={"merged": [d.strategy for d in loaded], "on_overlap": on_overlap},
        sparsity=_merged_sparsity(loaded, sum(int(t.numel()) for t in indices.values())),
        step=max(d.step for d in loaded),
    )


def _check_compatible(name: str, parts: Sequence[SparseDelta]) -> None:
    if len({d.shapes[name] for d in parts}) > 1 or len({d.values[name].dtype for d in parts}) > 1:
        raise ValueError(f"cannot merge: {name} has different shapes or dtypes across the deltas")


def _merge_entries(
    name: str, indices: Sequence[Tensor], values: Sequence[Tensor], on_overlap: str
) -> tuple[Tensor, Tensor]:
    all_idx = torch.cat([i.to(torch.int64) for i in indices])
    all_vals = torch.cat(list(values))
    order = torch.sort(all_idx, stable=True).indices
    all_idx, all_vals = all_idx[order], all_vals[order]
    unique, inverse, counts = torch.unique_consecutive(all_idx, return_inverse=True, return_counts=True)
    if unique.numel() == all_idx.numel():
        return unique, all_vals
    if on_overlap == "error":
        overlap = int((counts > 1).sum())
        raise ValueError(f"cannot merge: {overlap} entries of {name} are stored in more than one delta "
                         f"(choose on_overlap='last' or 'mean')")
    if on_overlap == "last":
        return unique, all_vals[torch.cumsum(counts, 0) - 1]
    if on_overlap == "mean":
        sums = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, all_vals.to(torch.float64))
        return unique, (sums / counts).to(all_vals.dtype)
    raise ValueError(f"on_overlap must be 'error', 'last' or 'mean', not {on_overlap!r}")


def _merged_sparsity(deltas: Sequence[SparseDelta], merged_entries: int) -> float:
    eligible = [d.num_entries / (1.0 - d.sparsity) for d in deltas if d.sparsity < 1.0 and d.num_entries]
    if not eligible:
        return 1.0
    return max(0.0, 1.0 - merged_entries / max(eligible))
