"""Every user error of ``mth`` is one line on stderr, exit status 2, no traceback, and nothing written.

Each row of :data:`CASES` is a bad config, flag or file, run as the ``mth`` console script in a
folder of its own (through :mod:`tests.mth_server`, which imports mthlib once; one row and the
``--traceback`` check run ``python -m mthlib.cli`` itself). The row's folder and the tiny model
it uses are compared file by file before and after: a bad input leaves no run folder,
checkpoint or file.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from mthlib.cli_errors import clean, reported
from tests.conftest import save_tiny_chat_lm
from tests.mth_server import clients
from tests.test_cli import CONFIG


@dataclass(frozen=True)
class Case:
    """One bad input: the ``mth`` arguments, the phrase the error line must hold, and the files it needs.

    ``{dir}`` (the row's folder), ``{model}`` (the tiny model), ``{config}`` (a valid fit config in
    the row's folder) and ``{jsonl_config}`` (its text, reading prompts from ``{dir}/tasks.jsonl``)
    are filled in ``args``, ``phrase`` and ``files``. ``loads`` marks rows whose mistake
    can only be seen after the model loaded: Lightning's and transformers' start-up lines may precede
    the error line there; every other row prints the error line alone.
    """

    name: str
    args: tuple[str, ...]
    phrase: str
    files: dict[str, str] = field(default_factory=dict)
    loads: bool = False


FIT = ("fit", "--config", "{config}")
CASES = [
    # config files
    Case("yaml_syntax", ("fit", "--config", "{dir}/bad.yaml"), "bad.yaml:3:1: invalid YAML: expected ',' or ']'",
         files={"bad.yaml": "model:\n  num_generations: [2\n"}),
    Case("config_missing", ("fit", "--config", "{dir}/nope.yaml"), "config file not found: {dir}/nope.yaml"),
    Case("config_not_mapping", ("fit", "--config", "{dir}/list.yaml"), "list.yaml: a config is a YAML mapping",
         files={"list.yaml": "- model\n- data\n"}),
    Case("unknown_key_in_yaml", ("fit", "--config", "{config}", "--config", "{dir}/typo.yaml"),
         "unknown key model.learnin_rate; closest valid: model.learning_rate",
         files={"typo.yaml": "model:\n  learnin_rate: 0.1\n"}),
    # flags
    Case("unknown_flag", (*FIT, "--model.learnin_rate", "1"),
         "unknown option --model.learnin_rate; closest valid: --model.learning_rate"),
    Case("abbreviated_flag", (*FIT, "--model.learning_rat", "1e-3"),
         "unknown option --model.learning_rat; closest valid: --model.learning_rate"),
    Case("abbreviated_trainer_flag", (*FIT, "--trainer.max_step", "3"),
         "unknown option --trainer.max_step; closest valid: --trainer.max_steps"),
    Case("unknown_command", ("fitt", "--config", "{config}"), "unknown command 'fitt'; closest valid: fit"),
    Case("negative_value_without_equals", (*FIT, "--model.learning_rate", "-1e-3"),
         "--model.learning_rate needs a value (write a value that starts with '-' as --model.learning_rate=VALUE)"),
    Case("loss_type", (*FIT, "--model.loss_type", "ppo"), "model.loss_type: got 'ppo'; allowed: 'grpo', 'dr_grpo'"),
    Case("scale_rewards", (*FIT, "--model.scale_rewards", "yes"),
         "model.scale_rewards: got 'yes'; allowed: 'group', 'batch', 'none'"),
    Case("not_an_int", (*FIT, "--model.num_generations=many"), "model.num_generations: got 'many'; expected int"),
    Case("accumulate_grad_batches", (*FIT, "--trainer.accumulate_grad_batches", "4"),
         "trainer.accumulate_grad_batches=4 has no effect: GRPO optimises manually; use model.micro_batch_size"),
    Case("gradient_clip_val", (*FIT, "--trainer.gradient_clip_val", "1.0"),
         "trainer.gradient_clip_val=1.0 has no effect: GRPO optimises manually; use model.max_grad_norm"),
    Case("gradient_clip_algorithm", (*FIT, "--trainer.gradient_clip_algorithm", "value"),
         "trainer.gradient_clip_algorithm=value has no effect: GRPO optimises manually; use model.max_grad_norm"),
    Case("weights_only_off", (*FIT, "--weights_only", "false"), "--weights_only false is refused"),
    # masks
    Case("unknown_mask", (*FIT, "--model.mask", "nope"), "unknown mask strategy 'nope'; registered: block, continuous, diff"),
    Case("unknown_mask_option", (*FIT, "--model.mask", "random", "--model.mask.sparsit", "0.5"),
         "model.mask: unknown option 'sparsit' of mthlib.masking.names.random; closest valid: sparsity"),
    Case("exclude_matches_nothing", (*FIT, "--model.mask", "random", "--model.mask.exclude", "[mlp.*]"),
         "exclude pattern 'mlp.*' matches no parameter; names look like: model.embed_tokens.weight", loads=True),
    Case("include_matches_nothing", (*FIT, "--model.mask", "random", "--model.mask.include", "[attn*]"),
         "include pattern 'attn*' matches no parameter; names look like: model.embed_tokens.weight", loads=True),
    Case("sparsity_out_of_range", (*FIT, "--model.mask", "random", "--model.mask.sparsity", "1.5"),
         "sparsity must be in [0, 1) (fraction of entries that stay frozen); got 1.5", loads=True),
    # values the module refuses
    Case("num_generations_1", (*FIT, "--model.num_generations", "1"), "num_generations must be >= 2", loads=True),
    Case("negative_learning_rate", (*FIT, "--model.learning_rate=-1e-3"), "learning_rate must be >= 0", loads=True),
    Case("reinit_without_mask", (*FIT, "--model.reinit", "true"),
         "reinit re-initialises the entries of a mask: set model.mask too, or reinit false", loads=True),
    # model, checkpoints, data, output folder
    Case("model_missing", (*FIT, "--model.model_name_or_path", "{dir}/nope"),
         "cannot load model '{dir}/nope': no such folder", loads=True),
    Case("model_unreadable", (*FIT, "--model.model_name_or_path", "{dir}/broken"),
         "cannot load model '{dir}/broken': It looks like the config file", files={"broken/config.json": "{not json"},
         loads=True),
    Case("checkpoint_missing", (*FIT, "--ckpt_path", "{dir}/none.ckpt"), "--ckpt_path"),
    Case("checkpoint_truncated", (*FIT, "--ckpt_path", "{dir}/cut.ckpt"), "cut.ckpt is truncated",
         files={"cut.ckpt": "PK\x03\x04 cut short"}),
    Case("checkpoint_last_without_run", (*FIT, "--ckpt_path", "last"), "--ckpt_path last: no"),
    Case("jsonl_malformed", ("fit", "--config", "{dir}/jsonl.yaml"),
         "{dir}/tasks.jsonl:2: invalid JSON at column 11 (Expecting ':' delimiter)",
         files={"tasks.jsonl": '{"prompt": "a", "answer": "b"}\n{"prompt" "a"}\n', "jsonl.yaml": "{jsonl_config}"},
         loads=True),
    Case("jsonl_missing", ("fit", "--config", "{dir}/jsonl.yaml"), "JSONL file not found: {dir}/tasks.jsonl",
         files={"jsonl.yaml": "{jsonl_config}"}, loads=True),
    Case("output_folder_is_a_file", (*FIT, "--trainer.logger.init_args.save_dir", "{dir}/afile/runs"),
         "not a directory: {dir}/afile/runs (a part of the path is a file, not a folder)",
         files={"afile": "I am a file"}, loads=True),
    # tool commands
    Case("export_missing_delta", ("export", "--delta", "{dir}/none.safetensors", "--out", "{dir}/out"),
         "mth export: error: sparse delta not found: {dir}/none.safetensors"),
    Case("export_truncated_delta", ("export", "--delta", "{dir}/cut.safetensors", "--out", "{dir}/out"),
         "mth export: error: not a valid mthlib sparse delta", files={"cut.safetensors": "\x08\x00\x00"}),
    Case("export_abbreviated_option", ("export", "--delt", "{dir}/none.safetensors", "--out", "{dir}/out"),
         "mth export: error: unknown option --delt; closest valid: --delta"),
    Case("analyze_missing_model", ("analyze", "sparsity", "--base", "{model}", "--finetuned", "{dir}/nope"),
         "mth analyze: error: no such file or folder: {dir}/nope"),
    Case("analyze_compare_dtype_without_bf16_view", ("analyze", "sparsity", "--base", "{model}", "--finetuned", "{model}",
                                                     "--views", "[stored]", "--compare_dtype", "bf16"),
         "mth analyze: error: compare_dtype bf16 computes the bf16 view's differences in bf16"),
    Case("masks_build_missing_config", ("masks", "build", "--config", "{dir}/nope.yaml", "--out", "{dir}/m.safetensors"),
         "mth masks: error: config file not found: {dir}/nope.yaml"),
]


def _fill(text: str, folder: Path, model: str) -> str:
    """``text`` with the placeholders of :class:`Case` replaced."""
    config = CONFIG.format(runs=folder / "runs", model=model)
    jsonl = config.replace("class_path: mthlib.envs.AlphabetSort\n    init_args: {max_turns: 1}",
                           f"class_path: mthlib.envs.JsonlEnv\n    init_args: {{path: {folder}/tasks.jsonl}}")
    for key, value in {"dir": str(folder), "model": model, "config": str(folder / "tiny.yaml"),
                       "jsonl_config": jsonl}.items():
        text = text.replace("{" + key + "}", value)
    return text


def _prepare(case: Case, root: Path, model: str) -> tuple[Path, list[str]]:
    """The row's folder with a valid config and the row's files; the arguments with placeholders filled."""
    folder = root / case.name
    folder.mkdir()
    (folder / "tiny.yaml").write_text(CONFIG.format(runs=folder / "runs", model=model))
    for name, text in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_fill(text, folder, model).encode("latin-1"))
    return folder, [_fill(arg, folder, model) for arg in case.args]


def _snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folders``: path -> (size, modification time in ns)."""
    found = {}
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            stat = path.stat()
            found[str(path)] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return found


@dataclass(frozen=True)
class Outcome:
    """What a row did: exit status, stderr, its folder, and every path written or changed there or in the model."""

    returncode: int
    stderr: str
    folder: Path
    changed: list


def _mth(command: list[str], args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``COMMAND ARGS`` (``mth`` or ``python -m mthlib.cli``) in ``cwd`` with ``env`` added."""
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def _wanted(request) -> set[str]:
    """The rows the selected tests of this module read (all of them, unless ``-k`` picks a few)."""
    wanted = set()
    for item in request.session.items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if item.module is request.module:
            wanted |= {params["case"].name} if "case" in params else {params["name"]} if "name" in params else set()
            wanted |= {"entry_point", "loss_type"} if item.name == "test_the_real_entry_point_prints_the_same_line" else set()
    return wanted


@pytest.fixture(scope="module")
def results(request, tmp_path_factory) -> dict[str, Outcome]:
    """Run the rows, the ``--traceback`` variants and one row through the real entry point, all at once.

    Rows run through the ``mth`` client of :mod:`tests.mth_server` (mthlib imported once, each
    command in a forked child, as the console script); ``traceback_flag`` and ``entry_point``
    through ``python -m mthlib.cli`` itself.
    """
    root = tmp_path_factory.mktemp("bad_inputs")
    model = save_tiny_chat_lm(root / "model", seed=3)
    env = {"MTH_CACHE": str(root / "cache"), "PYTHONPATH": str(Path(__file__).parents[1])}
    traceback_case = Case("traceback", (*FIT, "--model.loss_type", "ppo"), "")
    rows = [*CASES, *(replace(traceback_case, name=name) for name in ("traceback_env", "traceback_flag", "entry_point"))]
    prepared = {case.name: _prepare(case, root, model) for case in rows if case.name in _wanted(request)}
    before = _snapshot(*(folder for folder, _ in prepared.values()), Path(model))
    (root / "bin").mkdir()
    with clients(root / "bin", {**os.environ, **env}) as bin_folder, ThreadPoolExecutor(max_workers=3) as pool:
        entry_point = [sys.executable, "-m", "mthlib.cli"]
        commands = {"traceback_flag": (entry_point, ["--traceback"]), "entry_point": (entry_point, [])}
        runs = {}
        for name, (folder, args) in prepared.items():
            command, extra = commands.get(name, ([str(bin_folder / "mth")], []))
            row_env = {**env, "MTH_TRACEBACK": "1"} if name == "traceback_env" else env
            runs[name] = pool.submit(_mth, command, args + extra, folder, row_env)
        processes = {name: run.result() for name, run in runs.items()}
    changed = sorted(set(before.items()) ^ set(_snapshot(*(folder for folder, _ in prepared.values()), Path(model)).items()))
    outcomes = {}
    for name, (folder, _) in prepared.items():
        mine = [path for path in changed if path[0] in (str(folder), model) or path[0].startswith((f"{folder}/", f"{model}/"))]
        outcomes[name] = Outcome(processes[name].returncode, processes[name].stderr, folder, mine)
    return outcomes


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(results, case):
    outcome = results[case.name]
    command = case.args[0] if case.args[0] != "fitt" else ""
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert outcome.returncode == 2, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr and "usage:" not in outcome.stderr, outcome.stderr[-3000:]
    assert lines, "nothing on stderr"
    error = lines[-1]
    assert error.startswith(f"mth {command}: error: " if command else "mth: error: "), error
    assert _fill(case.phrase, outcome.folder, "") in error, error
    assert [line for line in lines if "error" in line.lower()] == [error], outcome.stderr[-3000:]
    if not case.loads:
        assert lines == [error], outcome.stderr[-3000:]
    assert "Union" not in outcome.stderr and "Given value" not in outcome.stderr
    assert not outcome.changed, f"written or changed: {outcome.changed}"
    assert not (outcome.folder / "runs").exists()


def test_at_least_twenty_bad_inputs_in_the_table():
    assert len({case.name for case in CASES}) == len(CASES) >= 20


def test_the_real_entry_point_prints_the_same_line(results):
    real, forked = results["entry_point"], results["loss_type"]
    assert real.returncode == forked.returncode == 2
    assert real.stderr == forked.stderr.replace("/loss_type/", "/entry_point/")
    assert real.stderr.count("\n") == 1 and not real.changed


@pytest.mark.parametrize("name", ["traceback_flag", "traceback_env"])
def test_traceback_flag_and_env_show_the_traceback_instead(results, name):
    outcome = results[name]
    assert outcome.returncode == 1
    assert "Traceback (most recent call last)" in outcome.stderr
    assert "UsageError: model.loss_type: got 'ppo'" in outcome.stderr.splitlines()[-1]
    assert not outcome.changed


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/runs/tiny/version_0/checkpoints/last.ckpt"),
         "mth fit: error: no space left on device: /runs/tiny/version_0/checkpoints/last.ckpt (free some space or "
         "choose another output folder (trainer.logger.init_args.save_dir))"),
        (PermissionError(errno.EACCES, "Permission denied", "/runs"),
         "mth fit: error: permission denied: /runs (choose a folder you may write to (trainer.logger.init_args.save_dir))"),
        (SystemExit("mth: error: --ckpt_path last: nothing\nto resume"), "mth fit: error: --ckpt_path last: nothing to resume"),
        (KeyError("no tensor 'x' in the delta"), "mth fit: error: no tensor 'x' in the delta"),
    ],
    ids=["full_disk", "read_only", "exit_message", "key_error"],
)
def test_file_system_and_exit_errors_are_one_line_with_exit_2(capsys, error, line):
    with pytest.raises(SystemExit) as stop, reported("fit", show_traceback=False):
        raise error
    assert stop.value.code == 2
    assert capsys.readouterr().err == line + "\n"


def test_traceback_mode_lets_the_error_through(capsys):
    with pytest.raises(OSError, match="No space left"), reported("fit", show_traceback=True):
        raise OSError(errno.ENOSPC, "No space left on device", "/x")
    assert capsys.readouterr().err == ""


def test_union_noise_is_reduced_to_the_failing_subtype():
    message = (
        'Parser key "data.env":\n  Does not validate against any of the Union subtypes\n  Subtypes: [Environment, None]\n'
        "  Errors:\n    - Problem with given class_path 'mthlib.envs.JsonlEnv':\n        tasks.jsonl:2: invalid JSON\n"
        "    - Expected a <class 'NoneType'>\n  Given value type: <class 'Namespace'>\n  Given value: Namespace(a=1)"
    )
    assert clean(message) == "data.env: mthlib.envs.JsonlEnv: tasks.jsonl:2: invalid JSON"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_one_line_and_nothing_written(tmp_path):
    model = save_tiny_chat_lm(tmp_path / "model", seed=3)
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "tiny.yaml").write_text(CONFIG.format(runs=locked / "runs", model=model))
    locked.chmod(0o500)
    try:
        process = _mth([sys.executable, "-m", "mthlib.cli"], ["fit", "--config", str(tmp_path / "tiny.yaml")], tmp_path,
                       {"MTH_CACHE": str(tmp_path / "c")})
    finally:
        locked.chmod(0o700)
    assert process.returncode == 2, process.stderr[-3000:]
    assert process.stderr.splitlines()[-1] == (
        f"mth fit: error: permission denied: {locked}/runs (choose a folder you may write to "
        "(trainer.logger.init_args.save_dir))"
    )
    assert list(locked.iterdir()) == []
