"""``mth analyze`` commands: stdout tables, report files and PNGs; a delta measures like its exported folder."""

from __future__ import annotations

import json

import pytest
import torch
from jsonargparse import ArgumentParser
from safetensors.torch import save_file

from mthlib.analysis import commands


def _strip_labels(data):
    return {k: v for k, v in data.items() if k not in ("base", "finetuned", "labels")}


def test_sparsity_of_a_delta_equals_sparsity_of_its_exported_folder(tiny_run):
    of_delta = commands.sparsity(str(tiny_run.base_dir), str(tiny_run.delta))
    of_folder = commands.sparsity(str(tiny_run.base_dir), str(tiny_run.exported))
    assert _strip_labels(of_delta.to_dict()) == _strip_labels(of_folder.to_dict())
    trained = sum(int(i.numel()) for i in tiny_run.indices.values())
    assert of_delta.changed("stored", 1e-5) == trained  # every trained entry moved by >= 0.05


def test_rank_and_overlap_of_a_delta_equal_those_of_its_exported_folder(tiny_run):
    base, delta, folder = str(tiny_run.base_dir), str(tiny_run.delta), str(tiny_run.exported)
    assert _strip_labels(commands.rank(base, delta).to_dict()) == _strip_labels(commands.rank(base, folder).to_dict())
    changed = commands.overlap([delta, folder], base=base, delta_sets="changed")
    stored = commands.overlap([delta, folder], base=base)
    assert changed.intersections == stored.intersections
    assert changed.pair(0, 1).jaccard == 1.0 and changed.total == stored.total


def test_sparsity_command_prints_and_writes_reports_and_heatmaps(hand_pair, tmp_path, capsys):
    out = tmp_path / "report"
    result = commands.sparsity(str(hand_pair.base), str(hand_pair.finetuned), out=str(out))
    printed = capsys.readouterr().out
    assert "Update sparsity (%)" in printed and "tol=1e-05" in printed and "wrote" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "sparsity.json", "sparsity.md", "sparsity_bf16.png", "sparsity_stored.png"]
    data = json.loads((out / "sparsity.json").read_text())
    assert data["overall"]["stored"]["1e-05"] == result.sparsity("stored", 1e-5)
    assert "| layer | n |" in (out / "sparsity.md").read_text()
    assert (out / "sparsity_stored.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlap_and_consecutive_and_rank_commands_write_their_files(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    commands.overlap([str(tiny_run.delta), str(tiny_run.exported)], base=str(tiny_run.base_dir), out=str(out))
    commands.consecutive(str(tiny_run.delta.parent.parent), out=str(out))
    commands.rank(str(tiny_run.base_dir), str(tiny_run.delta), out=str(out))
    assert sorted(p.name for p in out.iterdir()) == [
        "consecutive.json", "consecutive.md", "consecutive.png", "overlap.json", "overlap.md",
        "overlap_jaccard.png", "overlap_o1.png", "rank.json", "rank.md"]
    consecutive = json.loads((out / "consecutive.json").read_text())
    trained = sum(int(i.numel()) for i in tiny_run.indices.values())
    assert consecutive["net_updated"] == trained and consecutive["cancelled"] == 0
    assert "o1 random" in capsys.readouterr().out


def test_bad_inputs_give_one_clear_line(hand_pair, tiny_run, tmp_path):
    save_file({"x": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    cases = [
        (FileNotFoundError, lambda: commands.sparsity(str(hand_pair.base), str(tmp_path / "missing.safetensors"))),
        (ValueError, lambda: commands.sparsity(str(hand_pair.base), str(tmp_path / "other.safetensors"))),
        (ValueError, lambda: commands.sparsity(str(hand_pair.base), str(tiny_run.delta))),
        (ValueError, lambda: commands.overlap([str(tiny_run.delta)])),
    ]
    for error, call in cases:
        with pytest.raises(error) as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("command", [commands.sparsity, commands.rank, commands.overlap, commands.consecutive])
def test_commands_build_jsonargparse_parsers_with_help(command):
    parser = ArgumentParser()
    parser.add_function_arguments(command)
    assert "out" in parser.get_defaults()
    assert parser.get_defaults()["check_fingerprint"] is True


def test_command_line_values_parse_to_typed_arguments():
    parser = ArgumentParser()
    parser.add_function_arguments(commands.sparsity)
    cfg = parser.parse_args(["--base", "b", "--finetuned", "f", "--tolerances", "[1e-5]", "--views", "[bf16]"])
    assert list(cfg.tolerances) == [1e-5] and list(cfg.views) == ["bf16"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--base", "b", "--finetuned", "f", "--views", "[fp8]"])


def test_sparsity_options_of_the_papers_script_from_the_command_line(hand_pair, tmp_path, capsys):
    from mthlib.cli import main

    out = tmp_path / "paper"
    main(["analyze", "sparsity", "--base", str(hand_pair.base), "--finetuned", str(hand_pair.finetuned),
          "--layer_average", "unweighted", "--compare_dtype", "bf16", "--out", str(out)])
    data = json.loads((out / "sparsity.json").read_text())
    assert (data["layer_average"], data["compare_dtype"]) == ("unweighted", "bf16")
    markdown = (out / "sparsity.md").read_text()
    assert "per layer, stored view (unweighted: mean over the layer's parameters" in markdown
    assert "bf16 view compared in bf16" in markdown and "bf16 view compared in bf16" in capsys.readouterr().out
