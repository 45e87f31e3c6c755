"""Reward helpers: tag extraction, normalisation, similarity, the strict-increase rule, resolve_reward."""

import difflib

import pytest

from mthlib.envs.rewards import (
    attempt_ratios,
    exact_match,
    extract_tagged,
    keep_if_improving,
    normalize_lines,
    resolve_reward,
    sequence_ratio,
    turn_score,
)

TAG = "alphabetical_sorted"
EXPECTED = "AnnZed\nBobYork\nCarlXu"

# 16 names, 209 characters once joined: long enough for difflib's autojunk heuristic.
LONG = [
    "AdaLovelace", "AlanTuring", "BernhardRiemann", "CarlGauss", "DavidHilbert", "EmmyNoether",
    "EvaristeGalois", "GeorgCantor", "HenriPoincare", "IsaacNewton", "JohnNash", "KurtGodel",
    "LeonhardEuler", "MaryamMirzakhani", "SophieGermain", "SrinivasaRamanujan",
]


def block(body: str, tag: str = TAG) -> str:
    return f"<{tag}>\n{body}\n</{tag}>"


def test_extract_tagged_finds_every_complete_pair_in_order():
    text = "intro <t>one</t> middle <t>\ntwo\n</t> outro"
    assert extract_tagged(text, "t") == ["one", "\ntwo\n"]


def test_extract_tagged_ignores_unclosed_wrong_case_and_attributes():
    assert extract_tagged("<t>never closed", "t") == []
    assert extract_tagged("<T>x</T>", "t") == []
    assert extract_tagged("<t>x</T>", "t") == []
    assert extract_tagged('<t a="1">x</t>', "t") == []
    assert extract_tagged("< t>x</ t>", "t") == []


def test_extract_tagged_unclosed_opening_tag_extends_the_next_match():
    assert extract_tagged("<t>draft <t>final</t>", "t") == ["draft <t>final"]


def test_extract_tagged_is_not_fooled_by_a_longer_tag_name():
    text = "<combined_alphabetical_sorted>x</combined_alphabetical_sorted>"
    assert extract_tagged(text, "alphabetical_sorted") == []
    assert extract_tagged(text, "combined_alphabetical_sorted") == ["x"]


def test_normalize_lines():
    assert normalize_lines("  Alice \n\n\t BOB\r\n  \nCarl // New Name!\n") == "alice\nbob\ncarl // new name!"
    assert normalize_lines(" \n\n ") == ""


def test_sequence_ratio_hand_checked_value():
    # "ann\nbo" is a prefix of "ann\nbob": 6 matching characters out of 6 + 7 -> 2 * 6 / 13.
    assert sequence_ratio("ann\nbo", "ann\nbob") == pytest.approx(12 / 13)
    assert sequence_ratio("abcd", "abdc") == pytest.approx(0.75)


def test_sequence_ratio_keeps_autojunk_and_argument_order():
    expected = "\n".join(name.lower() for name in LONG)
    swapped = LONG[:8] + [LONG[9], LONG[8]] + LONG[10:]
    pred = "\n".join(name.lower() for name in swapped)
    assert len(expected) >= 200
    with_junk = difflib.SequenceMatcher(None, pred, expected).ratio()
    without_junk = difflib.SequenceMatcher(None, pred, expected, autojunk=False).ratio()
    reversed_args = difflib.SequenceMatcher(None, expected, pred).ratio()
    assert sequence_ratio(pred, expected) == with_junk
    assert with_junk < without_junk - 0.3
    assert reversed_args > with_junk + 0.3


def test_exact_match_strips_surrounding_whitespace_only():
    assert exact_match("  42\n", "42") == 1.0
    assert exact_match("4 2", "42") == 0.0
    assert exact_match("Paris", "paris") == 0.0


@pytest.mark.parametrize(
    ("scores", "expected"),
    [([], 0.0), ([0.4], 0.4), ([0.0], 0.0), ([0.2, 0.5, 0.9], 0.9), ([0.5, 0.5], 0.0), ([0.9, 0.5], 0.0),
     ([1.0, 1.0], 0.0), ([0.2, 0.9, 0.8], 0.0)],
)
def test_keep_if_improving(scores, expected):
    assert keep_if_improving(scores) == expected


def test_exact_answer_scores_one():
    assert turn_score(block(EXPECTED), TAG, EXPECTED, power=4.0) == 1.0
    assert turn_score(block(" annzed \n\nBOBYORK\ncarlxu  "), TAG, EXPECTED, power=4.0) == 1.0


def test_partial_answer_scores_the_difflib_ratio():
    pred = "AnnZed\nCarlXu\nBobYork"
    raw = difflib.SequenceMatcher(None, pred.lower(), EXPECTED.lower()).ratio()
    assert 0 < raw < 1
    assert turn_score(block(pred), TAG, EXPECTED) == raw
    assert turn_score(block(pred), TAG, EXPECTED, power=4.0) == raw**4
    # Hand-checked: the last name is missing its final letter (2 * 20 / 41).
    assert turn_score(block("AnnZed\nBobYork\nCarlX"), TAG, EXPECTED) == pytest.approx(40 / 41)


def test_long_answer_score_uses_autojunk():
    expected = "\n".join(LONG)
    pred = "\n".join(LONG[:8] + [LONG[9], LONG[8]] + LONG[10:])
    lowered = pred.lower(), expected.lower()
    assert turn_score(block(pred), TAG, expected) == difflib.SequenceMatcher(None, *lowered).ratio()
    assert turn_score(block(pred), TAG, expected) < difflib.SequenceMatcher(None, *lowered, autojunk=False).ratio()


@pytest.mark.parametrize(
    "reply",
    [
        "AnnZed\nBobYork\nCarlXu",  # no tag at all
        block(""),  # empty content
        block("  \n \n"),  # only whitespace
        f"<{TAG}>\nAnnZed\nBobYork\nCarlXu\n",  # unclosed
        block(EXPECTED, "Alphabetical_Sorted"),  # wrong case
        block(EXPECTED, "combined_alphabetical_sorted"),  # the other turn's tag
        block("AnnZed\nBobYork") + block("AnnZed"),  # worse second attempt
        block(EXPECTED) + block(EXPECTED),  # repeated correct answer
        block("AnnZed") + block(EXPECTED) + block(EXPECTED),  # improves, then repeats
    ],
)
def test_replies_that_score_zero(reply):
    assert turn_score(reply, TAG, EXPECTED, power=4.0) == 0.0
    assert turn_score(reply, TAG, EXPECTED) == 0.0


def test_strictly_improving_attempts_score_the_last():
    first, second = "AnnZed", "AnnZed\nBobYork"
    reply = block(first) + "\nwait, let me fix that\n" + block(second) + block(EXPECTED)
    assert turn_score(reply, TAG, EXPECTED, power=4.0) == 1.0
    reply = block(first) + block(second)
    assert turn_score(reply, TAG, EXPECTED, power=2.0) == sequence_ratio("annzed\nbobyork", EXPECTED.lower()) ** 2


def test_text_outside_tags_is_ignored_and_think_blocks_count():
    assert turn_score("Sure!\n" + block(EXPECTED) + "\nDone.", TAG, EXPECTED) == 1.0
    thought = "<think>" + block("AnnZed") + "</think>" + block(EXPECTED)
    assert attempt_ratios(thought, TAG, EXPECTED) == [sequence_ratio("annzed", EXPECTED.lower()), 1.0]
    assert turn_score(thought, TAG, EXPECTED) == 1.0


def test_unclosed_opening_tag_swallows_the_next_attempt():
    reply = f"<{TAG}>\nBobYork\n" + block(EXPECTED)
    content = f"BobYork\n<{TAG}>\n{EXPECTED}"
    assert turn_score(reply, TAG, EXPECTED) == sequence_ratio(normalize_lines(content), EXPECTED.lower())


def test_resolve_reward_builtins():
    assert resolve_reward("exact_match") is exact_match
    assert resolve_reward("sequence_ratio") is sequence_ratio


def test_resolve_reward_import_paths():
    assert resolve_reward("mthlib.envs.rewards:exact_match") is exact_match
    assert resolve_reward("mthlib.envs.rewards.sequence_ratio") is sequence_ratio
    assert resolve_reward("difflib:get_close_matches") is difflib.get_close_matches


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("exactmatch", "unknown reward 'exactmatch'"),
        ("", "unknown reward ''"),
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("mthlib.envs.rewards:missing", "has no callable 'missing'"),
        ("mthlib.envs.rewards:BUILTIN_REWARDS", "has no callable 'BUILTIN_REWARDS'"),
    ],
)
def test_resolve_reward_errors_list_the_allowed_names(name, message):
    with pytest.raises(ValueError, match=message) as info:
        resolve_reward(name)
    assert "exact_match" in str(info.value) and "sequence_ratio" in str(info.value)
