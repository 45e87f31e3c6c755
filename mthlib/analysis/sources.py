"""Where analysed weights and index sets come from, read lazily one tensor at a time.

A *spec* names one of:

* a Hugging Face model folder (``*.safetensors`` shards, read with :func:`safetensors.safe_open`);
* a single safetensors state-dict file;
* a sparse delta (:mod:`mthlib.deltas`): weights once laid over a base, or its index sets;
* a mask file (metadata ``format=mthlib.masks``): index sets only, see
  :mod:`mthlib.analysis.index_sets`;
* a run folder: its latest delta (``deltas/*.safetensors`` or ``last.safetensors``,
  highest ``step`` metadata);
* a model name that is not an existing path (e.g. ``"embedded"``): loaded with
  :func:`mthlib.models.load_model`;
* an in-memory :class:`torch.nn.Module`.

Weight sources list parameters as :func:`~mthlib.fingerprint.unique_parameters`
does (tied parameters once), so a folder written by ``save_pretrained``, the model
it came from and a delta laid over either all name the same tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, Union

import torch
from safetensors import safe_open
from torch import Tensor, nn

from mthlib.analysis.compare import View, changed_indices
from mthlib.deltas import FORMAT as DELTA_FORMAT
from mthlib.deltas import SparseDelta, load_delta
from mthlib.fingerprint import state_fingerprint, unique_parameters
from mthlib.utils import safetensors_format

MASKS_FORMAT = "mthlib.masks"
SPEC_KINDS = "an HF model folder, a safetensors state dict, a sparse delta, a mask file, a run folder or a model name"


class WeightSource(Protocol):
    """Named tensors that can be listed, measured and read one at a time."""

    label: str

    def names(self) -> list[str]:
        """Parameter names, sorted."""

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one parameter, without reading it."""

    def get(self, name: str) -> Tensor:
        """The tensor (a fresh copy or a read-only view; callers do not modify it)."""

    def fingerprint(self) -> str:
        """:func:`~mthlib.fingerprint.state_fingerprint` over the tensors sorted by name."""


Spec = Union[str, os.PathLike, nn.Module]


class Shaped(Protocol):
    """Anything that lists parameter names and their shapes."""

    def names(self) -> list[str]:
        """Parameter names."""

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one parameter."""


def total_entries(source: Shaped) -> int:
    """Number of entries over all of a source's parameters."""
    return sum(_numel(source.shape(name)) for name in source.names())


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class SafetensorsWeights:
    """Weights in one or more safetensors files (an HF folder's shards or a state-dict file)."""

    def __init__(self, files: list[Path], label: str) -> None:
        self.label = label
        self._file: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self._file[key] = file
                    self._shapes[key] = tuple(handle.get_slice(key).get_shape())
        self._fingerprint: str | None = None

    def names(self) -> list[str]:
        return sorted(self._file)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> Tensor:
        with safe_open(str(self._file[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint((name, self.get(name)) for name in self.names())
        return self._fingerprint


class ModuleWeights:
    """The parameters of an in-memory model (tied parameters once)."""

    def __init__(self, model: nn.Module, label: str) -> None:
        self.label = label
        self._params = dict(unique_parameters(model))
        self._fingerprint: str | None = None

    def names(self) -> list[str]:
        return sorted(self._params)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._params[name].shape)

    def get(self, name: str) -> Tensor:
        return self._params[name].detach().cpu()

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint((name, self.get(name)) for name in self.names())
        return self._fingerprint


class DeltaWeights:
    """A base's weights with a sparse delta scattered in, materialised one tensor at a time."""

    def __init__(self, delta: SparseDelta, base: WeightSource, label: str) -> None:
        self.label = label
        self.delta = delta
        self.base = base
        known = set(base.names())
        for name, shape in delta.shapes.items():
            if name not in known:
                raise ValueError(f"{label}: parameter {name} is not in the base {base.label}")
            if base.shape(name) != shape:
                raise ValueError(f"{label}: {name} has shape {shape} but {base.shape(name)} in the base {base.label}")
        self._fingerprint: str | None = None

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def get(self, name: str) -> Tensor:
        tensor = self.base.get(name)
        if name not in self.delta.indices:
            return tensor
        values = self.delta.values[name]
        tensor = tensor.to(device="cpu", dtype=values.dtype, copy=True).contiguous()
        tensor.view(-1)[self.delta.indices[name].to(torch.int64)] = values
        return tensor

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint((name, self.get(name)) for name in self.names())
        return self._fingerprint


def check_same_parameters(base: WeightSource, other: WeightSource) -> None:
    """Refuse two weight sources whose parameter names or shapes differ, naming the first difference."""
    base_names, other_names = set(base.names()), set(other.names())
    if base_names != other_names:
        only_base = sorted(base_names - other_names)
        only_other = sorted(other_names - base_names)
        where = f"{only_base[0]} is in {base.label} only" if only_base else f"{only_other[0]} is in {other.label} only"
        raise ValueError(f"parameters differ between {base.label} and {other.label}: {where} "
                         f"({len(only_base) + len(only_other)} names differ)")
    for name in sorted(base_names):
        if base.shape(name) != other.shape(name):
            raise ValueError(f"{name} has shape {base.shape(name)} in {base.label} "
                             f"but {other.shape(name)} in {other.label}")


def _step_of(path: Path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int((handle.metadata() or {})["step"])


def run_deltas(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The deltas saved in a run folder as ``(step, path)``, ascending by step.

    Looks in ``deltas/*.safetensors`` and ``last.safetensors``; where two files
    share a step (``last.safetensors`` links the newest), the one not named
    ``last.safetensors`` is kept.
    """
    run = Path(run_dir)
    saved = sorted(p for p in (run / "deltas").glob("*.safetensors") if p.name != "last.safetensors")
    candidates = [*saved, run / "deltas" / "last.safetensors", run / "last.safetensors"]
    by_step: dict[int, Path] = {}
    for path in candidates:
        if path.is_file() and safetensors_format(path) == DELTA_FORMAT:
            by_step.setdefault(_step_of(path), path)
    return sorted(by_step.items())


def _hf_weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [p for p in sorted(folder.glob("*.safetensors")) if safetensors_format(p) not in (DELTA_FORMAT, MASKS_FORMAT)]


def spec_kind(path: Path) -> str:
    """What an existing path holds: ``hf_folder``, ``state_dict``, ``delta``, ``masks`` or ``run``."""
    if path.is_dir():
        if _hf_weight_files(path):
            return "hf_folder"
        if run_deltas(path):
            return "run"
        raise ValueError(f"{path} is neither an HF model folder (*.safetensors weights) nor a run folder "
                         "(deltas/*.safetensors or last.safetensors)")
    if path.suffix != ".safetensors":
        raise ValueError(f"unsupported file {path}: expected {SPEC_KINDS}")
    fmt = safetensors_format(path)
    if fmt == DELTA_FORMAT:
        return "delta"
    if fmt == MASKS_FORMAT:
        return "masks"
    return "state_dict"


def existing_path(spec: str | os.PathLike) -> Path | None:
    """``spec`` as a path when it exists; None when it reads as a model name; FileNotFoundError otherwise."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = os.fspath(spec)
    if text.endswith(".safetensors") or text.startswith(("/", ".", "~")) or isinstance(spec, Path):
        raise FileNotFoundError(f"no such file or folder: {text}")
    return None


def _load_by_name(name: str) -> WeightSource:
    from mthlib.models import load_model

    model, _ = load_model(name)
    return ModuleWeights(model, name)


def latest_delta(run: Path) -> SparseDelta:
    """The run folder's delta with the highest ``step``, loaded and validated."""
    return load_delta(run_deltas(run)[-1][1])


def resolve_weights(
    spec: Spec | WeightSource, base: Spec | WeightSource | None = None, *, check_fingerprint: bool = True
) -> WeightSource:
    """A :class:`WeightSource` for a spec (see the module docstring).

    Args:
        spec: What to read.
        base: The base a delta (or a run folder's latest delta) is laid over; when
            absent, the delta's recorded ``base_model`` is resolved instead.
        check_fingerprint: Refuse a base whose fingerprint differs from the delta's.

    Raises:
        FileNotFoundError: A path that does not exist.
        ValueError: A mask file (it holds no weights), an unrecognised file, or a
            delta whose base fingerprint differs from the base's.
    """
    if isinstance(spec, nn.Module):
        return ModuleWeights(spec, type(spec).__name__)
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    path = existing_path(spec)
    if path is None:
        return _load_by_name(os.fspath(spec))
    kind = spec_kind(path)
    if kind == "hf_folder":
        return SafetensorsWeights(_hf_weight_files(path), str(path))
    if kind == "state_dict":
        return SafetensorsWeights([path], str(path))
    if kind == "masks":
        raise ValueError(f"{path} is a mask file: it holds index sets, not weights")
    delta = load_delta(path) if kind == "delta" else latest_delta(path)
    return delta_weights(delta, base, str(path), check_fingerprint=check_fingerprint)


def delta_weights(
    delta: SparseDelta, base: Spec | WeightSource | None, label: str, *, check_fingerprint: bool = True
) -> DeltaWeights:
    """Lay ``delta`` over ``base`` (default: the delta's recorded base), checking the fingerprint."""
    base_source = resolve_weights(base if base is not None else delta.base_model)
    if check_fingerprint:
        check_base(delta, base_source, label)
    return DeltaWeights(delta, base_source, label)


def check_base(delta: SparseDelta, base: WeightSource, label: str) -> None:
    """Refuse a base whose fingerprint differs from the one the delta records (both named)."""
    actual = base.fingerprint()
    if actual != delta.base_fingerprint:
        raise ValueError(f"{label} was made from base fingerprint {delta.base_fingerprint} ({delta.base_model}), "
                         f"but the base {base.label} has fingerprint {actual}")


def open_weights(spec: Spec | WeightSource, base: Spec | WeightSource | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, tensor)`` for every parameter of a spec, sorted by name, one tensor at a time."""
    source = resolve_weights(spec, base)
    for name in source.names():
        yield name, source.get(name)


def update_indices(
    base: Spec | WeightSource, finetuned: Spec | WeightSource, tol: float = 1e-5, view: View = "stored"
) -> dict[str, Tensor]:
    """Per parameter, the flat int64 indices where ``finetuned`` differs from ``base`` by more than ``tol``."""
    base_source = resolve_weights(base)
    ft_source = resolve_weights(finetuned, base_source)
    check_same_parameters(base_source, ft_source)
    return {name: changed_indices(base_source.get(name), ft_source.get(name), tol, view) for name in base_source.names()}
