"""Reward functions as pure functions of text: tag extraction, line normalisation, similarity.

The alphabet-sort helpers reproduce the scoring of Kalomaze's Alphabetsort environment
(verifiers ``environments/alphabet_sort``) rule for rule; the documentation page
"Environments" states the rules they implement.

A reward used by :class:`~mthlib.envs.JsonlEnv` is any function ``(reply, answer) -> float``;
:func:`resolve_reward` turns a name from a config file into such a function. A reward of
:class:`~mthlib.envs.DatasetEnv` is a TRL-style function found by :func:`import_callable`.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

RewardFn = Callable[[str, str], float]


def extract_tagged(text: str, tag: str) -> list[str]:
    """Contents of every complete ``<tag>...</tag>`` pair in ``text``, in order.

    Non-greedy and across newlines, exactly ``re.findall(r"<tag>(.*?)</tag>", text, re.DOTALL)``:
    tag names are case-sensitive, an unclosed tag yields nothing, and an unclosed opening
    tag before a complete pair makes that match start at the first opening tag.
    """
    return re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, re.DOTALL)


def normalize_lines(text: str) -> str:
    """Split on ``\\n``, strip every line, drop empty lines, lower-case, join with ``\\n``."""
    return "\n".join(line.strip().lower() for line in text.split("\n") if line.strip())


def sequence_ratio(pred: str, expected: str) -> float:
    """``difflib.SequenceMatcher(None, pred, expected).ratio()`` with the default ``autojunk=True``.

    The argument order matters: with ``autojunk`` the characters that are frequent in
    ``expected`` (about 1% of a string of 200 or more characters) are ignored as match
    anchors, so long answers score much lower for small mistakes.
    """
    return difflib.SequenceMatcher(None, pred, expected).ratio()


def exact_match(pred: str, expected: str) -> float:
    """1.0 when ``pred`` and ``expected`` are equal after stripping surrounding whitespace, else 0.0."""
    return float(pred.strip() == expected.strip())


def keep_if_improving(scores: Sequence[float]) -> float:
    """The last score when every score is strictly greater than the one before, else 0.0.

    One score is returned as is; no score gives 0.0. Repeating an answer therefore scores 0.
    """
    if not scores:
        return 0.0
    if any(later <= earlier for earlier, later in zip(scores, scores[1:])):
        return 0.0
    return scores[-1]


def attempt_ratios(reply: str, tag: str, expected: str) -> list[float]:
    """Raw similarity of every ``<tag>`` attempt in ``reply`` to ``expected``.

    Both sides are normalised with :func:`normalize_lines`; an attempt or an expected
    answer that is empty after normalisation scores 0.0.

    Args:
        reply: One assistant message.
        tag: The answer tag to read (case-sensitive).
        expected: The expected answer, one item per line.
    """
    target = normalize_lines(expected)
    ratios = []
    for content in extract_tagged(reply, tag):
        answer = normalize_lines(content)
        ratios.append(sequence_ratio(answer, target) if answer and target else 0.0)
    return ratios


def turn_score(reply: str, tag: str, expected: str, power: float | None = None) -> float:
    """Alphabet-sort score of one turn: the strict-increase rule over the tagged attempts.

    Args:
        reply: The assistant message of this turn.
        tag: ``alphabetical_sorted`` on turn 1, ``combined_alphabetical_sorted`` later.
        expected: The expected answer, one item per line.
        power: When given, every attempt's ratio is raised to it before the rule compares
            them (``power_per_turn=True``); ``None`` compares and returns raw ratios.

    Returns:
        The last (powered) score when the attempts strictly improve, else 0.0; 0.0 without
        any complete tag pair.
    """
    ratios = attempt_ratios(reply, tag, expected)
    return keep_if_improving(ratios if power is None else [r**power for r in ratios])


BUILTIN_REWARDS: dict[str, RewardFn] = {"exact_match": exact_match, "sequence_ratio": sequence_ratio}


def resolve_reward(name: str) -> RewardFn:
    """The reward function called ``name``.

    Args:
        name: A built-in name (``exact_match`` or ``sequence_ratio``) or the import path of
            a function ``(reply, answer) -> float``, written ``package.module:function`` or
            ``package.module.function``.

    Raises:
        ValueError: ``name`` is neither a built-in nor an importable callable.
    """
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    return import_callable(name, f"one of {sorted(BUILTIN_REWARDS)} or an import path 'package.module:function'")


def import_callable(name: str, allowed: str) -> Callable[..., Any]:
    """The callable at the import path ``name`` (``package.module:function`` or ``package.module.function``).

    Shared by every option that names a user's reward function in a config file, so they
    all read and report import paths the same way.

    Args:
        name: The import path.
        allowed: What the option accepts, quoted after "expected" in every error.

    Raises:
        ValueError: ``name`` is not an import path, its module does not import, or the
            module has no callable of that name.
    """
    module_name, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown reward {name!r}: expected {allowed}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"reward {name!r}: cannot import module {module_name!r} ({error}); expected {allowed}"
        ) from error
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {name!r}: module {module_name!r} has no callable {attr!r}; expected {allowed}")
    return fn
