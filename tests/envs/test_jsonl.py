"""JsonlEnv: reading a user's prompts and answers, sampling, named and imported rewards, errors."""

import difflib
import json

import pytest

from mthlib.envs import JsonlEnv

ROWS = [
    {"prompt": "Capital of France?", "answer": "Paris"},
    {"prompt": "2 + 2 = ?", "answer": "4"},
    {"prompt": "Spell 'cat' backwards.", "answer": "tac"},
]


def shouting_reward(reply: str, answer: str) -> float:
    """A user reward for the import-path test: 2.0 when the reply is the answer in capitals."""
    return 2.0 if reply == answer.upper() else -1.0


def write_jsonl(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_sample_is_single_turn_uniform_and_seeded(tmp_path):
    env = JsonlEnv(path=write_jsonl(tmp_path, ROWS), system_prompt="Answer briefly.")
    episodes = env.episodes(seed=0, count=300)
    counts = {row["prompt"]: 0 for row in ROWS}
    for episode in episodes:
        assert episode.num_turns == 1 and episode.system_prompt == "Answer briefly."
        row = ROWS[episode.info["row"]]
        assert (episode.user_turns[0], episode.answer) == (row["prompt"], row["answer"])
        counts[episode.user_turns[0]] += 1
    assert all(70 < count < 130 for count in counts.values())
    assert episodes[:20] == env.episodes(seed=0, count=20)
    assert episodes[:20] != env.episodes(seed=1, count=20)
    assert episodes[0].messages() == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": episodes[0].user_turns[0]},
    ]


def test_exact_match_reward_accuracy_and_reference(tmp_path):
    env = JsonlEnv(path=write_jsonl(tmp_path, ROWS))
    episode = env.episode(0, 0)
    assert episode.system_prompt is None
    assert env.reference(episode) == [episode.answer]
    assert env.score(episode, env.reference(episode)) == {"reward": 1.0, "accuracy": 1.0}
    assert env.score(episode, [f"  {episode.answer}\n"]) == {"reward": 1.0, "accuracy": 1.0}
    assert env.score(episode, [episode.answer + "!"]) == {"reward": 0.0, "accuracy": 0.0}
    assert env.score(episode, []) == {"reward": 0.0, "accuracy": 0.0}


def test_sequence_ratio_reward(tmp_path):
    env = JsonlEnv(path=write_jsonl(tmp_path, [{"prompt": "Name a city.", "answer": "Paris"}]), reward="sequence_ratio")
    episode = env.episode(0, 0)
    metrics = env.score(episode, ["Pari"])
    assert metrics["reward"] == pytest.approx(8 / 9)  # 4 matching characters out of 4 + 5
    assert metrics["reward"] == difflib.SequenceMatcher(None, "Pari", "Paris").ratio()
    assert metrics["accuracy"] == 0.0


def test_reward_by_import_path_to_a_user_function(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "Shout 'go'.", "answer": "go"}])
    for name in (f"{__name__}:shouting_reward", f"{__name__}.shouting_reward"):
        env = JsonlEnv(path=path, reward=name)
        episode = env.episode(0, 0)
        assert env.score(episode, ["GO"]) == {"reward": 2.0, "accuracy": 0.0}
        assert env.score(episode, ["go"]) == {"reward": -1.0, "accuracy": 1.0}


def test_custom_keys_and_blank_lines(tmp_path):
    lines = [{"question": "Q1", "target": "A1", "extra": 1}, "", "   ", {"question": "Q2", "target": "A2"}]
    env = JsonlEnv(path=write_jsonl(tmp_path, lines), prompt_key="question", answer_key="target")
    assert {e.user_turns[0] for e in env.episodes(seed=0, count=40)} == {"Q1", "Q2"}
    assert env.rows == [("Q1", "A1"), ("Q2", "A2")]


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        JsonlEnv(path=str(missing))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([ROWS[0], "{not json"], r"data.jsonl:2: invalid JSON"),
        ([ROWS[0], ROWS[1], {"prompt": "no answer"}], r"data.jsonl:3: missing key 'answer' \(keys found: \['prompt'\]"),
        ([{"answer": "x"}], r"data.jsonl:1: missing key 'prompt'"),
        ([ROWS[0], '["a", "list"]'], r"data.jsonl:2: expected a JSON object"),
        ([{"prompt": "Q", "answer": 4}], r"data.jsonl:1: 'answer' must be a string, got int"),
        (["", "  "], r"data.jsonl: no records"),
    ],
)
def test_bad_lines_are_reported_with_their_number(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        JsonlEnv(path=write_jsonl(tmp_path, lines))


def test_unknown_reward_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="unknown reward 'f1'.*exact_match.*sequence_ratio"):
        JsonlEnv(path=write_jsonl(tmp_path, ROWS), reward="f1")
