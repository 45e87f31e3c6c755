"""Consecutive checkpoints: changes per transition and the never / cancelled / net split, by hand."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mthlib.analysis.consecutive import consecutive_changes
from mthlib.analysis.sources import SafetensorsWeights
from mthlib.deltas import build_delta, write_delta


def _delta(path, indices, values, step, base_path, fingerprint):
    delta = build_delta({"w": torch.tensor(indices)}, {"w": torch.tensor(values)}, {"w": (10,)},
                        base_model=str(base_path), base_fingerprint=fingerprint, strategy=None,
                        sparsity=0.6, step=step)
    return write_delta(delta, path)


@pytest.fixture
def run_dir(tmp_path):
    """Base w = 0 (10 entries) and v = 0 (6 entries, never stored); three deltas named out of step order."""
    base = tmp_path / "base.safetensors"
    save_file({"w": torch.zeros(10), "v": torch.zeros(6)}, str(base))
    fingerprint = SafetensorsWeights([base], "base").fingerprint()
    run = tmp_path / "run"
    _delta(run / "deltas" / "b.safetensors", [0, 1, 2], [1.0, 1.0, 1.0], 10, base, fingerprint)
    _delta(run / "deltas" / "a.safetensors", [0, 1, 2, 3], [1.0, 2.0, 0.0, 1.0], 20, base, fingerprint)
    _delta(run / "last.safetensors", [0, 1, 3], [1.0, 2.0, 0.0], 30, base, fingerprint)
    return run


def test_transitions_and_split_by_hand(run_dir):
    result = consecutive_changes(run_dir, run_dir.parent / "base.safetensors")
    assert [(t.start, t.end, t.changed, t.stored) for t in result.transitions] == [
        (None, 10, 3, 3),  # entries 0, 1, 2 leave the base
        (10, 20, 3, 4),  # 1: 1 -> 2, 2: back to 0, 3: 0 -> 1
        (20, 30, 1, 4),  # 3: stored as 0; 2 is no longer stored and stays at base
    ]
    assert result.total == 16
    assert (result.never_updated, result.cancelled, result.net_updated) == (12, 2, 2)
    data = result.to_dict()
    assert data["transitions"][1]["fraction_of_model"] == 3 / 16 and data["cancelled"] == 2


def test_base_defaults_to_the_recorded_base_model(run_dir):
    assert consecutive_changes(run_dir).net_updated == 2


def test_tolerance_hides_small_moves(run_dir, tmp_path):
    base = run_dir.parent / "base.safetensors"
    fingerprint = SafetensorsWeights([base], "base").fingerprint()
    _delta(run_dir / "deltas" / "c.safetensors", [0, 1, 3], [1.0, 2.0, 1e-7], 40, base, fingerprint)
    strict = consecutive_changes(run_dir, base, tol=0.0)
    loose = consecutive_changes(run_dir, base, tol=1e-6)
    assert strict.transitions[-1].changed == 1 and loose.transitions[-1].changed == 0
    assert strict.net_updated == 3 and loose.net_updated == 2


def test_other_base_and_mixed_bases_refused(run_dir, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(10), "v": torch.zeros(6)}, str(other))
    with pytest.raises(ValueError, match="fingerprint") as err:
        consecutive_changes(run_dir, other)
    assert "\n" not in str(err.value)
    _delta(run_dir / "deltas" / "z.safetensors", [0], [1.0], 50, other, SafetensorsWeights([other], "o").fingerprint())
    with pytest.raises(ValueError, match="mixes deltas of different bases"):
        consecutive_changes(run_dir)


def test_missing_or_empty_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        consecutive_changes(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no sparse deltas"):
        consecutive_changes(tmp_path / "empty")
