"""SparseDeltaCheckpoint: write the trained entries as sparse deltas during and after fit."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from safetensors import SafetensorError

from mthlib.deltas import save_delta
from mthlib.masking import MaskCallback
from mthlib.utils import atomic_dir, atomic_path, write_error

LAST = "last.safetensors"
DELTAS = "deltas"
_STEP_FILE = re.compile(r"^step=(\d+)\.safetensors$")


def delta_dir(trainer: pl.Trainer) -> Path:
    """The run's delta folder: ``<log_dir>/deltas`` (the run folder that holds config and metrics)."""
    return Path(trainer.log_dir or trainer.default_root_dir) / DELTAS


class SparseDeltaCheckpoint(pl.Callback):
    """Save ``deltas/step=NNNNNN.safetensors`` every ``every_n_steps`` and at the end of fit.

    Each file is a :mod:`~mthlib.deltas` sparse delta of the active entries of the run's
    :class:`~mthlib.masking.SparseState` (owned by ``mask_callback``);
    ``deltas/last.safetensors`` always names the newest one (a hard link, replaced
    atomically). Only the newest ``keep_last`` step files *this run wrote* are kept: a resumed
    run (which logs into a new version folder) never deletes or overwrites the deltas of the
    run it resumed, and its step numbers continue from the checkpoint's. A run refuses to start
    in a folder that already holds deltas of later steps (another run's), which it would
    overwrite. Only rank zero writes; a failed write leaves every earlier file intact.

    Args:
        mask_callback: The run's mask callback (its state gives the masks and the base fingerprint,
            its strategy the config recorded in each file).
        base_model: Name or path of the base model, recorded for ``mth export``.
        every_n_steps: Save every this many optimizer steps (0: only at the end of fit).
        keep_last: Step files to keep (``last`` is extra).
    """

    def __init__(self, mask_callback: MaskCallback, base_model: str, every_n_steps: int = 50, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1; got {keep_last}")
        self.mask_callback = mask_callback
        self.base_model = base_model
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.saved: list[str] = []
        """The step files this run wrote, oldest first (only these are ever pruned)."""
        self._start_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note the step the run starts at; refuse a folder holding later deltas of another run.

        Raises:
            ValueError: The delta folder holds a step file later than the starting step.
        """
        self._start_step = trainer.global_step
        folder = delta_dir(trainer)
        later = None
        if trainer.is_global_zero and folder.is_dir():
            steps = {p.name: int(m[1]) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))}
            later = next((name for name in sorted(steps) if steps[name] > self._start_step), None)
        later = trainer.strategy.broadcast(later)
        if later is not None:
            raise ValueError(
                f"{folder} already holds {later} from another run, later than this run's start (step "
                f"{self._start_step}); this run would overwrite it: log into a new folder (a logger gives each run "
                "its own version folder)"
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step > 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trained = trainer.global_step > self._start_step
        if trained and (not self.saved or not self.saved[-1].endswith(f"step={trainer.global_step:06d}.safetensors")):
            self.save(trainer, pl_module)

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        """Write the delta of the current step, point ``last`` at it, prune this run's old files.

        Raises:
            OSError: A file could not be written (it names the file; earlier files are unchanged).
        """
        folder = delta_dir(trainer)
        path = folder / f"step={trainer.global_step:06d}.safetensors"
        if trainer.is_global_zero:
            state = self.mask_callback.state
            try:
                save_delta(
                    path, state.model, dict(state.masks.items()), base_model=self.base_model,
                    base_fingerprint=state.base_fingerprint, strategy=self.mask_callback.strategy.config(),
                    sparsity=1 - state.masks.density, step=trainer.global_step,
                )
                with atomic_path(folder / LAST) as tmp:
                    tmp.unlink()
                    os.link(path, tmp)
            except (OSError, SafetensorError) as err:
                raise write_error(err, path) from err
        if str(path) not in self.saved:  # every rank keeps the list, so every rank agrees on when to save
            self.saved.append(str(path))
        while len(self.saved) > self.keep_last:
            old = Path(self.saved.pop(0))
            if trainer.is_global_zero:
                old.unlink(missing_ok=True)
        trainer.strategy.barrier()
        return path


class FinalModel(pl.Callback):
    """Save the trained model as a Hugging Face folder, ``<run>/model``, when fit ends (dense runs).

    A full fine-tune has no sparse delta; this folder is what ``mth analyze`` compares with the
    base and what ``from_pretrained`` loads. It is written to a temporary folder and renamed.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "model"  # log_dir is a collective: every rank asks
        if trainer.is_global_zero:
            with atomic_dir(folder) as tmp:
                pl_module.model.save_pretrained(tmp)
                pl_module.tokenizer.save_pretrained(tmp)
        trainer.strategy.barrier()
