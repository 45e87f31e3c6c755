"""Render analysis results: aligned text tables for stdout, Markdown, HTML and JSON files for an output folder."""

from __future__ import annotations

import html
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


@dataclass(frozen=True)
class Section:
    """A titled paragraph of a report, with an optional figure: what is not a table.

    Attributes:
        title: The section heading.
        text: A paragraph under the heading (may be empty).
        image: Path of a PNG relative to the report's folder, shown under the heading; None for text only.
    """

    title: str
    text: str = ""
    image: str | None = None


Part = Table | Section
"""One block of a Markdown or HTML report, in reading order."""


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


def _md_cell(text: str) -> str:
    """A table cell's text with its pipes escaped (``|I1∩I2|`` would split the cell)."""
    return text.replace("|", "\\|")


def render_markdown(parts: Sequence[Part], heading: str) -> str:
    """Tables and sections as a Markdown document under ``heading`` (figures as relative image links)."""
    lines = [f"# {heading}\n"]
    for part in parts:
        lines.append(f"## {part.title}\n")
        if isinstance(part, Section):
            if part.image is not None:
                lines.append(f"![{part.title}]({part.image})\n")
            if part.text:
                lines.append(f"{part.text}\n")
            continue
        lines.append("| " + " | ".join(_md_cell(h) for h in part.headers) + " |")
        lines.append("|" + "|".join("---" for _ in part.headers) + "|")
        lines.extend("| " + " | ".join(_md_cell(format_cell(c)) for c in row) + " |" for row in part.rows)
        lines.append("")
    return "\n".join(lines)


_HTML_STYLE = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:0.2em 0.6em}"
               "td{text-align:right}td:first-child{text-align:left}th{background:#f2f2f2}img{max-width:100%}")


def render_html(parts: Sequence[Part], heading: str) -> str:
    """Tables and sections as one HTML page under ``heading``: inline style, no script, figures by relative path."""
    body = [f"<h1>{html.escape(heading)}</h1>"]
    for part in parts:
        body.append(f"<h2>{html.escape(part.title)}</h2>")
        if isinstance(part, Section):
            if part.image is not None:
                body.append(f'<img src="{html.escape(part.image)}" alt="{html.escape(part.title)}">')
            if part.text:
                body.append(f"<p>{html.escape(part.text)}</p>")
            continue
        header = "".join(f"<th>{html.escape(h)}</th>" for h in part.headers)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(c))}</td>" for c in row) + "</tr>"
                       for row in part.rows)
        body.append(f"<table><tr>{header}</tr>{rows}</table>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(heading)}</title>'
            f"<style>{_HTML_STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(
    result: Reportable, out: str | os.PathLike, name: str, *,
    parts: Sequence[Part] | None = None, heading: str | None = None, html_page: bool = False,
) -> list[Path]:
    """Write ``<out>/<name>.md`` and ``<out>/<name>.json`` (and ``<name>.html``) atomically; return their paths.

    Args:
        result: What is reported; its :meth:`~Reportable.to_dict` is the JSON file.
        out: The folder (created if needed).
        name: The files' stem.
        parts: The pages' blocks in order (default: ``result.tables()``).
        heading: The pages' title (default: ``name``).
        html_page: Also write the parts as one HTML page.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    blocks = result.tables() if parts is None else parts
    title = name if heading is None else heading
    written = [folder / f"{name}.md", folder / f"{name}.json"]
    atomic_write_text(written[0], render_markdown(blocks, title))
    atomic_write_text(written[1], json.dumps(_json_safe(result.to_dict()), indent=2, allow_nan=False) + "\n")
    if html_page:
        written.append(folder / f"{name}.html")
        atomic_write_text(written[2], render_html(blocks, title))
    return written
