"""The alphabet-sort environment: sort names over several turns, marking the new ones.

Mirrors Kalomaze's Alphabetsort environment (verifiers ``environments/alphabet_sort``), the task
the "Beyond the Lottery Ticket" blog trains on: same prompts, answer tags and reward for the same
episode and replies. Only the names differ: mthlib ships its own list (``names.txt``) instead of
the Hugging Face data set of arXiv authors.
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path
from typing import Literal

from mthlib.envs.base import Environment, Episode
from mthlib.envs.rewards import attempt_ratios, extract_tagged, keep_if_improving, normalize_lines, turn_score

NAMES_FILE = Path(__file__).with_name("names.txt")
FIRST_TAG = "alphabetical_sorted"
LATER_TAG = "combined_alphabetical_sorted"
NEW_MARK = " // new name!"
_PROMPT_LIST = re.compile(r"by (?:FIRST|LAST) name: ([^\n]*)")


def split_name(name: str) -> tuple[str, str]:
    """Split a concatenated name at its first upper-case character at index 1 or later.

    ``"Jean-PierreSerre"`` gives ``("Jean-", "PierreSerre")`` and ``"LudwigvanBeethoven"`` gives
    ``("Ludwigvan", "Beethoven")``; a name without an inner capital has an empty last name.
    """
    for i in range(1, len(name)):
        if name[i].isupper():
            return name[:i], name[i:]
    return name, ""


def sort_names(names: list[str], by: Literal["FIRST", "LAST"]) -> list[str]:
    """``names`` sorted by the ``"FIRST"`` or ``"LAST"`` part of :func:`split_name`.

    Python's stable ``sorted``: code-point order, case-sensitive, ties keep the order of ``names``.
    """
    part = 0 if by == "FIRST" else 1
    return sorted(names, key=lambda name: split_name(name)[part])


def load_names(path: str | Path) -> list[str]:
    """Names of a file with one name per line: spaces removed, blank lines and repeats dropped (first kept).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"names file not found: {path}")
    names = (line.replace(" ", "").strip() for line in path.read_text(encoding="utf-8").splitlines())
    return list(dict.fromkeys(name for name in names if name))


def _format_block(tag: str, lines: list[str]) -> str:
    return "\n".join([f"<{tag}>", *lines, f"</{tag}>"])


class AlphabetSort(Environment):
    """Sort names alphabetically by first or last name over 1-3 turns, marking each turn's new names.

    Turn 1 asks for the names sorted inside ``<alphabetical_sorted>``; every later turn adds names
    and asks for the whole list re-sorted inside ``<combined_alphabetical_sorted>``, the new names
    ending in ``// new name!``. A turn's score is the ``difflib`` similarity of the normalised answer
    to the expected one (zero unless several attempts strictly improve); the reward averages the
    turns, missing ones counting 0, as the original environment does.

    Metrics beside ``reward``: ``format`` (fraction of turns with a complete answer tag pair),
    ``similarity`` (mean unpowered turn score, strict-increase rule included, over the turns that
    had a pair; 0.0 if none did) and ``accuracy`` (1.0 when every turn's counted attempt equals the
    expected answer after normalisation). Three more tell sorting from copying, each the fraction
    of turns whose last tagged attempt qualifies (a turn without a tag pair counts 0):

    * ``order``: every expected name appears, and in the expected order, whatever the layout
      (one line, commas, spaces inside names, case and ``// new name!`` marks are ignored);
    * ``copy``: every expected name appears in the order the *input* gave them: the prompt's
      order on turn 1; on a later turn the previous turn's expected list followed by the new
      names as the prompt gave them. With few names the input order is often already sorted
      (a 2-name turn: half the time), so ``copy`` and ``order`` overlap by chance;
    * ``one_per_line``: the non-empty lines are the expected names, one each (any order).

    Args:
        min_turns: Fewest turns of an episode.
        max_turns: Most turns of an episode.
        min_names_per_turn: Fewest names a turn introduces.
        max_names_per_turn: Most names a turn introduces.
        power: Exponent applied to the similarity (the original's ``similarity_power``).
        power_per_turn: Raise every turn's score to ``power`` and average (the original's default);
            otherwise raise the average of the raw scores to ``power``.
        names_file: A text file with one name per line (spaces are removed); default: the list
            shipped with mthlib.
        format_bonus: Added to the reward times ``format``. 0 (the default) is the original's reward
            exactly; a small bonus gives a weak model a learning signal before it can sort.
        order_bonus: Added to the reward times ``order``: pays for the names in sorted order whatever
            the layout, so sorting earns more than copying the input. 0 (the default) keeps the
            original's reward.
        examples: Solved episodes shown before the task as earlier user/assistant turns (an
            in-context example of the exact format, one name per line). They are drawn after the
            task from the same generator, so the task itself is the one drawn with ``examples=0``.
            0 (the default) is the original's prompt.
    """

    metrics = ("reward", "accuracy", "format", "similarity", "order", "copy", "one_per_line")

    def __init__(
        self,
        min_turns: int = 1,
        max_turns: int = 3,
        min_names_per_turn: int = 1,
        max_names_per_turn: int = 5,
        power: float = 4.0,
        power_per_turn: bool = True,
        names_file: str | None = None,
        format_bonus: float = 0.0,
        order_bonus: float = 0.0,
        examples: int = 0,
    ) -> None:
        if not 1 <= min_turns <= max_turns:
            raise ValueError(f"need 1 <= min_turns <= max_turns, got min_turns={min_turns}, max_turns={max_turns}")
        if not 1 <= min_names_per_turn <= max_names_per_turn:
            raise ValueError(
                "need 1 <= min_names_per_turn <= max_names_per_turn, got "
                f"min_names_per_turn={min_names_per_turn}, max_names_per_turn={max_names_per_turn}"
            )
        if power <= 0:
            raise ValueError(f"power must be > 0, got {power}")
        if examples < 0:
            raise ValueError(f"examples must be >= 0, got {examples}")
        self.min_turns = min_turns
        self.max_turns = max_turns
        self.min_names_per_turn = min_names_per_turn
        self.max_names_per_turn = max_names_per_turn
        self.power = power
        self.power_per_turn = power_per_turn
        self.format_bonus = format_bonus
        self.order_bonus = order_bonus
        self.examples = examples
        self.names = load_names(names_file if names_file is not None else NAMES_FILE)
        needed = max_turns * max_names_per_turn
        if len(self.names) < needed:
            raise ValueError(
                f"names file {names_file or NAMES_FILE} has {len(self.names)} distinct names; "
                f"max_turns * max_names_per_turn = {needed} are needed"
            )

    def sample(self, rng: random.Random) -> Episode:
        """Draw the task (see :meth:`_draw_task`), then :attr:`examples` solved episodes as its history."""
        episode = self._draw_task(rng)
        history: list[dict[str, str]] = []
        for _ in range(self.examples):
            example = self._draw_task(rng)
            for user, reply in zip(example.user_turns, self.reference(example)):
                history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return dataclasses.replace(episode, history=tuple(history)) if history else episode

    def _draw_task(self, rng: random.Random) -> Episode:
        """Draw turns, names per turn, sort key, names, then the shuffled prompts and templates."""
        num_turns = rng.randint(self.min_turns, self.max_turns)
        counts = [rng.randint(self.min_names_per_turn, self.max_names_per_turn) for _ in range(num_turns)]
        by = rng.choice(["FIRST", "LAST"])
        drawn = rng.sample(self.names, sum(counts))
        turn_names = []
        for count in counts:
            turn_names.append(drawn[:count])
            drawn = drawn[count:]
        answers = []
        for turn, new in enumerate(turn_names):
            ordered = sort_names([name for names in turn_names[: turn + 1] for name in names], by)
            answers.append(tuple(name + NEW_MARK if turn and name in new else name for name in ordered))
        user_turns = [self._first_prompt(rng, turn_names[0], by)]
        for turn in range(1, num_turns):
            user_turns.append(self._later_prompt(rng, turn_names, turn, by))
        return Episode(
            user_turns=tuple(user_turns),
            answer=tuple(answers),
            info={"sort_by": by, "turn_names": [list(names) for names in turn_names]},
        )

    def _first_prompt(self, rng: random.Random, names: list[str], by: str) -> str:
        shown = list(names)
        rng.shuffle(shown)
        count = rng.randint(self.min_names_per_turn, self.max_names_per_turn)
        template = _format_block(FIRST_TAG, [f"Name{i}" for i in range(1, count + 1)])
        return (
            f"Sort these names in alphabetical order by {by} name: {', '.join(shown)}\n\n"
            f"Use exactly this format:\n{template}"
        )

    def _later_prompt(self, rng: random.Random, turn_names: list[list[str]], turn: int, by: str) -> str:
        shown = list(turn_names[turn])
        rng.shuffle(shown)
        text = (
            f"Now sort ALL of these names alphabetically by {by} name: {', '.join(shown)}\n\n"
            "These are in addition to the prior list. Mark any NEW names (that weren't in the prior list) "
            "with `// new name!` at the end."
        )
        if turn > 1:
            return text + " Follow the same format as before."
        total = sum(len(names) for names in turn_names[: turn + 1])
        count = rng.randint(self.min_names_per_turn, total)
        first_new = rng.randint(0, count - 1)
        lines = [f"Name{i}" + (NEW_MARK if i > first_new else "") for i in range(1, count + 1)]
        return f"{text}\n\nUse exactly this format:\n{_format_block(LATER_TAG, lines)}"

    def score(self, episode: Episode, replies: list[str]) -> dict[str, float]:
        """Reward exactly as the original environment computes it, plus the metrics of the class docstring."""
        num_turns = episode.num_turns
        power = self.power if self.power_per_turn else None
        scores, raw_scores, formatted, exact = [], [], 0, 0
        layout = {"order": 0, "copy": 0, "one_per_line": 0}
        for turn, expected_lines in enumerate(episode.answer):
            reply = replies[turn] if turn < len(replies) else ""
            tag = LATER_TAG if turn else FIRST_TAG
            expected = "\n".join(expected_lines)
            scores.append(turn_score(reply, tag, expected, power))
            attempts = extract_tagged(reply, tag)
            if not attempts:
                continue
            formatted += 1
            names = [line.removesuffix(NEW_MARK) for line in expected_lines]
            found = names_in_order(attempts[-1], names)
            layout["order"] += found == names
            layout["copy"] += found == input_order(episode, turn)
            layout["one_per_line"] += sorted(_lines(attempts[-1])) == sorted(map(_plain, names))
            raw = keep_if_improving(attempt_ratios(reply, tag, expected))
            raw_scores.append(raw)
            if raw > 0 and normalize_lines(attempts[-1]) == normalize_lines(expected):
                exact += 1
        mean = sum(scores) / num_turns
        reward = mean if self.power_per_turn else mean**self.power
        return {
            "reward": reward + (self.format_bonus * formatted + self.order_bonus * layout["order"]) / num_turns,
            "format": formatted / num_turns,
            "similarity": sum(raw_scores) / len(raw_scores) if raw_scores else 0.0,
            "accuracy": float(exact == num_turns),
            **{key: count / num_turns for key, count in layout.items()},
        }

    def reference(self, episode: Episode) -> list[str]:
        """The ideal reply of every turn: the expected answer inside that turn's tag."""
        return [
            _format_block(LATER_TAG if turn else FIRST_TAG, list(lines))
            for turn, lines in enumerate(episode.answer)
        ]


def _plain(text: str) -> str:
    """``text`` lower-cased without whitespace, commas or new-name marks: a name as the layout-free checks compare it."""
    return re.sub(r"[\s,]+", "", re.sub(re.escape(NEW_MARK.strip()), "", text, flags=re.IGNORECASE)).lower()


def _lines(text: str) -> list[str]:
    """The non-empty lines of ``text``, each :func:`_plain`."""
    return [plain for plain in map(_plain, text.split("\n")) if plain]


def names_in_order(text: str, names: list[str]) -> list[str] | None:
    """``names`` in the order they first appear in ``text``, ignoring layout; ``None`` if one is missing.

    Both sides are compared :func:`_plain` (no whitespace, commas or ``// new name!``
    marks, lower case), so ``"Ada Lovelace, Emmy Noether"`` on one line finds the same
    order as one name per line.
    """
    plain = _plain(text)
    positions = {name: plain.find(_plain(name)) for name in names}
    if any(position < 0 for position in positions.values()):
        return None
    return sorted(names, key=positions.__getitem__)


def input_order(episode: Episode, turn: int) -> list[str] | None:
    """The names of ``turn`` in the order the input gave them: what a model that copies would write.

    Turn 0: the order of the prompt's list (``"... by FIRST name: B, A"``). A later turn:
    the previous turn's expected list, then the new names in the order of that turn's
    prompt. ``None`` when the prompt has no such list.
    """
    listed = _PROMPT_LIST.search(episode.user_turns[turn])
    if listed is None:
        return None
    shown = listed.group(1).split(", ")
    if turn == 0:
        return shown
    return [line.removesuffix(NEW_MARK) for line in episode.answer[turn - 1]] + shown
