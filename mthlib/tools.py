"""The non-training ``mth`` subcommands as typed functions: ``masks``, ``analyze``, ``export``.

jsonargparse builds each subcommand's arguments and ``--help`` from these signatures
and docstrings (see :mod:`mthlib.cli`).
"""

from __future__ import annotations

import json
from typing import Literal

from mthlib.analysis import commands as analyze_commands
from mthlib.analysis.plot_run import plot_run


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
    from mthlib.cli import MthCLI
    from mthlib.masking import compute_masks

    files = [config] if isinstance(config, str) else config
    cli = MthCLI(args=[word for path in files for word in ("--config", path)], run=False)
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


def export(
    delta: list[str] | str,
    out: str,
    base: str | None = None,
    format: Literal["hf", "delta"] = "hf",
    on_overlap: Literal["error", "last", "mean"] = "error",
    overwrite: bool = False,
) -> None:
    """Turn sparse deltas into a Hugging Face model folder (or a delta with its model card).

    Args:
        delta: One or more sparse delta files; several are merged (tickets trained on
            different tasks), and overlapping indices are an error unless ``on_overlap`` says how to merge.
        out: Output folder (written to a temporary folder, then renamed).
        base: Base model name or path (default: the base recorded in the delta).
        format: ``hf`` writes safetensors weights, config and tokenizer; ``delta`` the delta and a model card.
        on_overlap: ``error``, ``last`` (later delta wins) or ``mean``.
        overwrite: Replace an existing output folder.
    """
    from mthlib.deltas import load_delta, merge_deltas
    from mthlib.export import export_model

    deltas = [load_delta(path) for path in ([delta] if isinstance(delta, str) else delta)]
    merged = deltas[0] if len(deltas) == 1 else merge_deltas(deltas, on_overlap=on_overlap)
    folder = export_model(merged, out, base=base, format=format, overwrite=overwrite)
    print(f"wrote {folder}")


COMMANDS = {
    "masks": {"list": masks_list, "build": masks_build},
    "analyze": {
        "sparsity": analyze_commands.sparsity,
        "rank": analyze_commands.rank,
        "overlap": analyze_commands.overlap,
        "consecutive": analyze_commands.consecutive,
    },
    "export": export,
    "plot": plot_run,
}

DESCRIPTIONS = {
    "masks": "List mask strategies, or build a mask without training.",
    "analyze": "Measure what training changed: update sparsity, rank, overlap, consecutive checkpoints.",
    "export": "Apply sparse deltas to their base and write a Hugging Face folder.",
    "plot": "Draw PNG curves (reward, scores, loss, KL, evaluation, step time) of a run from its metrics.csv.",
}
