"""The Environment protocol: seeded episodes in, rewards out. An environment knows nothing of training."""

from __future__ import annotations

import abc
import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Episode:
    """One task instance.

    Attributes:
        user_turns: The user message of every turn, scripted in advance. Turn ``t``'s
            message is sent after the model answered turns ``0 .. t-1``.
        answer: Whatever the environment needs to score the replies (the expected output).
        system_prompt: Optional system message placed before the first user turn.
        info: Free-form metadata (for logging and inspection only).
        history: Messages placed between the system prompt and the first user turn, e.g. the
            few-shot user/assistant pairs of a conversational dataset prompt (each a
            ``{"role": ..., "content": ...}`` dict); empty for a prompt of user turns only.
    """

    user_turns: tuple[str, ...]
    answer: Any
    system_prompt: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    history: tuple[dict[str, str], ...] = ()

    @property
    def num_turns(self) -> int:
        return len(self.user_turns)

    def messages(self, replies: list[str] | tuple[str, ...] = ()) -> list[dict[str, str]]:
        """Chat so far: system prompt, :attr:`history`, user turns answered by ``replies``, the next user turn."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages += [dict(message) for message in self.history]
        for turn, user in enumerate(self.user_turns[: len(replies) + 1]):
            messages.append({"role": "user", "content": user})
            if turn < len(replies):
                messages.append({"role": "assistant", "content": replies[turn]})
        return messages


class Environment(abc.ABC):
    """Produces seeded episodes and scores the model's replies.

    Subclasses implement :meth:`sample` and :meth:`score`, and declare in :attr:`metrics`
    the keys :meth:`score` returns. Episode ``i`` of stream ``seed`` is a pure function of
    ``(seed, i)`` (see :meth:`episode`), so a training run can resume at any position and
    an evaluation set is fixed by its seed.
    """

    metrics: ClassVar[tuple[str, ...]] = ("reward",)
    """The keys of every :meth:`score` result, ``reward`` first; evaluation logs each as ``val/<key>``."""

    @abc.abstractmethod
    def sample(self, rng: random.Random) -> Episode:
        """Draw one episode using only ``rng`` for randomness."""

    @abc.abstractmethod
    def score(self, episode: Episode, replies: list[str]) -> dict[str, float]:
        """Score the assistant ``replies`` (one per answered turn; missing turns score 0).

        Returns:
            A dict with at least ``"reward"``; extra keys (e.g. ``"format"``, ``"accuracy"``)
            are averaged and logged as metrics.
        """

    def reference(self, episode: Episode) -> list[str] | None:
        """The ideal assistant reply of every turn of ``episode``, or ``None`` when the environment has none.

        Used where a prompt needs a good answer beside it, e.g. calibration batches for
        gradient-based mask strategies (prompt + reference reply).
        """
        return None

    def episode(self, seed: int, index: int) -> Episode:
        """Episode ``index`` of the stream ``seed``: deterministic and independent of other indices."""
        digest = hashlib.sha256(f"{type(self).__name__}:{seed}:{index}".encode()).digest()
        return self.sample(random.Random(int.from_bytes(digest[:8], "little")))

    def episodes(self, seed: int, count: int, start: int = 0) -> list[Episode]:
        """``count`` consecutive episodes of stream ``seed`` starting at ``start``."""
        return [self.episode(seed, i) for i in range(start, start + count)]

    def evaluation_episodes(self, seed: int, count: int) -> list[Episode]:
        """The fixed evaluation set: by default the first ``count`` episodes of stream ``seed``.

        An environment with held-out prompts of its own (e.g. a dataset's test split) returns
        those instead, so evaluation never scores prompts the model trained on.
        """
        return self.episodes(seed, count)
