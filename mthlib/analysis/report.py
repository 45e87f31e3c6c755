"""Render analysis results: aligned text tables for stdout, Markdown and JSON files for an output folder."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mthlib.utils import atomic_write_text

Cell = str | int | float | None


@dataclass(frozen=True)
class Table:
    """A titled table of cells; floats print with 4 decimals, None as ``n/a``.

    Attributes:
        title: One line above the table.
        headers: Column names.
        rows: One list of cells per row, as long as ``headers``.
    """

    title: str
    headers: list[str]
    rows: list[list[Cell]]


class Reportable(Protocol):
    """What every analysis result offers to the renderers."""

    def tables(self) -> list[Table]:
        """Tables for people."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""


def percent(fraction: float | None) -> float | None:
    """A fraction as a percentage (None and NaN stay None)."""
    if fraction is None or math.isnan(fraction):
        return None
    return 100.0 * fraction


def format_cell(cell: Cell) -> str:
    """Text of one cell."""
    if cell is None:
        return "n/a"
    if isinstance(cell, float):
        return "n/a" if math.isnan(cell) else f"{cell:.4f}"
    return str(cell)


def render_text(tables: Sequence[Table]) -> str:
    """Tables as aligned plain text, separated by blank lines."""
    blocks = []
    for table in tables:
        cells = [table.headers, *([format_cell(c) for c in row] for row in table.rows)]
        widths = [max(len(row[i]) for row in cells) for i in range(len(table.headers))]
        lines = [table.title]
        for n, row in enumerate(cells):
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def render_markdown(tables: Sequence[Table], heading: str) -> str:
    """Tables as a Markdown document under ``heading``."""
    parts = [f"# {heading}\n"]
    for table in tables:
        parts.append(f"## {table.title}\n")
        parts.append("| " + " | ".join(table.headers) + " |")
        parts.append("|" + "|".join("---" for _ in table.headers) + "|")
        parts.extend("| " + " | ".join(format_cell(c) for c in row) + " |" for row in table.rows)
        parts.append("")
    return "\n".join(parts)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(result: Reportable, out: str | os.PathLike, name: str) -> list[Path]:
    """Write ``<out>/<name>.md`` and ``<out>/<name>.json`` atomically; return their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    markdown, data = folder / f"{name}.md", folder / f"{name}.json"
    atomic_write_text(markdown, render_markdown(result.tables(), name))
    atomic_write_text(data, json.dumps(_json_safe(result.to_dict()), indent=2, allow_nan=False) + "\n")
    return [markdown, data]
