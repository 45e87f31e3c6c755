"""MaskCallback: choose the mask before training, prove the frozen entries never move, resume exactly.

Contract with the LightningModule: it holds the causal LM as ``pl_module.model`` (and its
tokenizer as ``pl_module.tokenizer`` when the strategy needs calibration), has the
attributes ``masks`` and ``base_values`` (the callback sets both), and in
``configure_optimizers`` builds :class:`~mthlib.masking.SparseAdamW` from
``self.model`` and ``self.masks``. A strategy that needs calibration asks the data
module for ``calibration_batches(tokenizer, num_samples=..., batch_size=..., seed=...)``.

Ordering (Lightning 2.6, ``Trainer._run``): ``Callback.setup`` → restore of module
weights and callback states (``load_state_dict``, when resuming) → ``Strategy.setup``
(model to device, then ``configure_optimizers``) → ``on_fit_start`` → optimizer state
restore. ``trainer.ckpt_path`` is only set once restoring starts, i.e. *after*
``setup``, so ``setup`` cannot tell a fresh run from a resumed one. The callback
therefore chooses the mask at the last possible moment: for the duration of the fit it
wraps ``pl_module.configure_optimizers`` so that, unless ``load_state_dict`` restored a
mask, the strategy runs right before the optimizer is built (the model is already on
its device then, so calibration runs on the accelerator). A restored mask is never
recomputed.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from mthlib.fingerprint import CACHE_ATTR, model_fingerprint
from mthlib.masking.base import MaskStrategy
from mthlib.masking.masks import Masks, index_dtype, locate
from mthlib.masking.optim import SparseAdamW
from mthlib.masking.swap import frozen_digests, gather_values


class MaskCallback(Callback):
    """Compute, enforce, verify, update and checkpoint the mask of a sparse fine-tune.

    * Fresh run: the strategy chooses the masks; their base values, the base model
      fingerprint (:func:`~mthlib.fingerprint.model_fingerprint`, cached on the model) and
      a SHA-256 digest of every parameter are recorded.
    * Every ``verify_every`` optimizer steps and at the end of training, each parameter
      is hashed with its active entries set back to their base values; a digest that
      differs from the recorded one raises :class:`RuntimeError` naming the tensor.
    * Dynamic strategies: every ``strategy.update_every`` steps ``strategy.update`` gets
      the masks, the model, the step and the optimizer's sparse gradients. Entries it
      drops return to their base values (so everything outside the mask stays the base,
      bitwise); entries it grows start from their base values; the optimizer keeps the
      moments of kept entries (:meth:`~mthlib.masking.SparseAdamW.set_masks`).
    * Several processes (``ddp_sparse``): the ranks must hold the same base (fingerprints
      compared), calibration batches are dealt out over ranks (the strategy's gradient
      passes all-reduce their sums), and every mask, initial or updated, is broadcast
      from rank zero, so all ranks train the same entries.
    * Logs ``mask/trainable_count`` and ``mask/trainable_fraction`` (active entries over
      all parameters of the model, tied ones once) every training batch.
    * The checkpoint holds the strategy config, the fingerprint, the digests, the step of
      the last update, the indices (int32) and the base values (a module that reloads its base
      instead of checkpointing dense weights may drop them: they are then read back from the
      freshly loaded base); resuming restores them
      and refuses a different strategy config or a model whose frozen part differs.

    Args:
        strategy: The mask strategy.
        verify_every: Optimizer steps between two verifications (0: only at the end).
        calibration_batch_size: Sequences per calibration batch.
    """

    def __init__(self, strategy: MaskStrategy, verify_every: int = 50, calibration_batch_size: int = 8) -> None:
        if verify_every < 0 or calibration_batch_size < 1:
            raise ValueError(
                f"verify_every must be >= 0 and calibration_batch_size >= 1; got {verify_every}, {calibration_batch_size}"
            )
        self.strategy = strategy
        self.verify_every = verify_every
        self.calibration_batch_size = calibration_batch_size
        self.masks: Masks | None = None
        self.base_values: dict[str, torch.Tensor] = {}
        self.base_fingerprint = ""
        self.digests: dict[str, str] = {}
        self.last_update_step = 0
        self._module: pl.LightningModule | None = None
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
        if stage != "fit":
            return
        self._module = pl_module
        if self.masks is not None:
            self._apply(pl_module)
        _unwrap(pl_module)
        original = pl_module.configure_optimizers

        @functools.wraps(original)
        def configure_optimizers() -> Any:
            self.prepare(trainer, pl_module)
            return original()

        pl_module.configure_optimizers = configure_optimizers

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _unwrap(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        _unwrap(pl_module)

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Masks:
        """Compute the masks unless they exist (restored or computed before), and publish them on the module."""
        if self.masks is None:
            self._compute(trainer, pl_module)
        self._apply(pl_module)
        return self.masks

    def _compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        fingerprint = model_fingerprint(model)
        if not trainer.strategy.reduce_boolean_decision(fingerprint == trainer.strategy.broadcast(fingerprint), all=True):
            raise RuntimeError(
                f"the processes loaded different base models (rank {trainer.global_rank}: fingerprint {fingerprint}); "
                "every rank must train the same base"
            )
        batches = self._calibration(trainer, pl_module)
        masks = trainer.strategy.broadcast(self.strategy.compute(model, batches), src=0)
        self.masks = masks
        self.base_values = gather_values(model, masks)
        self.base_fingerprint = fingerprint
        self.digests = dict(frozen_digests(model, masks, self.base_values))
        self.last_update_step = 0

    def _calibration(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Calibration batches from the data module when the strategy needs them, else ``None``.

        With several processes, each gets every ``world_size``-th batch starting at its rank
        (the strategy's gradient passes sum the statistics over processes).
        """
        if not self.strategy.needs_calibration:
            return None
        make = getattr(trainer.datamodule, "calibration_batches", None)
        if make is None:
            raise RuntimeError(
                f"mask strategy {self.strategy.name!r} needs calibration batches: the data module must define "
                "calibration_batches(tokenizer, num_samples, batch_size, seed)"
            )
        batches = make(
            getattr(pl_module, "tokenizer", None), num_samples=self.strategy.num_samples,
            batch_size=self.calibration_batch_size, seed=self.strategy.seed,
        )
        return itertools.islice(batches, trainer.global_rank, None, trainer.world_size)

    def _apply(self, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        if not self.base_values:
            self.base_values = gather_values(model, self.masks)
        params = dict(model.named_parameters())
        self.base_values = {n: v.to(params[n].device) for n, v in self.base_values.items()}
        pl_module.masks = self.masks
        pl_module.base_values = self.base_values
        setattr(model, CACHE_ATTR, self.base_fingerprint)
        self._model_numel = sum(p.numel() for p in params.values())

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prepare(trainer, pl_module)
        if not any(isinstance(opt, SparseAdamW) for opt in trainer.optimizers):
            built = ", ".join(type(opt).__name__ for opt in trainer.optimizers) or "none"
            raise RuntimeError(
                "MaskCallback needs the LightningModule to build mthlib.masking.SparseAdamW(self.model, self.masks, ...) "
                f"in configure_optimizers; it built: {built}"
            )

    # -- verification -----------------------------------------------------------------------
    def verify(self, model: torch.nn.Module, step: int | None = None) -> None:
        """Check that every entry outside the mask still holds its base value (bitwise).

        Raises:
            RuntimeError: The first parameter (by name) whose frozen entries changed.
        """
        seen = set()
        for name, digest in frozen_digests(model, self.masks, self.base_values):
            seen.add(name)
            expected = self.digests.get(name)
            if digest != expected:
                where = f" at step {step}" if step is not None else ""
                raise RuntimeError(
                    f"frozen entries of {name} differ from the base model{where}: digest {digest} != recorded {expected}"
                )
        missing = sorted(set(self.digests) - seen)
        if missing:
            raise RuntimeError(f"parameters recorded at the start are gone from the model: {', '.join(missing[:5])}")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._last_seen_step:
            self._last_seen_step = step
            if self.verify_every and step % self.verify_every == 0:
                self.verify(pl_module.model, step)
            every = self.strategy.update_every
            if self.strategy.dynamic and every > 0 and step > self.last_update_step and step % every == 0:
                self._update(trainer, pl_module, step)
        total = self.masks.total
        pl_module.log("mask/trainable_count", float(total), batch_size=1)
        pl_module.log("mask/trainable_fraction", total / max(self._model_numel, 1), batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.verify(pl_module.model, trainer.global_step)

    # -- dynamic masks ----------------------------------------------------------------------
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        optimizer = next(opt for opt in trainer.optimizers if isinstance(opt, SparseAdamW))
        old = self.masks
        new = self.strategy.update(
            old, pl_module.model, step, optimizer.sparse_grads or None, self.base_values,
            self._calibration(trainer, pl_module),
        )
        new = trainer.strategy.broadcast(new, src=0)
        if new.shapes != old.shapes or new.total != old.total:
            raise RuntimeError(
                f"{self.strategy.name}.update must keep the parameters and the count: {old.total} active entries "
                f"before, {new.total} after"
            )
        params = dict(pl_module.model.named_parameters())
        dropped = old.difference(new)
        values = {}
        with torch.no_grad():
            for name, idx in dropped.items():
                flat = params[name].view(-1)
                base = self.base_values[name]
                if idx.numel():
                    position = torch.searchsorted(old[name], idx).to(base.device)
                    flat.index_copy_(0, idx.to(flat.device), base[position].to(flat.dtype))
            for name, idx in new.items():
                found, position = locate(old[name], idx)
                current = params[name].detach().view(-1).index_select(0, idx.to(params[name].device))
                found, position = found.to(current.device), position.to(current.device)
                current[found] = self.base_values[name][position[found]]
                values[name] = current
        optimizer.set_masks(new)
        self.masks, self.base_values, self.last_update_step = new, values, step
        self._apply(pl_module)

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.masks is None:
            return {}
        return {
            "strategy": self._config_json(),
            "base_fingerprint": self.base_fingerprint,
            "digests": dict(self.digests),
            "last_update_step": int(self.last_update_step),
            "names": list(self.masks.names),
            "shapes": {name: list(shape) for name, shape in self.masks.shapes.items()},
            "indices": {
                name: idx.to(index_dtype(math.prod(self.masks.shape(name)))) for name, idx in self.masks.items()
            },
            "base_values": {name: values.detach().cpu() for name, values in self.base_values.items()},
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        if trainer.state.fn == "fit" and self.state_key not in states:
            found = [str(key) for key in states if str(key).startswith(type(self).__qualname__)]
            raise ValueError(
                f"the checkpoint has no mask state for {self.state_key}; it has: {', '.join(found) or 'none'}. "
                "Resume with the strategy (name and sparsity) the checkpoint was trained with"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the masks saved by :meth:`state_dict`; refuses another strategy config or base.

        Raises:
            ValueError: The strategy config differs, or the model's frozen entries differ
                from those recorded (both values in the message).
        """
        expected = self._config_json()
        if state_dict["strategy"] != expected:
            raise ValueError(
                f"the checkpoint was trained with mask strategy {state_dict['strategy']}, "
                f"but this run is configured with {expected}; resume with the checkpoint's strategy"
            )
        names = state_dict["names"]
        self.masks = Masks({n: state_dict["indices"][n] for n in names}, {n: state_dict["shapes"][n] for n in names})
        self.base_values = dict(state_dict.get("base_values") or {})
        if not self.base_values and self._module is not None:
            self.base_values = gather_values(self._module.model, self.masks)
        self.base_fingerprint = state_dict["base_fingerprint"]
        self.digests = dict(state_dict["digests"])
        self.last_update_step = int(state_dict["last_update_step"])
        if self._module is not None:
            self._check_restored(self._module.model)
            self._apply(self._module)

    def _check_restored(self, model: torch.nn.Module) -> None:
        for name, digest in frozen_digests(model, self.masks, self.base_values):
            if digest != self.digests.get(name):
                raise ValueError(
                    f"the model's frozen entries of {name} (digest {digest}) differ from the checkpoint's "
                    f"({self.digests.get(name)}, base fingerprint {self.base_fingerprint}); resume from the same base"
                )


def _unwrap(pl_module: pl.LightningModule) -> None:
    """Remove the instance-level ``configure_optimizers`` wrapper installed by :meth:`MaskCallback.setup`."""
    if "configure_optimizers" in vars(pl_module):
        del pl_module.configure_optimizers
