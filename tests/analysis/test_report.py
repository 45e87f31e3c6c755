"""Report rendering: aligned text, Markdown, strict JSON; plots skip with one warning without matplotlib."""

from __future__ import annotations

import json
import math
import sys

import pytest

from mthlib.analysis import plots
from mthlib.analysis.report import Table, format_cell, render_markdown, render_text, write_report

TABLE = Table("Title", ["name", "value"], [["a", 1.0], ["long name", None], ["c", 12]])


class _Result:
    def tables(self):
        return [TABLE]

    def to_dict(self):
        return {"x": float("nan"), "nested": {1: [math.inf, 2.5]}}


def test_text_table_is_aligned():
    lines = render_text([TABLE]).splitlines()
    assert lines[0] == "Title"
    assert lines[1] == "name        value"
    assert lines[2] == "---------  ------"
    assert lines[3] == "a          1.0000"
    assert lines[4] == "long name     n/a"
    assert len({len(line) for line in lines[1:]}) == 1


def test_markdown_and_cells():
    md = render_markdown([TABLE], "heading")
    assert md.startswith("# heading\n") and "| name | value |" in md and "| long name | n/a |" in md
    assert format_cell(float("nan")) == "n/a" and format_cell(3) == "3" and format_cell(0.123456) == "0.1235"


def test_write_report_makes_strict_json(tmp_path):
    paths = write_report(_Result(), tmp_path / "r", "thing")
    assert [p.name for p in paths] == ["thing.md", "thing.json"]
    assert json.loads(paths[1].read_text()) == {"x": None, "nested": {"1": [None, 2.5]}}


def test_plots_skip_with_a_warning_without_matplotlib(tmp_path, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plots.heatmap([[1.0]], ["r"], ["c"], "t", tmp_path / "h.png") is None
    assert not (tmp_path / "h.png").exists()


def test_heatmap_writes_a_png(tmp_path):
    path = plots.heatmap([[1.0, float("nan")], [3.0, 4.0]], ["a", "b"], ["x", "y"], "t", tmp_path / "h.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
