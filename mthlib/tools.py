"""The non-training ``mth`` subcommands as typed functions: ``masks``, ``analyze``, ``export``.

jsonargparse builds each subcommand's arguments and ``--help`` from these signatures
and docstrings (see :mod:`mthlib.cli`).
"""

from __future__ import annotations

import json
from typing import Literal

from mthlib.analysis import commands as analyze_commands
from mthlib.analysis.plot_run import plot_run
from mthlib.analysis.sweep_report import report


def masks_list() -> None:
    """List every registered mask strategy with its one-line summary."""
    from mthlib.masking import available_masks

    strategies = available_masks()
    width = max(len(name) for name in strategies)
    for name, cls in sorted(strategies.items()):
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:<{width}}  {summary}")


def masks_build(config: list[str] | str, out: str) -> None:
    """Compute the mask a fit config would train, without training, and save it.

    The mask is the one ``mth fit --config CONFIG`` trains, bitwise: both reach it through
    :func:`~mthlib.masking.compute_masks` with the config's strategy, data module and
    ``model.calibration_batch_size``. The file records the strategy config and the base
    model's fingerprint, and is a valid mask for a run (the ``file`` strategy).

    Args:
        config: An ``mth fit`` YAML config, e.g. ``configs/fisher99.yaml``. Several are
            layered as ``mth fit`` layers them (later files win), given either as repeated
            options, ``--config configs/random99.yaml --config seed.yaml``, or as one list,
            ``--config '[configs/random99.yaml, seed.yaml]'``.
        out: The ``.safetensors`` file to write (atomically).
    """
    files = [config] if isinstance(config, str) else config
    write_config_mask([word for path in files for word in ("--config", path)], out)


def write_config_mask(fit_args: list[str], out: str) -> None:
    """Compute the mask the ``mth fit`` arguments ``fit_args`` (without ``fit``) would train and save it to ``out``.

    The one path to a mask file from a config: ``mth masks build`` and ``mth sweep`` use it.
    """
    from mthlib.cli import MthCLI
    from mthlib.masking import compute_masks

    cli = MthCLI(args=fit_args, run=False)
    module, strategy = cli.model, cli.model.mask_strategy
    if strategy is None:
        raise ValueError("the config sets no mask (model.mask); nothing to build")
    masks = compute_masks(strategy, module.model, cli.datamodule, module.tokenizer, module.hparams.calibration_batch_size)
    masks.save(out, metadata={
        "strategy": json.dumps(strategy.config()),
        "base_model": str(module.hparams.model_name_or_path),
        "base_fingerprint": module.base_fingerprint,
    })
    print(f"{strategy.name}: {masks.total:,} trainable entries of {masks.numel:,} "
          f"(density {masks.density:.4%}) in {len(masks)} tensors -> {out}")


def masks_shuffle(mask: str, seed: int, out: str) -> None:
    """Move a saved mask's active entries to random positions, keeping every tensor's count.

    The lottery-ticket sanity check: the result trains as many entries of each tensor as
    ``mask`` at positions drawn uniformly at random (:meth:`~mthlib.masking.Masks.shuffled`),
    so a run from it shows what the layer-wise counts alone give, without the positions the
    strategy chose. The file records that it is a shuffle (``derived: shuffle``), the
    source's SHA-256 and path, the seed, and the source's strategy, base model and base
    fingerprint, so the ``file`` strategy trains it on the same base.

    Args:
        mask: A mask file (``mth masks build``, ``mth masks shuffle``) or a sparse delta (its stored entries).
        seed: Seed of the torch.Generator that draws the new positions.
        out: The ``.safetensors`` mask file to write (atomically).
    """
    from mthlib.fingerprint import file_sha256
    from mthlib.masking import Masks

    source = Masks.load(mask)
    shuffled = source.shuffled(seed)
    kept = {key: source.metadata[key] for key in ("base_model", "base_fingerprint") if key in source.metadata}
    if "strategy" in source.metadata:
        kept["source_strategy"] = source.metadata["strategy"]
    shuffled.save(out, metadata={
        "derived": "shuffle", "source": str(mask), "source_sha256": file_sha256(mask), "seed": str(seed), **kept,
    })
    print(f"shuffled {shuffled.total:,} trainable entries of {shuffled.numel:,} in {len(shuffled)} tensors "
          f"(seed {seed}) -> {out}")


def export(
    delta: list[str] | str,
    out: str,
    base: str | None = None,
    format: Literal["hf", "delta", "peft"] = "hf",
    on_overlap: Literal["error", "last", "mean"] = "error",
    overwrite: bool = False,
) -> None:
    """Turn sparse deltas into a Hugging Face model folder (or a delta with its model card, or a PEFT adapter).

    Args:
        delta: One or more sparse delta files; several are merged (tickets trained on
            different tasks), and overlapping indices are an error unless ``on_overlap`` says how to merge.
        out: Output folder (written to a temporary folder, then renamed).
        base: Base model name or path (default: the base recorded in the delta).
        format: ``hf`` writes safetensors weights, config and tokenizer; ``delta`` the delta and a model card;
            ``peft`` a SHiRA adapter for ``peft.PeftModel.from_pretrained`` (nn.Linear weights only; needs peft).
        on_overlap: ``error``, ``last`` (later delta wins) or ``mean``.
        overwrite: Replace an existing output folder.
    """
    from mthlib.deltas import load_delta, merge_deltas
    from mthlib.export import export_model

    deltas = [load_delta(path) for path in ([delta] if isinstance(delta, str) else delta)]
    merged = deltas[0] if len(deltas) == 1 else merge_deltas(deltas, on_overlap=on_overlap)
    folder = export_model(merged, out, base=base, format=format, overwrite=overwrite)
    print(f"wrote {folder}")


def tickets(
    config: list[str] | str,
    out: str,
    target_sparsity: float,
    steps_per_round: int | None = None,
    rounds: int = 5,
    prune_fraction: float | None = None,
    criterion: Literal["diff", "magnitude"] = "diff",
    rewind_step: int = 0,
    early_bird_threshold: float | None = None,
    seed: int | None = None,
) -> None:
    """Find a sparse ticket iteratively: train, keep the best trained entries, rewind, train again.

    Every round is an ordinary ``mth fit`` run of the config, in ``OUT/round_NN``; round N+1
    trains the best entries of round N's mask (a mask file in ``OUT/masks``) on the geometric
    schedule down to ``target_sparsity``. ``OUT/tickets.json`` lists the rounds; a rerun with
    the same arguments skips the finished ones. See :mod:`mthlib.tickets`.

    Args:
        config: An ``mth fit`` YAML config (round 0 trains its mask; no mask: dense). Several
            are layered as ``mth fit`` layers them, as repeated options or one list.
        out: The search's folder (new, or the folder of an earlier run with the same arguments).
        target_sparsity: Sparsity of the final ticket (e.g. 0.999), above round 0's.
        steps_per_round: Training steps of every round (default: the config's ``trainer.max_steps``).
        rounds: Rounds at most, round 0 included; the last one trains the target.
        prune_fraction: Share of the entries each round removes (e.g. 0.5); default: the share that
            reaches the target in ``rounds - 1`` prunings.
        criterion: ``diff`` keeps the entries training moved most, ``|trained - base|``;
            ``magnitude`` the largest trained weights, ``|trained|``.
        rewind_step: 0 starts every round from the base; r > 0 from round 0's values at step r
            on the round's mask (exported to ``OUT/rewind/round_NN``).
        early_bird_threshold: Jump to the target once the target masks drawn after two consecutive
            rounds differ by less than this normalised Hamming distance (e.g. 0.1); default: off.
        seed: ``seed_everything`` of every round (default: the config's).
    """
    from mthlib.tickets import find_tickets

    find_tickets(config, out, target_sparsity, steps_per_round=steps_per_round, rounds=rounds,
                 prune_fraction=prune_fraction, criterion=criterion, rewind_step=rewind_step,
                 early_bird_threshold=early_bird_threshold, seed=seed)


def sweep(config: str, run: str | None = None, list_runs: bool = False) -> None:
    """Run a grid of ``mth fit`` runs from a sweep file, one folder each; finished runs are skipped, a stopped one resumes.

    The sweep file names the fit config(s), the output folder and the grid: dotted config keys
    with their lists of values, or a list of such grids (see :mod:`mthlib.sweep`). Masks that need calibration are
    built once per setting and reused from file across the grid.

    Args:
        config: The sweep file (YAML with ``config``, ``out`` and ``grid``).
        run: Run only the run of this name (one job of a cluster array); default: every run in order.
        list_runs: Print the run names, one per line, and run nothing.
    """
    from mthlib.sweep import Sweep, run_sweep

    if list_runs:
        for point in Sweep.load(config).runs():
            print(point.name)
        return
    run_sweep(config, only=run)


COMMANDS = {
    "masks": {"list": masks_list, "build": masks_build, "shuffle": masks_shuffle},
    "analyze": {
        "sparsity": analyze_commands.sparsity,
        "rank": analyze_commands.rank,
        "overlap": analyze_commands.overlap,
        "consecutive": analyze_commands.consecutive,
    },
    "export": export,
    "plot": plot_run,
    "tickets": tickets,
    "sweep": sweep,
    "report": report,
}

DESCRIPTIONS = {
    "masks": "List mask strategies, build a mask without training, or shuffle a saved one.",
    "analyze": "Measure what training changed: update sparsity, rank, overlap, consecutive checkpoints.",
    "export": "Apply sparse deltas to their base and write a Hugging Face folder (or a delta, or a PEFT adapter).",
    "plot": "Draw PNG curves (reward, scores, loss, KL, evaluation, step time) of a run from its metrics.csv.",
    "tickets": "Find a sparse ticket iteratively: train, prune to the best trained entries, rewind, train again.",
    "sweep": "Run a grid of config values as ordinary fit runs, one folder each, resumable.",
    "report": "Put a sweep's runs side by side: evaluation over seeds, reward vs learning rate, curves, mask overlap.",
}
