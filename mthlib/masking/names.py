"""Short-name aliases of the registered mask strategies (``mask: fisher`` in a config).

Each registered strategy ``X`` registered as ``"x"`` appears here as a subclass named
``x`` (see :mod:`mthlib.masking.registry`), so jsonargparse resolves the short name
and a saved config's ``class_path: mthlib.masking.names.x`` imports again in a fresh
process: looking up a missing name loads the registry (entry points included) first.
"""

from typing import Any


def __getattr__(attr: str) -> Any:
    if attr.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    from mthlib.masking.registry import available_masks

    known = available_masks()
    if attr in globals():
        return globals()[attr]
    raise AttributeError(f"module {__name__!r} has no mask strategy {attr!r}; registered: {', '.join(known)}")
