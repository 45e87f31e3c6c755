"""A run a user can watch: step progress bar, mask-aware summary, quiet output, completions pages, ``mth plot``."""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import re
import shlex
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from mthlib.analysis.plot_run import panel_curves, plot_run, read_metrics
from mthlib.cli import main
from mthlib.data import PromptDataModule
from mthlib.envs import AlphabetSort
from mthlib.envs.base import Episode
from mthlib.grpo import GRPOModule
from mthlib.masking import build_mask
from mthlib.monitor import (
    KNOWN_WARNINGS, CompletionsTable, MaskModelSummary, StepProgressBar, StepSamples, completions_markdown,
    KnownNoticeFilter, filter_known_warnings, step_postfix,
)
from tests.conftest import save_tiny_chat_lm

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_chat_lm(tmp_path_factory.mktemp("tiny") / "model", seed=3)


class BatchLog(pl.Callback):
    """Records every training batch (the prompts) by optimizer step."""

    def __init__(self) -> None:
        self.batches: dict[int, list[Episode]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches[trainer.global_step] = list(batch)


def fit(model_dir, tmp_path, steps, callbacks, logger=True, **trainer_options):
    pl.seed_everything(0)
    module = GRPOModule(model_name_or_path=model_dir, mask=build_mask("random", sparsity=0.99, seed=1),
                        num_generations=2, max_completion_length=6, learning_rate=1e-2)
    data = PromptDataModule(env=AlphabetSort(max_turns=1), batch_size=2, eval_size=2)
    trainer = pl.Trainer(
        max_steps=steps, logger=CSVLogger(tmp_path, name="run") if logger else False, enable_checkpointing=False,
        callbacks=callbacks, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path, **trainer_options,
    )
    trainer.fit(module, datamodule=data)
    return module, trainer


# -- progress bar ----------------------------------------------------------------------------
def test_postfix_shows_reward_tag_rate_and_seconds_per_step():
    logged = {"reward": torch.tensor(0.6404), "rewards/format": torch.tensor(0.75), "timing/step_s": 19.04, "loss": 1.0}
    assert step_postfix(logged) == {"reward": "0.640", "tag": "75%", "s/step": "19.0"}
    assert step_postfix({"reward": 0.5}) == {"reward": "0.500"}  # an environment without a format score: no tag


def test_the_bar_counts_optimizer_steps_to_max_steps_from_where_a_resumed_run_stands(capsys):
    trainer = SimpleNamespace(max_steps=100, max_epochs=-1, global_step=40, current_epoch=0, is_global_zero=True,
                              num_training_batches=float("inf"), loggers=[], progress_bar_metrics={"val/reward": 0.25},
                              callback_metrics={"reward": 0.5, "timing/step_s": 3.0})
    bar = StepProgressBar()
    bar.setup(trainer, None, "fit")
    bar.on_train_start(trainer, None)
    bar.on_train_epoch_start(trainer, None)
    trainer.global_step = 42  # two optimizer steps in this batch (num_iterations=2), the first batch after resuming
    bar.on_train_batch_end(trainer, None, None, [], 0)
    progress = bar.train_progress_bar
    assert (progress.total, progress.initial, progress.n) == (100, 40, 42)  # rate and ETA count this run's 2 steps
    assert "step 42/100 |" in capsys.readouterr().out
    assert bar.get_metrics(trainer, None) == {"reward": "0.500", "s/step": "3.0", "val/reward": 0.25}


def test_fit_shows_steps_summary_counts_the_mask_and_pages_every_n_steps(model_dir, tmp_path, capsys, caplog):
    batches = BatchLog()
    with caplog.at_level(logging.INFO):
        module, trainer = fit(model_dir, tmp_path, 4, [TQDMProgressBar(), ModelSummary(), CompletionsTable(2), batches])
    bars = [c for c in trainer.callbacks if isinstance(c, ProgressBar)]
    assert [type(c) for c in bars] == [StepProgressBar]  # replaces the default bar, keeps a single one
    assert [type(c) for c in trainer.callbacks if isinstance(c, ModelSummary)] == [MaskModelSummary]
    out = capsys.readouterr().out
    assert "step 4/4" in out and "Epoch" not in out
    assert "reward=" in out and "tag=" in out and "s/step=" in out

    entries, total = module.sparse_state.masks.total, sum(p.numel() for p in module.model.parameters())
    assert entries < total // 50  # a 1% mask: the summary must say so, not "all parameters"
    log = caplog.text
    assert re.search(rf"^{entries} +Trainable params$", log, re.M)
    assert f"Trainable entries: {entries} of {total / 1000:.1f} K ({entries / total:.2%}) chosen by the mask" in log

    pages = tmp_path / "run" / "version_0" / "completions"
    assert sorted(p.name for p in pages.iterdir()) == ["step=000002.md", "step=000004.md"]
    page = (pages / "step=000004.md").read_text()
    samples = module.last_samples  # the last step's completions, as the module kept them
    assert samples.step == 4 and page.startswith("# Completions at step 4")
    for p, episode in enumerate(batches.batches[4]):
        assert episode.user_turns[0] in page
        for row in (2 * p, 2 * p + 1):
            assert samples.replies[row][0] in page
            assert f"(reward {samples.scores[row]['reward']:.3f})" in page
    assert page.count("| completion | " + " | ".join(samples.scores[0]) + " |") == 2  # reward first, then the env's
    assert list(samples.scores[0])[0] == "reward" and set(samples.scores[0]) == set(AlphabetSort.metrics)


def test_disabled_bar_and_summary_stay_off_and_a_configured_table_is_kept(model_dir, tmp_path):
    _, trainer = fit(model_dir, tmp_path, 2, [CompletionsTable(every_n_steps=0)], enable_progress_bar=False,
                     enable_model_summary=False)
    assert not any(isinstance(c, (ProgressBar, ModelSummary)) for c in trainer.callbacks)
    tables = [c for c in trainer.callbacks if isinstance(c, CompletionsTable)]
    assert len(tables) == 1 and tables[0].every_n_steps == 0
    assert not (tmp_path / "run" / "version_0" / "completions").exists()


# -- completions pages -----------------------------------------------------------------------
def page_writer(tmp_path, step, samples):
    trainer = SimpleNamespace(global_step=step, loggers=[object()], log_dir=str(tmp_path), is_global_zero=True)
    return trainer, SimpleNamespace(last_samples=samples)


def test_a_page_is_written_once_per_step_and_only_for_a_step_taken(tmp_path):
    table = CompletionsTable(every_n_steps=2, num_prompts=1)
    first = [Episode(("sort: bob, al",), "x")]
    samples = StepSamples(2, [["al"], ["bob"]], [{"reward": 1.0}, {"reward": 0.0}])
    table.on_train_batch_end(*page_writer(tmp_path, 2, samples), None, first, 0)
    written = (tmp_path / "completions" / "step=000002.md").read_text()
    assert "sort: bob, al" in written and "(reward 1.000)" in written
    # a skipped step leaves global_step and the module's samples as they were: no second page, no overwrite
    table.on_train_batch_end(*page_writer(tmp_path, 2, samples), None, [Episode(("other",), "x")], 1)
    assert (tmp_path / "completions" / "step=000002.md").read_text() == written
    # samples older than the step (this batch's step was skipped) and steps off the period write nothing
    table.on_train_batch_end(*page_writer(tmp_path, 4, samples), None, first, 2)
    table.on_train_batch_end(*page_writer(tmp_path, 3, StepSamples(3, [["a"], ["b"]], [{"reward": 0.0}] * 2)),
                             None, first, 3)
    assert [p.name for p in (tmp_path / "completions").iterdir()] == ["step=000002.md"]
    unlogged, module = page_writer(tmp_path / "off", 2, samples)
    CompletionsTable(every_n_steps=2).on_train_batch_end(SimpleNamespace(**{**vars(unlogged), "loggers": []}), module,
                                                         None, first, 0)
    assert not (tmp_path / "off").exists()  # logger=False: no run folder, nothing written


def test_markdown_keeps_turns_tags_and_backticks_readable():
    episodes = [Episode(("first turn", "second turn"), "x")]
    samples = StepSamples(10, [["<tag>\nA\n</tag>", "has ``` inside"], ["b", "c"]],
                          [{"reward": 0.5, "format": 1.0}, {"reward": float("nan"), "format": 0.0}])
    page = completions_markdown(samples, episodes, num_prompts=3)
    assert "first turn\n\nsecond turn" in page
    assert "````text\n[turn 1]\n<tag>\nA\n</tag>\n\n[turn 2]\nhas ``` inside\n````" in page  # fence outlasts the text's
    assert "| 1 | 0.500 | 1.000 |" in page and "| 2 | nan | 0.000 |" in page
    two = [episodes[0], Episode(("another prompt",), "y")]
    both = StepSamples(10, [["a"], ["b"], ["c"], ["d"]], [{"reward": 0.0}] * 4)
    assert "## Prompt 2" in completions_markdown(both, two, num_prompts=2)
    first_only = completions_markdown(both, two, num_prompts=1)
    assert "another prompt" not in first_only and "```text\nb\n```" in first_only
    assert "```text\nc\n```" not in first_only


def test_bad_table_options_are_one_clear_error():
    with pytest.raises(ValueError, match="every_n_steps >= 0 .* num_prompts >= 1; got every_n_steps=-1, num_prompts=2"):
        CompletionsTable(every_n_steps=-1)
    with pytest.raises(ValueError, match="got every_n_steps=10, num_prompts=0"):
        CompletionsTable(num_prompts=0)


# -- warnings --------------------------------------------------------------------------------
EXAMPLES = [
    ("The 'train_dataloader' does not have many workers which may be a bottleneck.", PossibleUserWarning),
    ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead.", FutureWarning),
    ("Found 19 module(s) in eval mode at the start of training.", PossibleUserWarning),
    ("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no state.", UserWarning),
    ("LightningCLI's args parameter is intended to run from within Python like if it were", UserWarning),
]


def test_exactly_the_known_harmless_warnings_are_filtered():
    assert len(EXAMPLES) == len(KNOWN_WARNINGS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_known_warnings()
        for message, category in EXAMPLES:
            warnings.warn(message, category)
        assert caught == []
        warnings.warn("The 'val_dataloader' returned NaN", PossibleUserWarning)
        warnings.warn("LeafSpec is fine", DeprecationWarning)
    assert [str(w.message) for w in caught] == ["The 'val_dataloader' returned NaN", "LeafSpec is fine"]


def test_only_the_hosted_logger_advertisement_is_dropped_from_lightnings_info_lines(caplog):
    filter_known_warnings()
    filter_known_warnings()  # a second call adds no second filter
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert sum(isinstance(f, KnownNoticeFilter) for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)")
        logger.info("GPU available: False, used: False")
    assert [record.getMessage() for record in caplog.records] == ["GPU available: False, used: False"]


DOC = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "watching.rst"

CONFIG = """
trainer:
  max_steps: 4
  val_check_interval: 2
  limit_val_batches: 1
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: runs, name: quickstart}}
model:
  model_name_or_path: {model}
  num_generations: 2
  max_completion_length: 4
  mask: random
data:
  env:
    class_path: mthlib.envs.AlphabetSort
    init_args: {{max_turns: 1}}
  batch_size: 1
  eval_size: 2
"""


def doc_commands() -> list[str]:
    """The ``mth`` lines of the bash blocks of docs/tutorials/watching.rst, in page order."""
    blocks = re.findall(r"\.\. code-block:: bash\n\n((?:   .*\n|\n)+)", DOC.read_text())
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("mth ")]


def test_the_watching_page_commands_run_as_written_without_known_warnings(model_dir, tmp_path, monkeypatch):
    """Each ``mth`` line of the page, run as a user would; ``configs/quickstart.yaml`` is a tiny config here."""
    commands = doc_commands()
    assert [command.split()[1] for command in commands] == ["fit", "plot", "fit"]
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.format(model=model_dir))
    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}  # what a user's shell shows
    env["COLUMNS"] = "200"  # a terminal's width: Rich wraps a captured bar at 80 columns, splitting its metrics
    printed = []
    for command in commands:
        if "TensorBoardLogger" in command and not has_tensorboard:
            continue
        words = shlex.split(command.replace("configs/quickstart.yaml", str(config)))
        if words[1] == "plot":  # in-process: its output is a list of files, and a fresh interpreter costs seconds
            monkeypatch.chdir(tmp_path)
            main(words[1:])
            continue
        result = subprocess.run([sys.executable, "-m", "mthlib.cli", *words[1:]], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr
        printed.append(result.stdout + result.stderr)

    first = printed[0]
    assert "Epoch" not in first and re.search(r"^step .* 4/4 ", first, re.M)  # Rich bar, over optimizer steps
    assert "reward: " in first and "tag: " in first and "s/step: " in first
    assert re.search(r"^Trainable params: 212 ", first, re.M)
    assert "Trainable entries: 212 of 21.8 K (0.97%) chosen by the mask" in first
    assert not re.search("warn|deprecat|eval mode at the start|Tip: ", "".join(printed), re.I)

    run = tmp_path / "runs" / "quickstart" / "version_0"
    assert sorted(p.name for p in (run / "completions").iterdir()) == ["step=000002.md", "step=000004.md"]
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["loss.png", "reward.png", "timing.png", "val.png"]
    assert all(png.read_bytes()[:8] == PNG_SIGNATURE for png in (run / "plots").iterdir())
    if has_tensorboard:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "runs" / "tensorboard" / "quickstart" / "version_0")).Reload()
        assert {"reward", "rewards/format", "val/reward", "loss", "timing/step_s"} <= set(events.Tags()["scalars"])
        assert not (tmp_path / "runs" / "quickstart" / "version_1" / "completions").exists()  # default: every 10 steps


def test_the_watching_page_yaml_snippets_are_valid_configs(model_dir, tmp_path, capsys):
    blocks = re.findall(r"\.\. code-block:: yaml\n\n((?:   .*\n|\n)+)", DOC.read_text())
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.format(model=model_dir))
    resolved = []
    for i, block in enumerate(blocks):
        snippet = tmp_path / f"snippet{i}.yaml"
        snippet.write_text(textwrap.dedent(block))
        with pytest.raises(SystemExit) as stop:
            main(["fit", "--config", str(config), "--config", str(snippet), "--print_config"])
        assert not stop.value.code
        resolved.append(yaml.safe_load(capsys.readouterr().out)["trainer"])
    assert len(resolved) == 2
    table = resolved[0]["callbacks"]
    assert [(c["class_path"], c["init_args"]) for c in table] == [
        ("mthlib.monitor.CompletionsTable", {"every_n_steps": 2, "num_prompts": 1})]
    loggers = [(c["class_path"].rsplit(".", 1)[1], c["init_args"]["save_dir"]) for c in resolved[1]["logger"]]
    assert loggers == [("CSVLogger", "runs"), ("TensorBoardLogger", "runs/tensorboard")]


# -- mth plot --------------------------------------------------------------------------------
METRICS = [
    {"step": "0", "reward": "0.1", "rewards/format": "0.2", "loss": "1.5", "timing/step_s": "2.0"},
    {"step": "1", "reward": "0.3", "rewards/format": "0.4", "loss": "nan", "timing/step_s": "2.5"},
    {"step": "1", "val/reward": "0.6", "val/format": "0.7"},
    {"step": "2", "reward": "0.5", "rewards/format": "1.0", "loss": "0.5", "timing/step_s": "1.5"},
]


def write_metrics(folder: Path, rows, extra=()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    columns = ["epoch", "loss", "reward", "rewards/format", "step", "timing/step_s", "val/format", "val/reward", *extra]
    with (folder / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows({"epoch": "0", **row} for row in rows)
    return folder


def test_metrics_are_read_per_column_without_empty_or_non_finite_cells(tmp_path):
    curves = read_metrics(write_metrics(tmp_path, METRICS) / "metrics.csv")
    assert curves == {
        "loss": [(0, 1.5), (2, 0.5)],
        "reward": [(0, 0.1), (1, 0.3), (2, 0.5)],
        "rewards/format": [(0, 0.2), (1, 0.4), (2, 1.0)],
        "timing/step_s": [(0, 2.0), (1, 2.5), (2, 1.5)],
        "val/format": [(1, 0.7)],
        "val/reward": [(1, 0.6)],
    }
    assert set(panel_curves(curves, ("reward", "rewards/"))) == {"reward", "rewards/format"}
    assert set(panel_curves(curves, ("val/",))) == {"val/format", "val/reward"}


def test_mth_plot_writes_one_png_per_panel_with_data(tmp_path):
    run = write_metrics(tmp_path / "run", METRICS)
    main(["plot", str(run)])
    plots = run / "plots"
    assert sorted(p.name for p in plots.iterdir()) == ["loss.png", "reward.png", "timing.png", "val.png"]  # no kl
    for png in plots.iterdir():
        assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 1000
    with_kl = write_metrics(tmp_path / "kl", [{**METRICS[0], "kl": "0.01"}], extra=["kl"])
    plot_run(str(with_kl), out=str(tmp_path / "elsewhere"))
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["kl.png", "loss.png", "reward.png",
                                                                           "timing.png"]


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d, "metrics.csv does not exist: give a run's log folder"),
    (lambda d: write_metrics(d, [{"step": "0", "reward": "high"}]),
     "metrics.csv:2: reward='high' (step '0') is not a number"),
    (lambda d: write_metrics(d, [{"step": "0", "epoch": "0"}]), "holds none of the plotted metrics"),
])
def test_mth_plot_bad_run_folder_is_one_error_line(tmp_path, capsys, make, message):
    run = make(tmp_path / "run")
    with pytest.raises(SystemExit) as stop:
        main(["plot", str(run)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("mth plot: error: ") and message in err
    assert not (run / "plots").exists()


# -- TensorBoard (optional extra) ------------------------------------------------------------
def test_tensorboard_gets_the_curves_and_the_completions_text(model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    module = GRPOModule(model_name_or_path=model_dir, num_generations=2, max_completion_length=4)
    trainer = pl.Trainer(max_steps=2, logger=TensorBoardLogger(tmp_path, name="tb"), enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[CompletionsTable(every_n_steps=2)],
                         num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=PromptDataModule(env=AlphabetSort(max_turns=1), batch_size=1, eval_size=2))
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"tensors": 0}).Reload()
    assert {"reward", "rewards/format", "rewards/similarity", "timing/step_s"} <= set(events.Tags()["scalars"])
    text = events.Tensors("completions/text_summary")[0]
    assert text.step == 2 and b"# Completions at step 2" in text.tensor_proto.string_val[0]
    assert (tmp_path / "tb" / "version_0" / "completions" / "step=000002.md").exists()
