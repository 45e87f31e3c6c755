"""The product stands alone: no shipped file points at material outside the repository."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_no_file_refers_to_the_developers_shared_folder():
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    this = Path(__file__).resolve().relative_to(ROOT).as_posix()
    offenders = []
    for name in listed.splitlines():
        path = ROOT / name
        if name == this or not path.is_file() or path.suffix not in {".py", ".md", ".rst", ".yaml", ".toml", ".txt", ""}:
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        if "../shared" in text or "shared/specs" in text or "shared/REFERENCE" in text:
            offenders.append(name)
    assert not offenders, f"files referring to ../shared: {offenders}"
