"""MaskCallback: create the run's :class:`~mthlib.masking.SparseState`, prove the frozen entries never move, resume exactly.

Contract with the LightningModule: it holds the causal LM as ``pl_module.model`` (and its
tokenizer as ``pl_module.tokenizer`` when the strategy needs calibration), may hold its
base fingerprint as ``pl_module.base_fingerprint`` (saves hashing the model again), and in
``configure_optimizers`` asks the callback for the state and builds the optimizer on it::

    def configure_optimizers(self):
        state = self.mask_callback.prepare(self.trainer, self)
        return SparseAdamW(state, lr=1e-4)

A strategy that needs calibration gets its batches from the data module's
``calibration_batches(tokenizer, num_samples=..., batch_size=..., seed=...)`` through
:func:`~mthlib.masking.compute_masks`, the function ``mth masks build`` uses too.

Why ``configure_optimizers``: Lightning 2.6 restores callback states (``load_state_dict``)
after ``Callback.setup`` and before ``Strategy.setup`` builds the optimizer, and
``trainer.ckpt_path`` is only known once restoring starts. So only when the optimizer is
built does the callback know whether a checkpoint gave it a state; otherwise it computes
the mask then (the model is on its device already, so calibration runs on the accelerator).
A restored mask is never recomputed.
"""

from __future__ import annotations

import json
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from mthlib.fingerprint import model_fingerprint
from mthlib.masking.calibration import calibration_batches, compute_masks
from mthlib.masking.optim import SparseAdamW
from mthlib.masking.reinit import reinitialised_values
from mthlib.masking.state import SparseState
from mthlib.masking.strategy import MaskStrategy
from mthlib.masking.swap import scatter_values


class MaskCallback(Callback):
    """Compute, enforce, verify, update and checkpoint the mask of a sparse fine-tune.

    * Fresh run: the strategy chooses the masks (:func:`~mthlib.masking.compute_masks`) and
      :meth:`SparseState.capture` records their base values, the base fingerprint and a
      digest of every parameter. With ``reinit`` the active entries then get fresh values
      (:func:`~mthlib.masking.reinit.reinitialised_values`, seeded with the strategy's
      ``seed``): training starts from them, while the recorded base values, so the KL
      reference (:meth:`SparseState.swapped_to_base`) and the frozen-entry checks, stay
      the base's. A resumed run restores its trained values and never re-initialises.
    * The state is attached to the model while the fit runs (masked layers, gradient hooks)
      and detached when it ends or fails, so nothing of the run stays on the model.
    * Every ``verify_every`` optimizer steps and at the end of training,
      :meth:`SparseState.verify` proves the frozen entries unchanged (bitwise).
    * Dynamic strategies: every ``strategy.update_every`` steps ``strategy.update`` gets
      the masks, the model, the step, the optimizer's sparse gradients and fresh
      calibration batches (run inside :meth:`SparseState.calibrating`);
      :meth:`SparseState.replace_masks` returns dropped entries to base and
      :meth:`SparseAdamW.remap` keeps the moments of kept entries.
    * Several processes (``ddp_sparse``): the ranks must hold the same base (fingerprints
      compared), calibration batches are dealt out over ranks, and every mask is broadcast
      from rank zero, so all ranks train the same entries.
    * Logs ``mask/trainable_count`` and ``mask/trainable_fraction`` every training batch.
    * Checkpoints :meth:`SparseState.state_dict` with the strategy config; resuming refuses
      a different strategy config (one line naming the first differing argument, e.g.
      ``resume: model.mask.init_args.sparsity is 0.999 here but 0.99 in the checkpoint``),
      a checkpoint without a mask, or a model whose frozen part differs; it records ``reinit``
      too and refuses to resume with the other setting.

    Args:
        strategy: The mask strategy.
        verify_every: Optimizer steps between two verifications (0: only at the end).
        calibration_batch_size: Sequences per calibration batch.
        save_base_values: Checkpoint the base values of the active entries. A module that
            reloads its base from its source instead of checkpointing dense weights (as
            :class:`~mthlib.grpo.GRPOModule` does) can leave them out: they are then read
            back from the freshly loaded base, whose frozen digests are checked first.
        reinit: Start the active entries from values drawn per tensor from a normal with the
            base tensor's mean and standard deviation instead of the base values (the
            lottery-ticket re-initialisation check; :mod:`mthlib.masking.reinit` says why this
            distribution). Entries a dynamic strategy grows later start from their base values.
    """

    def __init__(
        self,
        strategy: MaskStrategy,
        verify_every: int = 50,
        calibration_batch_size: int = 8,
        save_base_values: bool = True,
        reinit: bool = False,
    ) -> None:
        if verify_every < 0 or calibration_batch_size < 1:
            raise ValueError(
                f"verify_every must be >= 0 and calibration_batch_size >= 1; got {verify_every}, {calibration_batch_size}"
            )
        self.strategy = strategy
        self.verify_every = verify_every
        self.calibration_batch_size = calibration_batch_size
        self.save_base_values = save_base_values
        self.reinit = reinit
        self.state: SparseState | None = None
        """The run's sparse state, once computed or restored."""
        self._module: pl.LightningModule | None = None
        self._restored: dict[str, Any] | None = None
        self._last_seen_step = -1
        self._model_numel = 0

    @property
    def state_key(self) -> str:
        name = self.strategy.name or type(self.strategy).__name__
        return self._generate_state_key(strategy=name, sparsity=self.strategy.sparsity)

    def _config_json(self) -> str:
        return json.dumps(self.strategy.config(), sort_keys=True)

    # -- choosing the mask ------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._module = pl_module

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> SparseState:
        """The run's state, attached to ``pl_module.model``: restored from the checkpoint, or computed now."""
        model = pl_module.model
        if self.state is None:
            self.state = self._restore(model) if self._restored is not None else self._compute(trainer, pl_module)
        if not self.state.attached:
            self.state.attach(model)
        self._model_numel = sum(p.numel() for p in model.parameters())
        return self.state

    def _compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> SparseState:
        model = pl_module.model
        fingerprint = getattr(pl_module, "base_fingerprint", None) or model_fingerprint(model)
        if not trainer.strategy.reduce_boolean_decision(fingerprint == trainer.strategy.broadcast(fingerprint), all=True):
            raise RuntimeError(
                f"the processes loaded different base models (rank {trainer.global_rank}: fingerprint {fingerprint}); "
                "every rank must train the same base"
            )
        masks = compute_masks(
            self.strategy, model, trainer.datamodule, getattr(pl_module, "tokenizer", None),
            self.calibration_batch_size, trainer.global_rank, trainer.world_size,
        )
        state = SparseState.capture(model, trainer.strategy.broadcast(masks, src=0), fingerprint)
        if self.reinit:
            scatter_values(model, state.masks, reinitialised_values(model, state.masks, self.strategy.seed))
        return state

    def _restore(self, model: Any) -> SparseState:
        state = SparseState.from_state_dict(self._restored, model)
        self._restored = None
        return state

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not any(isinstance(opt, SparseAdamW) and opt.sparse_state is self.state for opt in trainer.optimizers):
            built = ", ".join(type(opt).__name__ for opt in trainer.optimizers) or "none"
            raise RuntimeError(
                "MaskCallback needs the LightningModule to build mthlib.masking.SparseAdamW(callback.prepare(trainer, "
                f"module), ...) in configure_optimizers; it built: {built}"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.state is not None:
            self.state.detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.state is not None:
            self.state.detach()

    # -- verification and dynamic masks ------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._last_seen_step:
            self._last_seen_step = step
            if self.verify_every and step % self.verify_every == 0:
                self.state.verify(step)
            every = self.strategy.update_every
            if self.strategy.dynamic and every > 0 and step > self.state.last_update_step and step % every == 0:
                self._update(trainer, pl_module, step)
        total = self.state.masks.total
        pl_module.log("mask/trainable_count", float(total), batch_size=1)
        pl_module.log("mask/trainable_fraction", total / max(self._model_numel, 1), batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state.verify(trainer.global_step)

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        optimizer = next(opt for opt in trainer.optimizers if isinstance(opt, SparseAdamW))
        state, old = self.state, self.state.masks
        batches = calibration_batches(
            self.strategy, trainer.datamodule, getattr(pl_module, "tokenizer", None), self.calibration_batch_size,
            trainer.global_rank, trainer.world_size,
        )
        with state.calibrating():
            new = self.strategy.update(old, state.model, step, optimizer.sparse_grads or None, state.base_values, batches)
        new = trainer.strategy.broadcast(new, src=0)
        if new.shapes != old.shapes or new.total != old.total:
            raise RuntimeError(
                f"{self.strategy.name}.update must keep the parameters and the count: {old.total} active entries "
                f"before, {new.total} after"
            )
        state.replace_masks(new, step)
        optimizer.remap(old)

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.state is None:
            return {}
        return {"strategy": self._config_json(), "reinit": self.reinit,
                **self.state.state_dict(include_base_values=self.save_base_values)}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse, before anything is restored, a checkpoint without this callback's state.

        Raises:
            ValueError: The checkpoint has no mask state (trained without a mask), or one of
                another strategy or sparsity (the first differing argument and both values) or ``reinit``.
        """
        if trainer.state.fn == "fit":
            self.check_checkpoint(checkpoint)

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's saved state of this callback; refused if missing, of another strategy configuration or ``reinit``.

        Raises:
            ValueError: One line naming the first differing argument and both values.
        """
        states = checkpoint.get("callbacks") or {}
        found = [states[self.state_key]] if self.state_key in states else [
            state for key, state in states.items() if str(key).startswith(type(self).__qualname__)]
        if not found:
            here = self.strategy.name or type(self.strategy).__name__
            raise ValueError(f"resume: model.mask is {here} here but null in the checkpoint (trained without a mask)")
        self._check_config(found[0])
        return found[0]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state saved by :meth:`state_dict` for :meth:`prepare`; refuses another strategy config.

        Raises:
            ValueError: The strategy config (the first differing argument and both values) or ``reinit`` differs.
        """
        self._check_config(state_dict)
        self.state = None
        self._restored = dict(state_dict)
        if self._module is not None:
            self.state = self._restore(self._module.model)

    def _check_config(self, saved: dict[str, Any]) -> None:
        if saved["strategy"] != self._config_json():
            raise ValueError(config_difference(self.strategy.config(), json.loads(saved["strategy"])))
        if bool(saved.get("reinit", False)) != self.reinit:  # checkpoints from before the option never re-initialised
            raise ValueError(f"resume: model.reinit is {_shown(self.reinit)} here but {_shown(not self.reinit)} "
                             "in the checkpoint")


_UNSET = "<not set>"


def config_difference(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """One line naming the first argument where two strategy configs differ, with both values.

    Args:
        ours: This run's :meth:`~mthlib.masking.MaskStrategy.config`.
        theirs: The checkpoint's.

    Returns:
        e.g. ``resume: model.mask.init_args.sparsity is 0.999 here but 0.99 in the checkpoint``.
    """
    pairs = [("model.mask", ours.get("name") or ours.get("class_path"), theirs.get("name") or theirs.get("class_path")),
             ("model.mask.class_path", ours.get("class_path"), theirs.get("class_path"))]
    mine, saved = ours.get("init_args") or {}, theirs.get("init_args") or {}
    pairs += [(f"model.mask.init_args.{key}", mine.get(key, _UNSET), saved.get(key, _UNSET))
              for key in [*mine, *(k for k in saved if k not in mine)]]
    key, here, there = next(((k, a, b) for k, a, b in pairs if a != b), ("model.mask", ours, theirs))
    return f"resume: {key} is {_shown(here)} here but {_shown(there)} in the checkpoint"


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
