"""Evaluation logs exactly the metrics the environment declares, whatever the environment."""

import lightning.pytorch as pl
import pytest

from mthlib.data import PromptDataModule
from mthlib.envs import AlphabetSort, JsonlEnv
from mthlib.envs.base import Episode
from mthlib.grpo import GRPOModule
from tests.conftest import save_tiny_chat_lm
from tests.grpo.toy import LetterA


class Lengths(LetterA):
    """A user environment with metrics of its own."""

    metrics = ("reward", "length", "vowels")

    def score(self, episode: Episode, replies: list[str]) -> dict[str, float]:
        reply = replies[0] if replies else ""
        return {"reward": 1.0, "length": float(len(reply)), "vowels": float(sum(c in "aeiou" for c in reply))}


class Undeclared(LetterA):
    metrics = ("reward", "accuracy", "missing")


def validate(tmp_path, env):
    module = GRPOModule(model_name_or_path=save_tiny_chat_lm(tmp_path / "tiny", seed=3), max_completion_length=3)
    data = PromptDataModule(env=env, eval_size=3, eval_batch_size=3)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return trainer.validate(module, datamodule=data, verbose=False)[0]


def test_a_user_environment_logs_its_own_metrics(tmp_path):
    logged = validate(tmp_path, Lengths())
    assert sorted(logged) == ["val/length", "val/reward", "val/vowels"]
    assert logged["val/reward"] == 1.0 and 0 <= logged["val/vowels"] <= logged["val/length"] <= 3


def test_the_built_in_environments_declare_what_they_score(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"prompt": "p", "answer": "a"}\n')
    for env in (AlphabetSort(), JsonlEnv(path=str(jsonl))):
        episode = env.episode(0, 0)
        assert set(env.score(episode, ["x"])) == set(env.metrics) and env.metrics[0] == "reward"


def test_a_declared_metric_the_score_lacks_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"returned \['accuracy', 'reward'\], without the declared metrics \['missing'\]"):
        validate(tmp_path, Undeclared())

