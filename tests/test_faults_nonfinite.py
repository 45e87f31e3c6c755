"""Fault injection, non-finite values: a NaN reward, an Inf gradient, a learning rate of 1e3, a NaN delta.

Each training case is a real short fit of the tiny model. A bad step is skipped (weights and
optimizer state bitwise unchanged) and counted; a run of them stops the fit with one line
naming the first bad quantity and its step; every file written before the fault is
byte-identical afterwards, and no file written holds a NaN or Inf.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file, save_file

from mthlib.cli import main
from mthlib.data import PromptDataModule
from mthlib.deltas import build_delta, content_fingerprint, load_delta, save_delta, write_delta
from mthlib.export import export_model
from mthlib.grpo import GRPOModule
from mthlib.grpo.guard import NonFiniteError
from mthlib.masking import build_mask
from tests.conftest import make_tiny_lm, save_tiny_chat_lm
from tests.grpo.toy import LetterA

NAN, INF = float("nan"), float("inf")
ROOT = Path(__file__).parents[1]


class FaultyReward(LetterA):
    """:class:`LetterA` whose first reward in each of the training steps ``bad_steps`` is ``value``.

    Args:
        bad_steps: Steps (from 1) with a bad reward.
        per_step: ``score`` calls per step (prompts x ``num_generations``).
        value: The bad reward.
    """

    def __init__(self, bad_steps: list[int], per_step: int, value: float = NAN) -> None:
        super().__init__("abcdefghijklm")
        self.bad_steps, self.per_step, self.value = set(bad_steps), per_step, value
        self.calls = 0

    def score(self, episode, replies):
        result = super().score(episode, replies)
        step, position = divmod(self.calls, self.per_step)
        self.calls += 1
        return {**result, "reward": self.value} if step + 1 in self.bad_steps and position == 0 else result


class FileSnapshot(pl.Callback):
    """Write ``{file: sha256}`` of the run folder to ``out`` just before step ``before_step`` (from 1)."""

    def __init__(self, before_step: int, out: str) -> None:
        self.before_step, self.out = before_step, out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.before_step:
            Path(self.out).write_text(json.dumps(digests(Path(trainer.log_dir))))


class StepRecorder(pl.Callback):
    """The trained values and the optimizer state before and after every training step."""

    def __init__(self) -> None:
        self.before: list[tuple[dict, dict]] = []
        self.after: list[tuple[dict, dict]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append(training_state(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after.append(training_state(trainer, pl_module))

    def unchanged(self, step: int) -> bool:
        """Whether step ``step`` (from 1) left every trained value and the optimizer state bitwise as they were."""
        return same(self.before[step - 1], self.after[step - 1])


class InfGradient(pl.Callback):
    """Make the gradient of the first trained parameter +Inf during the training steps ``steps`` (from 1)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 in self.steps:
            state = pl_module.sparse_state
            name = next(iter(state.masks)) if state is not None else next(iter(dict(pl_module.model.named_parameters())))
            self.handle = dict(pl_module.model.named_parameters())[name].register_hook(infinite)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def infinite(grad: torch.Tensor) -> torch.Tensor:
    if grad.is_sparse:
        return torch.sparse_coo_tensor(grad._indices(), torch.full_like(grad._values(), INF), grad.shape).coalesce()
    return torch.full_like(grad, INF)


def training_state(trainer: pl.Trainer, module: GRPOModule) -> tuple[dict, dict]:
    if module.sparse_state is not None:
        weights = module.sparse_state.trained_values()
    else:
        weights = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    return weights, copy.deepcopy(trainer.optimizers[0].state_dict()["state"])


def same(a, b) -> bool:
    """Nested dicts, tuples and lists of tensors and numbers, bitwise equal."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_in(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    return []


def assert_nothing_non_finite(folder: Path) -> int:
    """Every tensor of every checkpoint and delta, and every metric, is finite; returns the tensor files read."""
    read = 0
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".safetensors":
            tensors = list(load_file(path).values())
        elif path.suffix == ".ckpt":
            checkpoint = torch.load(path, weights_only=True)
            callbacks = {k: v for k, v in checkpoint.pop("callbacks").items() if not k.startswith("ModelCheckpoint")}
            tensors = tensors_in(checkpoint) + tensors_in(callbacks)  # ModelCheckpoint's kth_value is inf by design
        elif path.name == "metrics.csv":
            cells = [cell.lower() for row in csv.reader(path.open()) for cell in row]
            assert not {"nan", "inf", "-inf"} & set(cells), path
            continue
        else:
            continue
        read += 1
        assert all(bool(t.isfinite().all()) for t in tensors if t.is_floating_point()), path
    return read


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_chat_lm(tmp_path_factory.mktemp("model") / "tiny", seed=3)


def fit(model_dir, root: Path, steps: int, env, masked: bool, callbacks=(), **options) -> GRPOModule:
    """A short fit of the tiny model (2 prompts x 4 completions a step) with CSV metrics in ``root/run/version_0``."""
    pl.seed_everything(0)
    module = GRPOModule(
        model_name_or_path=model_dir, mask=build_mask("random", sparsity=0.5) if masked else None,
        **{"num_generations": 4, "max_completion_length": 4, "micro_batch_size": 8, "learning_rate": 1e-2, **options},
    )
    data = PromptDataModule(env=env, batch_size=2, eval_size=2, eval_batch_size=2)
    trainer = pl.Trainer(
        max_steps=steps, logger=CSVLogger(root, name="run"), callbacks=list(callbacks), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root, log_every_n_steps=1,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    trainer.fit(module, datamodule=data)
    return module


def metric_rows(root: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((root / "run" / "version_0" / "metrics.csv").open()))


@pytest.mark.parametrize(
    ("options", "message"),
    [({"max_bad_steps": 0}, "max_bad_steps must be >= 1"), ({"divergence_factor": 0.5}, "divergence_factor must be > 1")],
)
def test_the_guard_options_of_the_module_are_checked_before_the_model_loads(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        GRPOModule(model_name_or_path=str(tmp_path / "no-such-model"), **options)


# -- NaN reward -----------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_a_nan_reward_skips_its_step_bitwise_and_training_goes_on(tiny_model_dir, tmp_path, masked):
    recorder = StepRecorder()
    module = fit(tiny_model_dir, tmp_path, 4, FaultyReward([2], per_step=8), masked, [recorder])
    assert module.trainer.global_step == 4 and module.guard.skipped_steps == 1
    assert recorder.unchanged(2)  # the bad step: no weight, no moment, no step counter changed
    assert not recorder.unchanged(1) and not recorder.unchanged(3)  # the steps around it train
    assert same(recorder.after[1], recorder.before[2])
    rows = [row for row in metric_rows(tmp_path) if row["guard/skipped_steps"]]
    assert [row["guard/skipped_steps"] for row in rows] == ["0.0", "1.0", "1.0", "1.0"]
    assert rows[1]["reward"] in ("", rows[0]["reward"])  # no new value (Lightning repeats the last one logged)
    assert rows[2]["reward"] not in ("", rows[1]["reward"])
    assert assert_nothing_non_finite(tmp_path) == (2 if masked else 1)  # the final delta and last, or the model


def test_consecutive_nan_rewards_stop_mth_fit_in_one_line_and_keep_every_file(tiny_model_dir, tmp_path):
    config = tmp_path / "nan.yaml"
    snapshot = tmp_path / "before_fault.json"
    config.write_text(f"""
trainer:
  max_steps: 8
  limit_val_batches: 0
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {tmp_path / "runs"}, name: tiny}}
  callbacks:
    - class_path: tests.test_faults_nonfinite.FileSnapshot
      init_args: {{before_step: 3, out: {snapshot}}}
checkpoint:
  every_n_train_steps: 2
model:
  model_name_or_path: {tiny_model_dir}
  mask: {{class_path: random, init_args: {{sparsity: 0.5}}}}
  num_generations: 2
  max_completion_length: 4
  learning_rate: 0.01
  delta_every_n_steps: 2
  max_bad_steps: 2
data:
  env:
    class_path: tests.test_faults_nonfinite.FaultyReward
    init_args: {{bad_steps: [3, 4, 5, 6, 7, 8], per_step: 2}}
  batch_size: 1
""")
    run = subprocess.run([sys.executable, "-m", "mthlib.cli", "fit", "--config", str(config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        "mth fit: error: reward is NaN at step 3 (2 consecutive non-finite steps; model.max_bad_steps is 2): "
        "the environment's score returned a non-finite reward."
    )
    folder = tmp_path / "runs" / "tiny" / "version_0"
    before, after = json.loads(snapshot.read_text()), digests(folder)
    assert {"checkpoints/last.ckpt", "checkpoints/epoch=0-step=2.ckpt", "deltas/step=000002.safetensors",
            "deltas/last.safetensors"} <= set(before)
    assert {name: after.get(name) for name in before if name != "metrics.csv"} == {
        name: digest for name, digest in before.items() if name != "metrics.csv"}  # byte-identical
    assert set(after) == set(before)  # nothing written after the fault (no new checkpoint, delta or temp file)
    assert assert_nothing_non_finite(folder) == 4
    rows = [row for row in csv.DictReader((folder / "metrics.csv").open()) if row["guard/skipped_steps"]]
    assert [row["guard/skipped_steps"] for row in rows] == ["0.0", "0.0", "1.0"]  # the stop comes in step 4


# -- Inf gradient ---------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_an_inf_gradient_is_skipped_and_a_run_of_them_stops_naming_the_gradient(tiny_model_dir, tmp_path, masked):
    recorder = StepRecorder()
    module = fit(tiny_model_dir, tmp_path / "once", 3, LetterA("abcdefghijklm"), masked, [recorder, InfGradient({2})])
    assert module.guard.skipped_steps == 1 and recorder.unchanged(2) and not recorder.unchanged(3)
    recorder = StepRecorder()
    with pytest.raises(NonFiniteError, match=r"^gradient norm is Inf at step 2 \(3 consecutive non-finite steps; "
                                             r"model.max_bad_steps is 3\): lower model.learning_rate"):
        fit(tiny_model_dir, tmp_path / "stop", 6, LetterA("abcdefghijklm"), masked, [recorder, InfGradient({2, 3, 4})])
    assert len(recorder.after) == 3 and recorder.unchanged(2) and recorder.unchanged(3)
    assert same(recorder.after[0], recorder.before[3])  # the model ends as step 1 left it


# -- learning rate 1e3 ----------------------------------------------------------------------
def test_a_learning_rate_of_1e3_stops_a_dense_run_before_anything_non_finite_is_written(tiny_model_dir, tmp_path):
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True)
    recorder = StepRecorder()
    with pytest.raises(NonFiniteError) as raised:
        # unpacked rows: on this seed their blown-up gradients turn NaN
        fit(tiny_model_dir, tmp_path, 8, LetterA(), False, [recorder, every_step], learning_rate=1e3,
            num_generations=4, max_completion_length=8, micro_batch_size=16, beta=0.1, pack_prefixes=False)
    found = re.match(r"gradient norm is NaN at step (\d+) \(3 consecutive non-finite steps", str(raised.value))
    assert found, raised.value
    first_bad = int(found.group(1))
    assert len(recorder.after) == first_bad + 1  # three bad steps in a row: the third stops inside its step
    assert recorder.unchanged(first_bad) and recorder.unchanged(first_bad + 1)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(
        [f"epoch=0-step={step}.ckpt" for step in range(1, first_bad + 2)] + ["last.ckpt"])
    snapshot = torch.load(tmp_path / "ckpt" / f"epoch=0-step={first_bad - 1}.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(snapshot["model." + name], value) for name, value in recorder.after[-1][0].items())
    assert assert_nothing_non_finite(tmp_path) == first_bad + 2


def test_a_learning_rate_of_2e3_on_a_mask_warns_of_the_kl_jump_and_writes_only_finite_deltas(
    tiny_model_dir, tmp_path, caplog
):
    # unpacked rows: on this seed their blown-up gradients turn NaN in 4 of the 8 steps, never 8 in a row
    module = fit(tiny_model_dir, tmp_path, 8, LetterA(), True, learning_rate=2e3, num_generations=4,
                 max_completion_length=8, micro_batch_size=16, beta=0.1, delta_every_n_steps=1, delta_keep_last=8,
                 pack_prefixes=False, max_bad_steps=8)
    warned = [r.getMessage() for r in caplog.records if r.name == "mthlib.grpo.guard"]
    assert len(warned) == 1 and warned[0].startswith("warning: kl jumped to ")
    assert module.guard.skipped_steps >= 1  # the blown-up model's gradients became NaN: those steps were skipped
    assert all(bool(p.isfinite().all()) for p in module.model.parameters())
    assert assert_nothing_non_finite(tmp_path) == 9  # step=1..8 and last


# -- deltas and export ----------------------------------------------------------------------
def delta_parts(model: torch.nn.Module) -> tuple[dict, dict, dict, dict]:
    """Indices, values and shapes of two entries of every parameter, and the metadata arguments."""
    params = dict(model.named_parameters())
    indices = {name: torch.tensor([0, 3]) for name in params}
    values = {name: p.detach().reshape(-1)[[0, 3]].clone() for name, p in params.items()}
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    meta = {"base_model": "tiny", "base_fingerprint": "0" * 64, "strategy": None, "sparsity": 0.9, "step": 5}
    return indices, values, shapes, meta


def test_save_delta_refuses_a_non_finite_value_and_leaves_the_previous_file(tmp_path):
    model = make_tiny_lm()
    indices, _, _, meta = delta_parts(model)
    path = tmp_path / "delta.safetensors"
    save_delta(path, model, indices, **meta)
    written = path.read_bytes()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.view(-1)[3] = NAN
    with pytest.raises(ValueError, match=r"^cannot save delta .*delta\.safetensors: model\.layers\.1\.mlp\.up_proj\."
                                         r"weight\.values holds 1 non-finite value\(s\) \(NaN or Inf\)") as raised:
        save_delta(path, model, indices, **meta)
    assert "\n" not in str(raised.value)
    assert path.read_bytes() == written and sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors"]


def test_build_and_write_delta_refuse_inf(tmp_path):
    indices, values, shapes, meta = delta_parts(make_tiny_lm())
    name = "model.norm.weight"
    values[name][1] = -INF
    with pytest.raises(ValueError, match=f"^{name}.values holds 1 non-finite value"):
        build_delta(indices, values, shapes, **meta)
    finite = {**values, name: torch.ones(2)}
    delta = build_delta(indices, finite, shapes, **meta)
    delta.values[name][0] = INF  # altered after it was built
    with pytest.raises(ValueError, match=f"^{name}.values holds 1 non-finite value"):
        write_delta(delta, tmp_path / "d.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def nan_delta_file(tmp_path) -> Path:
    """A delta file that is valid in every way (checksum included) except one NaN value."""
    indices, values, shapes, meta = delta_parts(make_tiny_lm())
    delta = build_delta(indices, values, shapes, **meta)
    name = "model.embed_tokens.weight"
    delta.values[name][1] = NAN
    metadata = {**delta.metadata, "content_sha256": content_fingerprint(delta.indices, delta.values)}
    tensors = {f"{n}.{kind}": getattr(delta, kind)[n] for n in delta.indices for kind in ("indices", "values")}
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_load_delta_refuses_a_nan_value(nan_delta_file):
    with pytest.raises(ValueError, match=r"^not a valid mthlib sparse delta: .*nan\.safetensors: model\.embed_tokens"
                                         r"\.weight\.values holds 1 non-finite value"):
        load_delta(nan_delta_file)


def test_mth_export_refuses_a_nan_delta_in_one_line_and_writes_nothing(nan_delta_file, tmp_path, capsys):
    out = tmp_path / "exported"
    with pytest.raises(SystemExit) as exited:
        main(["export", "--delta", str(nan_delta_file), "--out", str(out), "--format", "delta"])
    code = exited.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err.strip()
    assert code != 0
    assert message.startswith("mth export: error: not a valid mthlib sparse delta: ") and "\n" not in message
    assert "model.embed_tokens.weight.values holds 1 non-finite value" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]


def test_export_model_refuses_a_non_finite_delta_built_in_memory_before_loading_the_base(tmp_path):
    indices, values, shapes, meta = delta_parts(make_tiny_lm())
    delta = build_delta(indices, values, shapes, **meta)
    delta.values["model.norm.weight"][0] = NAN
    with pytest.raises(ValueError, match="^model.norm.weight.values holds 1 non-finite value"):
        export_model(delta, tmp_path / "out", base=str(tmp_path / "no-such-base"))
    assert list(tmp_path.iterdir()) == []
