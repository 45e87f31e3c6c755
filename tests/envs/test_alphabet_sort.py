"""AlphabetSort: episodes, prompts and the reward of the original environment, rule by rule."""

import difflib
import random
import re

import pytest

from mthlib.envs import AlphabetSort, Episode
from mthlib.envs.alphabet_sort import NAMES_FILE, input_order, load_names, sort_names, split_name

T1, T2 = "alphabetical_sorted", "combined_alphabetical_sorted"
PROMPT_1 = re.compile(
    r"Sort these names in alphabetical order by (FIRST|LAST) name: (\S+(?:, \S+)*)\n\n"
    r"Use exactly this format:\n<alphabetical_sorted>\n((?:Name\d+\n)+)</alphabetical_sorted>"
)
PROMPT_LATER = (
    r"Now sort ALL of these names alphabetically by (FIRST|LAST) name: (\S+(?:, \S+)*)\n\n"
    r"These are in addition to the prior list\. Mark any NEW names \(that weren't in the prior list\) "
    r"with `// new name!` at the end\."
)
PROMPT_2 = re.compile(
    PROMPT_LATER + r"\n\nUse exactly this format:\n<combined_alphabetical_sorted>\n"
    r"((?:Name\d+(?: // new name!)?\n)+)</combined_alphabetical_sorted>"
)
PROMPT_3 = re.compile(PROMPT_LATER + r" Follow the same format as before\.")


def block(lines, tag):
    return "\n".join([f"<{tag}>", *lines, f"</{tag}>"])


def names_file(tmp_path, names):
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return str(path)


def two_turn_episode():
    return Episode(
        user_turns=("turn 1", "turn 2"),
        answer=(("AnnZed", "BobYork"), ("AnnZed", "BobYork", "CarlXu // new name!")),
    )


def spec_reward(answer, replies, power, power_per_turn):
    """The reward as the spec states it, written independently of the module under test."""
    turn_scores = []
    for turn, expected in enumerate(answer):
        if turn >= len(replies):
            turn_scores.append(0.0)
            continue
        tag = T2 if turn else T1
        target = "\n".join(line.strip().lower() for line in expected)
        attempts = []
        for content in re.findall(f"<{tag}>(.*?)</{tag}>", replies[turn], re.DOTALL):
            lines = [line.strip().lower() for line in content.split("\n") if line.strip()]
            ratio = difflib.SequenceMatcher(None, "\n".join(lines), target).ratio() if lines else 0.0
            attempts.append(ratio**power if power_per_turn else ratio)
        ok = attempts and all(b > a for a, b in zip(attempts, attempts[1:]))
        turn_scores.append(attempts[-1] if ok else 0.0)
    mean = sum(turn_scores) / len(answer)
    return mean if power_per_turn else mean**power


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("VladimirDrinfeld", ("Vladimir", "Drinfeld")),
        ("Jean-PierreSerre", ("Jean-", "PierreSerre")),
        ("J.R.R.Tolkien", ("J.", "R.R.Tolkien")),
        ("LudwigvanBeethoven", ("Ludwigvan", "Beethoven")),
        ("CarlFriedrichGauss", ("Carl", "FriedrichGauss")),
        ("ÉvaTardos", ("Éva", "Tardos")),
        ("danahboyd", ("danahboyd", "")),
        ("JOHNSMITH", ("J", "OHNSMITH")),
        ("X", ("X", "")),
    ],
)
def test_split_name(name, parts):
    assert split_name(name) == parts


def test_sort_first_vs_last_is_case_sensitive_code_point_order():
    names = ["ZoeAdams", "adaBrown", "BobCole", "ÉmileBorel", "AliceZhu"]
    assert sort_names(names, "FIRST") == ["AliceZhu", "BobCole", "ZoeAdams", "adaBrown", "ÉmileBorel"]
    assert sort_names(names, "LAST") == ["ZoeAdams", "ÉmileBorel", "adaBrown", "BobCole", "AliceZhu"]


def test_sort_ties_keep_the_given_order():
    names = ["JohnTate", "AnnaNash", "JohnMilnor", "JohnNash"]
    assert sort_names(names, "FIRST") == ["AnnaNash", "JohnTate", "JohnMilnor", "JohnNash"]
    assert sort_names(names, "LAST") == ["JohnMilnor", "AnnaNash", "JohnNash", "JohnTate"]


def test_episode_answers_follow_draw_order_on_ties(tmp_path):
    """With equal first names the answer keeps the draw order, not the shuffled prompt order."""
    path = names_file(tmp_path, ["JohnNash", "JohnMilnor", "JohnTate", "JohnConway", "JohnThompson"])
    env = AlphabetSort(min_turns=1, max_turns=1, min_names_per_turn=5, max_names_per_turn=5, names_file=path)
    prompt_differs = False
    for index in range(20):
        episode = env.episode(0, index)
        drawn = episode.info["turn_names"][0]
        if episode.info["sort_by"] == "FIRST":
            assert list(episode.answer[0]) == drawn
            shown = PROMPT_1.fullmatch(episode.user_turns[0]).group(2).split(", ")
            prompt_differs |= shown != drawn
        else:
            assert list(episode.answer[0]) == sorted(drawn, key=lambda n: n[4:])
    assert prompt_differs


def test_hand_made_names_sorted_by_first_and_last(tmp_path):
    path = names_file(tmp_path, ["AnnaZorn", "BenYoung", "CaraXu"])
    env = AlphabetSort(min_turns=1, max_turns=1, min_names_per_turn=3, max_names_per_turn=3, names_file=path)
    seen = {}
    for index in range(30):
        episode = env.episode(1, index)
        seen[episode.info["sort_by"]] = episode.answer
    assert seen == {"FIRST": (("AnnaZorn", "BenYoung", "CaraXu"),), "LAST": (("CaraXu", "BenYoung", "AnnaZorn"),)}


def test_new_name_marks_exactly_the_names_new_in_each_turn():
    env = AlphabetSort(min_turns=3, max_turns=3)
    for episode in env.episodes(seed=5, count=25):
        turn_names = episode.info["turn_names"]
        so_far = []
        for turn, (new, answer) in enumerate(zip(turn_names, episode.answer)):
            so_far += new
            marked = [line.removesuffix(" // new name!") for line in answer if line.endswith(" // new name!")]
            plain = [line.removesuffix(" // new name!") for line in answer]
            assert plain == sort_names(so_far, episode.info["sort_by"])
            assert sorted(marked) == (sorted(new) if turn else [])
            assert all(line.count("//") <= 1 for line in answer)


def test_prompts_match_the_spec_format():
    env = AlphabetSort(min_turns=1, max_turns=4, min_names_per_turn=1, max_names_per_turn=5)
    counts = set()
    for episode in env.episodes(seed=3, count=60):
        turn_names, by = episode.info["turn_names"], episode.info["sort_by"]
        assert episode.system_prompt is None
        assert len(episode.user_turns) == len(turn_names) == len(episode.answer)
        first = PROMPT_1.fullmatch(episode.user_turns[0])
        assert first and first.group(1) == by
        assert sorted(first.group(2).split(", ")) == sorted(turn_names[0])
        placeholders = first.group(3).splitlines()
        assert placeholders == [f"Name{i}" for i in range(1, len(placeholders) + 1)]
        assert 1 <= len(placeholders) <= 5
        counts.add(len(placeholders))
        if len(turn_names) > 1:
            second = PROMPT_2.fullmatch(episode.user_turns[1])
            assert second and second.group(1) == by
            assert sorted(second.group(2).split(", ")) == sorted(turn_names[1])
            lines = second.group(3).splitlines()
            assert 1 <= len(lines) <= len(turn_names[0]) + len(turn_names[1])
            marks = [line.endswith(" // new name!") for line in lines]
            assert marks[-1] and marks == sorted(marks)  # unmarked lines first, then at least one marked
        for turn in range(2, len(turn_names)):
            later = PROMPT_3.fullmatch(episode.user_turns[turn])
            assert later and later.group(1) == by
            assert sorted(later.group(2).split(", ")) == sorted(turn_names[turn])
    assert len(counts) > 1  # the template size is random


def test_same_seed_same_episodes_different_seed_differs():
    env = AlphabetSort()
    first = [e.user_turns for e in env.episodes(seed=7, count=10)]
    assert first == [e.user_turns for e in AlphabetSort().episodes(seed=7, count=10)]
    assert env.episode(7, 3) == env.episodes(seed=7, count=2, start=3)[0]
    assert first != [e.user_turns for e in env.episodes(seed=8, count=10)]


def test_reference_replies_score_one_and_every_metric_is_perfect():
    env = AlphabetSort()
    for episode in env.episodes(seed=11, count=30):
        replies = env.reference(episode)
        assert len(replies) == episode.num_turns
        assert replies[0].startswith(f"<{T1}>\n") and all(r.startswith(f"<{T2}>\n") for r in replies[1:])
        score = env.score(episode, replies)
        assert {key: score.pop(key) for key in ("reward", "format", "similarity", "accuracy", "order", "one_per_line")} \
            == {"reward": 1.0, "format": 1.0, "similarity": 1.0, "accuracy": 1.0, "order": 1.0, "one_per_line": 1.0}
        already_sorted = [input_order(episode, t) == [n.removesuffix(" // new name!") for n in episode.answer[t]]
                          for t in range(episode.num_turns)]
        assert score == {"copy": sum(already_sorted) / episode.num_turns}  # a sorted answer "copies" a sorted input


def test_score_partial_answers_per_turn_and_power_modes():
    episode = two_turn_episode()
    reply1 = block(["BobYork", "AnnZed"], T1)
    reply2 = block(["AnnZed", "BobYork", "CarlXu"], T2)  # forgot the marker
    r1 = difflib.SequenceMatcher(None, "bobyork\nannzed", "annzed\nbobyork").ratio()
    r2 = difflib.SequenceMatcher(None, "annzed\nbobyork\ncarlxu", "annzed\nbobyork\ncarlxu // new name!").ratio()
    per_turn = AlphabetSort(power_per_turn=True).score(episode, [reply1, reply2])
    overall = AlphabetSort(power_per_turn=False).score(episode, [reply1, reply2])
    assert per_turn["reward"] == pytest.approx((r1**4 + r2**4) / 2)
    assert overall["reward"] == pytest.approx(((r1 + r2) / 2) ** 4)
    assert per_turn["reward"] != pytest.approx(overall["reward"])
    for metrics in (per_turn, overall):
        assert metrics["similarity"] == pytest.approx((r1 + r2) / 2)
        assert metrics["format"] == 1.0 and metrics["accuracy"] == 0.0


def test_missing_turns_count_as_zero_in_the_mean():
    episode = two_turn_episode()
    perfect = AlphabetSort().reference(episode)
    assert AlphabetSort().score(episode, perfect[:1]) == {"reward": 0.5, "format": 0.5, "similarity": 1.0,
                                                          "accuracy": 0.0, "order": 0.5, "copy": 0.0,
                                                          "one_per_line": 0.5}
    assert AlphabetSort(power_per_turn=False, power=2.0).score(episode, perfect[:1])["reward"] == 0.25
    assert AlphabetSort().score(episode, []) == dict.fromkeys(AlphabetSort.metrics, 0.0)
    assert AlphabetSort().score(episode, perfect + ["extra reply"])["reward"] == 1.0


def test_turn_tags_are_per_turn():
    episode = two_turn_episode()
    swapped = [block(episode.answer[0], T2), block(episode.answer[1], T1)]
    assert AlphabetSort().score(episode, swapped) == dict.fromkeys(AlphabetSort.metrics, 0.0)


def test_repeated_or_worsening_attempts_zero_the_turn_but_count_for_format():
    episode = two_turn_episode()
    good1, good2 = AlphabetSort().reference(episode)
    metrics = AlphabetSort().score(episode, [good1 + good1, good2])
    assert metrics == {"reward": 0.5, "format": 1.0, "similarity": 0.5, "accuracy": 0.0, "order": 1.0, "copy": 0.0,
                       "one_per_line": 1.0}
    worse = good2 + block(["AnnZed"], T2)
    assert AlphabetSort().score(episode, [good1, worse])["reward"] == 0.5
    better = block(["AnnZed"], T2) + "\nOops, again:\n" + good2
    assert AlphabetSort().score(episode, [good1, better])["accuracy"] == 1.0


def test_unclosed_and_wrong_case_tags_score_zero():
    episode = two_turn_episode()
    good1, good2 = AlphabetSort().reference(episode)
    unclosed = good1.removesuffix(f"</{T1}>")
    wrong_case = good1.replace(T1, T1.upper())
    for bad in (unclosed, wrong_case):
        assert AlphabetSort().score(episode, [bad, good2]) == {"reward": 0.5, "format": 0.5, "similarity": 1.0,
                                                              "accuracy": 0.0, "order": 0.5, "copy": 0.0,
                                                              "one_per_line": 0.5}


def test_long_answer_reward_uses_autojunk():
    names = [f"Person{chr(65 + i)}{'abcdefghij'[i % 10]}Surname" for i in range(15)]
    episode = Episode(user_turns=("sort",), answer=(tuple(names),))
    pred = names[:6] + [names[7], names[6]] + names[8:]
    expected, answer = "\n".join(names).lower(), "\n".join(pred).lower()
    assert len(expected) >= 200
    junk = difflib.SequenceMatcher(None, answer, expected).ratio()
    no_junk = difflib.SequenceMatcher(None, answer, expected, autojunk=False).ratio()
    assert junk < no_junk
    reward = AlphabetSort(power_per_turn=False, power=1.0).score(episode, [block(pred, T1)])["reward"]
    assert reward == junk


def test_scores_agree_with_an_independent_reading_of_the_spec():
    rng = random.Random(0)
    env = AlphabetSort(min_turns=1, max_turns=3)
    for power_per_turn in (True, False):
        scorer = AlphabetSort(power_per_turn=power_per_turn, power=3.0)
        for episode in env.episodes(seed=21, count=40):
            replies = []
            for turn, answer in enumerate(episode.answer):
                tag = T2 if turn else T1
                attempts = []
                for _ in range(rng.choice([0, 1, 1, 2, 3])):
                    lines = list(answer)
                    if rng.random() < 0.5:
                        rng.shuffle(lines)
                    lines = lines[: rng.randint(0, len(lines))]
                    attempts.append(block(lines, tag if rng.random() < 0.9 else tag.upper()))
                replies.append(" ok ".join(attempts))
            replies = replies[: rng.randint(0, len(replies))]
            expected = spec_reward(episode.answer, replies, 3.0, power_per_turn)
            assert scorer.score(episode, replies)["reward"] == pytest.approx(expected, abs=1e-15)


def test_names_file_is_cleaned_and_validated(tmp_path):
    path = names_file(tmp_path, ["Vladimir Drinfeld", "VladimirDrinfeld", "", "  ", "Emmy Noether", "AdaLovelace"])
    assert load_names(path) == ["VladimirDrinfeld", "EmmyNoether", "AdaLovelace"]
    with pytest.raises(ValueError, match="3 distinct names"):
        AlphabetSort(names_file=path)
    env = AlphabetSort(min_turns=1, max_turns=1, min_names_per_turn=3, max_names_per_turn=3, names_file=path)
    assert sorted(env.episode(0, 0).info["turn_names"][0]) == ["AdaLovelace", "EmmyNoether", "VladimirDrinfeld"]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        AlphabetSort(names_file=str(tmp_path / "nope.txt"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_turns": 0}, "min_turns"),
        ({"min_turns": 3, "max_turns": 2}, "min_turns <= max_turns"),
        ({"min_names_per_turn": 0}, "min_names_per_turn"),
        ({"min_names_per_turn": 4, "max_names_per_turn": 3}, "min_names_per_turn <= max_names_per_turn"),
        ({"power": 0.0}, "power must be > 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlphabetSort(**kwargs)


def test_shipped_name_list():
    names = NAMES_FILE.read_text(encoding="utf-8").splitlines()
    assert len(names) >= 300
    assert load_names(NAMES_FILE) == names  # already clean: no spaces, blanks or repeats
    for tricky in ("Jean-PierreSerre", "J.R.R.Tolkien", "LudwigvanBeethoven", "JohnvonNeumann", "danahboyd"):
        assert tricky in names


def test_format_bonus_adds_to_the_reward_per_tagged_turn_and_defaults_to_the_original():
    plain = AlphabetSort(min_turns=2, max_turns=2, power=1.0)
    bonus = AlphabetSort(min_turns=2, max_turns=2, power=1.0, format_bonus=0.2)
    episode = plain.episode(0, 0)
    replies = [plain.reference(episode)[0], "no tags at all"]
    base = plain.score(episode, replies)
    assert base["reward"] == 0.5 and base["format"] == 0.5
    assert bonus.score(episode, replies)["reward"] == 0.5 + 0.2 * 0.5


def test_layout_free_metrics_tell_sorting_from_copying():
    episode = Episode(
        user_turns=("Sort these names in alphabetical order by FIRST name: CarlXu, AnnZed, BobYork\n\nUse ...",
                    "Now sort ALL of these names alphabetically by FIRST name: EveVo, DanWu\n\nThese are ..."),
        answer=(("AnnZed", "BobYork", "CarlXu"),
                ("AnnZed", "BobYork", "CarlXu", "DanWu // new name!", "EveVo // new name!")),
    )
    env = AlphabetSort()

    def metrics(first: str, second: str) -> tuple[float, float, float]:
        score = env.score(episode, [f"<{T1}>{first}</{T1}>", f"<{T2}>{second}</{T2}>"])
        return score["order"], score["copy"], score["one_per_line"]

    sorted_lines = env.reference(episode)
    assert env.score(episode, sorted_lines)["order"] == env.score(episode, sorted_lines)["one_per_line"] == 1.0
    assert env.score(episode, sorted_lines)["copy"] == 0.0
    # the quickstart's failure: the input copied into the tags on one line
    assert metrics("CarlXu, AnnZed, BobYork", "AnnZed BobYork CarlXu EveVo DanWu") == (0.0, 1.0, 0.0)
    # sorted on one line, spaces inside names and lower case: right order, wrong layout
    assert metrics("ann zed, bob york, carl xu", "annzed, bobyork, carlxu, danwu // new name!, evevo") == (1.0, 0.0, 0.0)
    # one name per line, in the input's order, new marks kept: layout right, order copied
    assert metrics("\nCarlXu\nAnnZed\nBobYork\n", "\nAnnZed\nBobYork\nCarlXu\nEveVo // new name!\nDanWu\n") == (0.0, 1.0, 1.0)
    # a missing name, or an extra line, fails every check of its turn
    assert metrics("AnnZed\nBobYork", "AnnZed\nBobYork\nCarlXu\nDanWu\nEveVo\nZoe") == (0.5, 0.0, 0.0)


def test_layout_free_metrics_on_sampled_episodes_follow_the_prompts():
    env = AlphabetSort(min_turns=1, max_turns=3, min_names_per_turn=2, max_names_per_turn=4)
    copied_total = 0
    for episode in env.episodes(seed=3, count=40):
        perfect = env.reference(episode)
        assert env.score(episode, perfect)["order"] == 1.0 and env.score(episode, perfect)["one_per_line"] == 1.0
        first = PROMPT_1.match(episode.user_turns[0]).group(2).split(", ")
        copied = env.score(episode, [block(first, T1)])
        assert copied["copy"] == 1 / episode.num_turns  # turn 1 copies its prompt; the others are missing
        assert copied["order"] == (first == list(episode.answer[0])) / episode.num_turns
        copied_total += copied["order"] == 0
    assert copied_total > 20  # most prompts are not already sorted
