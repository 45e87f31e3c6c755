"""`mth tickets`: iterative pruning with rewinding made of ordinary fit runs, early-bird stop, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mthlib.cli import main
from mthlib.deltas import load_delta
from mthlib.fingerprint import model_fingerprint
from mthlib.masking import Masks
from mthlib.models import load_model
from mthlib.ticket_schedule import early_bird_stop, hamming_distance, prune, sparsity_schedule
from mthlib.tickets import find_tickets
from tests.conftest import TINY_FIT_CONFIG, save_tiny_chat_lm



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny base model and two configs: a 90% random mask, and no mask (dense)."""
    folder = tmp_path_factory.mktemp("tickets")
    model = save_tiny_chat_lm(folder / "tiny", seed=3)
    for name, mask in (("masked", "{class_path: random, init_args: {sparsity: 0.9, seed: 4}}"), ("dense", "null")):
        (folder / f"{name}.yaml").write_text(TINY_FIT_CONFIG.format(model=model, mask=mask))
    (folder / "rigl.yaml").write_text("model:\n  mask: {class_path: rigl, init_args: {sparsity: 0.9}}\n")
    return folder


def base_params(world) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in load_model(str(world / "tiny"))[0].named_parameters()}


def files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()}


def masks_from(entries, indices) -> list[Masks]:
    return [Masks.load(entries[i]["mask"]) for i in indices]


def test_hamming_distance_is_the_symmetric_difference_over_the_kept_entries():
    shapes = {"a": (2, 3), "b": (4,)}
    one = Masks({"a": torch.tensor([0, 1, 5]), "b": torch.tensor([2])}, shapes)
    two = Masks({"a": torch.tensor([1, 2]), "b": torch.tensor([2, 3])}, shapes)
    # A xor B = {a0, a5, a2, b3}: 4 entries; |A| + |B| = 4 + 4
    assert hamming_distance(one, two) == pytest.approx(4 / 8)
    assert hamming_distance(one, one) == 0.0
    assert hamming_distance(one, Masks({"a": torch.tensor([2, 3])}, shapes)) == 1.0  # disjoint
    assert hamming_distance(Masks({}, shapes), Masks({}, shapes)) == 0.0
    with pytest.raises(ValueError, match="different parameters"):
        hamming_distance(one, Masks({}, {"a": (2, 3)}))


def test_early_bird_stops_on_the_latest_distance_below_the_threshold():
    assert early_bird_stop([None, 0.3, 0.05], 0.1)
    assert not early_bird_stop([None, 0.05, 0.3], 0.1)
    assert not early_bird_stop([None], 0.1) and not early_bird_stop([], 0.1)
    assert not early_bird_stop([None, 0.0], None)  # off
    assert not early_bird_stop([None, 0.1], 0.1)  # strictly below


def test_the_schedule_is_geometric_and_ends_exactly_at_the_target():
    assert sparsity_schedule(1000, 10, 3) == ([1000, 100, 10], "target")  # keep (10/1000)^(1/2) = 0.1
    assert sparsity_schedule(1000, 100, 5, prune_fraction=0.5) == ([1000, 500, 250, 125, 100], "target")
    assert sparsity_schedule(1000, 10, 3, prune_fraction=0.5) == ([1000, 500, 10], "rounds")  # rounds ran out
    with pytest.raises(ValueError, match="between 1 and 999"):
        sparsity_schedule(1000, 1000, 3)


def test_prune_keeps_the_best_scores_within_the_mask_with_ties_to_the_earlier_entry():
    mask = Masks({"a": torch.tensor([1, 4, 7]), "b": torch.tensor([0, 2])}, {"a": (8,), "b": (3,), "c": (2,)})
    scores = {"a": torch.tensor([0.5, 2.0, 1.0]), "b": torch.tensor([1.0, 3.0])}
    kept = prune(scores, mask, 2)
    assert kept["a"].tolist() == [4] and kept["b"].tolist() == [2] and kept.count("c") == 0
    tie = prune(scores, mask, 3)  # a7 ties b0 at 1.0: the earlier parameter wins
    assert tie["a"].tolist() == [4, 7] and tie["b"].tolist() == [2]
    assert kept.shapes == mask.shapes
    with pytest.raises(ValueError, match="needs 2 scores"):
        prune({"a": scores["a"]}, mask, 2)


def test_rounds_are_ordinary_runs_nested_down_to_the_exact_target_and_a_rerun_skips_them(world, capsys):
    out = world / "iterative"
    args = ["tickets", "--config", str(world / "masked.yaml"), "--out", str(out), "--target_sparsity", "0.99",
            "--rounds", "3", "--rewind_step", "1"]
    main(args)
    summary = json.loads((out / "tickets.json").read_text())
    entries = summary["rounds"]
    masks = masks_from(entries, range(3))
    numel, first = masks[0].numel, masks[0].total
    target = int(numel * 0.01)
    assert [m.total for m in masks] == sparsity_schedule(first, target, 3)[0] and masks[2].total == target
    assert summary["stop_reason"] == entries[2]["stop"] == "target" and summary["ticket"] == entries[2]["mask"]
    for previous, mask in zip(masks, masks[1:]):  # every mask is a subset of the one before
        assert all(torch.isin(mask[n], previous[n]).all() for n in mask)
    for entry, mask in zip(entries, masks):  # an ordinary run folder that trained exactly its mask file
        run = Path(entry["folder"])
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["mask"]["init_args"]["path"] == entry["mask"]
        assert len(config["model"]["mask"]["init_args"]["digest"]) == 64 and (run / "metrics.csv").is_file()
        trained = load_delta(run / "deltas" / "last.safetensors")
        assert all(torch.equal(trained.indices[n].long(), mask[n]) for n in trained.indices)
        assert sum(idx.numel() for idx in trained.indices.values()) == mask.total

    # diff: round 1 keeps the entries of round 0 that moved most from the base
    base = base_params(world)
    moved = load_delta(Path(entries[0]["folder"]) / "deltas" / "last.safetensors")
    scores = {n: (moved.values[n].double() - base[n].reshape(-1)[moved.indices[n].long()].double()).abs()
              for n in moved.indices}
    assert prune(scores, masks[0], masks[1].total) == masks[1]
    assert entries[1]["hamming"] is not None and entries[2]["hamming"] is None

    # rewind to step 1: round 2 starts from the base with round 0's step-1 values on its own mask only
    rewound_path = Path(entries[2]["model"])
    assert rewound_path == out / "rewind" / "round_02"
    rewound = load_model(str(rewound_path))[0]
    early = load_delta(Path(entries[0]["folder"]) / "deltas" / "step=000001.safetensors")
    moved_at_1 = {n: early.values[n] != base[n].reshape(-1)[early.indices[n].long()] for n in early.indices}
    inside = {n: torch.isin(early.indices[n].long(), masks[2][n]) for n in early.indices}
    assert any((moved_at_1[n] & inside[n]).any() for n in inside) and any((moved_at_1[n] & ~inside[n]).any() for n in inside)
    for name, param in rewound.named_parameters():
        expected = base[name].clone().reshape(-1)
        if name in early.indices:
            keep = torch.isin(early.indices[name].long(), masks[2][name])
            expected[early.indices[name].long()[keep]] = early.values[name][keep]
        assert torch.equal(param.detach().reshape(-1), expected), name
    config = yaml.safe_load((Path(entries[2]["folder"]) / "config.yaml").read_text())
    assert config["model"]["model_name_or_path"] == str(rewound_path)
    assert masks[2].metadata["base_fingerprint"] == model_fingerprint(rewound)

    before = files(out)
    capsys.readouterr()
    main(args)  # finished: nothing trained, nothing written
    assert files(out) == before and "is complete" in capsys.readouterr().out

    # interrupted after round 1 was recorded: only round 2 is trained again, to the same mask
    summary["rounds"], summary["stop_reason"], summary["ticket"] = entries[:2], None, None
    (out / "tickets.json").write_text(json.dumps(summary))
    kept = {k: v for k, v in files(out).items() if "round_00" in k or "round_01" in k}
    main(args)
    again = json.loads((out / "tickets.json").read_text())
    assert {k: v for k, v in files(out).items() if "round_00" in k or "round_01" in k} == kept
    assert again["stop_reason"] == "target" and Masks.load(again["ticket"]) == masks[2]


def planted(base: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """A criterion that ignores training: every round draws the same mask (the largest base weights)."""
    return base.abs()


def test_a_stable_draw_stops_the_search_early_at_the_target(world):
    out = world / "early"
    summary = find_tickets(str(world / "dense.yaml"), str(out), 0.99, steps_per_round=1, rounds=5, prune_fraction=0.5,
                           criterion=planted, early_bird_threshold=0.1)
    entries = summary["rounds"]
    assert [e["stop"] for e in entries] == [None, None, "early_bird"] and summary["stop_reason"] == "early_bird"
    assert entries[0]["mask"] is None and (Path(entries[0]["folder"]) / "model" / "config.json").is_file()  # dense round 0
    assert entries[1]["hamming"] == 0.0
    base = base_params(world)
    eligible = {n: p for n, p in base.items() if p.dim() >= 2}  # matrices and the (tied) embedding
    numel = sum(p.numel() for p in eligible.values())
    target = int(numel * 0.01)
    assert entries[1]["entries"] == round(numel / 2)  # the schedule's first step: half of round 0
    # the ticket is the top `target` |base| entries over every eligible parameter
    flat = torch.cat([p.abs().reshape(-1) for p in eligible.values()])
    chosen = set(torch.topk(flat, target).indices.tolist())
    ticket, offset, expected = Masks.load(summary["ticket"]), 0, {}
    for name, p in eligible.items():
        expected[name] = sorted(i - offset for i in chosen if offset <= i < offset + p.numel())
        offset += p.numel()
    assert ticket.total == target and {n: ticket[n].tolist() for n in eligible} == expected


@pytest.mark.parametrize("extra, message", [
    (["--target_sparsity", "1.5"], "target_sparsity must be in (0, 1)"),
    (["--target_sparsity", "0.99", "--rounds", "1"], "rounds must be >= 2"),
    (["--target_sparsity", "0.99", "--prune_fraction", "1"], "prune_fraction must be in (0, 1)"),
    (["--target_sparsity", "0.99", "--steps_per_round", "2", "--rewind_step", "2"], "rewind_step must be in [0, steps_per_round)"),
    (["--target_sparsity", "0.99", "--early_bird_threshold", "0"], "early_bird_threshold must be in (0, 1]"),
    (["--target_sparsity", "0.99", "--criterion", "size"], "criterion"),
    (["--target_sparsity", "0.5"], "round 0's mask keeps"),
    (["--target_sparsity", "0.99", "--config", "rigl.yaml"], "round 0 needs a fixed mask, but rigl changes"),
])
def test_bad_arguments_are_one_line_and_write_nothing(world, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    extra = [str(world / word) if word.endswith(".yaml") else word for word in extra]
    with pytest.raises(SystemExit) as stop:
        main(["tickets", "--config", str(world / "masked.yaml"), "--out", str(out), *extra])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mth tickets: error: ")]
    assert stop.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_a_folder_of_something_else_or_of_other_arguments_is_refused(world, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["tickets", "--config", str(world / "masked.yaml"), "--out", str(tmp_path), "--target_sparsity", "0.99"])
    assert "holds files but no tickets.json" in capsys.readouterr().err
    (tmp_path / "notes.txt").unlink()
    summary = {"arguments": {"config": [str(world / "masked.yaml")], "target_sparsity": 0.9}, "rounds": [],
               "stop_reason": None, "ticket": None}
    (tmp_path / "tickets.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=r"holds tickets of other arguments \(target_sparsity: 0.9 there, 0.99 now\)"):
        find_tickets(str(world / "masked.yaml"), str(tmp_path), 0.99)
