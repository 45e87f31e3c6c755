"""A user's own task: single-turn prompts and answers from a JSON Lines file, scored by a named reward."""

from __future__ import annotations

import json
import random
from pathlib import Path

from mthlib.envs.base import Environment, Episode
from mthlib.envs.rewards import exact_match, resolve_reward


def load_jsonl(path: str | Path, prompt_key: str, answer_key: str) -> list[tuple[str, str]]:
    """The ``(prompt, answer)`` pairs of a JSON Lines file; blank lines are skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: A line is not a JSON object, lacks a key, or holds a non-string value
            (the message names the line); or the file holds no record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number}: invalid JSON at column {error.colno} ({error.msg}); each line must be one "
                f'JSON object such as {{"{prompt_key}": "...", "{answer_key}": "..."}}'
            ) from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object with keys {prompt_key!r} and {answer_key!r}")
        for key in (prompt_key, answer_key):
            if key not in record:
                raise ValueError(f"{path}:{number}: missing key {key!r} (keys found: {sorted(record)})")
            if not isinstance(record[key], str):
                raise ValueError(f"{path}:{number}: {key!r} must be a string, got {type(record[key]).__name__}")
        rows.append((record[prompt_key], record[answer_key]))
    if not rows:
        raise ValueError(f"{path}: no records; expected one JSON object per line")
    return rows


class JsonlEnv(Environment):
    """Single-turn prompts and answers read from a JSON Lines file, one ``{"prompt": ..., "answer": ...}`` per line.

    Every episode is one line drawn uniformly at random. Metrics beside ``reward``:
    ``accuracy``, 1.0 when the reply equals the answer after stripping surrounding whitespace.

    Args:
        path: The JSON Lines file.
        reward: ``exact_match``, ``sequence_ratio`` (``difflib`` similarity of reply to answer),
            or the import path ``package.module:function`` of a function ``(reply, answer) -> float``.
        prompt_key: Key of the user prompt in every line.
        answer_key: Key of the expected answer in every line.
        system_prompt: Optional system message placed before every prompt.
    """

    metrics = ("reward", "accuracy")

    def __init__(
        self,
        path: str,
        reward: str = "exact_match",
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        system_prompt: str | None = None,
    ) -> None:
        self.path = path
        self.reward = reward
        self.prompt_key = prompt_key
        self.answer_key = answer_key
        self.system_prompt = system_prompt
        self.reward_fn = resolve_reward(reward)
        self.rows = load_jsonl(path, prompt_key, answer_key)

    def sample(self, rng: random.Random) -> Episode:
        """One line of the file, chosen uniformly."""
        line = rng.randrange(len(self.rows))
        prompt, answer = self.rows[line]
        return Episode(user_turns=(prompt,), answer=answer, system_prompt=self.system_prompt, info={"row": line})

    def score(self, episode: Episode, replies: list[str]) -> dict[str, float]:
        """``reward`` from the configured function; a missing reply scores 0 on both metrics."""
        if not replies:
            return {"reward": 0.0, "accuracy": 0.0}
        return {
            "reward": float(self.reward_fn(replies[0], episode.answer)),
            "accuracy": exact_match(replies[0], episode.answer),
        }

    def reference(self, episode: Episode) -> list[str]:
        """The expected answer as the single ideal reply."""
        return [episode.answer]
