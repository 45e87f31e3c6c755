"""The sparse delta format: build, save and load (validated) the trained entries of a run.

A delta is one safetensors file. For every parameter with trained entries it holds
``"<param>.indices"`` (flat, sorted, unique; int32 when the parameter has fewer than
2**31 entries, else int64) and ``"<param>.values"`` (the trained values at those
entries, in the parameter's dtype, so applying is an exact scatter). String
metadata: ``format`` (:data:`FORMAT`), ``version`` (:data:`VERSION`),
``base_model``, ``base_fingerprint`` (:func:`~mthlib.fingerprint.model_fingerprint`
of the base), ``strategy`` (the mask strategy's config as JSON), ``sparsity``,
``step``, ``mthlib_version`` and ``shapes`` (JSON ``{name: shape}``, so a delta can
be checked without its base). :func:`save_delta` also writes ``content_sha256`` (a
fingerprint of the stored tensors), so bytes flipped inside the file are caught on
load; a file without it is still accepted.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

import mthlib
from mthlib.fingerprint import state_fingerprint
from mthlib.utils import atomic_path

FORMAT = "mthlib.sparse_delta"
VERSION = "1"
INDICES_SUFFIX = ".indices"
VALUES_SUFFIX = ".values"
REQUIRED_METADATA = (
    "format",
    "version",
    "base_model",
    "base_fingerprint",
    "strategy",
    "sparsity",
    "step",
    "mthlib_version",
    "shapes",
)


def index_dtype(numel: int) -> torch.dtype:
    """Index dtype the format requires for a parameter of ``numel`` entries (int32 below 2**31)."""
    return torch.int32 if numel < 2**31 else torch.int64


@dataclass(frozen=True)
class SparseDelta:
    """Trained entries of a model, relative to a fingerprinted base.

    Attributes:
        indices: Per parameter name, flat sorted unique indices (int32/int64 by :func:`index_dtype`).
        values: Per parameter name, the trained values at ``indices`` (the parameter's dtype).
        metadata: The file's string metadata (see the module docstring).
        shapes: Per parameter name, the full shape of the parameter.
    """

    indices: dict[str, Tensor]
    values: dict[str, Tensor]
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def base_fingerprint(self) -> str:
        """Fingerprint of the base the delta applies to."""
        return self.metadata["base_fingerprint"]

    @property
    def base_model(self) -> str:
        """Name or path of the base model, as recorded at save time."""
        return self.metadata["base_model"]

    @property
    def step(self) -> int:
        """Training step at which the delta was saved."""
        return int(self.metadata["step"])

    @property
    def sparsity(self) -> float:
        """Fraction of eligible entries that stayed frozen, as recorded at save time."""
        return float(self.metadata["sparsity"])

    @property
    def strategy(self) -> dict[str, Any] | None:
        """The mask strategy's config (parsed from JSON)."""
        return json.loads(self.metadata["strategy"])

    @property
    def num_entries(self) -> int:
        """Number of stored (trained) entries over all parameters."""
        return sum(int(idx.numel()) for idx in self.indices.values())

    def validate(self) -> None:
        """Check every invariant of the format; raise ``ValueError`` naming the first broken one."""
        missing = [key for key in REQUIRED_METADATA if key not in self.metadata]
        if missing:
            raise ValueError(f"metadata lacks {missing}")
        if self.metadata["format"] != FORMAT:
            raise ValueError(f"metadata format is {self.metadata['format']!r}, expected {FORMAT!r}")
        if self.metadata["version"] != VERSION:
            raise ValueError(f"version {self.metadata['version']!r} is not supported (supported: {VERSION!r})")
        _check_scalar_metadata(self.metadata)
        if set(self.indices) != set(self.values):
            raise ValueError(f"unpaired tensors: {sorted(set(self.indices) ^ set(self.values))}")
        if set(self.shapes) != set(self.indices):
            raise ValueError(f"'shapes' metadata does not list exactly the stored parameters: "
                             f"{sorted(set(self.shapes) ^ set(self.indices))}")
        for name in self.indices:
            check_entries(name, self.indices[name], self.values[name], self.shapes[name])
        checksum = self.metadata.get("content_sha256")
        if checksum is not None and checksum != content_fingerprint(self.indices, self.values):
            raise ValueError("content checksum mismatch: the stored tensors were altered")


def _check_scalar_metadata(metadata: Mapping[str, str]) -> None:
    try:
        int(metadata["step"])
        float(metadata["sparsity"])
        json.loads(metadata["strategy"])
    except ValueError as err:
        raise ValueError(f"bad step, sparsity or strategy metadata: {err}") from None


def check_entries(name: str, indices: Tensor, values: Tensor, shape: Sequence[int]) -> None:
    """Check one parameter's stored entries against the format (dtype rule, finite values, order, range, lengths)."""
    numel = math.prod(shape)
    expected = index_dtype(numel)
    if indices.dtype != expected:
        raise ValueError(f"{name}.indices is {indices.dtype}, the format requires {expected} "
                         f"for a parameter of {numel} entries")
    if indices.dim() != 1 or values.dim() != 1:
        raise ValueError(f"{name}: indices and values must be 1-D")
    if indices.numel() != values.numel():
        raise ValueError(f"{name}: {indices.numel()} indices but {values.numel()} values")
    if not values.is_floating_point():
        raise ValueError(f"{name}.values is {values.dtype}, expected a floating-point dtype")
    nonfinite = int((~values.isfinite()).sum())
    if nonfinite:
        raise ValueError(f"{name}.values holds {nonfinite} non-finite value(s) (NaN or Inf); a delta stores finite values only")
    if indices.numel() == 0:
        return
    if bool((indices[1:] <= indices[:-1]).any()):
        raise ValueError(f"{name}.indices are not sorted and unique")
    if int(indices[0]) < 0 or int(indices[-1]) >= numel:
        raise ValueError(f"{name}.indices out of range [0, {numel}) for shape {tuple(shape)}")


def content_fingerprint(indices: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> str:
    """Checksum of a delta's stored tensors (names sorted), as :func:`~mthlib.fingerprint.state_fingerprint`."""
    names = sorted(indices)
    return state_fingerprint(
        pair for name in names for pair in ((name + INDICES_SUFFIX, indices[name]), (name + VALUES_SUFFIX, values[name]))
    )


def build_delta(
    indices: Mapping[str, Tensor],
    values: Mapping[str, Tensor],
    shapes: Mapping[str, Sequence[int]],
    *,
    base_model: str,
    base_fingerprint: str,
    strategy: dict | None,
    sparsity: float,
    step: int,
) -> SparseDelta:
    """Assemble and validate a :class:`SparseDelta`; indices are cast to the format's dtype."""
    idx = {name: t.detach().cpu().to(index_dtype(math.prod(shapes[name]))).contiguous() for name, t in indices.items()}
    vals = {name: values[name].detach().cpu().contiguous() for name in idx}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "base_model": str(base_model),
        "base_fingerprint": str(base_fingerprint),
        "strategy": json.dumps(strategy, sort_keys=True),
        "sparsity": repr(float(sparsity)),
        "step": str(int(step)),
        "mthlib_version": mthlib.__version__,
        "shapes": json.dumps({name: list(shapes[name]) for name in sorted(idx)}),
        "content_sha256": content_fingerprint(idx, vals),
    }
    delta = SparseDelta(idx, vals, metadata, {name: tuple(int(s) for s in shapes[name]) for name in idx})
    delta.validate()
    return delta


def write_delta(delta: SparseDelta, path: str | os.PathLike) -> Path:
    """Validate ``delta`` and write it atomically to ``path``."""
    delta.validate()
    tensors = {}
    for name in sorted(delta.indices):
        tensors[name + INDICES_SUFFIX] = delta.indices[name]
        tensors[name + VALUES_SUFFIX] = delta.values[name]
    target = Path(path)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=dict(delta.metadata))
    return target


def parameter_lookup(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every name a parameter answers to, tied aliases included (``lm_head.weight`` of a tied model)."""
    return dict(model.named_parameters(remove_duplicate=False))


def save_delta(
    path: str | os.PathLike,
    model: nn.Module,
    indices: Mapping[str, Tensor],
    *,
    base_model: str,
    base_fingerprint: str,
    strategy: dict | None,
    sparsity: float,
    step: int,
) -> Path:
    """Write the model's current values at ``indices`` as a sparse delta, atomically.

    Args:
        path: Target file; a killed write leaves any previous file at ``path`` intact.
        model: The trained model; values are gathered from its current parameters.
        indices: Per parameter name, flat sorted unique indices of trained entries
            (e.g. the index tensors of a :class:`~mthlib.masking.Masks`). Empty ones are skipped.
        base_model: Name or path of the base, recorded for ``mth export``.
        base_fingerprint: :func:`~mthlib.fingerprint.model_fingerprint` of the untouched base.
        strategy: The mask strategy's config, stored as JSON.
        sparsity: Fraction of eligible entries that stay frozen.
        step: Training step.

    Returns:
        The written path.

    Raises:
        ValueError: Unknown parameter names, or a trained value that is NaN or Inf (nothing is written).
    """
    params = parameter_lookup(model)
    unknown = sorted(set(indices) - set(params))
    if unknown:
        raise ValueError(f"cannot save delta: the model has no parameter(s) {unknown}")
    kept, values, shapes = {}, {}, {}
    for name, idx in indices.items():
        if idx.numel() == 0:
            continue
        param = params[name]
        flat_idx = idx.detach().reshape(-1).to(torch.int64)
        kept[name] = flat_idx
        values[name] = param.detach().reshape(-1)[flat_idx.to(param.device)]
        shapes[name] = tuple(param.shape)
    try:
        delta = build_delta(kept, values, shapes, base_model=base_model, base_fingerprint=base_fingerprint,
                            strategy=strategy, sparsity=sparsity, step=step)
    except ValueError as err:
        raise ValueError(f"cannot save delta {path}: {err}") from None
    return write_delta(delta, path)


def load_delta(path: str | os.PathLike) -> SparseDelta:
    """Read a sparse delta and check every invariant of the format before returning it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``"not a valid mthlib sparse delta: <path>: <reason>"`` for a
            truncated, corrupt or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sparse delta not found: {path}")
    try:
        delta = _read(path)
        delta.validate()
    except (SafetensorError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"not a valid mthlib sparse delta: {path}: {err}") from None
    return delta


def _read(path: Path) -> SparseDelta:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        if metadata.get("format") != FORMAT:
            raise ValueError(f"metadata format is {metadata.get('format')!r}, expected {FORMAT!r}")
        indices, values = {}, {}
        for key in handle.keys():
            if key.endswith(INDICES_SUFFIX):
                indices[key.removesuffix(INDICES_SUFFIX)] = handle.get_tensor(key)
            elif key.endswith(VALUES_SUFFIX):
                values[key.removesuffix(VALUES_SUFFIX)] = handle.get_tensor(key)
            else:
                raise ValueError(f"unexpected tensor {key!r} (only '<param>.indices' and '<param>.values')")
    try:
        raw_shapes = json.loads(metadata.get("shapes", "{}"))
        shapes = {name: tuple(int(s) for s in shape) for name, shape in raw_shapes.items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"bad 'shapes' metadata: {err}") from None
    return SparseDelta(indices, values, metadata, shapes)
