"""GRPOModule: the LightningModule that samples, scores and optimises the GRPO objective."""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import fields, replace
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.nn.parallel import DistributedDataParallel

from mthlib.checkpoints import FinalModel, SparseDeltaCheckpoint
from mthlib.distributed import check_masked_strategy
from mthlib.envs.base import Environment, Episode
from mthlib.grpo.batch_loss import backward_micro_batches
from mthlib.grpo.loss import ImportanceSamplingLevel, LossType, Normalizer, ScaleRewards, mask_truncated
from mthlib.grpo.gradients import clip_gradients, synchronise_gradients
from mthlib.grpo import resume
from mthlib.grpo.guard import NonFiniteGuard
from mthlib.grpo.metrics import EvaluationMetrics, step_metrics
from mthlib.grpo.optimizers import grpo_optimizers
from mthlib.grpo.objective import GRPOObjective, batch_advantages, batch_normalizer
from mthlib.grpo.engines import EngineName, SamplingConfig, make_engine
from mthlib.grpo.rollout import Rollout, generate_rollout, rollout_logprobs
from mthlib.masking import MaskCallback, MaskStrategy, SparseState
from mthlib.fingerprint import model_fingerprint
from mthlib.models import EMBEDDED, enable_activation_checkpointing, load_model
from mthlib.monitor import StepSamples, watch_callbacks


class GRPOModule(pl.LightningModule):
    """GRPO fine-tuning of a causal LM, optionally restricted to a sparse subnetwork.

    Each training step takes a batch of prompts, samples ``num_generations`` completions
    per prompt, scores them with the data module's environment, turns rewards into
    group-relative advantages and minimises the clipped surrogate loss, micro-batch by
    micro-batch. With ``mask`` set, a :class:`~mthlib.masking.MaskCallback` chooses the
    subnetwork before training and :class:`~mthlib.masking.SparseAdamW` updates only it.

    Argument names and meanings follow TRL's ``GRPOConfig``; defaults differ where said.

    Args:
        model_name_or_path: ``"embedded"`` (SmolLM2-135M-Instruct shipped with mthlib's
            dependencies), a local Hugging Face folder, or a Hub id (the HF cache and
            ``HF_HUB_OFFLINE`` apply).
        dtype: Parameter dtype of the policy.
        mask: The mask strategy choosing the trainable subnetwork (a registered short name
            such as ``fisher``, or a ``class_path``); ``None`` trains every parameter.
        learning_rate: AdamW learning rate (the blog: 1e-6 full, 5e-6 Fisher 99%, 1e-5 Fisher 99.9%).
        weight_decay: Decoupled weight decay (active entries only when masked).
        adam_betas: AdamW betas.
        adam_epsilon: AdamW epsilon.
        warmup_steps: Linear learning-rate warm-up steps, then constant.
        max_grad_norm: Clip the gradient norm to this value (``None``: no clipping).
        num_generations: Completions sampled per prompt (``G``).
        max_completion_length: New tokens per turn at most.
        temperature: Sampling temperature.
        top_p: Nucleus sampling (1.0: off).
        top_k: Top-k sampling (0: off).
        rollout_engine: ``hf`` (Hugging Face ``generate``), ``native`` (one prefill per prompt shared by its
            G completions, finished rows leave the batch; greedy gives the same tokens) or ``vllm`` (GPU, the
            ``vllm`` extra; sparse weight syncs); see :mod:`mthlib.grpo.engines`.
        compile_rollout: ``torch.compile`` the native engine's decode step.
        rollout_dtype: The native engine samples from a copy of the policy in this dtype, synced every batch.
        loss_type: ``grpo``, ``dr_grpo``, ``dapo`` (TRL's default), ``bnpo``, ``cispo`` (MiniMax-M1),
            ``sapo`` (soft gate), ``luspo`` (length-unbiased GSPO) or ``vespo`` (gamma-weighted
            sequence ratios); see :func:`~mthlib.grpo.loss.aggregate_loss` and
            :class:`~mthlib.grpo.objective.GRPOObjective`.
        scale_rewards: ``group``, ``batch`` or ``none``; see :func:`~mthlib.grpo.loss.group_advantages`.
        epsilon: Lower clip range.
        epsilon_high: Upper clip range (``None``: same as ``epsilon``); with ``loss_type="cispo"``
            the cap of the ratio itself (ScaleRL recommends 5.0).
        delta: Cap of the unclipped ratio, two-sided clipping (INTELLECT-2); ``None``: off.
        num_iterations: Optimiser steps per rollout batch (μ in the GRPO paper).
        beta: KL coefficient towards the base model. 0 keeps no reference; with a mask the
            reference is the base reached by swapping the active entries, never a copy.
        use_bias_correction_kl: Multiply the per-token KL by the importance ratio, the unbiased
            reverse-KL gradient of DeepSeek-V3.2 (changes the gradient even on-policy; only with ``beta > 0``).
        importance_sampling_level: ``token`` ratios, or one ``sequence`` ratio per completion
            (GSPO; ``luspo`` is meant for it).
        sapo_temperature_pos: SAPO gate temperature for positive advantages.
        sapo_temperature_neg: SAPO gate temperature for zero and negative advantages.
        vespo_k_pos: VESPO exponent for advantages >= 0 (how fast ratios below 1 are down-weighted).
        vespo_lambda_pos: VESPO decay for advantages >= 0 (how fast ratios above 1 are down-weighted).
        vespo_k_neg: VESPO exponent for negative advantages.
        vespo_lambda_neg: VESPO decay for negative advantages.
        mask_truncated_completions: Exclude completions cut at ``max_completion_length`` from the loss
            and from the token count of ``dapo``.
        micro_batch_size: Completions per forward/backward pass (gradient accumulation inside a step).
        logprob_chunk_size: Tokens per chunk of output-projection logits.
        pack_prefixes: Compute log-probabilities on the rows packed into prefix trees, so a prefix
            that rows share (the prompt of a group's G completions) runs through the decoder once,
            not G times; equal to unpacked rows up to floating-point rounding. Only ``sdpa`` and
            ``eager`` attention take the tree's mask; other models run unpacked
            (:mod:`mthlib.grpo.prefix_tree`).
        gradient_checkpointing: Recompute each decoder layer's activations in backward instead of
            keeping them (less memory, about one more forward pass of time).
        eval_max_completion_length: New tokens per turn in greedy evaluation (``None``: ``max_completion_length``).
        verify_every: With a mask, check every this many steps that frozen entries are bitwise unchanged.
        calibration_batch_size: Sequences per gradient pass when a strategy calibrates (e.g. Fisher):
            smaller passes lower the peak memory of building the mask, not its result.
        reinit: With a mask, train its entries from random values, not the base's (:class:`~mthlib.masking.MaskCallback`).
        delta_every_n_steps: With a mask, write a sparse delta every this many steps (and at the end).
        delta_keep_last: Sparse delta files kept in the run's ``deltas/`` folder.
        max_bad_steps: A step whose rewards, advantages, loss or gradients hold a NaN or Inf is skipped
            (no weight or optimizer state changes) and logged as ``guard/skipped_steps``; after this many
            in a row the run stops with one line naming the first bad quantity and its step.
        divergence_factor: Warn once when the loss or the KL exceeds this many times its running median
            (``None``: no warning); see :class:`~mthlib.grpo.guard.NonFiniteGuard`.
    """

    def __init__(
        self,
        model_name_or_path: str = EMBEDDED,
        dtype: Literal["float32", "bfloat16"] = "float32",
        mask: MaskStrategy | None = None,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_epsilon: float = 1e-8,
        warmup_steps: int = 0,
        max_grad_norm: float | None = 1.0,
        num_generations: int = 8,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        rollout_engine: EngineName = "hf",
        compile_rollout: bool = False,
        rollout_dtype: Literal["float32", "bfloat16"] | None = None,
        loss_type: LossType = "dapo",
        scale_rewards: ScaleRewards = "group",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        delta: float | None = None,
        num_iterations: int = 1,
        beta: float = 0.0,
        use_bias_correction_kl: bool = True,
        importance_sampling_level: ImportanceSamplingLevel = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        mask_truncated_completions: bool = False,
        micro_batch_size: int = 8,
        logprob_chunk_size: int = 1024,
        pack_prefixes: bool = True,
        gradient_checkpointing: bool = False,
        eval_max_completion_length: int | None = None,
        verify_every: int = 50,
        calibration_batch_size: int = 8,
        reinit: bool = False,
        delta_every_n_steps: int = 50,
        delta_keep_last: int = 3,
        max_bad_steps: int = 3,
        divergence_factor: float | None = 100.0,
    ) -> None:
        super().__init__()
        if not learning_rate >= 0:
            raise ValueError(f"learning_rate must be >= 0 (the AdamW step size); got {learning_rate}")
        if num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (group advantages need a group); got {num_generations}")
        if micro_batch_size < 1 or num_iterations < 1:
            raise ValueError("micro_batch_size and num_iterations must be >= 1")
        if reinit and mask is None:
            raise ValueError("reinit re-initialises the entries of a mask: set model.mask too, or reinit false")
        self.save_hyperparameters(ignore=["mask"])
        self.hparams["mask"] = mask.config() if mask is not None else None
        self._objective()  # a bad loss option fails here, before the model loads
        self.engine = make_engine(rollout_engine, torch.initial_seed(), compile_rollout, model_name_or_path, dtype, rollout_dtype)
        self.guard = NonFiniteGuard(max_bad_steps, divergence_factor)
        self.automatic_optimization = False
        self.model, self.tokenizer = load_model(model_name_or_path, dtype)
        if gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.mask_strategy = mask
        self.base_fingerprint = model_fingerprint(self.model)
        self.mask_callback = None if mask is None else MaskCallback(
            mask, verify_every=verify_every, calibration_batch_size=calibration_batch_size, save_base_values=False,
            reinit=reinit)
        self.reference = None
        self.last_samples: StepSamples | None = None
        self.prompts_seen = 0
        self._restored: resume.ResumeState | None = None  # from on_load_checkpoint until the first batch
        self.sampling = SamplingConfig(max_completion_length, temperature, top_p, top_k)
        self.eval_sampling = replace(self.sampling, max_completion_length=eval_max_completion_length
                                     or max_completion_length, greedy=True)

        self.val_metrics = EvaluationMetrics()

    # -- Lightning wiring -------------------------------------------------------------------
    def configure_callbacks(self) -> list[pl.Callback]:
        """The run's own callbacks (final model or mask and deltas) and what lets a user watch it (:mod:`mthlib.monitor`)."""
        watch = watch_callbacks(self.trainer)
        if self.mask_callback is None:
            return [FinalModel(), *watch]
        deltas = SparseDeltaCheckpoint(self.mask_callback, base_model=self.hparams.model_name_or_path,
                                       every_n_steps=self.hparams.delta_every_n_steps, keep_last=self.hparams.delta_keep_last)
        return [self.mask_callback, deltas, *watch]

    @property
    def sparse_state(self) -> SparseState | None:
        """The run's sparse state (owned by the mask callback), once computed or restored; ``None`` for dense runs."""
        return None if self.mask_callback is None else self.mask_callback.state

    def setup(self, stage: str) -> None:
        """Check the training strategy; one evaluation metric per key the environment declares (``env.metrics``)."""
        if stage == "fit":
            self.check_strategy(self.trainer.strategy)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "env"):
            self.val_metrics = EvaluationMetrics(self.env.metrics)

    def check_strategy(self, strategy: pl.strategies.Strategy) -> None:
        """Refuse a training strategy that cannot train this module (a masked one needs ``ddp_sparse`` for DDP)."""
        if self.mask_strategy is not None:
            check_masked_strategy(strategy)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with warmup (:func:`~mthlib.grpo.optimizers.grpo_optimizers`); a masked run first computes its mask."""
        h = self.hparams
        state = None if self.mask_callback is None else self.mask_callback.prepare(self.trainer, self)
        return grpo_optimizers(self.model, state, h.learning_rate, h.adam_betas, h.adam_epsilon, h.weight_decay,
                               h.warmup_steps)

    def on_fit_start(self) -> None:
        self.model.train()
        if self._restored is not None and self._restored.trained_values is not None:
            self.sparse_state.load_trained_values(self._restored.trained_values)
        if self.hparams.beta > 0 and self.mask_callback is None and self.reference is None:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)

    def on_train_batch_start(self, batch: list[Episode], batch_idx: int) -> None:
        if self._restored is not None:  # after on_fit_start and the data module's set-up, just before sampling
            resume.restore_rng(self._restored.rng, self.device, self.engine)
            self._restored = None

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save a :class:`~mthlib.grpo.resume.ResumeState`; a masked run saves its trained entries, not dense weights."""
        state = self.sparse_state
        if state is not None:
            checkpoint["state_dict"] = {}
        checkpoint[resume.KEY] = resume.ResumeState(
            self.prompts_seen, self.guard.state_dict(), resume.capture_rng(self.device, self.engine),
            self.hparams.model_name_or_path, self.base_fingerprint, None if state is None else state.trained_values(),
        ).to_checkpoint()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another base or mask setting (:meth:`check_checkpoint`), then restore."""
        saved = self.check_checkpoint(checkpoint)
        if saved is None:
            return
        self.strict_loading = saved.trained_values is None  # a masked checkpoint holds no dense weights
        if saved.guard is not None:
            self.guard.load_state_dict(saved.guard)
        self.prompts_seen = saved.prompts_seen
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "train_stream"):
            datamodule.train_stream.position = self.prompts_seen
        self._restored = saved
        if saved.trained_values is not None and self._trainer is not None and self.trainer.state.fn != "fit":
            # validate / test run no fit start: rebuild the mask's state now and write the trained entries in
            self.mask_callback.load_state_dict(self.mask_callback.check_checkpoint(checkpoint))
            self.mask_callback.prepare(self.trainer, self).load_trained_values(saved.trained_values)

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> resume.ResumeState | None:
        """Refuse a checkpoint of another base or mask setting (one line: the setting, both values); else its
        :class:`~mthlib.grpo.resume.ResumeState`. The ``mth`` CLI calls it before ``fit`` writes anything."""
        saved = resume.ResumeState.from_checkpoint(checkpoint)
        if saved is not None:
            saved.check((checkpoint.get("hyper_parameters") or {}).get("mask"), self.hparams.model_name_or_path,
                        self.base_fingerprint, self.mask_strategy)
        if self.mask_callback is not None:
            self.mask_callback.check_checkpoint(checkpoint)
        return saved

    @property
    def env(self) -> Environment:
        """The environment of the attached data module (it scores the completions)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "env"):
            raise RuntimeError("GRPOModule needs a data module with an `env` (e.g. mthlib.data.PromptDataModule)")
        return datamodule.env

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch: list[Episode], batch_idx: int) -> None:
        h = self.hparams
        start = time.perf_counter()
        self.prompts_seen += len(batch)
        episodes = [ep for ep in batch for _ in range(h.num_generations)]
        with self.engine.weights_of(self.model, self.sparse_state):
            rollout = generate_rollout(self.model, self.tokenizer, episodes, self.sampling, self.engine).to(self.device)
        generation_time = time.perf_counter() - start
        scores = [self.env.score(ep, replies) for ep, replies in zip(episodes, rollout.replies)]
        rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32, device=self.device)
        advantages = batch_advantages(rewards, h.num_generations, h.scale_rewards)
        if h.mask_truncated_completions:
            rollout = replace(rollout, loss_mask=mask_truncated(rollout.loss_mask, rollout.truncated))
        norm = batch_normalizer(rollout.loss_mask, h.max_completion_length)
        old_logps = self._logps_no_grad(rollout, self.model) if h.num_iterations > 1 else None
        ref_logps = self._reference_logps(rollout) if h.beta > 0 else None
        objective = self._objective()
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        for _ in range(h.num_iterations):
            self._optimise(objective, rollout, advantages, old_logps, ref_logps, norm, stats, rewards)
        self.log("guard/skipped_steps", float(self.guard.skipped_steps), batch_size=1)
        if stats:  # empty when every step was skipped: its metrics are not finite, none is logged
            self._log_step(rewards, scores, rollout, stats, generation_time, time.perf_counter() - start)

    def _objective(self) -> GRPOObjective:
        """The GRPO loss configured by this module's loss options (the hyperparameters of the same names)."""
        return GRPOObjective(**{option.name: self.hparams[option.name] for option in fields(GRPOObjective)})

    def _optimise(self, objective: GRPOObjective, rollout: Rollout, advantages: torch.Tensor,
                  old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None, norm: Normalizer,
                  stats: dict[str, list[torch.Tensor]], rewards: torch.Tensor) -> None:
        """One optimiser step on the whole rollout batch: micro-batch gradients add up to the batch loss's.

        ``old_logps`` is ``None`` on-policy (the current log-probabilities, detached, stand in).
        The guard skips a step whose rewards, advantages, loss or gradient norm are not finite;
        only the metrics of a step taken are added to ``stats``.
        """
        h = self.hparams
        optimizer = self.optimizers()
        self.model.train()
        step_loss, step_stats = backward_micro_batches(
            self.model, objective, rollout, advantages, norm, self.manual_backward, h.micro_batch_size, old_logps,
            ref_logps, h.temperature, h.logprob_chunk_size, h.pack_prefixes,
        )
        step_stats["loss"].append(step_loss)
        wrapped = isinstance(self.trainer.strategy.model, DistributedDataParallel)
        synchronise_gradients(self.model, optimizer.optimizer, reduced_by_ddp=wrapped)
        grad_norm = clip_gradients(self.model, optimizer.optimizer, self.hparams.max_grad_norm)
        step_stats["grad_norm"].append(grad_norm)
        checked = {"reward": rewards, "advantage": advantages, "loss": step_loss, "gradient norm": grad_norm}
        if self.guard.step(optimizer, checked, step_stats, self.trainer.global_step + 1, self.model, self.sparse_state):
            for key, values in step_stats.items():
                stats[key].extend(values)
        optimizer.zero_grad()
        self.lr_schedulers().step()

    def _logps_no_grad(self, rollout: Rollout, model: torch.nn.Module) -> torch.Tensor:
        h = self.hparams
        return rollout_logprobs(model, rollout, h.micro_batch_size, h.temperature, h.logprob_chunk_size, h.pack_prefixes)

    def _reference_logps(self, rollout: Rollout) -> torch.Tensor:
        if self.sparse_state is not None:
            with self.sparse_state.swapped_to_base():
                return self._logps_no_grad(rollout, self.model)
        return self._logps_no_grad(rollout, self.reference)

    def _log_step(self, rewards: torch.Tensor, scores: list[dict[str, float]], rollout: Rollout,
                  stats: dict[str, list[torch.Tensor]], generation_time: float, step_time: float) -> None:
        learning_rate = self.optimizers().optimizer.param_groups[0]["lr"]
        metrics = step_metrics(
            rewards, scores, rollout, self.hparams.num_generations, generation_time, step_time, learning_rate
        )
        lengths = rollout.completion_lengths.float()
        metrics.update({key: torch.stack(values).float().mean() for key, values in stats.items()})
        self.log("reward", rewards.mean(), prog_bar=True, batch_size=len(rewards), sync_dist=True)
        self.log_dict({k: v.float() for k, v in metrics.items()}, batch_size=len(rewards), sync_dist=True)
        self.log("completions/min_length", lengths.min(), batch_size=len(rewards), sync_dist=True, reduce_fx="min")
        self.log("completions/max_length", lengths.max(), batch_size=len(rewards), sync_dist=True, reduce_fx="max")
        self.last_samples = StepSamples(self.global_step, rollout.replies, scores)  # for monitor.CompletionsTable

    # -- evaluation -------------------------------------------------------------------------
    def validation_step(self, batch: list[Episode], batch_idx: int) -> None:
        """Greedy replies to the evaluation prompts, scored into :attr:`val_metrics` (``test_step`` alike)."""
        with self.engine.weights_of(self.model, self.sparse_state):
            rollout = generate_rollout(self.model, self.tokenizer, batch, self.eval_sampling, self.engine)
        self.val_metrics.add(self.env, batch, rollout.replies)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        for key, value in self.val_metrics.compute_and_reset().items():
            self.log(f"{stage}/{key}", value, prog_bar=key == "reward")
