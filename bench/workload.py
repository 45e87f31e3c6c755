"""The quickstart's workload for the benchmarks, read from ``configs/quickstart.yaml`` so the two never drift apart.

The scripts in ``bench/`` run from the repository (``python bench/<script>.py``), so they
import this module by its file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mthlib.envs import AlphabetSort

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def quickstart_config() -> dict[str, Any]:
    """``configs/quickstart.yaml`` as plain data."""
    return yaml.safe_load(QUICKSTART.read_text())


def quickstart_env() -> AlphabetSort:
    """The quickstart's environment (its prompts: one turn of 2-3 names)."""
    return AlphabetSort(**quickstart_config()["data"]["env"]["init_args"])
