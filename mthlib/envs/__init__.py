"""Environments: seeded prompts and rewards."""

from mthlib.envs.alphabet_sort import AlphabetSort
from mthlib.envs.base import Environment, Episode
from mthlib.envs.dataset import DatasetEnv
from mthlib.envs.jsonl import JsonlEnv

__all__ = ["AlphabetSort", "DatasetEnv", "Environment", "Episode", "JsonlEnv"]
