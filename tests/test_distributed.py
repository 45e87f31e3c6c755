"""Data-parallel training on CPU (two gloo processes launched by Lightning through `mth fit`).

Each run writes one snapshot per rank (:class:`tests.distributed_probe.RankSnapshot`): every
weight, every mask's indices and the prompts the rank trained on.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mthlib.data import EpisodeStream, PromptDataModule
from mthlib.envs import AlphabetSort
from mthlib.masking import Masks
from mthlib.models import load_model
from mthlib.registry.fisher import Fisher
from mthlib.registry.rigl import RigL
from tests.conftest import save_tiny_chat_lm

ROOT = Path(__file__).parents[1]

CONFIG = """
trainer:
  max_steps: 3
  accelerator: cpu
  devices: 2
  strategy: {strategy}
  val_check_interval: 3
  limit_val_batches: 1
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {runs}, name: tiny}}
  callbacks:
    - class_path: tests.distributed_probe.RankSnapshot
      init_args: {{out: {snapshots}}}
checkpoint:
  every_n_train_steps: 2
model:
  model_name_or_path: {model}
  mask: {mask}
  learning_rate: 0.01
  weight_decay: 0.1
  max_grad_norm: 0.5
  micro_batch_size: 1
  num_generations: 2
  max_completion_length: 4
  temperature: 1.0
  verify_every: 1
  delta_every_n_steps: 2
data:
  env:
    class_path: mthlib.envs.AlphabetSort
    init_args: {{max_turns: 1}}
  batch_size: 2
  eval_size: 4
  eval_batch_size: 2
"""

FISHER = "{class_path: fisher, init_args: {sparsity: 0.9, num_samples: 32}}"
RIGL = "{class_path: rigl, init_args: {sparsity: 0.9, update_every: 2, drop_fraction: 0.5, total_steps: 3, num_samples: 16}}"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_chat_lm(tmp_path_factory.mktemp("ddp") / "tiny", seed=3)


def fit_two_ranks(tmp_path: Path, model: str, strategy: str, mask: str = "null") -> subprocess.CompletedProcess:
    config = tmp_path / "ddp.yaml"
    config.write_text(CONFIG.format(
        strategy=strategy, runs=tmp_path / "runs", snapshots=tmp_path / "snapshots", model=model, mask=mask,
    ))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)
    return subprocess.run(
        [sys.executable, "-m", "mthlib.cli", "fit", "--config", str(config)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )


def snapshots(tmp_path: Path) -> list[tuple[dict[str, torch.Tensor], list[str]]]:
    out = []
    for rank in (0, 1):
        path = tmp_path / "snapshots" / f"rank{rank}.safetensors"
        with safe_open(str(path), "pt") as handle:
            prompts = json.loads(handle.metadata()["prompts"])
        out.append((load_file(str(path)), prompts))
    return out


def weights(snapshot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.split("/", 1)[1]: v for k, v in snapshot.items() if k.startswith("weight/")}


def masks(snapshot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.split("/", 1)[1]: v for k, v in snapshot.items() if k.startswith("mask/")}


def assert_ranks_identical(tmp_path: Path) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    (first, prompts0), (second, prompts1) = snapshots(tmp_path)
    assert set(first) == set(second)
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"ranks differ in {different[:3]}"
    assert len(prompts0) == len(prompts1) == 6 and not set(prompts0) & set(prompts1)  # each rank its own prompts
    return first, prompts0, prompts1


def test_stream_shards_are_disjoint_and_interleave_the_single_process_stream():
    env = AlphabetSort(max_turns=1)
    single = EpisodeStream(env, seed=5)
    expected = [ep.user_turns[0] for ep, _ in zip(single, range(6))]
    shards = []
    for rank in (0, 1):
        stream = EpisodeStream(env, seed=5)
        stream.shard(rank, 2)
        shards.append([ep.user_turns[0] for ep, _ in zip(stream, range(3))])
    assert shards[0] == expected[0::2] and shards[1] == expected[1::2]
    with pytest.raises(ValueError, match="rank must be in"):
        EpisodeStream(env, seed=5).shard(2, 2)


def assert_frozen_unchanged_and_active_trained(snapshot: dict[str, torch.Tensor], model: str, tmp_path: Path) -> Masks:
    base, _ = load_model(model, "float32")
    trained, chosen = weights(snapshot), masks(snapshot)
    kept = Masks(chosen, {name: tuple(p.shape) for name, p in base.named_parameters() if name in chosen})
    moved = 0
    for name, param in base.named_parameters():
        after, before = trained[name].view(-1), param.detach().view(-1)
        frozen = torch.ones_like(before, dtype=torch.bool)
        if name in chosen:
            frozen[chosen[name]] = False
            moved += int((after[chosen[name]] != before[chosen[name]]).sum())
        assert torch.equal(after[frozen], before[frozen]), f"frozen entries of {name} moved"
    assert moved > 0.9 * kept.total  # the averaged steps did train the active entries
    deltas = sorted(p.name for p in (tmp_path / "runs" / "tiny").glob("version_*/deltas/step=*.safetensors"))
    assert deltas == ["step=000002.safetensors", "step=000003.safetensors"]  # written once, by rank zero
    return kept


def test_fisher_ddp_ranks_agree_and_reduce_calibration_statistics(tiny_model, tmp_path):
    result = fit_two_ranks(tmp_path, tiny_model, "ddp_sparse", FISHER)
    assert result.returncode == 0, result.stderr[-3000:]
    snapshot, _, _ = assert_ranks_identical(tmp_path)
    chosen = assert_frozen_unchanged_and_active_trained(snapshot, tiny_model, tmp_path)
    _, tokenizer = load_model(tiny_model, "float32")
    data = PromptDataModule(env=AlphabetSort(max_turns=1))
    batches = list(data.calibration_batches(tokenizer, num_samples=32, batch_size=8, seed=0))
    strategy = Fisher(sparsity=0.9, num_samples=32)
    everything = strategy.compute(load_model(tiny_model, "float32")[0], batches)
    rank0_only = strategy.compute(load_model(tiny_model, "float32")[0], batches[0::2])
    assert chosen.total == everything.total
    together = chosen.overlap(everything)["jaccard"]
    assert together > 0.98  # the statistics of all four batches (summation order aside)
    assert chosen.overlap(rank0_only)["jaccard"] < together - 0.05  # not one rank's share


def test_rigl_ddp_ranks_agree_after_mask_updates(tiny_model, tmp_path):
    result = fit_two_ranks(tmp_path, tiny_model, "ddp_sparse", RIGL)
    assert result.returncode == 0, result.stderr[-3000:]
    snapshot, _, _ = assert_ranks_identical(tmp_path)
    final = assert_frozen_unchanged_and_active_trained(snapshot, tiny_model, tmp_path)
    initial = RigL(sparsity=0.9, update_every=2, drop_fraction=0.5, total_steps=3).compute(
        load_model(tiny_model, "float32")[0], None
    )
    assert final.total == initial.total and final.overlap(initial)["o1"] < 0.9  # the update at step 2 moved entries


def test_dense_ddp_sparse_matches_pytorch_ddp(tiny_model, tmp_path):
    ours, theirs = tmp_path / "ddp_sparse", tmp_path / "ddp"
    for folder, strategy in ((ours, "ddp_sparse"), (theirs, "ddp")):
        folder.mkdir()
        result = fit_two_ranks(folder, tiny_model, strategy)
        assert result.returncode == 0, result.stderr[-3000:]
    mine, reference = weights(assert_ranks_identical(ours)[0]), weights(assert_ranks_identical(theirs)[0])
    base, _ = load_model(tiny_model, "float32")
    assert all(not torch.equal(mine[n], p.detach()) for n, p in base.named_parameters() if p.dim() == 2)
    for name in reference:
        torch.testing.assert_close(mine[name], reference[name], rtol=1e-5, atol=1e-6)
    assert any((folder / "runs" / "tiny").glob("version_*/model/config.json") for folder in (ours, theirs))


def test_masked_run_under_pytorch_ddp_is_one_error_line(tiny_model, tmp_path):
    result = fit_two_ranks(tmp_path, tiny_model, "ddp", FISHER)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "mth fit: error: a masked run cannot use DDPStrategy: DistributedDataParallel all-reduces dense gradients "
        "that SparseAdamW frees; use strategy 'ddp_sparse' (mthlib.distributed.SparseDDPStrategy)"
    )


@pytest.mark.parametrize("strategy", ["fsdp", "model_parallel"])
def test_sharding_strategies_are_refused_for_a_masked_run_in_one_line(strategy):
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    from mthlib.distributed import SparseDDPStrategy, check_masked_strategy

    made = {"fsdp": FSDPStrategy, "model_parallel": ModelParallelStrategy}[strategy]()
    with pytest.raises(ValueError, match=(
            rf"^a masked run cannot use {type(made).__name__}: masks, base values and SparseAdamW state are kept per "
            r"whole parameter, not per shard; use one device or strategy 'ddp_sparse' \(data parallel, every rank "
            r"holds the model\)$")):
        check_masked_strategy(made)
    check_masked_strategy(SparseDDPStrategy())
    check_masked_strategy(SingleDeviceStrategy(device=torch.device("cpu")))
