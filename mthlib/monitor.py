"""What a user sees while a run trains: a step progress bar, a mask-aware model summary, sampled completions.

:class:`~mthlib.grpo.GRPOModule` installs these through ``configure_callbacks`` (see
:func:`watch_callbacks`): Lightning's default progress bar and model summary are replaced by
subclasses of the same kind (TQDM or Rich, whichever Lightning chose), and a
:class:`CompletionsTable` is added unless the trainer already has one. The mthlib CLI also
silences the few Lightning and torch warnings that are known to be harmless for a GRPO run
(:func:`filter_known_warnings`).
"""

from __future__ import annotations

import logging
import math
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from mthlib.envs.base import Episode
from mthlib.utils import atomic_write_text

KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"The '\w+' does not have many workers", PossibleUserWarning,
     "prompts are generated in-process in microseconds; sampling, not loading, is the bottleneck"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     "raised inside Lightning's own pytree helper; nothing a user can change"),
    (r"Found \d+ module\(s\) in eval mode", PossibleUserWarning,
     "the frozen KL reference model (dense runs with beta > 0) stays in eval mode on purpose"),
    (r"Using ModelCheckpoint with manual optimization", UserWarning,
     "GRPO checkpoints after the optimizer step by design; resuming continues from exactly that state"),
    (r"LightningCLI's args parameter is intended", UserWarning,
     "`mth masks build` builds the fit CLI from a config while sys.argv holds the tool's own arguments"),
)
"""(message regex, category, why it is harmless) of every warning :func:`filter_known_warnings` silences."""

POSTFIX: tuple[tuple[str, str, str], ...] = (
    ("reward", "reward", "{:.3f}"),
    ("rewards/format", "tag", "{:.0%}"),
    ("timing/step_s", "s/step", "{:.1f}"),
)
"""(logged metric, progress-bar label, format) shown after the bar when the metric was logged."""


KNOWN_NOTICES: tuple[tuple[str, str], ...] = (
    (r"💡 Tip: For seamless cloud logging", "an advertisement for a hosted logger, printed by every run"),
)
"""(message regex, why it is left out) of every info line of Lightning's that :func:`filter_known_warnings` drops."""


class KnownNoticeFilter(logging.Filter):
    """Drops the log records of :data:`KNOWN_NOTICES` (installed on Lightning's rank-zero logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(re.match(pattern, record.getMessage()) for pattern, _ in KNOWN_NOTICES)


def filter_known_warnings() -> None:
    """Ignore the warnings of :data:`KNOWN_WARNINGS` and the notices of :data:`KNOWN_NOTICES`, and only those.

    Called by the ``mth`` entry point; calling it again adds nothing.
    """
    for message, category, _ in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(existing, KnownNoticeFilter) for existing in logger.filters):
        logger.addFilter(KnownNoticeFilter())


# -- progress bar ---------------------------------------------------------------------------
def step_postfix(metrics: Mapping[str, Any]) -> dict[str, str]:
    """The progress bar's text after the bar: last step's reward, answer-tag rate and seconds per step.

    Args:
        metrics: Logged metrics (``trainer.callback_metrics``): tensors or numbers by name.
    """
    return {label: fmt.format(float(metrics[key])) for key, label, fmt in POSTFIX if key in metrics}


class _StepBar:
    """Progress over optimizer steps: ``step k/max_steps`` instead of ``Epoch 0/-2`` on an endless prompt stream."""

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps > 0 else super().total_train_batches

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The bar counts optimizer steps (resumed runs start where they stopped), not batches of this epoch.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        for key in ("v_num", *(key for key, _, _ in POSTFIX)):
            items.pop(key, None)
        return {**step_postfix(trainer.callback_metrics), **items}


class StepProgressBar(_StepBar, TQDMProgressBar):
    """Lightning's TQDM bar over optimizer steps.

    It reads ``step 12/100 |███| [03:34<25:12, reward=0.640, tag=75%, s/step=19.0]``.
    """

    TRAIN_FORMAT = "step {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}{postfix}]"

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(
            position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
            file=sys.stdout, smoothing=0, bar_format=self.TRAIN_FORMAT,
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.initial = trainer.global_step  # rate and ETA count this run's steps only


class RichStepProgressBar(_StepBar, RichProgressBar):
    """Lightning's Rich bar over optimizer steps.

    It reads ``step ━━━━ 12/100 0:03:34 • 0:25:12 reward: 0.640 tag: 75% s/step: 19.0``.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'step':{len(self.validation_description)}}"


# -- model summary --------------------------------------------------------------------------
def trainable_line(entries: int, total: int) -> str:
    """``Trainable entries: 1.3 M of 134 M (1.00%) chosen by the mask``: a sparse run's share of every entry."""
    fraction = entries / total if total else 0.0
    trained, every = get_human_readable_count(entries).strip(), get_human_readable_count(total).strip()
    return f"Trainable entries: {trained} of {every} ({fraction:.2%}) chosen by the mask"


class _MaskCounts:
    """A model summary whose trainable count is the mask's active entries when the module trains a sparse state.

    Every parameter with an active entry requires a gradient, so Lightning's own count says
    nearly all of the model trains; the run's :class:`~mthlib.masking.SparseState` (built in
    ``configure_optimizers``, which Lightning calls before ``on_fit_start``) knows the real count.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = getattr(pl_module, "sparse_state", None)
        if state is None or not self._max_depth:
            super().on_fit_start(trainer, pl_module)
            return
        summary = self._summary(trainer, pl_module)
        if trainer.is_global_zero:
            self.summarize(
                summary._get_summary_data(), summary.total_parameters, state.masks.total, summary.model_size,
                summary.total_training_modes, total_flops=getattr(summary, "total_flops", 0), **self._summarize_kwargs,
            )
            rank_zero_info(trainable_line(state.masks.total, summary.total_parameters))


class MaskModelSummary(_MaskCounts, ModelSummary):
    """Lightning's model summary table, counting a sparse run's trainable entries."""


class RichMaskModelSummary(_MaskCounts, RichModelSummary):
    """Lightning's Rich model summary table, counting a sparse run's trainable entries."""


# -- completions ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StepSamples:
    """What one training step sampled and how the environment scored it (kept by the module for the table).

    Attributes:
        step: The optimizer step (``trainer.global_step``) after the step.
        replies: Per completion, the assistant reply of every turn; the ``G`` completions of a prompt are contiguous.
        scores: Per completion, the environment's score (``reward`` and its metrics).
    """

    step: int
    replies: list[list[str]]
    scores: list[dict[str, float]]


def _fenced(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _number(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else str(value)


def completions_markdown(samples: StepSamples, episodes: Sequence[Episode], num_prompts: int) -> str:
    """A Markdown page of the first ``num_prompts`` prompts of a step, each with all its completions and scores.

    Args:
        samples: The step's completions and scores.
        episodes: The step's batch of prompts (one episode per prompt, in batch order).
        num_prompts: Prompts shown.
    """
    group = len(samples.replies) // len(episodes)
    keys = list(samples.scores[0])
    lines = [f"# Completions at step {samples.step}", ""]
    for p, episode in enumerate(episodes[:num_prompts]):
        rows = range(p * group, (p + 1) * group)
        lines += [f"## Prompt {p + 1}", "", _fenced("\n\n".join(episode.user_turns)), ""]
        lines += ["| completion | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
        lines += [f"| {r - p * group + 1} | " + " | ".join(_number(samples.scores[r][k]) for k in keys) + " |"
                  for r in rows]
        for r in rows:
            turns = samples.replies[r]
            text = turns[0] if len(turns) == 1 else "\n\n".join(f"[turn {t + 1}]\n{x}" for t, x in enumerate(turns))
            lines += ["", f"### Completion {r - p * group + 1} (reward {_number(samples.scores[r]['reward'])})", "",
                      _fenced(text)]
        lines.append("")
    return "\n".join(lines)


class CompletionsTable(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, write a few prompts with their sampled completions and scores.

    The page goes to ``<log dir>/completions/step=<step>.md`` (written atomically; nothing without a logger), and to
    TensorBoard's text tab (tag ``completions``) when a :class:`~lightning.pytorch.loggers.TensorBoardLogger`
    is attached. The module hands the samples over in its ``last_samples`` attribute
    (:class:`StepSamples`, set by :class:`~mthlib.grpo.GRPOModule` after each step it takes).

    Args:
        every_n_steps: Optimizer steps between two pages (0: off).
        num_prompts: Prompts per page, each with all its completions.
    """

    def __init__(self, every_n_steps: int = 10, num_prompts: int = 2) -> None:
        if every_n_steps < 0 or num_prompts < 1:
            raise ValueError(
                f"CompletionsTable needs every_n_steps >= 0 (0: off) and num_prompts >= 1; "
                f"got every_n_steps={every_n_steps}, num_prompts={num_prompts}"
            )
        self.every_n_steps = every_n_steps
        self.num_prompts = num_prompts
        self._written_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Sequence[Episode], batch_idx: int) -> None:
        samples: StepSamples | None = pl_module.last_samples
        step = trainer.global_step
        if (not self.every_n_steps or samples is None or samples.step != step or step % self.every_n_steps
                or step == self._written_step):
            return  # off, no step taken in this batch (skipped), not a multiple, or already written
        self._written_step = step
        if not trainer.loggers:
            return  # logging is off: there is no log folder
        folder = Path(trainer.log_dir) / "completions"  # on every rank: log_dir is a collective broadcast
        if not trainer.is_global_zero:
            return
        text = completions_markdown(samples, batch, self.num_prompts)
        atomic_write_text(folder / f"step={step:06d}.md", text)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("completions", text, global_step=step)


# -- wiring ---------------------------------------------------------------------------------
def watch_callbacks(trainer: pl.Trainer) -> list[pl.Callback]:
    """The monitoring callbacks a GRPO module adds to ``trainer`` (from its ``configure_callbacks``).

    Lightning's default bar and summary (exactly :class:`TQDMProgressBar`, :class:`RichProgressBar`,
    :class:`ModelSummary` or :class:`RichModelSummary`; ``enable_progress_bar`` and
    ``enable_model_summary`` still turn them off) get their mthlib subclass, which Lightning
    substitutes for them; subclasses a user configured are kept. A :class:`CompletionsTable` with
    its defaults is added unless the trainer has one (configure it in ``trainer.callbacks``).
    """
    callbacks: list[pl.Callback] = []
    for callback in trainer.callbacks:
        kind = type(callback)
        if kind is TQDMProgressBar:
            callbacks.append(StepProgressBar(callback.refresh_rate, callback.process_position))
        elif kind is RichProgressBar:
            callbacks.append(RichStepProgressBar(callback.refresh_rate, theme=callback.theme))
        elif kind is ModelSummary:
            callbacks.append(MaskModelSummary())
        elif kind is RichModelSummary:
            callbacks.append(RichMaskModelSummary())
    if not any(isinstance(callback, CompletionsTable) for callback in trainer.callbacks):
        callbacks.append(CompletionsTable())
    return callbacks
