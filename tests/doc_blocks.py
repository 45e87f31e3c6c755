"""The code blocks of the documentation: README.md, docs/**/*.rst and the launch lines of configs/*.yaml.

Used by ``tests/test_tutorials.py``, whose docstring says how each kind of block is run.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BASH = {"bash", "sh", "shell"}
COMMAND = re.compile(r"\s*(\$\s+)?(mth|python3?|pip|bash)\s+[\w.-]+(\s|$)")
"""A line that reads as a command to type (``mth fit --config ...``, not ``mth fit: error: ...``)."""
FILE_NAME = re.compile(r"[\w.-]+(/[\w.-]+)*\.\w+")


@dataclass(frozen=True)
class Block:
    """One code block of a page: where it starts, its language, its text and its ``:caption:``."""

    page: str
    line: int
    language: str
    text: str
    caption: str | None = None

    @property
    def saved_as(self) -> str | None:
        """The file the page asks the reader to create from this block, if its caption names one."""
        return self.caption if self.caption and FILE_NAME.fullmatch(self.caption) else None

    def lines(self) -> list[str]:
        """The block's lines, continuation lines joined by one space, indentation kept (heredocs stay intact)."""
        return re.sub(r"\s*\\\n\s*", " ", self.text).splitlines()

    def commands(self) -> list[str]:
        """A bash block's commands: its non-empty lines, stripped."""
        return [line.strip() for line in self.lines() if line.strip()]

    @property
    def transcript(self) -> bool:
        """A shell session shown as typed: commands after ``$ ``, each followed by what it prints."""
        return self.language in {"console", "text"} and self.text.lstrip().startswith("$ ")

    def session(self) -> list[tuple[str, list[str]]]:
        """A transcript's commands, each with the lines shown after it."""
        steps: list[tuple[str, list[str]]] = []
        for line in self.text.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:].strip(), []))
            elif line.strip():
                steps[-1][1].append(line)
        return steps

    def keys(self) -> list[str]:
        """What a table of skipped blocks may name: each command of a bash block, else the block's first line."""
        return self.commands() if self.language in BASH else [self.text.strip().splitlines()[0].strip()]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rst_blocks(path: Path, page: str) -> list[Block]:
    """The code blocks of an rst page: code-block / code / literalinclude directives and ``::`` literal blocks."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        line = lines[i]
        directive = re.match(r"(\s*)\.\. (code-block|code|sourcecode|literalinclude)::\s*(\S*)\s*$", line)
        literal = directive is None and line.rstrip().endswith("::") and not line.lstrip().startswith("..")
        if not (directive or literal):
            i += 1
            continue
        j, options = i + 1, {}
        while directive and j < len(lines) and (option := re.match(r"\s+:([\w-]+):\s*(.*)$", lines[j])):
            options[option[1]] = option[2].strip()
            j += 1
        body = []
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > _indent(line)):
            body.append(lines[j])
            j += 1
        text = textwrap.dedent("\n".join(body)).strip("\n") + "\n"
        if directive and directive[2] == "literalinclude":
            text = (path.parent / directive[3]).read_text(encoding="utf-8")
            options.setdefault("language", "text")
        language = options.get("language") or (directive[3] if directive else "") or "text"
        if text.strip():
            blocks.append(Block(page, i + 1, language, text, options.get("caption")))
        i = j
    return blocks


def markdown_blocks(path: Path, page: str) -> list[Block]:
    """The fenced code blocks of a Markdown page."""
    blocks, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        fence = re.match(r"(```|~~~)\s*([\w-]*)", lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence[1]))
            blocks.append(Block(page, i + 1, fence[2] or "text", "\n".join(lines[i + 1:end]) + "\n"))
            i = end
        i += 1
    return blocks


def config_blocks(path: Path, page: str) -> list[Block]:
    """The launch lines (``#   mth ...``) of a config's comment header, as one bash block."""
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    commands = [line.lstrip("#").strip() for line in header if re.match(r"#\s+mth ", line)]
    return [Block(page, 1, "bash", "\n".join(commands) + "\n")] if commands else []


def collect_pages() -> dict[str, list[Block]]:
    """Every page with code, README first, then docs/ and configs/ in path order."""
    pages = {"README.md": markdown_blocks(ROOT / "README.md", "README.md")}
    for path in sorted((ROOT / "docs").rglob("*.rst")):
        if not {"_build", "_generated"} & set(path.relative_to(ROOT / "docs").parts):
            pages[path.relative_to(ROOT).as_posix()] = rst_blocks(path, path.relative_to(ROOT).as_posix())
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        pages[path.relative_to(ROOT).as_posix()] = config_blocks(path, path.relative_to(ROOT).as_posix())
    return {page: blocks for page, blocks in pages.items() if blocks}



def shown_as(line: str) -> re.Pattern:
    """A line of a session as a pattern: the text itself, ``...`` and ``(...)`` standing for any text."""
    return re.compile(".*".join(re.escape(part) for part in re.split(r"\(?\.\.\.\)?", line.strip())))
