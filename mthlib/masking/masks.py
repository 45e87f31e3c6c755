"""The :class:`Masks` container: which entries of which parameters are trainable.

A mask is stored as indices, never as a dense boolean tensor: at 99% sparsity a
135M-parameter model has 1.35M active entries, i.e. ~11 MB of int64 indices against
~135 MB of booleans. Every index tensor is flat (into ``param.view(-1)``), sorted and
unique, and lives on the CPU.

File format (safetensors, written atomically): ``"<name>.indices"`` holds the indices
(int32 when the parameter has fewer than 2**31 entries, else int64) and
``"<name>.shape"`` the parameter shape as int64. Metadata: ``format=mthlib.masks``,
``version``, ``names`` (JSON list, the parameter order) and any strings the caller adds,
keys sorted, so equal masks and metadata give the same bytes (and the same SHA-256).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mthlib.deltas import FORMAT as DELTA_FORMAT
from mthlib.deltas import load_delta
from mthlib.utils import safetensors_format, save_safetensors

FORMAT = "mthlib.masks"
"""Value of the ``format`` metadata key of a mask file."""

VERSION = "1"
"""Version of the mask file layout."""

INT32_LIMIT = 2**31
"""Parameters with at least this many entries store int64 indices."""


def index_dtype(numel: int) -> torch.dtype:
    """The integer dtype indices are stored in for a parameter of ``numel`` entries."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


def holds_every_entry(indices: torch.Tensor, numel: int) -> bool:
    """Whether a mask's indices (sorted and distinct, as :class:`Masks` keeps them) name all ``numel`` entries.

    Such a complete mask lets its parameter be read and updated whole, without index gathers.
    """
    return indices.numel() == numel


class Masks:
    """Trainable entries per parameter, as flat sorted unique indices.

    Args:
        indices: Parameter name (as in :meth:`~torch.nn.Module.named_parameters`, so tied
            weights appear once) to a 1-D integer tensor of flat indices of trainable
            entries. Names of ``shapes`` missing here get no active entry.
        shapes: Parameter name to its shape; defines the order of :attr:`names` and the
            entries :attr:`numel` counts.

    Raises:
        ValueError: An index tensor is not 1-D, not sorted, has duplicates, is out of
            range, or names a parameter without a shape.
    """

    def __init__(self, indices: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]) -> None:
        unknown = [name for name in indices if name not in shapes]
        if unknown:
            raise ValueError(f"indices given for parameters without a shape: {', '.join(unknown[:5])}")
        self._shapes: dict[str, tuple[int, ...]] = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        self._indices: dict[str, torch.Tensor] = {}
        for name, shape in self._shapes.items():
            given = indices.get(name)
            if given is None:
                self._indices[name] = torch.zeros(0, dtype=torch.int64)
            else:
                self._indices[name] = _validated(name, given, math.prod(shape))
        self.metadata: dict[str, str] = {}

    # -- mapping-like access ----------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names, in the order the masks were built (the strategy's eligible order)."""
        return tuple(self._shapes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name to shape (a copy)."""
        return dict(self._shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._indices[name]

    def __contains__(self, name: object) -> bool:
        return name in self._indices

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, indices)`` pairs in :attr:`names` order."""
        return iter(self._indices.items())

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of parameter ``name``."""
        return self._shapes[name]

    # -- counts -----------------------------------------------------------------------------
    def count(self, name: str) -> int:
        """Active entries of parameter ``name``."""
        return int(self._indices[name].numel())

    @property
    def total(self) -> int:
        """Active entries over all parameters."""
        return sum(int(idx.numel()) for idx in self._indices.values())

    @property
    def numel(self) -> int:
        """Entries of all parameters the masks cover (active or not)."""
        return sum(math.prod(shape) for shape in self._shapes.values())

    @property
    def density(self) -> float:
        """:attr:`total` / :attr:`numel` (0.0 for empty masks)."""
        numel = self.numel
        return self.total / numel if numel else 0.0

    # -- dense conversion -------------------------------------------------------------------
    def to_dense(self, name: str) -> torch.Tensor:
        """A boolean tensor of the parameter's shape, ``True`` at active entries."""
        dense = torch.zeros(math.prod(self._shapes[name]), dtype=torch.bool)
        dense[self._indices[name]] = True
        return dense.view(self._shapes[name])

    @classmethod
    def from_dense(cls, dense: Mapping[str, torch.Tensor]) -> Masks:
        """Build masks from boolean tensors (``True`` = trainable); shapes are the tensors' shapes."""
        indices = {name: torch.nonzero(t.detach().reshape(-1).cpu().bool()).view(-1) for name, t in dense.items()}
        return cls(indices, {name: tuple(t.shape) for name, t in dense.items()})

    # -- set algebra ------------------------------------------------------------------------
    def _check_shapes(self, other: Masks) -> list[str]:
        common = [name for name in self._shapes if name in other._shapes]
        for name in common:
            if self._shapes[name] != other._shapes[name]:
                raise ValueError(
                    f"parameter {name} has shape {self._shapes[name]} in one mask and {other._shapes[name]} in the other"
                )
        return common

    def overlap(self, other: Masks) -> dict[str, float]:
        """Overlap of the active sets A (``self``) and B (``other``) with random baselines.

        Computed over parameters present in both. ``o1 = |A∩B|/|A|``, ``o2 = |A∩B|/|B|``,
        ``jaccard = |A∩B|/|A∪B|``. Their expectations for independent uniform masks of the
        same densities ``dA``, ``dB``: ``o1_random = dB``, ``o2_random = dA``,
        ``jaccard_random = dA*dB / (dA + dB - dA*dB)``. A ratio with a zero denominator is NaN.
        Also returned: ``intersection``, ``count_a``, ``count_b`` and ``numel`` (as floats).

        Raises:
            ValueError: No parameter in common, or a common parameter's shapes differ.
        """
        common = self._check_shapes(other)
        if not common:
            raise ValueError("the two masks have no parameter in common")
        inter = sum(_intersection_size(self._indices[n], other._indices[n]) for n in common)
        count_a = sum(self.count(n) for n in common)
        count_b = sum(other.count(n) for n in common)
        numel = sum(math.prod(self._shapes[n]) for n in common)
        da, db = count_a / numel, count_b / numel
        return {
            "o1": _ratio(inter, count_a),
            "o2": _ratio(inter, count_b),
            "jaccard": _ratio(inter, count_a + count_b - inter),
            "o1_random": db,
            "o2_random": da,
            "jaccard_random": _ratio(da * db, da + db - da * db),
            "intersection": float(inter),
            "count_a": float(count_a),
            "count_b": float(count_b),
            "numel": float(numel),
        }

    def union(self, other: Masks) -> Masks:
        """Entries active in either; parameters of both (``self``'s order, then ``other``'s new ones)."""
        self._check_shapes(other)
        shapes = {**self._shapes, **{n: s for n, s in other._shapes.items() if n not in self._shapes}}
        indices = {}
        for name in shapes:
            parts = [m._indices[name] for m in (self, other) if name in m._indices]
            indices[name] = torch.unique(torch.cat(parts))
        return Masks(indices, shapes)

    def difference(self, other: Masks) -> Masks:
        """Entries active in ``self`` but not in ``other`` (``self``'s parameters)."""
        self._check_shapes(other)
        indices = {}
        for name, idx in self._indices.items():
            if name in other._indices and idx.numel():
                idx = idx[~torch.isin(idx, other._indices[name], assume_unique=True)]
            indices[name] = idx
        return Masks(indices, self._shapes)

    def shuffled(self, seed: int) -> Masks:
        """The same number of active entries in every parameter, at uniformly random positions.

        The lottery-ticket "random positions" check: a run from the result trains each
        tensor's count of entries (the layer-wise allocation) but none of the positions a
        strategy chose. With one :class:`torch.Generator` seeded with ``seed``, each
        parameter with ``k`` active entries of ``n`` (in :attr:`names` order) takes the first
        ``k`` of ``torch.randperm(n)``, sorted: every set of ``k`` positions is equally
        likely, whatever the current ones. Parameters without active entries draw nothing.
        Cost: one permutation of the largest parameter (8 bytes per entry). :attr:`metadata`
        is not carried over.
        """
        generator = torch.Generator().manual_seed(seed)
        indices = {}
        for name, idx in self._indices.items():
            if idx.numel():
                drawn = torch.randperm(math.prod(self._shapes[name]), generator=generator)[: idx.numel()]
                indices[name] = torch.sort(drawn).values
        return Masks(indices, self._shapes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Masks):
            return NotImplemented
        if self._shapes != other._shapes:
            return False
        return all(torch.equal(idx, other._indices[name]) for name, idx in self._indices.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Masks({len(self)} parameters, {self.total} of {self.numel} entries active, density {self.density:.6g})"

    # -- files ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        """Write the masks to a safetensors file atomically; equal masks and metadata give equal bytes.

        Args:
            path: Target file; its folder is created if needed.
            metadata: Extra string metadata (e.g. the strategy config as JSON). The keys
                ``format``, ``version`` and ``names`` are reserved.

        Raises:
            ValueError: A metadata key is reserved or a value is not a string.
        """
        extra = dict(metadata or {})
        for key, value in extra.items():
            if key in ("format", "version", "names"):
                raise ValueError(f"metadata key {key!r} is reserved by the mask file format; rename it")
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"mask file metadata must map strings to strings; got {key!r}: {type(value).__name__}")
        tensors = {}
        for name, idx in self._indices.items():
            shape = self._shapes[name]
            tensors[f"{name}.indices"] = idx.to(index_dtype(math.prod(shape))).contiguous()
            tensors[f"{name}.shape"] = torch.tensor(shape, dtype=torch.int64)
        header = {"format": FORMAT, "version": VERSION, "names": json.dumps(list(self._shapes)), **extra}
        save_safetensors(tensors, path, header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Masks:
        """Read masks written by :meth:`save`, or the trained entries of a sparse delta.

        A sparse delta (:mod:`mthlib.deltas`) is accepted too, so a finished run's
        ``deltas/last.safetensors`` can be the ``exclude_mask`` of the next task. The file's
        extra metadata lands in :attr:`metadata`.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: The file is not a safetensors file or not an mthlib mask file or delta.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mask file not found: {path}")
        is_delta = False
        with contextlib.suppress(ValueError):
            is_delta = safetensors_format(path) == DELTA_FORMAT
        if is_delta:
            delta = load_delta(path)
            masks = cls({n: i.to(torch.int64) for n, i in delta.indices.items()}, dict(delta.shapes))
            masks.metadata = dict(delta.metadata)
            return masks
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                if header.get("format") != FORMAT:
                    raise ValueError(
                        f"{path} is not an mthlib mask file (metadata format={header.get('format')!r}, "
                        f"expected {FORMAT!r})"
                    )
                names = json.loads(header["names"])
                shapes = {name: tuple(handle.get_tensor(f"{name}.shape").tolist()) for name in names}
                indices = {name: handle.get_tensor(f"{name}.indices").to(torch.int64) for name in names}
        except SafetensorError as err:
            raise ValueError(f"{path} is not a safetensors file: {err}") from err
        masks = cls(indices, shapes)
        masks.metadata = {k: v for k, v in header.items() if k not in ("format", "version", "names")}
        return masks


def locate(haystack: torch.Tensor, needles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where sorted ``needles`` sit in sorted unique ``haystack`` (same device).

    Returns:
        ``found`` (bool, per needle) and ``position`` (index into ``haystack``, valid where ``found``).
    """
    position = torch.searchsorted(haystack, needles).clamp(max=max(haystack.numel() - 1, 0))
    if not haystack.numel():
        return torch.zeros_like(needles, dtype=torch.bool), position
    return haystack[position] == needles, position


def _validated(name: str, indices: torch.Tensor, numel: int) -> torch.Tensor:
    if not isinstance(indices, torch.Tensor):
        indices = torch.as_tensor(indices)
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"indices of {name} must be an integer tensor; got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"indices of {name} must be 1-D flat indices; got shape {tuple(indices.shape)}")
    indices = indices.detach().to(device="cpu", dtype=torch.int64).contiguous()
    if indices.numel():
        steps = indices[1:] - indices[:-1]
        if bool((steps == 0).any()):
            raise ValueError(f"indices of {name} contain duplicates")
        if bool((steps < 0).any()):
            raise ValueError(f"indices of {name} are not sorted ascending")
        if int(indices[0]) < 0 or int(indices[-1]) >= numel:
            raise ValueError(
                f"indices of {name} out of range [0, {numel}): min {int(indices[0])}, max {int(indices[-1])}"
            )
    return indices


def _intersection_size(a: torch.Tensor, b: torch.Tensor) -> int:
    if not a.numel() or not b.numel():
        return 0
    return int(torch.count_nonzero(torch.isin(a, b, assume_unique=True)))


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan
