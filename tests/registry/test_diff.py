"""`diff` selects the entries a fine-tune changed beyond the tolerance (from any weights file), or a mask file's."""

import pytest
import torch
from safetensors.torch import save_file

from mthlib.deltas import save_delta
from mthlib.fingerprint import model_fingerprint
from mthlib.masking import Masks, build_mask
from mthlib.registry.diff import Diff
from tests.conftest import make_tiny_lm

UP = "model.layers.1.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
NORM = "model.norm.weight"


def tune(model, changes):
    """Add ``changes`` ({name: {flat index: amount}}) to a copy-free model in place."""
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, entries in changes.items():
            for index, amount in entries.items():
                params[name].view(-1)[index] += amount
    return model


@pytest.fixture
def tuned_folder(tmp_path):
    tuned = tune(make_tiny_lm(seed=0), {UP: {3: 1e-3, 10: 1e-6, 40: -0.5}, EMBED: {5: 0.1}})
    tuned.save_pretrained(tmp_path / "tuned")
    return str(tmp_path / "tuned")


def test_changed_entries_of_a_saved_folder(tiny_lm, tuned_folder):
    masks = Diff(finetuned=tuned_folder).compute(tiny_lm, None)
    assert masks[UP].tolist() == [3, 40] and masks[EMBED].tolist() == [5]  # 1e-6 is below the tolerance 1e-5
    assert masks.total == 3 and HEAD not in masks.names  # the tied head is the embedding, counted once
    loose = Diff(finetuned=tuned_folder, tolerance=1e-7).compute(tiny_lm, None)
    assert loose[UP].tolist() == [3, 10, 40]
    assert isinstance(build_mask("diff", finetuned=tuned_folder), Diff)


def test_sparsity_caps_the_count_by_largest_change(tiny_lm, tuned_folder):
    # 20,480 eligible entries; keep_count = 2 keeps the two largest |diff|: 0.5 (up 40) and 0.1 (embed 5)
    capped = Diff(finetuned=tuned_folder, sparsity=1 - 2 / 20480).compute(tiny_lm, None)
    assert capped.total == 2 and capped[UP].tolist() == [40] and capped[EMBED].tolist() == [5]
    # per tensor, keep_count(2048) = 1: up keeps its largest change, the embedding its only one
    per = Diff(finetuned=tuned_folder, sparsity=1 - 1 / 2048, allocation="per_tensor").compute(tiny_lm, None)
    assert per[UP].tolist() == [40] and per[EMBED].tolist() == [5]
    # a cap above the number of changed entries keeps all of them (the count is then below k)
    loose = Diff(finetuned=tuned_folder, sparsity=0.99).compute(tiny_lm, None)
    assert loose.total == 3 < Diff(finetuned=tuned_folder, sparsity=0.99).keep_count(20480)


def test_state_dict_file_of_an_untied_model(tiny_lm_untied, tmp_path):
    tuned = tune(make_tiny_lm(seed=0, tie=False), {HEAD: {7: 0.25}, UP: {1: -2e-5}})
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(tmp_path / "tuned.safetensors"))
    masks = Diff(finetuned=str(tmp_path / "tuned.safetensors")).compute(tiny_lm_untied, None)
    assert masks[HEAD].tolist() == [7] and masks[UP].tolist() == [1] and masks.total == 2


def test_sparse_delta_over_its_base(tiny_lm, tmp_path):
    tuned = tune(make_tiny_lm(seed=0), {UP: {2: 0.5, 9: 3e-5}})
    stored = {UP: torch.tensor([2, 9, 11])}  # entry 11 is stored but did not change
    save_delta(tmp_path / "delta.safetensors", tuned, stored, base_model="tiny",
               base_fingerprint=model_fingerprint(tiny_lm), strategy=None, sparsity=0.99, step=3)
    masks = Diff(finetuned=str(tmp_path / "delta.safetensors")).compute(tiny_lm, None)
    assert masks[UP].tolist() == [2, 9] and masks.total == 2
    with pytest.raises(ValueError, match="fingerprint"):
        Diff(finetuned=str(tmp_path / "delta.safetensors")).compute(make_tiny_lm(seed=1), None)


def test_exclude_mask_entries_are_dropped(tiny_lm, tuned_folder, tmp_path):
    Masks({UP: torch.tensor([40])}, {UP: (64, 32)}).save(tmp_path / "first.safetensors")
    masks = Diff(finetuned=tuned_folder, exclude_mask=str(tmp_path / "first.safetensors")).compute(tiny_lm, None)
    assert masks[UP].tolist() == [3] and masks.total == 2


def test_bad_inputs_are_clear_errors(tiny_lm, tmp_path):
    with pytest.raises(FileNotFoundError):
        Diff(finetuned=str(tmp_path / "missing")).compute(tiny_lm, None)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        Diff(finetuned="x", tolerance=-1.0)
    save_file({"other.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="has no parameter model.embed_tokens.weight"):
        Diff(finetuned=str(tmp_path / "other.safetensors")).compute(tiny_lm, None)


@pytest.fixture
def mask_file(tmp_path):
    """A mask file (as ``mth masks build`` writes) over up, the embedding and a norm (not eligible by default)."""
    path = tmp_path / "mask.safetensors"
    Masks({UP: torch.tensor([3, 40, 41]), EMBED: torch.tensor([5]), NORM: torch.tensor([0, 1])},
          {UP: (64, 32), EMBED: (64, 32), NORM: (32,)}).save(path)
    return str(path)


def test_a_mask_file_gives_its_entries_in_eligible_parameters(tiny_lm, mask_file, tmp_path):
    masks = Diff(finetuned=mask_file).compute(tiny_lm, None)
    assert masks[UP].tolist() == [3, 40, 41] and masks[EMBED].tolist() == [5] and masks.total == 4
    assert NORM not in masks.names  # restricted to eligible parameters; eligible ones the file lacks are empty
    with_norms = Diff(finetuned=mask_file, include_norms=True).compute(tiny_lm, None)
    assert with_norms[NORM].tolist() == [0, 1] and with_norms.total == 6
    # a binding cap keeps the earliest entries (no |diff| to rank by): the embedding first, then up's lowest
    capped = Diff(finetuned=mask_file, sparsity=1 - 2 / 20480).compute(tiny_lm, None)
    assert capped[EMBED].tolist() == [5] and capped[UP].tolist() == [3] and capped.total == 2
    per = Diff(finetuned=mask_file, sparsity=1 - 1 / 2048, allocation="per_tensor").compute(tiny_lm, None)
    assert per[UP].tolist() == [3] and per[EMBED].tolist() == [5]
    Masks({UP: torch.tensor([3])}, {UP: (64, 32)}).save(tmp_path / "first.safetensors")
    rest = Diff(finetuned=mask_file, exclude_mask=str(tmp_path / "first.safetensors")).compute(tiny_lm, None)
    assert rest[UP].tolist() == [40, 41] and rest.total == 3


def test_a_mask_file_of_another_model_is_refused(tiny_lm, tmp_path):
    Masks({"encoder.weight": torch.tensor([1])}, {"encoder.weight": (4, 4)}).save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="names encoder.weight, which the model does not have"):
        Diff(finetuned=str(tmp_path / "other.safetensors")).compute(tiny_lm, None)
    Masks({UP: torch.tensor([1])}, {UP: (32, 64)}).save(tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match=r"has shape \(32, 64\) in mask file .* \(64, 32\) in the model"):
        Diff(finetuned=str(tmp_path / "shape.safetensors")).compute(tiny_lm, None)
