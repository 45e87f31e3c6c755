"""The Sphinx site builds without a single warning, and its example strategy works as the tutorial says."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
STRATEGIES = ("random", "fisher", "snip", "magnitude", "expander", "rigl", "diff")


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the HTML site once for the module, warnings as errors, and return its folder."""
    out = tmp_path_factory.mktemp("docs_html")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}\n{result.stderr}"
    return out


def test_site_builds_with_index(built_site: Path) -> None:
    index = built_site / "index.html"
    assert index.is_file()
    assert "mthlib" in index.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_has_a_page_with_its_class(built_site: Path, name: str) -> None:
    page = built_site / "strategies" / f"{name}.html"
    assert page.is_file(), f"no page for strategy {name}"
    html = page.read_text(encoding="utf-8")
    assert f'id="mthlib.registry.{name}.' in html, f"{name}.html does not document a class of mthlib.registry.{name}"
    assert ".compute" in html, f"{name}.html does not document compute()"


def test_api_reference_documents_the_public_modules(built_site: Path) -> None:
    html = (built_site / "reference" / "api.html").read_text(encoding="utf-8")
    for anchor in ("mthlib.envs.AlphabetSort", "mthlib.envs.JsonlEnv", "mthlib.masking.MaskStrategy",
                   "mthlib.deltas.save_delta", "mthlib.grpo.module.GRPOModule", "mthlib.analysis.update_sparsity"):
        assert f'id="{anchor}"' in html, f"API reference lacks {anchor}"


def test_include_if_exists_inserts_present_fragments_and_skips_missing(tmp_path: Path) -> None:
    """The ``include-if-exists`` directive of docs/conf.py, in a throwaway project (no autodoc, fast)."""
    src = tmp_path / "src"
    (src / "_generated").mkdir(parents=True)
    (src / "conf.py").write_text(textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(DOCS)!r})
        from conf import IncludeIfExists

        exclude_patterns = ["_generated"]

        def setup(app):
            app.add_directive("include-if-exists", IncludeIfExists)
        """
    ))
    (src / "_generated" / "curve.rst").write_text("Measured curve\n--------------\n\nReward rose to 0.42.\n")
    (src / "index.rst").write_text(
        "Top\n===\n\n.. include-if-exists:: /_generated/curve.rst\n\n"
        ".. include-if-exists:: /_generated/missing.rst\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(src), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    html = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "Measured curve" in html and "Reward rose to 0.42." in html


def test_tutorial_strategy_registers_and_keeps_exact_whole_rows() -> None:
    """Runs in a subprocess so that registering ``row_norm`` leaves this process's registry alone."""
    script = textwrap.dedent(
        """
        import sys
        sys.path[:0] = [sys.argv[1], sys.argv[2]]
        import torch
        from conftest import make_tiny_lm
        from row_norm import RowNorm
        from mthlib.masking import get_mask_class, mask_summaries

        assert get_mask_class("row_norm") is RowNorm
        assert mask_summaries()["row_norm"].startswith("Train the rows")
        model = make_tiny_lm(seed=0)
        for allocation in ("global", "per_tensor"):
            strategy = RowNorm(sparsity=0.9, allocation=allocation, norm="l1")
            masks = strategy.compute(model, None)
            eligible = strategy.eligible(model)
            if allocation == "global":
                assert masks.total == strategy.keep_count(sum(p.numel() for p in eligible.values()))
            partial = 0
            for name, idx in masks.items():
                width = eligible[name].shape[-1]
                if allocation == "per_tensor":
                    assert idx.numel() == strategy.keep_count(eligible[name].numel()), name
                assert bool((idx[1:] > idx[:-1]).all()), name
                rows = torch.bincount(idx // width)
                partial += int(((rows > 0) & (rows < width)).sum())
            assert partial <= (1 if allocation == "global" else len(eligible)), partial
        config = RowNorm(sparsity=0.99, norm="l1").config()
        assert config["name"] == "row_norm" and config["init_args"]["norm"] == "l1", config
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(DOCS / "examples"), str(ROOT / "tests")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
