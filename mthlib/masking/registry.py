"""The registry of mask strategies: ``@register_mask("name")``, entry points, short names.

A strategy registers itself with one decorator on its class. Third-party packages
expose modules (or classes) under the entry-point group ``mthlib.masks``;
:func:`available_masks` imports them, which runs their decorators.

Short names in configs: jsonargparse resolves a ``class_path`` without dots only by
matching the ``__name__`` of an imported subclass of the annotated type. For each
registered strategy the decorator therefore creates an *alias* subclass whose
``__name__`` is the short name (``fisher``) and that lives in
:mod:`mthlib.masking.names`; ``mask: fisher`` then resolves to
``mthlib.masking.names.fisher``, which re-imports in a fresh process because that
module loads the registry on demand. Call :func:`load_short_names` before parsing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from mthlib.masking.strategy import MaskStrategy

ENTRY_POINT_GROUP = "mthlib.masks"
"""Entry-point group through which installed packages register strategies."""

ALIAS_MODULE = "mthlib.masking.names"
"""Module holding the short-name alias classes."""

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_REGISTRY: dict[str, type[MaskStrategy]] = {}
_LOADED_ENTRY_POINTS: set[str] = set()

S = TypeVar("S", bound=type[MaskStrategy])


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_mask(name: str) -> Callable[[S], S]:
    """Class decorator registering a :class:`~mthlib.masking.MaskStrategy` under a short name.

    Sets ``cls.name`` and creates the alias ``mthlib.masking.names.<name>`` used by
    configs. Registering the same class again (same import path, e.g. a module reload)
    replaces the entry.

    Args:
        name: Lowercase letters, digits and underscores, starting with a letter.

    Raises:
        ValueError: Badly formed name, name taken by another class, or the class is
            already registered under another name.
        TypeError: The decorated object is not a concrete MaskStrategy subclass.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"mask strategy name {name!r} is not allowed: use lowercase letters, digits and underscores, "
            "starting with a letter (e.g. 'my_mask')"
        )

    def decorator(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, MaskStrategy)):
            raise TypeError(f"@register_mask({name!r}) decorates MaskStrategy subclasses; got {cls!r}")
        if cls.__dict__.get("_alias_of") is not None:
            raise ValueError(f"{_path(cls)} is the short-name alias of {_path(cls._alias_of)}; register that class")
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise TypeError(f"{_path(cls)} cannot be registered as {name!r}: it does not implement {missing}")
        existing = _REGISTRY.get(name)
        if existing is not None and _path(existing) != _path(cls):
            raise ValueError(
                f"mask strategy name {name!r} is already registered by {_path(existing)}; "
                f"choose another name for {_path(cls)}"
            )
        own = cls.__dict__.get("name")
        if own and own != name and _REGISTRY.get(own) is cls:
            raise ValueError(f"{_path(cls)} is already registered as {own!r}; register it under one name only")
        cls.name = name
        _REGISTRY[name] = cls
        _make_alias(name, cls)
        return cls

    return decorator


def _make_alias(name: str, cls: type[MaskStrategy]) -> None:
    """Create ``mthlib.masking.names.<name>``, a subclass of ``cls`` named ``name``."""
    module = importlib.import_module(ALIAS_MODULE)
    if cls.__name__ == name and cls.__qualname__ == name:
        setattr(module, name, cls)
        return
    alias = type(cls)(name, (cls,), {"__module__": ALIAS_MODULE, "__qualname__": name, "__doc__": cls.__doc__,
                                     "_alias_of": cls})
    setattr(module, name, alias)


def _load_entry_points() -> None:
    """Import every not yet loaded ``mthlib.masks`` entry point; one that fails to load only warns."""
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = f"{entry_point.name}={entry_point.value}"
        if key in _LOADED_ENTRY_POINTS:
            continue
        _LOADED_ENTRY_POINTS.add(key)
        try:
            loaded = entry_point.load()
        except Exception as err:  # a broken plugin must not hide the other strategies
            warnings.warn(
                f"mask strategy entry point {entry_point.name!r} ({entry_point.value}) failed to load: {err}",
                stacklevel=3,
            )
            continue
        if isinstance(loaded, type) and issubclass(loaded, MaskStrategy) and loaded not in _REGISTRY.values():
            register_mask(entry_point.name)(loaded)


def available_masks() -> dict[str, type[MaskStrategy]]:
    """Every registered strategy (after loading entry points), name to class, sorted by name."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def load_short_names() -> list[str]:
    """Make every registered short name resolvable by jsonargparse; returns the names. Call before parsing."""
    return list(available_masks())


def get_mask_class(name: str) -> type[MaskStrategy]:
    """The class registered as ``name``.

    Raises:
        ValueError: Unknown name; the message lists the registered ones.
    """
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise ValueError(f"unknown mask strategy {name!r}; registered: {', '.join(sorted(_REGISTRY)) or '(none)'}")
    return _REGISTRY[name]


def build_mask(name: str, **init_args: Any) -> MaskStrategy:
    """Instantiate the strategy registered as ``name`` with ``init_args``."""
    return get_mask_class(name)(**init_args)


def mask_summaries() -> dict[str, str]:
    """Name to the first line of each strategy's docstring (what ``mth masks list`` shows)."""
    return {name: (inspect.getdoc(cls) or "").split("\n", 1)[0] for name, cls in available_masks().items()}

