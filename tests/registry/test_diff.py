"""`diff` selects exactly the entries a fine-tune changed beyond the tolerance."""

import pytest
import torch

from mthlib.masking import build_mask
from tests.conftest import make_tiny_lm


def test_diff_selects_changed_entries_from_a_saved_folder(tmp_path):
    base = make_tiny_lm(seed=0)
    tuned = make_tiny_lm(seed=0)
    name = "model.layers.1.mlp.up_proj.weight"
    with torch.no_grad():
        flat = dict(tuned.named_parameters())[name].view(-1)
        flat[[3, 10, 40]] += torch.tensor([1e-3, 1e-6, -0.5])  # 1e-6 is below the tolerance
    tuned.save_pretrained(tmp_path / "tuned")
    masks = build_mask("diff", finetuned=str(tmp_path / "tuned"), tolerance=1e-5).compute(base, None)
    assert masks[name].tolist() == [3, 40]
    assert masks.total == 2
    loose = build_mask("diff", finetuned=str(tmp_path / "tuned"), tolerance=1e-7).compute(base, None)
    assert loose[name].tolist() == [3, 10, 40]


def test_diff_of_a_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_mask("diff", finetuned=str(tmp_path / "missing")).compute(make_tiny_lm(), None)
