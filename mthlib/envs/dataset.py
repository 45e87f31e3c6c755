"""Prompts from a Hugging Face ``datasets`` dataset, scored by reward functions written for TRL's ``GRPOTrainer``.

A TRL user already has both: a dataset with a ``prompt`` column and reward functions
``f(prompts, completions, **kwargs) -> list[float | None]``. :class:`DatasetEnv` calls those
functions as TRL does, so they work unchanged.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Callable
from typing import Any

from mthlib.envs.base import Environment, Episode
from mthlib.envs.rewards import import_callable

ROLES = ("system", "user", "assistant")
TRL_SKIPPED = ("completion", "completion_ids")
"""Columns TRL does not hand to reward functions (beside the prompt column)."""
REWARD_PATH = "an import path 'package.module:function' of a TRL-style reward function"


def load_splits(path: str, name: str | None, data_files: Any, cache_dir: str | None) -> Any:
    """Every split of the dataset, as ``datasets.load_dataset`` reads it (a ``DatasetDict``).

    Raises:
        ImportError: ``datasets`` is not installed (it is an optional dependency).
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError("DatasetEnv needs the 'datasets' package: pip install datasets") from error
    return datasets.load_dataset(path, name=name, data_files=data_files, cache_dir=cache_dir)


def conversation(prompt: Any, where: str) -> list[dict[str, str]]:
    """The messages of a conversational prompt (TRL's format), reduced to ``role`` and ``content``.

    A prompt is a non-empty list of ``{"role", "content"}`` messages with string content,
    an optional system message first, and a user message last (the model writes the reply).

    Raises:
        ValueError: The prompt breaks one of these rules; ``where`` names its row.
    """
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: the prompt must be a string or a non-empty list of messages, got {prompt!r}")
    messages = []
    for position, message in enumerate(prompt):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise ValueError(f"{where}: message {position} must be {{'role': one of {list(ROLES)}, "
                             f"'content': a string}}, got {message!r}")
        if message["role"] == "system" and position:
            raise ValueError(f"{where}: a system message may only come first, found one at position {position}")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message must be the user's, got {messages[-1]['role']!r}")
    return messages


def metric_names(functions: list[Callable[..., Any]]) -> tuple[str, ...]:
    """``reward``, then each function's ``__name__``; a repeated name gets ``_2``, ``_3``... appended."""
    names = ["reward"]
    for function in functions:
        base = getattr(function, "__name__", type(function).__name__)
        name, copy = base, 1
        while name in names:
            copy += 1
            name = f"{base}_{copy}"
        names.append(name)
    return tuple(names)


def checked_split(splits: Any, split: str, path: str, prompt_column: str) -> Any:
    """Split ``split`` of ``splits``, checked to exist, to have rows and to have the prompt column.

    Raises:
        ValueError: Either is missing; the message lists the splits or columns there are.
    """
    if split not in splits:
        raise ValueError(f"{path}: no split {split!r}; splits: {sorted(splits)}")
    rows = splits[split]
    if prompt_column not in rows.column_names:
        raise ValueError(f"{path} split {split!r}: no prompt column {prompt_column!r}; columns: {rows.column_names}")
    if not len(rows):
        raise ValueError(f"{path} split {split!r}: no rows")
    return rows


def reward_value(name: str, function: Callable[..., Any], prompt: Any, completion: Any,
                 columns: dict[str, list[Any]]) -> float | None:
    """``function``'s reward for one completion, called as TRL calls it, with a batch of one.

    Args:
        name: The function's import path, for errors.
        function: The reward function.
        prompt: The row's prompt as stored.
        completion: The reply, as a string or as a list of one assistant message.
        columns: The row's other columns, each a one-element list.

    Raises:
        ValueError: The function returned anything but a list of one finite number or ``None``.
    """
    values = function(prompts=[prompt], completions=[completion], completion_ids=None,
                      **{**columns, "trainer_state": None})
    if isinstance(values, str) or not hasattr(values, "__len__") or len(values) != 1:
        raise ValueError(f"reward {name!r} returned {values!r}; expected a list of one value per completion (1 here)")
    value = values[0]
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"reward {name!r} returned {value!r}; expected a finite number or None")
    return float(value)


class DatasetEnv(Environment):
    """Single-turn prompts from a ``datasets`` dataset, scored by TRL-style reward functions.

    Training episodes are rows of ``split`` drawn uniformly at random. The prompt column
    holds a string (TRL's standard format: one user turn, after ``system_prompt`` if set)
    or a list of ``{"role", "content"}`` messages (TRL's conversational format): an optional
    system message first, any user/assistant messages (e.g. few-shot pairs), and a user
    message last; the episode's chat is exactly those messages (``system_prompt`` is added
    only when the row has no system message).

    Each reward function is called as TRL's ``GRPOTrainer`` calls it, with a batch of one:
    ``f(prompts=[prompt], completions=[completion], completion_ids=None, trainer_state=None,
    **columns)``. ``prompt`` is the row's prompt value as stored; ``completion`` is the
    reply (standard) or ``[{"role": "assistant", "content": reply}]`` (conversational);
    ``columns`` holds every other column of the row as a one-element list (except
    ``completion`` and ``completion_ids``, as in TRL). Token ids and the trainer state are
    not available to an environment, hence ``None``; TRL's ``log_extra``, ``log_metric`` and
    ``environments`` are not passed. A function returns a list of one finite number
    (``int``, ``float``, ``bool``, a NumPy scalar) or ``None`` ("not applicable").
    ``reward`` is the weighted sum with ``None`` counted as 0 (TRL's ``nansum``); each
    function's unweighted value is also a metric named after its ``__name__`` (``None``
    logged as 0.0). A missing reply scores 0 on every metric.

    The environment has no reference replies, so mask strategies that calibrate on
    reference answers (Fisher, SNIP...) stop with "DatasetEnv gives no reference replies".

    Args:
        path: A hub dataset name, a local folder of data files, or a loader name such as
            ``json``, ``csv`` or ``parquet`` with ``data_files`` (as ``datasets.load_dataset``).
        rewards: Import paths ``package.module:function`` of the reward functions.
        reward_weights: One weight per reward function; default 1.0 each.
        split: The split of the training prompts.
        eval_split: A split of held-out prompts: evaluation reads its first ``eval_size`` rows
            in order (all of them when it has fewer). ``None``: evaluation draws from ``split``
            with the evaluation seed, like every environment.
        name: The dataset configuration (``load_dataset``'s ``name``).
        data_files: File(s) for a loader name or folder, or a ``{split: file(s)}`` mapping.
        prompt_column: The column holding the prompt (``messages`` works the same way).
        system_prompt: Optional system message placed before prompts that have none.
        cache_dir: Where ``datasets`` keeps its converted copy (default: its own cache).
    """

    def __init__(
        self,
        path: str,
        rewards: list[str],
        reward_weights: list[float] | None = None,
        split: str = "train",
        eval_split: str | None = None,
        name: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        prompt_column: str = "prompt",
        system_prompt: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if not rewards:
            raise ValueError("rewards is empty; expected one or more import paths 'package.module:function' "
                             "of TRL-style reward functions")
        if reward_weights is not None and len(reward_weights) != len(rewards):
            raise ValueError(f"reward_weights has {len(reward_weights)} values for {len(rewards)} rewards; "
                             "expected one weight per reward, or none for 1.0 each")
        self.path = path
        self.rewards = rewards
        self.reward_weights = reward_weights if reward_weights is not None else [1.0] * len(rewards)
        self.split = split
        self.eval_split = eval_split
        self.prompt_column = prompt_column
        self.system_prompt = system_prompt
        self.reward_fns = [import_callable(reward, REWARD_PATH) for reward in rewards]
        self.metrics = metric_names(self.reward_fns)
        splits = load_splits(path, name, data_files, cache_dir)
        self.rows = {key: checked_split(splits, key, path, prompt_column)
                     for key in dict.fromkeys([split, eval_split]) if key is not None}
        for key in self.rows:
            self._episode(key, 0)  # a malformed prompt column fails here, not in the middle of training

    def _episode(self, split: str, index: int) -> Episode:
        """The episode of row ``index`` of ``split``; its ``answer`` is the whole row, for the rewards."""
        row = self.rows[split][index]
        prompt, info = row[self.prompt_column], {"split": split, "row": index}
        if isinstance(prompt, str):
            return Episode(user_turns=(prompt,), answer=row, system_prompt=self.system_prompt, info=info)
        messages = conversation(prompt, f"{self.path} split {split!r} row {index}")
        system = messages.pop(0)["content"] if messages[0]["role"] == "system" else self.system_prompt
        return Episode(user_turns=(messages[-1]["content"],), answer=row, system_prompt=system, info=info,
                       history=tuple(messages[:-1]))

    def sample(self, rng: random.Random) -> Episode:
        """One row of ``split``, chosen uniformly."""
        return self._episode(self.split, rng.randrange(len(self.rows[self.split])))

    def evaluation_episodes(self, seed: int, count: int) -> list[Episode]:
        """The first ``count`` rows of ``eval_split`` in order (all when it has fewer); without it, the default."""
        if self.eval_split is None:
            return super().evaluation_episodes(seed, count)
        return [self._episode(self.eval_split, index) for index in range(min(count, len(self.rows[self.eval_split])))]

    def score(self, episode: Episode, replies: list[str]) -> dict[str, float]:
        """The weighted sum of the reward functions, and each function's unweighted value."""
        if not replies:
            return dict.fromkeys(self.metrics, 0.0)
        row = episode.answer
        prompt = row[self.prompt_column]
        completion = replies[0] if isinstance(prompt, str) else [{"role": "assistant", "content": replies[0]}]
        columns = {key: [value] for key, value in row.items() if key not in (self.prompt_column, *TRL_SKIPPED)}
        values = [reward_value(path, fn, prompt, completion, columns)
                  for path, fn in zip(self.rewards, self.reward_fns)]
        scores = [0.0 if value is None else value for value in values]
        total = math.fsum(weight * score for weight, score in zip(self.reward_weights, scores))
        return dict(zip(self.metrics, [total, *scores]))
