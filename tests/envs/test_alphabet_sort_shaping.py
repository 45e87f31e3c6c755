"""AlphabetSort's switchable help for a weak model: in-context examples and a reward that pays order."""

import re

import pytest

from mthlib.envs import AlphabetSort, Episode
from mthlib.envs.alphabet_sort import sort_names
from mthlib.grpo.rollout import prompt_tokens

PROMPT_LIST = re.compile(r"by (FIRST|LAST) name: ([^\n]*)")


def test_examples_are_solved_episodes_placed_before_the_same_task():
    plain = AlphabetSort(min_turns=1, max_turns=2)
    shown = AlphabetSort(min_turns=1, max_turns=2, examples=2)
    for index in range(20):
        task, with_examples = plain.episode(7, index), shown.episode(7, index)
        # the task is the one drawn without examples: same prompts, answers and metadata
        assert (with_examples.user_turns, with_examples.answer, with_examples.info) == (
            task.user_turns, task.answer, task.info)
        assert task.history == ()
        history = with_examples.history
        assert [m["role"] for m in history] == ["user", "assistant"] * (len(history) // 2)
        firsts = [m["content"] for m in history[0::2] if m["content"].startswith("Sort these names")]
        assert len(firsts) == 2  # two complete examples, each opening with a first-turn prompt
        # chat order: examples first, then the task's first prompt
        messages = with_examples.messages()
        assert messages[: len(history)] == list(history)
        assert messages[len(history):] == [{"role": "user", "content": task.user_turns[0]}]


def test_example_replies_are_the_sorted_names_of_their_prompts():
    env = AlphabetSort(min_turns=1, max_turns=1, examples=3)
    for index in range(10):
        history = env.episode(1, index).history
        assert len(history) == 6
        for user, reply in zip(history[0::2], history[1::2]):
            by, listed = PROMPT_LIST.search(user["content"]).groups()
            lines = reply["content"].split("\n")
            assert lines[0] == "<alphabetical_sorted>" and lines[-1] == "</alphabetical_sorted>"
            assert lines[1:-1] == sort_names(listed.split(", "), by)
            assert env.score(Episode((user["content"],), (tuple(lines[1:-1]),)), [reply["content"]])["accuracy"] == 1.0


def test_examples_reach_the_tokenized_prompt(tiny_tokenizer):
    env = AlphabetSort(min_turns=1, max_turns=1, examples=1)
    episode = env.episode(0, 0)
    tokens = prompt_tokens(tiny_tokenizer, episode)
    text = tiny_tokenizer.decode(tokens)
    assert episode.history[1]["content"].split("\n")[1] in text
    assert len(tokens) > len(prompt_tokens(tiny_tokenizer, AlphabetSort(min_turns=1, max_turns=1).episode(0, 0)))


def test_order_bonus_pays_sorted_order_in_any_layout_and_defaults_to_the_original():
    plain = AlphabetSort(min_turns=1, max_turns=1, min_names_per_turn=3, max_names_per_turn=3, power=1.0)
    paid = AlphabetSort(min_turns=1, max_turns=1, min_names_per_turn=3, max_names_per_turn=3, power=1.0,
                        order_bonus=0.5)
    episode = plain.episode(0, 0)
    names = list(episode.answer[0])
    one_line = f"<alphabetical_sorted>{', '.join(names)}</alphabetical_sorted>"
    reversed_order = "<alphabetical_sorted>\n" + "\n".join(reversed(names)) + "\n</alphabetical_sorted>"
    for reply in (one_line, reversed_order, plain.reference(episode)[0]):
        base = plain.score(episode, [reply])
        assert paid.score(episode, [reply])["reward"] == pytest.approx(base["reward"] + 0.5 * base["order"])
    assert plain.score(episode, [one_line])["order"] == 1.0
    assert plain.score(episode, [reversed_order])["order"] == 0.0
    assert paid.score(episode, [plain.reference(episode)[0]])["reward"] == pytest.approx(1.5)


def test_negative_examples_refused():
    with pytest.raises(ValueError, match="examples must be >= 0"):
        AlphabetSort(examples=-1)
