"""GRPOModule: the LightningModule that samples, scores and optimises the GRPO objective."""

from __future__ import annotations

import copy
import random
import time
from collections import defaultdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric

from mthlib.checkpoints import FinalModel, SparseDeltaCheckpoint
from mthlib.distributed import STRATEGY_NAME as DDP_SPARSE, SparseDDPStrategy, all_reduce_mean_, is_distributed
from mthlib.envs.base import Environment, Episode
from mthlib.grpo.loss import (
    LossType,
    Normalizer,
    ScaleRewards,
    aggregate_loss,
    clip_fractions,
    clipped_surrogate,
    group_advantages,
    kl_to_reference,
)
from mthlib.grpo.rollout import Rollout, SamplingConfig, generate_rollout, token_logprobs
from mthlib.masking import MaskCallback, MaskStrategy, SparseAdamW, gather_values, scatter_values, swapped_to_base
from mthlib.fingerprint import model_fingerprint
from mthlib.models import EMBEDDED, load_model

EVAL_KEYS = ("reward", "accuracy", "format", "similarity")


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
            dependencies) or a local Hugging Face folder.
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
        loss_type: ``grpo``, ``dr_grpo``, ``dapo`` (TRL's default) or ``bnpo``; see
            :func:`~mthlib.grpo.loss.aggregate_loss`.
        scale_rewards: ``group``, ``batch`` or ``none``; see :func:`~mthlib.grpo.loss.group_advantages`.
        epsilon: Lower clip range.
        epsilon_high: Upper clip range (``None``: same as ``epsilon``).
        num_iterations: Optimiser steps per rollout batch (μ in the GRPO paper).
        beta: KL coefficient towards the base model. 0 keeps no reference; with a mask the
            reference is the base reached by swapping the active entries, never a copy.
        mask_truncated_completions: Exclude completions cut at ``max_completion_length`` from the loss.
        micro_batch_size: Completions per forward/backward pass (gradient accumulation inside a step).
        logprob_chunk_size: Tokens per chunk of output-projection logits.
        gradient_checkpointing: Recompute each decoder layer's activations in backward instead of
            keeping them (less memory, about one more forward pass of time).
        eval_max_completion_length: New tokens per turn in greedy evaluation (``None``: ``max_completion_length``).
        verify_every: With a mask, check every this many steps that frozen entries are bitwise unchanged.
        calibration_batch_size: Sequences per gradient pass when a strategy calibrates (e.g. Fisher):
            smaller passes lower the peak memory of building the mask, not its result.
        delta_every_n_steps: With a mask, write a sparse delta every this many steps (and at the end).
        delta_keep_last: Sparse delta files kept in the run's ``deltas/`` folder.
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
        loss_type: LossType = "dapo",
        scale_rewards: ScaleRewards = "group",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        num_iterations: int = 1,
        beta: float = 0.0,
        mask_truncated_completions: bool = False,
        micro_batch_size: int = 8,
        logprob_chunk_size: int = 1024,
        gradient_checkpointing: bool = False,
        eval_max_completion_length: int | None = None,
        verify_every: int = 50,
        calibration_batch_size: int = 8,
        delta_every_n_steps: int = 50,
        delta_keep_last: int = 3,
    ) -> None:
        super().__init__()
        if num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (group advantages need a group); got {num_generations}")
        if micro_batch_size < 1 or num_iterations < 1:
            raise ValueError("micro_batch_size and num_iterations must be >= 1")
        self.save_hyperparameters(ignore=["mask"])
        self.hparams["mask"] = mask.config() if mask is not None else None
        self.automatic_optimization = False
        self.model, self.tokenizer = load_model(model_name_or_path, dtype)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.mask_strategy = mask
        self.masks = None
        self.base_values = None
        self.reference = None
        self.prompts_seen = 0
        self._pending_values: dict[str, torch.Tensor] | None = None
        self._pending_rng: dict[str, Any] | None = None
        model_fingerprint(self.model)
        self.sampling = SamplingConfig(max_completion_length, temperature, top_p, top_k)
        self.eval_sampling = SamplingConfig(
            eval_max_completion_length or max_completion_length, temperature, top_p, top_k, greedy=True
        )
        self.val_metrics = torch.nn.ModuleDict({key: MeanMetric() for key in EVAL_KEYS})

    # -- Lightning wiring -------------------------------------------------------------------
    def configure_callbacks(self) -> list[pl.Callback]:
        if self.mask_strategy is None:
            return [FinalModel()]
        return [
            MaskCallback(
                self.mask_strategy, verify_every=self.hparams.verify_every,
                calibration_batch_size=self.hparams.calibration_batch_size,
            ),
            SparseDeltaCheckpoint(every_n_steps=self.hparams.delta_every_n_steps, keep_last=self.hparams.delta_keep_last),
        ]

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.check_strategy(self.trainer.strategy)

    def check_strategy(self, strategy: pl.strategies.Strategy) -> None:
        """Refuse a training strategy that cannot train this module.

        Raises:
            ValueError: A masked module under ``DistributedDataParallel`` (use ``ddp_sparse``).
        """
        if self.mask_strategy is not None and isinstance(strategy, DDPStrategy) and not isinstance(strategy, SparseDDPStrategy):
            raise ValueError(
                f"a masked run cannot use {type(strategy).__name__}: DistributedDataParallel all-reduces dense gradients "
                f"that SparseAdamW frees; use strategy '{DDP_SPARSE}' (mthlib.distributed.SparseDDPStrategy)"
            )

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        if self.masks is not None:
            optimizer = SparseAdamW(
                self.model, self.masks, lr=h.learning_rate, betas=tuple(h.adam_betas),
                eps=h.adam_epsilon, weight_decay=h.weight_decay,
            )
        else:
            optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=h.learning_rate, betas=tuple(h.adam_betas),
                eps=h.adam_epsilon, weight_decay=h.weight_decay,
            )
        warmup = max(h.warmup_steps, 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        self.model.train()
        if self._pending_values is not None:
            scatter_values(self.model, self.masks, self._pending_values)
            self._pending_values = None
        if self.hparams.beta > 0 and self.masks is None and self.reference is None:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)

    def on_train_batch_start(self, batch: list[Episode], batch_idx: int) -> None:
        if self._pending_rng is not None:
            torch.set_rng_state(self._pending_rng["torch"])
            random.setstate(self._pending_rng["python"])
            self._pending_rng = None

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the data position and RNG; a masked run saves its trained entries, not dense weights."""
        state: dict[str, Any] = {
            "prompts_seen": self.prompts_seen,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "base_model": self.hparams.model_name_or_path,
            "base_fingerprint": model_fingerprint(self.model),
        }
        if self.masks is not None:
            checkpoint["state_dict"] = {}
            state["trained_values"] = gather_values(self.model, self.masks)
            for callback_state in checkpoint.get("callbacks", {}).values():
                callback_state.pop("base_values", None)  # the base is reloaded and fingerprint-checked
        checkpoint["mthlib"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mthlib")
        if state is None:
            return
        ours = model_fingerprint(self.model)
        if "trained_values" in state:
            if state["base_fingerprint"] != ours:
                raise ValueError(
                    f"checkpoint was trained on base {state['base_model']!r} (fingerprint "
                    f"{state['base_fingerprint']}), but this model has fingerprint {ours}"
                )
            self.strict_loading = False
            self._pending_values = state["trained_values"]
        self.prompts_seen = int(state["prompts_seen"])
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "train_stream"):
            datamodule.train_stream.position = self.prompts_seen
        self._pending_rng = state["rng"]

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
        rollout = generate_rollout(self.model, self.tokenizer, episodes, self.sampling)
        rollout = _to_device(rollout, self.device)
        generation_time = time.perf_counter() - start
        scores = [self.env.score(ep, replies) for ep, replies in zip(episodes, rollout.replies)]
        rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32, device=self.device)
        advantages = group_advantages(rewards, h.num_generations, h.scale_rewards)
        if h.mask_truncated_completions:
            rollout.loss_mask = rollout.loss_mask * (~rollout.truncated).long().unsqueeze(1)
        norm = Normalizer(len(rollout), int(rollout.loss_mask.sum()), h.max_completion_length)
        old_logps = self._logps_no_grad(rollout, self.model) if h.num_iterations > 1 else None
        ref_logps = self._reference_logps(rollout) if h.beta > 0 else None
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        for _ in range(h.num_iterations):
            self._optimise(rollout, advantages, old_logps, ref_logps, norm, stats)
        self._log_step(rewards, scores, rollout, stats, generation_time, time.perf_counter() - start)

    def _optimise(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,
        old_logps: torch.Tensor | None,
        ref_logps: torch.Tensor | None,
        norm: Normalizer,
        stats: dict[str, list[torch.Tensor]],
    ) -> None:
        h = self.hparams
        optimizer = self.optimizers()
        epsilon_high = h.epsilon if h.epsilon_high is None else h.epsilon_high
        self.model.train()
        for first in range(0, len(rollout), h.micro_batch_size):
            rows = slice(first, first + h.micro_batch_size)
            part = rollout.select(rows)
            mask = part.loss_mask
            logps, entropy = token_logprobs(
                self.model, part.input_ids, part.attention_mask, mask, h.temperature, h.logprob_chunk_size
            )
            old = logps.detach() if old_logps is None else old_logps[rows, : logps.shape[1]]
            per_token, ratio = clipped_surrogate(logps, old, advantages[rows], h.epsilon, epsilon_high)
            if ref_logps is not None:
                kl = kl_to_reference(logps, ref_logps[rows, : logps.shape[1]])
                per_token = per_token + h.beta * kl
                stats["kl"].append(_masked_mean(kl.detach(), mask))
            loss = aggregate_loss(per_token, mask, h.loss_type, norm)
            self.manual_backward(loss)
            stats["loss"].append(loss.detach())
            stats["entropy"].append(_masked_mean(entropy, mask))
            for key, value in clip_fractions(ratio, advantages[rows], mask, h.epsilon, epsilon_high).items():
                stats[key].append(value)
        self._synchronise_gradients(optimizer.optimizer)
        stats["grad_norm"].append(self._clip_gradients(optimizer.optimizer))
        optimizer.step()
        optimizer.zero_grad()
        self.lr_schedulers().step()

    def _synchronise_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Average gradients over processes unless DistributedDataParallel already did (dense runs under ``ddp``)."""
        if not is_distributed() or isinstance(self.trainer.strategy.model, DistributedDataParallel):
            return
        if isinstance(optimizer, SparseAdamW):
            optimizer.all_reduce_gradients()
            return
        for param in self.model.parameters():
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)
        all_reduce_mean_(p.grad for p in self.model.parameters() if p.grad is not None)

    def _clip_gradients(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        max_norm = self.hparams.max_grad_norm or float("inf")
        if isinstance(optimizer, SparseAdamW):
            return optimizer.clip_grad_norm_(max_norm)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    @torch.no_grad()
    def _logps_no_grad(self, rollout: Rollout, model: torch.nn.Module) -> torch.Tensor:
        h = self.hparams
        parts = []
        width = rollout.input_ids.shape[1]
        for first in range(0, len(rollout), h.micro_batch_size):
            part = rollout.select(slice(first, first + h.micro_batch_size))
            logps, _ = token_logprobs(
                model, part.input_ids, part.attention_mask, part.loss_mask, h.temperature, h.logprob_chunk_size
            )
            parts.append(torch.nn.functional.pad(logps, (0, width - logps.shape[1])))
        return torch.cat(parts)

    def _reference_logps(self, rollout: Rollout) -> torch.Tensor:
        if self.masks is not None:
            with swapped_to_base(self.model, self.masks, self.base_values):
                return self._logps_no_grad(rollout, self.model)
        return self._logps_no_grad(rollout, self.reference)

    def _log_step(
        self,
        rewards: torch.Tensor,
        scores: list[dict[str, float]],
        rollout: Rollout,
        stats: dict[str, list[torch.Tensor]],
        generation_time: float,
        step_time: float,
    ) -> None:
        g = self.hparams.num_generations
        grouped = rewards.view(-1, g)
        lengths = rollout.completion_lengths.float()
        metrics = {
            "reward_std": grouped.std(dim=1).mean(),
            "frac_reward_zero_std": (grouped.std(dim=1) < 1e-6).float().mean(),
            "completions/mean_length": lengths.mean(),
            "completions/clipped_ratio": rollout.truncated.float().mean(),
            "tokens_per_second": lengths.sum() / max(generation_time, 1e-9),
            "timing/generation_s": torch.tensor(generation_time),
            "timing/step_s": torch.tensor(step_time),
            "learning_rate": torch.tensor(self.optimizers().optimizer.param_groups[0]["lr"]),
        }
        for key in scores[0]:
            if key != "reward":
                metrics[f"rewards/{key}"] = torch.tensor(sum(s[key] for s in scores) / len(scores))
        metrics.update({key: torch.stack(values).float().mean() for key, values in stats.items()})
        self.log("reward", rewards.mean(), prog_bar=True, batch_size=len(rewards), sync_dist=True)
        self.log_dict({k: v.float() for k, v in metrics.items()}, batch_size=len(rewards), sync_dist=True)
        self.log("completions/min_length", lengths.min(), batch_size=len(rewards), sync_dist=True, reduce_fx="min")
        self.log("completions/max_length", lengths.max(), batch_size=len(rewards), sync_dist=True, reduce_fx="max")

    # -- evaluation -------------------------------------------------------------------------
    def validation_step(self, batch: list[Episode], batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch: list[Episode], batch_idx: int) -> None:
        self._evaluate(batch)

    def _evaluate(self, batch: list[Episode]) -> None:
        rollout = generate_rollout(self.model, self.tokenizer, batch, self.eval_sampling)
        for episode, replies in zip(batch, rollout.replies):
            score = self.env.score(episode, replies)
            for key in EVAL_KEYS:
                if key in score:
                    self.val_metrics[key].update(score[key])

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        for key, metric in self.val_metrics.items():
            if metric.update_count:
                self.log(f"{stage}/{key}", metric.compute(), prog_bar=key == "reward")
            metric.reset()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _to_device(rollout: Rollout, device: torch.device) -> Rollout:
    rollout.input_ids = rollout.input_ids.to(device)
    rollout.attention_mask = rollout.attention_mask.to(device)
    rollout.loss_mask = rollout.loss_mask.to(device)
    rollout.truncated = rollout.truncated.to(device)
    return rollout
