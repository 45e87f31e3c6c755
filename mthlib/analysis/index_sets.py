"""Index sets: per parameter, the flat entries a subnetwork holds (mask, delta, or what a fine-tune changed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Protocol

import torch
from safetensors import safe_open
from torch import Tensor

from mthlib.analysis.compare import View, changed_indices
from mthlib.analysis.sources import (
    Spec,
    WeightSource,
    check_base,
    check_same_parameters,
    existing_path,
    latest_delta,
    resolve_weights,
    spec_kind,
)
from mthlib.deltas import SparseDelta, load_delta


class IndexSets(Protocol):
    """Per parameter, a set of flat entry indices (trained or updated entries)."""

    label: str

    def names(self) -> list[str]:
        """Names of parameters that have a set (possibly empty)."""

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of the parameter the indices address."""

    def indices(self, name: str) -> Tensor:
        """Sorted unique flat int64 indices."""


class DeltaIndexSets:
    """The entries a sparse delta stores (the trained subnetwork)."""

    def __init__(self, delta: SparseDelta, label: str) -> None:
        self.label = label
        self.delta = delta

    def names(self) -> list[str]:
        return sorted(self.delta.indices)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.delta.shapes[name]

    def indices(self, name: str) -> Tensor:
        return self.delta.indices[name].to(torch.int64)


class MaskIndexSets:
    """The trainable entries of a mask file written by :class:`~mthlib.masking.Masks`.

    The file has metadata ``format=mthlib.masks`` and, per parameter, tensors
    ``"<name>.indices"`` (flat indices) and ``"<name>.shape"`` (its full shape).
    """

    def __init__(self, path: Path) -> None:
        self.label = str(path)
        self.path = path
        self._shapes: dict[str, tuple[int, ...]] = {}
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            for key in sorted(keys):
                if key.endswith(".indices"):
                    name = key.removesuffix(".indices")
                    if f"{name}.shape" not in keys:
                        raise ValueError(f"mask file {path}: {key} has no matching {name}.shape")
                    self._shapes[name] = tuple(int(s) for s in handle.get_tensor(f"{name}.shape").tolist())

    def names(self) -> list[str]:
        return sorted(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def indices(self, name: str) -> Tensor:
        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(f"{name}.indices").to(torch.int64).reshape(-1)


class ChangedIndexSets:
    """The entries where weights differ from a base by more than a tolerance."""

    def __init__(self, base: WeightSource, weights: WeightSource, tol: float, view: View = "stored") -> None:
        self.label = weights.label
        self.base, self.weights, self.tol, self.view = base, weights, tol, view
        check_same_parameters(base, weights)

    def names(self) -> list[str]:
        return self.weights.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.weights.shape(name)

    def indices(self, name: str) -> Tensor:
        return changed_indices(self.base.get(name), self.weights.get(name), self.tol, self.view)


def resolve_index_sets(
    spec: Spec | WeightSource,
    base: Spec | WeightSource | None = None,
    *,
    tol: float = 1e-5,
    delta_sets: Literal["stored", "changed"] = "stored",
    check_fingerprint: bool = True,
) -> IndexSets:
    """Index sets for a spec: a mask's entries, a delta's stored entries, or what weights changed.

    Args:
        spec: A mask file, a delta, a run folder, or weights (folder, file, model).
        base: Needed for weights: entries with ``|θ - θ_base| > tol`` form the set.
        tol: Tolerance for weights (and for deltas with ``delta_sets="changed"``).
        delta_sets: ``"stored"`` takes a delta's stored indices (the trained
            subnetwork); ``"changed"`` lays it over ``base`` and keeps the entries
            that differ from the base by more than ``tol``.
        check_fingerprint: Refuse a delta whose base fingerprint differs from ``base``.
    """
    if delta_sets not in ("stored", "changed"):
        raise ValueError(f"delta_sets must be 'stored' or 'changed', not {delta_sets!r}")
    path = existing_path(spec) if isinstance(spec, (str, os.PathLike)) else None
    if path is not None:
        kind = spec_kind(path)
        if kind == "masks":
            return MaskIndexSets(path)
        if kind in ("delta", "run") and delta_sets == "stored":
            delta = load_delta(path) if kind == "delta" else latest_delta(path)
            if base is not None and check_fingerprint:
                check_base(delta, resolve_weights(base), str(path))
            return DeltaIndexSets(delta, str(path))
    if base is None:
        label = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else type(spec).__name__
        raise ValueError(f"{label} holds weights: pass base= to find which entries changed")
    base_source = resolve_weights(base)
    return ChangedIndexSets(base_source, resolve_weights(spec, base_source, check_fingerprint=check_fingerprint), tol)
