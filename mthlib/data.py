"""PromptDataModule: a seeded stream of training episodes, a fixed evaluation set, calibration batches."""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedTokenizerBase

from mthlib.envs.alphabet_sort import AlphabetSort
from mthlib.envs.base import Environment, Episode
from mthlib.grpo.padding import attention_rows, pad_rows


class EpisodeStream(IterableDataset):
    """Episodes ``position, position+1, ...`` of an environment's stream ``seed``, endless.

    Episode ``i`` depends only on ``(seed, i)``. On resume the module sets ``position`` to
    the number of prompts it had trained on (the loader prefetches, so the stream's own
    counter runs ahead), and the run continues with the prompts it would have seen.

    Sharded over ``world_size`` processes (:meth:`shard`), process ``rank`` reads episodes
    ``position * world_size + rank``: the processes never share a prompt, and together they
    read the single-process stream in order.
    """

    def __init__(self, env: Environment, seed: int) -> None:
        self.env = env
        self.seed = seed
        self.position = 0
        self.rank = 0
        self.world_size = 1

    def shard(self, rank: int, world_size: int) -> None:
        """Read only the episodes of process ``rank`` out of ``world_size``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[Episode]:
        while True:
            episode = self.env.episode(self.seed, self.position * self.world_size + self.rank)
            self.position += 1
            yield episode



def _as_list(batch: list[Episode]) -> list[Episode]:
    return batch


class PromptDataModule(pl.LightningDataModule):
    """Prompts for GRPO from an :class:`~mthlib.envs.Environment`.

    Args:
        env: The environment (``class_path`` + ``init_args`` in YAML); default alphabet sort
            with the blog's settings.
        batch_size: Prompts per training step (each gets ``num_generations`` completions).
        seed: Seed of the training prompt stream.
        eval_size: Prompts in the fixed evaluation set (the blog: 512); an environment with a
            held-out split of fewer prompts evaluates on all of them.
        eval_seed: Seed of the evaluation set (the blog: 2001); see
            :meth:`~mthlib.envs.Environment.evaluation_episodes`.
        eval_batch_size: Prompts per evaluation batch (greedy decoding).
    """

    def __init__(
        self,
        env: Environment | None = None,
        batch_size: int = 2,
        seed: int = 0,
        eval_size: int = 512,
        eval_seed: int = 2001,
        eval_batch_size: int = 32,
    ) -> None:
        super().__init__()
        self.env = env if env is not None else AlphabetSort()
        self.batch_size = batch_size
        self.seed = seed
        self.eval_size = eval_size
        self.eval_seed = eval_seed
        self.eval_batch_size = eval_batch_size
        self.train_stream = EpisodeStream(self.env, seed)

    def setup(self, stage: str) -> None:
        """Give each process its own share of the training prompts (data-parallel runs)."""
        if self.trainer is not None:
            self.train_stream.shard(self.trainer.global_rank, self.trainer.world_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_stream, batch_size=self.batch_size, collate_fn=_as_list)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def _eval_loader(self) -> DataLoader:
        episodes = self.env.evaluation_episodes(self.eval_seed, self.eval_size)
        return DataLoader(episodes, batch_size=self.eval_batch_size, shuffle=False, collate_fn=_as_list)

    def transfer_batch_to_device(self, batch: list[Episode], device: torch.device, dataloader_idx: int) -> list[Episode]:
        """Batches are episodes (plain Python objects): nothing to move."""
        return batch

    def calibration_batches(
        self, tokenizer: PreTrainedTokenizerBase, num_samples: int, batch_size: int, seed: int
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Tokenized conversations with the environment's reference replies, for gradient-based masks.

        Labels are the token ids on assistant replies and -100 elsewhere, so a causal-LM
        loss on a batch is the negative log-likelihood of the ideal answers.
        Episodes come from stream ``seed + 1_000_003`` (disjoint from training and evaluation).
        """
        rows = []
        for index in range(num_samples):
            episode = self.env.episode(seed + 1_000_003, index)
            replies = self.env.reference(episode)
            if replies is None:
                raise ValueError(f"{type(self.env).__name__} gives no reference replies; choose a mask without calibration")
            rows.append(conversation_tokens(tokenizer, episode, replies))
            if len(rows) == batch_size or index == num_samples - 1:
                yield _pad_batch(rows, tokenizer.pad_token_id)
                rows = []


def conversation_tokens(
    tokenizer: PreTrainedTokenizerBase, episode: Episode, replies: list[str]
) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and its labels (-100 outside assistant replies)."""
    ids: list[int] = []
    labels: list[int] = []
    for turn in range(len(replies)):
        prefix = tokenizer.apply_chat_template(
            episode.messages(replies[:turn]), tokenize=False, add_generation_prompt=True
        )
        answered = episode.messages(replies[: turn + 1])
        if answered[-1]["role"] == "user":
            answered = answered[:-1]
        full = tokenizer.apply_chat_template(answered, tokenize=False)
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        new_prompt = prefix_ids[len(ids):]
        ids += new_prompt
        labels += [-100] * len(new_prompt)
        answer = full_ids[len(ids):]
        ids += answer
        labels += answer
    return ids, labels


def _pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    ids = [row for row, _ in rows]
    return {
        "input_ids": pad_rows(ids, pad_id),
        "attention_mask": attention_rows(ids),
        "labels": pad_rows([labels for _, labels in rows], -100),
    }
