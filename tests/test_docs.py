"""The Sphinx site builds without a single warning, its measured results are generated from committed data,
and its example strategy works as the tutorial says."""

import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger

from mthlib.analysis.plot_run import read_metrics
from mthlib.analysis.rank import MatrixRank, RankResult
from mthlib.analysis.report import write_report
from mthlib.analysis.sparsity import ParamSparsity, SparsityResult

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DATA = DOCS / "data"
STRATEGIES = sorted(ep.name for ep in importlib.metadata.entry_points(group="mthlib.masks")
                    if ep.value.startswith("mthlib.registry."))
"""Every built-in strategy (the package's own entry points): each has a page."""


def _load_generator():
    """docs/generate.py as a module (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


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
    for anchor in ("mthlib.envs.AlphabetSort", "mthlib.envs.JsonlEnv", "mthlib.envs.DatasetEnv",
                   "mthlib.masking.MaskStrategy", "mthlib.deltas.save_delta", "mthlib.grpo.module.GRPOModule",
                   "mthlib.analysis.update_sparsity", "mthlib.masking.SparseState", "mthlib.masking.compute_masks",
                   "mthlib.grpo.objective.GRPOObjective"):
        assert f'id="{anchor}"' in html, f"API reference lacks {anchor}"


def _table_cells(html: str) -> list[str]:
    """The text of every table body cell of a page, in order."""
    return re.findall(r"<td><p>(.*?)</p></td>", html)


def test_site_includes_the_generated_result_tables(built_site: Path) -> None:
    curve = generate.read_curve(DATA / "quickstart_curve")
    cells = _table_cells((built_site / "quickstart.html").read_text(encoding="utf-8"))
    flat = [cell for row in curve.rows for cell in row]
    assert any(cells[i:i + len(flat)] == flat for i in range(len(cells))), "quickstart.html lacks the measured curve"
    measuring = (built_site / "tutorials" / "measuring.html").read_text(encoding="utf-8")
    assert "134,515,008 entries" in measuring and "210 matrices" in measuring
    assert {"25.04", "88.01", "99.89", "99.44"} <= set(_table_cells(measuring))


def test_fragments_show_the_committed_measurements(tmp_path: Path) -> None:
    fragments = {path.stem: path.read_text(encoding="utf-8") for path in generate.write_fragments(DATA, tmp_path)}
    curve, results, skill = fragments["quickstart_curve"], fragments["measuring_results"], fragments["skill_curve"]
    assert "   * - before training\n     - 0.269\n     - 0.641\n     - 0.437\n     - 0.109\n" in skill
    assert "   * - after step 45\n     - 0.506\n" in skill and "   * - 41-45\n     - 0.87\n" in skill
    assert "44 min 18 s wall for\n45 steps and 3 evaluations, peak RSS 11.5 GiB" in skill
    train_rows = (DATA / "quickstart_curve" / "metrics.csv").read_text(encoding="utf-8").count("\n") - 2
    assert curve.count("   * - ") == 1 + train_rows == 13
    for text in ("   * - 1\n     - 0.08\n     - 12%\n     - 0.05\n     - 3.7\n     - 2.0\n",
                 "   * - 12\n     - 0.58\n     - 94%\n     - 0.39\n     - 4.8\n     - 2.2\n",
                 "1 min 5 s wall", "peak RSS 1.6 GiB", "torch 2.13.0, transformers 5.25",
                 "16 held-out prompts", "reward 0.75", "exact sorts 0%"):
        assert text in curve, text
    for text in ("2e-5", "from 6% to 88%", "134,515,008 entries", "   * - stored (fp32)\n     - 2.24\n",
                 "     - 25.04\n   * - bf16\n     - 87.78\n", "88% of the entries",
                 "``S.max() * max(M, N) * eps(float32)``), 210 matrices", "   * - mean rank %\n     - 99.89\n     - 99.76\n",
                 "   mth analyze rank --base embedded --finetuned finetuned/ --out reports/full\n"):
        assert text in results, text


def test_fragments_render_the_tools_own_output(tmp_path: Path) -> None:
    """A CSVLogger metrics.csv and ``mth analyze`` JSON reports, copied in unchanged, give the fragments."""
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    logger = CSVLogger(tmp_path / "runs", name="quickstart")
    for step in range(3):
        logger.log_metrics({"loss": 0.1, "reward": 0.5 + step / 10, "rewards/format": step / 4, "rewards/similarity": 0.3,
                            "timing/step_s": 20.0 + step, "timing/generation_s": 8.0}, step=step)
    logger.log_metrics({"val/reward": 0.9, "val/format": 0.5, "val/accuracy": 0.25, "val/similarity": 0.7}, step=2)
    logger.save()
    shutil.copy(Path(logger.log_dir) / "metrics.csv", data / "quickstart_curve" / "metrics.csv")
    sparsity = SparsityResult("embedded", "finetuned", [1e-8, 1e-5], ["stored", "bf16"], [
        ParamSparsity("model.layers.0.self_attn.q_proj.weight", "0", "q", 1000, {"stored": [990, 900], "bf16": [120, 100]}),
    ])
    rank = RankResult("embedded", "finetuned", "rtol=max(M,N)*eps(float32)", [
        MatrixRank("model.layers.0.self_attn.q_proj.weight", "0", "q", (4, 4), 3),
        MatrixRank("model.layers.0.self_attn.k_proj.weight", "0", "k", (2, 4), 1),
    ])
    write_report(sparsity, data / "measuring_results", "sparsity")
    write_report(rank, data / "measuring_results", "rank")

    fragments = {path.stem: path.read_text(encoding="utf-8") for path in generate.write_fragments(data, tmp_path / "out")}
    curve, results = fragments["quickstart_curve"], fragments["measuring_results"]
    assert "   * - 3\n     - 0.70\n     - 50%\n     - 0.30\n     - 22.0\n     - 8.0\n" in curve
    assert "reward 0.90, answer tag present\nin 50%, exact sorts 25%" in curve
    assert "1,000 entries" in results and "2 matrices" in results
    assert "     - tol 1e-8\n     - tol 1e-5\n   * - stored (fp32)\n     - 1.00\n     - 10.00\n" in results
    assert "   * - bf16\n     - 88.00\n     - 90.00\n" in results and "90% of the entries" in results
    assert "     - all\n     - q\n     - k\n   * - mean rank %\n     - 62.5\n     - 75\n     - 50\n" in results


def test_readme_quickstart_table_agrees_with_the_data() -> None:
    """README.md repeats the measured curve; every row and number there must match docs/data."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quickstart: what it prints", 1)[1].split("\n## ", 1)[0]
    table = [[cell.strip() for cell in line.strip().strip("|").split("|")]
             for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
    curve = generate.read_curve(DATA / "quickstart_curve")
    assert table[0] == generate.CURVE_HEADERS
    assert table[1:] == curve.rows
    m, ev = curve.measurement, curve.evaluation
    for text in (f"{generate.duration(m['wall_s'])} wall", f"peak RSS {m['peak_rss_gib']} GiB", generate.versions(m),
                 f"{m['eval_prompts']} held-out prompts", f"reward {ev['reward']}", f"tag present {ev['format']}",
                 f"exact sorts {ev['accuracy']}"):
        assert text in section, f"README's quickstart section lacks {text!r}"


def test_generated_fragments_are_ignored_and_not_committed() -> None:
    if shutil.which("git") is None or subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True
    ).returncode != 0:
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "docs/_generated"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert tracked.stdout == "", f"generated fragments are committed:\n{tracked.stdout}"
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q", "docs/_generated/quickstart_curve.rst"], cwd=ROOT)
    assert ignored.returncode == 0, "docs/_generated/ is not in .gitignore"


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


def test_skill_page_and_config_state_the_committed_measurements() -> None:
    """Every figure the skill page and configs/skill.yaml quote is the committed run's."""
    folder = DATA / "skill_curve"
    base_curves, curves = read_metrics(folder / "base_metrics.csv"), read_metrics(folder / "metrics.csv")
    base = {key: values[-1][1] for key, values in base_curves.items()}
    evals = [{key: dict(values)[step] for key, values in curves.items() if key.startswith("val/")}
             for step, _ in curves["val/reward"]]
    page = (DOCS / "tutorials" / "skill.rst").read_text(encoding="utf-8")
    config = (ROOT / "configs" / "skill.yaml").read_text(encoding="utf-8")
    accuracy = [f"{float(row['val/accuracy']):.1%}" for row in [base, *evals]]
    assert accuracy == ["10.9%", "17.2%", "23.4%", "25.0%"]
    assert "from 10.9% of the evaluation prompts before training to 25.0% after" in page
    assert "(17.2% at step 15, 23.4% at step 30)" in page
    assert "10.9% (base) -> 17.2% (step 15) -> 23.4% (step 30) -> 25.0% (step 45)" in config
    assert f"{float(base['val/format']):.1%}" == "64.1%" and "on 64.1% of" in page and "on 64.1% of" in config
    assert f"{float(evals[-1]['val/similarity']):.3f}" == "0.715" and "reached 0.715" in page
    assert f"{float(base['val/similarity']):.3f} -> 0.715" in config
    copy = [f"{float(row['val/copy']):.2f}" for row in (base, evals[-1])]
    assert copy == ["0.16", "0.81"] and "from 0.16 to 0.81" in page
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert f"from {accuracy[0]} to {accuracy[-1]} of 64 evaluation prompts in 45 steps" in readme


def test_reproducing_page_shows_the_committed_report(tmp_path: Path) -> None:
    """The tickets fragment is the committed ``mth report`` output, and every figure the page quotes is in it."""
    folder = DATA / "tickets_repro"
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    fragment = {path.stem: path.read_text(encoding="utf-8")
                for path in generate.write_fragments(DATA, tmp_path)}["tickets_repro"]
    for group in report["groups"]:
        reward = group["val"]["reward"]
        cell = f"{reward['mean']:.3f}" if reward["n"] < 2 else f"{reward['mean']:.3f} ± {reward['std']:.3f}"
        assert f"   * - {group['label']}\n     - {len(group['runs'])}\n     - {cell}\n" in fragment
    for pair in report["overlap"]["pairs"]:
        assert f"     - {pair['jaccard']:.2%}\n     - {pair['jaccard_random']:.2%}\n" in fragment
    assert fragment.count("   * - ") == 3 + len(report["groups"]) + 1 + len(report["overlap"]["pairs"]) + len(
        report["update_sparsity"])
    assert {path.name for path in folder.glob("*.png")} == {"reward_vs_lr.png", "jaccard.png"}
    page = " ".join((DOCS / "tutorials" / "reproducing.rst").read_text(encoding="utf-8").split())
    for quoted in re.findall(r"\b0\.\d{3,4}\b", page):
        assert quoted in fragment, f"the page quotes {quoted}, which the committed report does not show"
    for quoted in re.findall(r"\b[1-9]\d*\.\d%|\b\d+\.\d\d%", page):  # 23.4% (an accuracy of 0.234), 0.50%
        as_rate = f"{float(quoted[:-1]) / 100:.3f}"
        assert quoted in fragment or as_rate in fragment, f"the page quotes {quoted}, which the report does not show"
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    for phrase, value in {"(reward 0.486)": "0.486", "(0.531)": "0.531", "(0.400 ± 0.002)": "0.400 ± 0.002",
                          "(0.419)": "0.419", "share 0.50% of their entries": "0.50%"}.items():
        assert phrase in readme and value in fragment, phrase
