"""bench/side_by_side.py refuses, in one line, variants whose packages (the ``bench`` extra) are missing."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
FIND_SPEC = importlib.util.find_spec


@pytest.fixture
def side_by_side(monkeypatch: pytest.MonkeyPatch):
    """The script as a module (it imports its neighbour ``workload`` from bench/)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("side_by_side", BENCH / "side_by_side.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pretend(monkeypatch: pytest.MonkeyPatch, installed: set[str]) -> None:
    """Make the bench extra's ``trl`` and ``peft`` look installed to ``find_spec`` only if in ``installed``."""
    def find_spec(name: str, *args):
        if name in ("trl", "peft"):
            return object() if name in installed else None
        return FIND_SPEC(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_packages_names_only_what_the_chosen_variants_import(side_by_side, monkeypatch):
    pretend(monkeypatch, installed=set())
    assert side_by_side.missing_packages(["trl_shira", "trl_full", "mthlib_dense"]) == ["trl", "peft"]
    assert side_by_side.missing_packages(["trl_full"]) == ["trl"]
    assert side_by_side.missing_packages(["hf_generate", "mthlib_dense", "mthlib_fisher99"]) == []
    pretend(monkeypatch, installed={"trl"})
    assert side_by_side.missing_packages(["trl_full", "trl_shira"]) == ["peft"]
    pretend(monkeypatch, installed={"trl", "peft"})
    assert side_by_side.missing_packages(list(side_by_side.VARIANTS)) == []


def test_a_variant_without_its_packages_stops_the_run_in_one_line_before_any_work(
    side_by_side, monkeypatch, tmp_path
):
    pretend(monkeypatch, installed={"trl"})
    monkeypatch.setattr(sys, "argv", ["side_by_side.py", "--only", "trl_full,trl_shira,mthlib_dense",
                                      "--model", str(tmp_path / "no_model_here"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stopped:
        side_by_side.main()
    message = str(stopped.value)
    assert "\n" not in message
    assert "peft" in message and "trl_shira" in message and "trl_full" not in message
    assert 'pip install -e ".[bench]"' in message and "--only" in message
    assert not (tmp_path / "out").exists()  # refused before the model was resolved or a folder written


def test_the_script_itself_exits_with_the_line(tmp_path):
    """Run as a command in a Python where ``trl`` cannot be imported (a ``None`` entry in ``sys.modules``)."""
    code = ("import runpy, sys; sys.modules['trl'] = None; "
            "sys.argv = ['side_by_side.py', '--only', 'trl_full', '--model', 'no_model_here']; "
            f"sys.path.insert(0, {str(BENCH)!r}); "
            f"runpy.run_path({str(BENCH / 'side_by_side.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        'not installed: trl (for trl_full); pip install -e ".[bench]", or leave those variants out with --only')
