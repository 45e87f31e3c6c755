"""TRL 1.16's own GRPO loss and advantage code, run on given tensors.

``GRPOTrainer._compute_loss`` and ``GRPOTrainer._generate_and_score_completions`` are called
unbound with a :class:`TrainerStandIn` as ``self``. The stand-in carries the attributes
TRL's ``__init__`` derives from a real :class:`trl.GRPOConfig`, hands back given
log-probabilities where TRL would run the model and given rewards where it would call the
reward functions. Nothing is downloaded and no TRL class is modified.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from types import SimpleNamespace

import torch
from trl import GRPOConfig
from trl.trainer.grpo_trainer import GRPOTrainer

PAD_ID = 0
EOS_ID = 2


def grpo_config(tmp_path, **options) -> GRPOConfig:
    """A real TRL config (CPU, no reporting) with ``options`` over TRL's defaults."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecation notice, not ours
        return GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **options)


class StandInAccelerator:
    """Process ``process_index`` of ``num_processes``; collectives return the local value.

    TRL's advantage code slices the rewards of all processes by ``process_index``; its loss
    divides the token count of all processes by ``num_processes``. Both are simulated here.
    """

    def __init__(self, num_processes: int = 1, process_index: int = 0) -> None:
        self.num_processes = num_processes
        self.process_index = process_index
        self.device = torch.device("cpu")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor


class TrainerStandIn:
    """What ``GRPOTrainer``'s loss and advantage methods read from ``self``, built from a config.

    Args:
        args: The TRL config.
        logps: ``(B, T)`` log-probabilities the "model" returns.
        accumulation_steps: Micro-batches per optimizer step (TRL's gradient accumulation).
        num_processes: Simulated number of processes.
        process_index: Simulated rank.
        rewards: ``(N,)`` rewards of the completions of all processes.
        completion_ids: This process's sampled ids per completion (the last one says whether it was truncated).
    """

    get_gamma_weights = staticmethod(GRPOTrainer.get_gamma_weights)

    def __init__(
        self,
        args: GRPOConfig,
        logps: torch.Tensor | None = None,
        accumulation_steps: int = 1,
        num_processes: int = 1,
        process_index: int = 0,
        rewards: torch.Tensor | None = None,
        completion_ids: list[list[int]] | None = None,
    ) -> None:
        self.args = args
        self.accelerator = StandInAccelerator(num_processes, process_index)
        self.model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
        self.ref_model = self.model
        self.current_gradient_accumulation_steps = accumulation_steps
        self._logps, self._rewards, self._completion_ids = logps, rewards, completion_ids
        self._copy_config(args)
        self._metrics = defaultdict(lambda: defaultdict(list))
        self._logs = {"prompt": [], "completion": [], "advantages": [], "images": [],
                      "rewards": defaultdict(list), "extra": defaultdict(list)}
        self._pending_extra_logs, self._pending_metrics = {}, {}

    def _copy_config(self, args: GRPOConfig) -> None:
        """The attributes ``GRPOTrainer.__init__`` copies from its config (loss, rewards, generation)."""
        for name in ("loss_type", "beta", "scale_rewards", "importance_sampling_level", "mask_truncated_completions",
                     "num_generations", "max_completion_length", "num_iterations", "top_entropy_quantile",
                     "off_policy_mask_threshold", "use_vllm", "vllm_importance_sampling_correction",
                     "multi_objective_aggregation", "pad_to_multiple_of", "log_multimodal"):
            setattr(self, name, getattr(args, name))
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        self.num_generations_eval = args.num_generations_eval or args.num_generations
        self.aux_loss_enabled = False
        self._entropy_bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
        self.environment_factories, self.environments, self.tools = None, [], []
        self.reward_funcs, self.reward_func_names = [None], ["reward"]
        self.reward_weights = torch.ones(1)
        self._tokenizer = SimpleNamespace(pad_token_id=PAD_ID)
        self.eos_token_ids = [EOS_ID]

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        logps = self._logps if self._logps is not None else torch.zeros(input_ids.shape[0], logits_to_keep)
        return logps, torch.zeros_like(logps), None

    def _generate(self, prompts):
        count = len(prompts)
        return ([[1]] * count, self._completion_ids, None, ["reply"] * count, None, {}, None, [None] * count)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        return self._rewards.view(-1, 1).float()


def trl_loss(
    args: GRPOConfig,
    logps: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    num_items_in_batch: int,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    accumulation_steps: int = 1,
    num_processes: int = 1,
) -> torch.Tensor:
    """TRL's loss of one micro-batch (``GRPOTrainer._compute_loss``) on given log-probabilities.

    Args:
        args: The TRL config.
        logps: ``(B, T)`` current log-probabilities (with gradient).
        mask: ``(B, T)`` completion mask.
        advantages: ``(B,)``.
        num_items_in_batch: Loss tokens of the generation batch of all processes.
        old_logps: ``(B, T)`` sampling log-probabilities (``None``: on-policy).
        ref_logps: ``(B, T)`` reference log-probabilities (with ``beta != 0``).
        accumulation_steps: Micro-batches per optimizer step.
        num_processes: Simulated number of processes.
    """
    trainer = TrainerStandIn(args, logps, accumulation_steps, num_processes)
    empty = torch.zeros(logps.shape[0], 0, dtype=torch.long)
    inputs = {
        "prompt_ids": empty, "prompt_mask": empty,
        "completion_ids": torch.zeros(logps.shape, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": advantages, "num_items_in_batch": torch.tensor(num_items_in_batch),
    }
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    if ref_logps is not None:
        inputs["ref_per_token_logps"] = ref_logps
    return GRPOTrainer._compute_loss(trainer, trainer.model, inputs)


def trl_scored_batch(
    args: GRPOConfig,
    rewards: torch.Tensor,
    completion_ids: list[list[int]],
    num_processes: int = 1,
    process_index: int = 0,
) -> dict[str, torch.Tensor]:
    """TRL's ``_generate_and_score_completions`` output for given completions and rewards.

    Args:
        args: The TRL config.
        rewards: ``(N,)`` rewards of the completions of all processes, groups contiguous.
        completion_ids: This process's completions; one ending without :data:`EOS_ID` is truncated.
        num_processes: Simulated number of processes.
        process_index: Simulated rank: which slice of ``rewards`` is this process's.

    Returns:
        TRL's batch: ``advantages``, ``completion_mask``, ``num_items_in_batch``, ...
    """
    trainer = TrainerStandIn(
        args, num_processes=num_processes, process_index=process_index, rewards=rewards, completion_ids=completion_ids
    )
    inputs = [{"prompt": "prompt"} for _ in completion_ids]
    return GRPOTrainer._generate_and_score_completions(trainer, inputs)
