"""Faults around files and resume: every file present before the fault is byte-identical after it.

Rows: kill -9 during a delta write and during a checkpoint write (a subprocess that blocks
half-way through the write), ENOSPC during a write, a truncated checkpoint then
``--ckpt_path last``, a read-only output folder, resuming an older run (its deltas survive,
the series continues), resuming with another strategy argument or base (one line naming the
setting and both values), file modes that follow the umask, ``--weights_only false``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from types import SimpleNamespace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import SafetensorError
from safetensors.torch import save as safetensors_bytes

import mthlib.deltas.format as delta_format
from mthlib.checkpoint_io import AtomicCheckpointIO
from mthlib.cli import main
from mthlib.data import PromptDataModule
from mthlib.deltas import load_delta
from mthlib.grpo import GRPOModule
from mthlib.masking import MaskCallback, build_mask
from mthlib.utils import atomic_dir, atomic_path, remove_stale_temps
from tests.conftest import save_tiny_chat_lm
from tests.grpo.toy import LetterA
from tests.test_mask_files import CONFIG as MASKED_RUN

# Runs `mth fit` with the second write of one kind blocked half-way: it signals `ready`, waits
# for `go`, writes half of the real bytes to the file being written, signals `written` and
# sleeps until killed. The patching happens only in that child process: nothing in mthlib waits.
CHILD = r"""
import io, sys, time
from pathlib import Path

import torch
import mthlib.deltas.format as delta_format
from safetensors.torch import save as safetensors_bytes
from mthlib.cli import main

kind, signals = sys.argv[1], Path(sys.argv[2])
calls = []


def block_half_way(path, data):
    (signals / "ready").touch()
    while not (signals / "go").exists():
        time.sleep(0.05)
    Path(path).write_bytes(data[: len(data) // 2])
    (signals / "written").touch()
    time.sleep(600)


real_save_file, real_torch_save = delta_format.save_file, torch.save


def save_file(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) == 2:
        block_half_way(filename, safetensors_bytes(tensors, metadata))
    return real_save_file(tensors, filename, metadata=metadata)


def torch_save(obj, f, *args, **kwargs):
    if str(f).endswith("last.ckpt"):
        calls.append(f)
        if len(calls) == 2:
            buffer = io.BytesIO()
            real_torch_save(obj, buffer)
            block_half_way(f, buffer.getvalue())
    return real_torch_save(obj, f, *args, **kwargs)


if kind == "delta":
    delta_format.save_file = save_file
else:
    torch.save = torch_save
main(sys.argv[3:])
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_chat_lm(tmp_path_factory.mktemp("model") / "tiny", seed=3)


def write_config(folder: Path, model: str) -> Path:
    """test_mask_files' tiny masked run (random, sparsity 0.9, seed 1), with a checkpoint and a delta every step."""
    mask = "{class_path: random, init_args: {sparsity: 0.9, seed: 1}}"
    config = yaml.safe_load(MASKED_RUN.format(runs=folder / "runs", name="tiny", model=model, mask=mask))
    config["trainer"]["enable_model_summary"] = False
    config["checkpoint"]["every_n_train_steps"] = 1
    config["model"].update(delta_every_n_steps=1, delta_keep_last=1)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model, children):
    """A masked 2-step run (version_0: checkpoints at steps 1 and 2, delta of step 2), copied per test.

    It asks for ``children`` so that the subprocesses start first and run alongside.
    """
    folder = tmp_path_factory.mktemp("finished")
    main(["fit", "--config", str(write_config(folder, tiny_model))])
    return folder / "runs"


@pytest.fixture
def run_copy(tmp_path, finished_run, tiny_model):
    shutil.copytree(finished_run, tmp_path / "runs", copy_function=shutil.copy2)
    return write_config(tmp_path, tiny_model), tmp_path / "runs" / "tiny"


def digests(root: Path) -> dict[str, str]:
    """Relative path to sha256 of every file under ``root``, except inside staging folders of writes in progress."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not any(part.endswith(".tmp") for part in p.parts)}


def assert_unchanged(before: dict[str, str], root: Path) -> None:
    after = digests(root)
    assert {name: after.get(name) for name in before} == before


def staging(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp"))


def fit_error(capsys, *args: str) -> str:
    """What follows ``mth fit: error:`` in the one error line `mth fit` exits with (status 2, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert exit_info.value.code == 2 and "Traceback" not in err and len(errors) == 1, err[-3000:]
    assert errors[0].startswith("mth fit: error: ")
    return errors[0].removeprefix("mth fit: error: ")


class Child:
    """A subprocess started early, so it runs while the in-process tests do (the machine has few cores)."""

    def __init__(self, argv: list[str], folder: Path) -> None:
        self.folder, self.log = folder, folder.parent / f"{folder.name}.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(argv, cwd=folder, stdout=out, stderr=subprocess.STDOUT)

    def wait_for(self, name: str, timeout: float = 300) -> None:
        """Wait until the child touches ``signals/<name>``."""
        deadline = time.monotonic() + timeout
        while not (self.folder / "signals" / name).exists():
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {name} after {timeout} s"
            time.sleep(0.1)

    def finish(self, timeout: float = 300) -> str:
        """Wait for the child to exit; its output."""
        self.process.wait(timeout)
        return self.log.read_text()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def read_only(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200 if writable else path.stat().st_mode & ~0o222)


@pytest.fixture(scope="module")
def children(tmp_path_factory, tiny_model):
    """The subprocess faults, started at once: fits to kill half-way through a delta / checkpoint write
    (blocked until their test says ``go``), and a fit into a read-only output folder."""
    started = {}
    for kind in ("delta", "checkpoint"):
        folder = tmp_path_factory.mktemp(f"kill_{kind}")
        (folder / "signals").mkdir()
        argv = [sys.executable, "-c", CHILD, kind, str(folder / "signals"), "fit", "--config",
                str(write_config(folder, tiny_model))]
        started[kind] = Child(argv, folder)
    folder = tmp_path_factory.mktemp("read_only")
    config = write_config(folder, tiny_model)
    (folder / "runs" / "tiny" / "version_0").mkdir(parents=True)
    (folder / "runs" / "tiny" / "version_0" / "metrics.csv").write_text("step,reward\n0,0.5\n")
    if os.geteuid() != 0 or shutil.which("setpriv"):
        read_only(folder, writable=False)
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"] if os.geteuid() == 0 else []
        started["read_only"] = Child([*prefix, sys.executable, "-m", "mthlib.cli", "fit", "--config", str(config)],
                                     folder)  # root writes anywhere unless it drops these capabilities
    yield started
    for child in started.values():
        child.kill()
    read_only(folder, writable=True)


@pytest.mark.parametrize(
    ("kind", "partial", "resumed_from"),
    [
        ("delta", "deltas/.step=000002.safetensors.*.tmp/step=000002.safetensors", "last.ckpt"),
        ("checkpoint", "checkpoints/.last.ckpt.*.tmp/last.ckpt", "epoch=0-step=2.ckpt"),
    ],
)
def test_kill_9_during_a_write_keeps_every_earlier_file_and_resume_removes_the_partial_one(
    kind, partial, resumed_from, children, caplog
):
    child = children[kind]
    child.wait_for("ready")
    before = digests(child.folder / "runs")
    (child.folder / "signals" / "go").touch()
    child.wait_for("written")
    os.kill(child.process.pid, signal.SIGKILL)
    child.finish()
    runs, config = child.folder / "runs" / "tiny", child.folder / "tiny.yaml"
    assert_unchanged(before, child.folder / "runs")
    left = list((runs / "version_0").glob(partial))
    assert len(left) == 1 and 0 < left[0].stat().st_size  # half written, under a hidden staging name only

    main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "3"])
    assert f"Restored all states from the checkpoint at {runs / 'version_0' / 'checkpoints' / resumed_from}" in caplog.text
    assert staging(runs) == []  # the killed write's staging folder is gone
    assert_unchanged({k: v for k, v in before.items() if k.startswith("tiny/version_0")}, child.folder / "runs")
    assert load_delta(runs / "version_1" / "deltas" / "last.safetensors").metadata["step"] == "3"


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("checkpoint", OSError(errno.ENOSPC, "No space left on device")),
        ("delta", SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')),
    ],
)
def test_a_full_disk_during_a_write_is_one_line_and_keeps_the_previous_files(
    target, error, tmp_path, tiny_model, monkeypatch, capsys
):
    config = write_config(tmp_path, tiny_model)
    runs, snapshots = tmp_path / "runs", []
    real_torch_save, real_save_file = torch.save, delta_format.save_file

    def fail_half_way(path: str, data: bytes) -> None:
        snapshots.append(digests(runs))
        Path(path).write_bytes(data[: len(data) // 2])
        raise error

    def torch_save(obj, f, *args, **kwargs):
        if target == "checkpoint" and str(f).endswith("last.ckpt") and obj["global_step"] == 2:
            buffer = io.BytesIO()
            real_torch_save(obj, buffer)
            fail_half_way(f, buffer.getvalue())
        return real_torch_save(obj, f, *args, **kwargs)

    def save_file(tensors, filename, metadata=None):
        if target == "delta" and filename.endswith("step=000002.safetensors"):
            fail_half_way(filename, safetensors_bytes(tensors, metadata))
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr("mthlib.deltas.format.save_file", save_file)
    message = fit_error(capsys, "--config", str(config))
    written = runs / "tiny" / "version_0" / ("checkpoints/last.ckpt" if target == "checkpoint" else "deltas/step=000002.safetensors")
    assert message.startswith(f"no space left on device: {written}")
    assert len(snapshots) == 1
    assert_unchanged(snapshots[0], runs)
    assert staging(runs) == []
    assert sorted(digests(runs)) == sorted(snapshots[0])  # nothing new under a final name either


def test_truncated_checkpoint_then_ckpt_path_last_falls_back_with_one_warning(run_copy, capsys, caplog):
    config, runs = run_copy
    checkpoints = runs / "version_0" / "checkpoints"
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # what Lightning's move left on a full disk
    before = digests(runs)

    message = fit_error(capsys, "--config", str(config), "--ckpt_path", str(last))
    assert message.startswith(f"--ckpt_path: {last} is truncated or not a torch checkpoint (")
    message = fit_error(capsys, "--config", str(config), "--ckpt_path", str(checkpoints / "nope.ckpt"))
    assert message == f"--ckpt_path: no checkpoint file {checkpoints / 'nope.ckpt'}"
    assert not (runs / "version_1").exists()

    capsys.readouterr()
    main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "3"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mth: warning:")]
    assert warnings == [
        f"mth: warning: --ckpt_path last: resuming from {checkpoints / 'epoch=0-step=2.ckpt'}, the newest intact "
        f"checkpoint; skipped 1 newer: {last} is truncated or not a torch checkpoint (PytorchStreamReader failed "
        "reading zip archive: failed finding central directory)"
    ]
    assert f"Restored all states from the checkpoint at {checkpoints / 'epoch=0-step=2.ckpt'}" in caplog.text
    assert_unchanged(before, runs)
    assert load_delta(runs / "version_1" / "deltas" / "last.safetensors").metadata["step"] == "3"

    for path in (runs / "version_1" / "checkpoints").glob("*.ckpt"):
        path.write_bytes(b"")
    (checkpoints / "epoch=0-step=2.ckpt").write_bytes(b"")
    message = fit_error(capsys, "--config", str(config), "--ckpt_path", "last")
    assert message.startswith(f"--ckpt_path last: no checkpoint under {runs} loads; the newest: ")


def test_resuming_an_older_run_keeps_its_deltas_and_continues_the_series_with_the_umask(tmp_path, tiny_model):
    config, runs = write_config(tmp_path, tiny_model), tmp_path / "runs" / "tiny"
    main(["fit", "--config", str(config)])  # in place: the checkpoint records where its deltas are
    before = digests(runs)
    assert sorted(p.name for p in (runs / "version_0" / "deltas").iterdir()) == [
        "last.safetensors", "step=000002.safetensors"
    ]
    old_umask = os.umask(0o027)
    try:
        main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "4"])
    finally:
        os.umask(old_umask)
    assert_unchanged(before, runs)  # keep_last=1 prunes only what this run wrote
    deltas = runs / "version_1" / "deltas"
    assert sorted(p.name for p in deltas.iterdir()) == ["last.safetensors", "step=000004.safetensors"]
    assert load_delta(deltas / "last.safetensors").metadata["step"] == "4"
    written = [*deltas.iterdir(), *(runs / "version_1" / "checkpoints").iterdir()]
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o640"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.mask.init_args.sparsity", "0.8"], "model.mask.init_args.sparsity is 0.8 here but 0.9 in the checkpoint"),
        (["--model.mask.init_args.seed", "2"], "model.mask.init_args.seed is 2 here but 1 in the checkpoint"),
        (["--model.mask.init_args.include_biases", "true"],
         "model.mask.init_args.include_biases is true here but false in the checkpoint"),
        (["--model.mask", "magnitude"], "model.mask is magnitude here but random in the checkpoint"),
        (["--model.mask", "null"], "model.mask is null here but random in the checkpoint"),
        ("other base", "model.model_name_or_path is {other} (base fingerprint "),
    ],
)
def test_resume_with_another_mask_or_base_is_one_line_naming_the_setting(override, message, run_copy, tmp_path, capsys):
    config, runs = run_copy
    if override == "other base":
        override = ["--model.model_name_or_path", save_tiny_chat_lm(tmp_path / "other", seed=4)]
        message = message.format(other=override[1])
    before = digests(runs)
    error = fit_error(capsys, "--config", str(config), "--ckpt_path", "last", *override)
    assert error.startswith(f"resume: {message}")
    assert_unchanged(before, runs)
    assert not (runs / "version_1").exists()  # refused before the run folder is created


def test_a_dense_checkpoint_resumed_with_a_mask_is_one_line(run_copy, capsys):
    config, runs = run_copy
    last = runs / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    del checkpoint["mthlib"]["trained_values"]  # what a dense run saves: no trained entries, no mask state
    checkpoint["callbacks"] = {k: v for k, v in checkpoint["callbacks"].items() if not k.startswith("MaskCallback")}
    checkpoint["hyper_parameters"]["mask"] = None
    dense = runs / "dense.ckpt"
    torch.save(checkpoint, dense)
    error = fit_error(capsys, "--config", str(config), "--ckpt_path", str(dense))
    assert error == "resume: model.mask is random here but null in the checkpoint"
    assert not (runs / "version_1").exists()


def test_mask_callback_names_the_first_differing_argument_or_a_checkpoint_without_a_mask():
    callback = MaskCallback(build_mask("random", sparsity=0.9, seed=1))
    fitting = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    with pytest.raises(ValueError, match=r"^resume: model\.mask is random here but null in the checkpoint \(trained "
                                         r"without a mask\)$"):
        callback.on_load_checkpoint(fitting, None, {"callbacks": {"SparseDeltaCheckpoint": {}}})
    saved = build_mask("random", sparsity=0.9, seed=1).config()
    saved["init_args"]["exclude"] = ["lm_head"]
    del saved["init_args"]["seed"]
    with pytest.raises(ValueError, match=r'^resume: model\.mask\.init_args\.exclude is null here but \["lm_head"\] in '
                                         r"the checkpoint$"):
        callback.load_state_dict({"strategy": json.dumps(saved)})
    saved["init_args"]["exclude"] = None
    with pytest.raises(ValueError, match=r"^resume: model\.mask\.init_args\.seed is 1 here but <not set> in the "
                                         r"checkpoint$"):
        callback.load_state_dict({"strategy": json.dumps(saved)})


def test_weights_only_false_is_refused(run_copy, tmp_path, capsys):
    config, runs = run_copy
    last = runs / "version_0" / "checkpoints" / "last.ckpt"
    error = fit_error(capsys, "--config", str(config), "--ckpt_path", str(last), "--weights_only", "false")
    assert error.startswith("--weights_only false is refused: weights_only=False would let a checkpoint")
    with pytest.raises(ValueError, match="mthlib loads checkpoints with weights_only=True only"):
        AtomicCheckpointIO().load_checkpoint(last, weights_only=False)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "anything": Namespace(code="runs at load")}, pickled)
    error = fit_error(capsys, "--config", str(config), "--ckpt_path", str(pickled))
    assert error.startswith(f"--ckpt_path: {pickled} holds objects only pickle can load;")
    assert not (runs / "version_1").exists()


def test_a_read_only_output_folder_is_one_line_and_changes_nothing(children):
    if "read_only" not in children:
        pytest.skip("running as root without setpriv: a read-only folder cannot be enforced")
    child = children["read_only"]
    runs = child.folder / "runs"
    output = child.finish()
    assert child.process.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert output.strip().splitlines()[-1].startswith(f"mth fit: error: permission denied: {runs}")
    assert digests(runs) == {"tiny/version_0/metrics.csv": hashlib.sha256(b"step,reward\n0,0.5\n").hexdigest()}


def trainer_fit(model: str, root: Path, steps: int, ckpt_path: Path | None = None, callbacks=(),
                accelerator: str = "cpu") -> GRPOModule:
    """A masked fit without a logger: deltas in ``root/deltas``, checkpoints of every step in ``root/ckpt``."""
    pl.seed_everything(0)
    module = GRPOModule(model_name_or_path=model, mask=build_mask("random", sparsity=0.9, seed=1), learning_rate=1e-2,
                        num_generations=2, max_completion_length=4, delta_every_n_steps=1, delta_keep_last=5)
    trainer = pl.Trainer(max_steps=steps, default_root_dir=root, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator=accelerator, devices=1,
                         plugins=[AtomicCheckpointIO()],
                         callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True),
                                    *callbacks])
    trainer.fit(module, datamodule=PromptDataModule(env=LetterA("abcdef"), batch_size=1, eval_size=2),
                ckpt_path=ckpt_path)
    return module


class StopAtStart(pl.Callback):
    """Stop a fit before its first step (as a guard that gives up at once would)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


def test_a_folder_with_later_deltas_of_another_run_is_refused_and_a_finished_resume_writes_nothing(
    tiny_model, tmp_path
):
    trainer_fit(tiny_model, tmp_path, 2)
    deltas, last = tmp_path / "deltas", tmp_path / "ckpt" / "last.ckpt"
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in deltas.iterdir()}
    trainer_fit(tiny_model, tmp_path, 4, ckpt_path=last, callbacks=[StopAtStart()])  # trains nothing, writes nothing
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in deltas.iterdir()} == stats

    (deltas / "step=000009.safetensors").write_bytes(b"another run's delta")
    before = digests(tmp_path / "deltas")
    with pytest.raises(ValueError, match=r"deltas already holds step=000009\.safetensors from another run, later "
                                         r"than this run's start \(step 2\)"):
        trainer_fit(tiny_model, tmp_path, 4, ckpt_path=last)
    assert digests(deltas) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the CUDA generator is saved only there")
def test_resume_on_a_gpu_is_bitwise_identical_to_an_uninterrupted_run(tiny_model, tmp_path):
    straight = trainer_fit(tiny_model, tmp_path / "a", 3, accelerator="gpu")
    straight_rng = torch.cuda.get_rng_state()
    trainer_fit(tiny_model, tmp_path / "b", 2, accelerator="gpu")
    resumed = trainer_fit(tiny_model, tmp_path / "b", 3, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt",
                          accelerator="gpu")
    assert torch.equal(torch.cuda.get_rng_state(), straight_rng)
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_atomic_writes_follow_the_umask_and_leave_the_previous_file_on_failure(tmp_path):
    old_umask = os.umask(0o027)
    try:
        from safetensors.torch import save_file

        with atomic_path(tmp_path / "a.safetensors") as tmp:
            save_file({"x": torch.ones(2)}, str(tmp))  # safetensors itself makes 0600 files
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "file").write_text("x")
        AtomicCheckpointIO().save_checkpoint({"x": torch.ones(2)}, tmp_path / "sub" / "c.ckpt")
    finally:
        os.umask(old_umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [*tmp_path.rglob("*")]}
    assert modes == {"a.safetensors": "0o640", "folder": "0o750", "file": "0o640", "sub": "0o750", "c.ckpt": "0o640"}

    before = digests(tmp_path)
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match=rf"No space left on device: '{tmp_path / 'sub' / 'c.ckpt'}'") as raised:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "save", lambda obj, f: (Path(f).write_bytes(b"half"), _raise(full)))
            AtomicCheckpointIO().save_checkpoint({"x": torch.zeros(2)}, tmp_path / "sub" / "c.ckpt")
    assert raised.value.errno == errno.ENOSPC
    assert digests(tmp_path) == before and staging(tmp_path) == []


def _raise(error: Exception) -> None:
    raise error


def test_stale_staging_folders_are_removed_only_when_their_process_is_gone(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".x.safetensors.{dead.pid}-0123abcd.tmp"
    live = tmp_path / f".x.safetensors.{os.getpid()}-0123abcd.tmp"
    lookalike = tmp_path / f".notes.{dead.pid}-0123abcd.tmp"
    for folder in (stale, live):
        folder.mkdir()
        (folder / ".tmpXYZ123").write_bytes(b"a writer's own temp")
    lookalike.write_text("a file, not a staging folder")
    swapped = tmp_path / f".model.{dead.pid}-0123abcd.old" / "model"  # killed between atomic_dir's two renames
    swapped.mkdir(parents=True)
    (swapped / "config.json").write_text("the previous model")
    with atomic_path(tmp_path / "y.txt") as tmp:
        tmp.write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, lookalike.name, "model", "y.txt"])
    assert (tmp_path / "model" / "config.json").read_text() == "the previous model"
    assert remove_stale_temps(tmp_path) == []
