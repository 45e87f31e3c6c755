"""DatasetEnv: prompts from a datasets dataset, TRL-style rewards called as TRL calls them, held-out evaluation."""

import csv
import importlib
import json
import math
import sys

import pytest

from mthlib.cli import main
from mthlib.data import PromptDataModule
from mthlib.envs import DatasetEnv
from mthlib.envs.base import Episode
from tests.conftest import save_tiny_chat_lm

ROWS = [
    {"prompt": "Capital of France?", "answer": "Paris", "points": 2},
    {"prompt": "2 + 2 = ?", "answer": "4", "points": 1},
    {"prompt": "Spell 'cat' backwards.", "answer": "tac", "points": 3},
]
HERE = __name__


def correctness(prompts, completions, answer, **kwargs):
    """A TRL reward: 1.0 when the completion (or its assistant message) is the answer column's value."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(text.strip() == expected) for text, expected in zip(texts, answer)]


def points_if_short(completions, points, **kwargs):
    """A TRL reward reading an integer column: the row's points for a reply of at most 5 characters, else None."""
    return [p if len(c) <= 5 else None for c, p in zip(completions, points)]


def reward(completions, **kwargs):
    """A TRL reward whose name is taken by the total."""
    return [0.5]


def two_values(completions, **kwargs):
    return [1.0, 2.0]


def a_float(completions, **kwargs):
    return 1.0


def not_finite(completions, **kwargs):
    return [math.nan]


def infinite(completions, **kwargs):
    return [math.inf]


def a_string(completions, **kwargs):
    return ["1.0"]


NOT_CALLABLE = 3


def write_jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def make_env(tmp_path, rows=ROWS, file="data.jsonl", **kwargs):
    """A DatasetEnv over ``rows`` written to ``file`` as a local JSON Lines train split (never the network)."""
    kwargs.setdefault("rewards", [f"{HERE}:correctness"])
    kwargs.setdefault("data_files", {"train": write_jsonl(tmp_path, rows, file)})
    return DatasetEnv(path="json", cache_dir=str(tmp_path / "hf_cache"), **kwargs)


def test_standard_prompts_are_single_turn_uniform_and_seeded(tmp_path):
    env = make_env(tmp_path, system_prompt="Answer briefly.")
    episodes = env.episodes(seed=0, count=300)
    counts = {row["prompt"]: 0 for row in ROWS}
    for episode in episodes:
        row = ROWS[episode.info["row"]]
        assert episode.info["split"] == "train" and episode.answer == row
        assert episode.messages() == [{"role": "system", "content": "Answer briefly."},
                                      {"role": "user", "content": row["prompt"]}]
        counts[row["prompt"]] += 1
    assert all(70 < count < 130 for count in counts.values())
    assert episodes[:20] == env.episodes(seed=0, count=20) and episodes[:20] != env.episodes(seed=1, count=20)
    assert env.reference(episodes[0]) is None


def test_rewards_get_prompts_completions_and_every_other_column_as_trl_passes_them(tmp_path, monkeypatch):
    (tmp_path / "recording_rewards.py").write_text(
        "CALLS = []\n\ndef record(**kwargs):\n    CALLS.append(kwargs)\n    return [0.25]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "recording_rewards", raising=False)
    rows = [{**ROWS[0], "completion": "gold", "completion_ids": [1]}]  # TRL hands neither column to a reward
    env = make_env(tmp_path, rows=rows, rewards=["recording_rewards:record"])
    episode = env.episode(0, 0)
    assert env.score(episode, ["Lyon"]) == {"reward": 0.25, "record": 0.25}
    assert importlib.import_module("recording_rewards").CALLS == [{
        "prompts": ["Capital of France?"], "completions": ["Lyon"], "completion_ids": None, "trainer_state": None,
        "answer": ["Paris"], "points": [2],
    }]


def test_reward_is_the_weighted_sum_and_none_counts_zero(tmp_path):
    env = make_env(tmp_path, rows=ROWS[:1], rewards=[f"{HERE}:correctness", f"{HERE}:points_if_short"],
                   reward_weights=[2.0, 0.5])
    assert env.metrics == ("reward", "correctness", "points_if_short")
    episode = env.episode(0, 0)
    assert env.score(episode, ["Paris"]) == {"reward": 3.0, "correctness": 1.0, "points_if_short": 2.0}
    assert env.score(episode, ["Lyon"]) == {"reward": 1.0, "correctness": 0.0, "points_if_short": 2.0}
    assert env.score(episode, ["Marseille"]) == {"reward": 0.0, "correctness": 0.0, "points_if_short": 0.0}
    assert env.score(episode, []) == {"reward": 0.0, "correctness": 0.0, "points_if_short": 0.0}


def test_default_weights_are_one_and_repeated_names_are_numbered(tmp_path):
    env = make_env(tmp_path, rows=ROWS[:1], rewards=[f"{HERE}:correctness", f"{HERE}:reward", f"{HERE}:correctness"])
    assert env.metrics == ("reward", "correctness", "reward_2", "correctness_2")
    assert env.score(env.episode(0, 0), ["Paris"]) == {"reward": 2.5, "correctness": 1.0, "reward_2": 0.5,
                                                      "correctness_2": 1.0}


CONVERSATION = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "1 + 1?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "2 + 2?"},
]


def test_conversational_prompts_become_exactly_the_datasets_messages(tmp_path, monkeypatch):
    rows = [{"prompt": CONVERSATION, "answer": "4"}, {"prompt": CONVERSATION[1:], "answer": "4"}]
    env = make_env(tmp_path, rows=rows, system_prompt="Be brief.")
    by_row = {episode.info["row"]: episode for episode in env.episodes(seed=0, count=20)}
    with_system, without_system = by_row[0], by_row[1]
    assert with_system.messages() == CONVERSATION
    assert without_system.messages() == [{"role": "system", "content": "Be brief."}, *CONVERSATION[1:]]
    assert with_system.user_turns == ("2 + 2?",) and with_system.system_prompt == "Answer with a number."
    assert env.score(with_system, ["4"]) == {"reward": 1.0, "correctness": 1.0}
    (tmp_path / "conversation_rewards.py").write_text(
        "CALLS = []\n\ndef record(**kwargs):\n    CALLS.append(kwargs)\n    return [None]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "conversation_rewards", raising=False)
    recording = make_env(tmp_path, rows=rows[:1], file="one.jsonl", rewards=["conversation_rewards:record"])
    assert recording.score(recording.episode(0, 0), ["4"]) == {"reward": 0.0, "record": 0.0}
    assert importlib.import_module("conversation_rewards").CALLS == [{
        "prompts": [CONVERSATION], "completions": [[{"role": "assistant", "content": "4"}]],
        "completion_ids": None, "trainer_state": None, "answer": ["4"],
    }]


def test_a_messages_column_works_as_the_prompt_column(tmp_path):
    env = make_env(tmp_path, rows=[{"messages": CONVERSATION, "answer": "4"}], prompt_column="messages")
    assert env.episode(0, 0).messages() == CONVERSATION


def test_episode_history_sits_between_the_system_prompt_and_the_first_user_turn():
    plain = Episode(user_turns=("a", "b"), answer=None, system_prompt="s")
    assert plain.history == () and plain.messages(["x"]) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "x"}, {"role": "user", "content": "b"}]
    shots = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "r"})
    episode = Episode(user_turns=("a", "b"), answer=None, system_prompt="s", history=shots)
    assert episode.messages(["x"]) == [
        {"role": "system", "content": "s"}, *shots, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "x"}, {"role": "user", "content": "b"}]
    episode.messages()[1]["content"] = "changed"
    assert episode.history[0]["content"] == "q"


def test_eval_split_rows_come_in_order_and_are_what_validation_reads(tmp_path):
    held_out = [{"prompt": f"held out {i}", "answer": str(i), "points": i} for i in range(5)]
    files = {"train": write_jsonl(tmp_path, ROWS), "test": write_jsonl(tmp_path, held_out, "test.jsonl")}
    env = make_env(tmp_path, data_files=files, eval_split="test")
    assert [e.user_turns[0] for e in env.evaluation_episodes(seed=7, count=3)] == ["held out 0", "held out 1",
                                                                                  "held out 2"]
    assert [e.info["row"] for e in env.evaluation_episodes(seed=7, count=50)] == [0, 1, 2, 3, 4]
    assert {e.info["split"] for e in env.episodes(seed=0, count=30)} == {"train"}
    loader = PromptDataModule(env=env, eval_size=4, eval_batch_size=3).val_dataloader()
    assert [[e.user_turns[0] for e in batch] for batch in loader] == [["held out 0", "held out 1", "held out 2"],
                                                                      ["held out 3"]]


def test_without_eval_split_evaluation_draws_from_the_training_split_with_the_eval_seed(tmp_path):
    env = make_env(tmp_path)
    assert env.evaluation_episodes(seed=2001, count=6) == env.episodes(seed=2001, count=6)
    loader = PromptDataModule(env=env, eval_size=6, eval_batch_size=6).val_dataloader()
    assert next(iter(loader)) == env.episodes(seed=2001, count=6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_column": "question"},
         r"^json split 'train': no prompt column 'question'; columns: \['prompt', 'answer', 'points'\]$"),
        ({"split": "training"}, r"^json: no split 'training'; splits: \['train'\]$"),
        ({"eval_split": "validation"}, r"^json: no split 'validation'; splits: \['train'\]$"),
        ({"reward_weights": [1.0, 2.0]}, r"^reward_weights has 2 values for 1 rewards; expected one weight per reward"),
        ({"rewards": []}, r"^rewards is empty; expected one or more import paths 'package.module:function'"),
        ({"rewards": ["exact_match"]}, r"^unknown reward 'exact_match': expected an import path"),
        ({"rewards": ["no_such_module_xyz:fn"]}, r"^reward 'no_such_module_xyz:fn': cannot import module"),
        ({"rewards": [f"{HERE}:missing"]}, rf"^reward '{HERE}:missing': module '{HERE}' has no callable 'missing'"),
        ({"rewards": [f"{HERE}:NOT_CALLABLE"]}, r"has no callable 'NOT_CALLABLE'; expected an import path"),
    ],
)
def test_bad_arguments_fail_at_construction_in_one_line(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        make_env(tmp_path, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("two_values", r"returned \[1.0, 2.0\]; expected a list of one value per completion \(1 here\)"),
        ("a_float", r"returned 1.0; expected a list of one value per completion \(1 here\)"),
        ("not_finite", r"returned nan; expected a finite number or None"),
        ("infinite", r"returned inf; expected a finite number or None"),
        ("a_string", r"returned '1.0'; expected a finite number or None"),
    ],
)
def test_a_bad_reward_value_names_the_function(tmp_path, name, message):
    env = make_env(tmp_path, rewards=[f"{HERE}:correctness", f"{HERE}:{name}"])
    with pytest.raises(ValueError, match=rf"^reward '{HERE}:{name}' {message}$"):
        env.score(env.episode(0, 0), ["x"])


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (CONVERSATION[:3], r"row 0: the last message must be the user's, got 'assistant'"),
        ([CONVERSATION[1], CONVERSATION[0], CONVERSATION[1]],
         r"row 0: a system message may only come first, found one at position 1"),
        ([{"role": "tool", "content": "x"}],
         r"row 0: message 0 must be \{'role': one of \['system', 'user', 'assistant'\]"),
        ([], r"row 0: the prompt must be a string or a non-empty list of messages, got \[\]"),
    ],
)
def test_a_malformed_conversational_prompt_is_reported_with_its_row(tmp_path, prompt, message):
    with pytest.raises(ValueError, match=rf"^json split 'train' {message}"):
        make_env(tmp_path, rows=[{"prompt": prompt, "answer": "4"}])


def test_a_malformed_later_row_is_reported_when_it_is_drawn(tmp_path):
    rows = [{"prompt": CONVERSATION, "answer": "4"}, {"prompt": CONVERSATION[:3], "answer": "2"}]
    env = make_env(tmp_path, rows=rows)
    with pytest.raises(ValueError, match=r"^json split 'train' row 1: the last message must be the user's"):
        env.episodes(seed=0, count=20)


def test_without_the_datasets_package_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"^DatasetEnv needs the 'datasets' package: pip install datasets$"):
        make_env(tmp_path)


FIT = """
trainer:
  max_steps: 2
  val_check_interval: 2
  limit_val_batches: 1
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {runs}, name: tiny}}
checkpoint:
  every_n_train_steps: 2
model:
  model_name_or_path: {model}
  num_generations: 2
  max_completion_length: 4
data:
  env:
    class_path: mthlib.envs.DatasetEnv
    init_args:
      path: json
      data_files: {{train: {train}, test: {test}}}
      eval_split: test
      rewards: ["{here}:correctness", "{here}:points_if_short"]
      reward_weights: [1.0, 0.5]
      cache_dir: {cache}
  batch_size: 1
  eval_size: 2
"""


def test_fit_trains_on_the_dataset_and_validates_on_its_eval_split(tmp_path):
    held_out = [{"prompt": "Say hi.", "answer": "hi", "points": 1}, {"prompt": "Say yo.", "answer": "yo", "points": 3},
                {"prompt": "Say no.", "answer": "no", "points": 100}]
    config = tmp_path / "dataset.yaml"
    config.write_text(FIT.format(runs=tmp_path / "runs", model=save_tiny_chat_lm(tmp_path / "tiny", seed=3),
                                 train=write_jsonl(tmp_path, [{**row, "points": 10 * row["points"]} for row in ROWS]),
                                 test=write_jsonl(tmp_path, held_out, "test.jsonl"),
                                 here=HERE, cache=tmp_path / "hf_cache"))
    main(["fit", "--config", str(config)])
    rows = list(csv.DictReader((tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv").open()))
    assert len([r for r in rows if r["reward"]]) == 2
    assert {"rewards/correctness", "rewards/points_if_short"} <= set(rows[0])
    val = next(r for r in rows if r["val/reward"])
    scores = {key: float(val[f"val/{key}"]) for key in ("reward", "correctness", "points_if_short")}
    assert all(math.isfinite(value) for value in scores.values())
    assert scores["points_if_short"] == 2.0  # held-out rows 0 and 1 (points 1, 3); replies have at most 4 characters
    assert scores["reward"] == pytest.approx(scores["correctness"] + 0.5 * 2.0)
