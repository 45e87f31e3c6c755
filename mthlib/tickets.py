"""Iterative tickets: train, keep the best trained entries, rewind, train again, down to a target sparsity.

``mth tickets`` (:func:`find_tickets`) is iterative pruning with rewinding (Frankle & Carbin,
"The Lottery Ticket Hypothesis", ICLR 2019, arXiv:1803.03635; rewinding to an early step:
Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020,
arXiv:1912.05611) made of ordinary ``mth fit`` runs, with the early-bird stop of You et al.
("Drawing Early-Bird Tickets", ICLR 2020, arXiv:1909.11957).

Rounds. Every round is a plain ``mth fit`` run of the given config (the same
:class:`~mthlib.cli.MthCLI`), ``trainer.max_steps`` set to the steps per round and the logger
pointed at ``OUT/round_NN``: a run folder like any other (``config.yaml``, ``metrics.csv``,
``checkpoints/``, ``deltas/``). Round 0 trains the config's own mask, computed once as
``mth masks build`` computes it and saved to ``OUT/masks/round_00.safetensors`` (a strategy
that changes its mask while training, such as ``rigl``, is refused); a config without a mask
trains densely, and its candidates are then every entry of the parameters a
strategy trains by default (matrices and embeddings). After a round, each of its entries is
scored, ``diff`` by ``|trained - base|`` (the score of the ``diff`` strategy: how far the
fine-tune moved it) or ``magnitude`` by ``|trained|``, and the next round's mask keeps the
best-scoring entries of this round's mask: one top-k over all parameters, ties to the earlier
parameter, then the lower flat index. Every mask is therefore a subset of the one before. Each
mask is written to ``OUT/masks/round_NN.safetensors`` and trained with the ``file`` strategy,
so each round's ``config.yaml`` names its mask file and the file's SHA-256.

Sparsity schedule (:func:`~mthlib.ticket_schedule.sparsity_schedule`): geometric in the number of kept entries. With
``prune_fraction`` p, round j keeps ``round(n0 * (1 - p)**j)`` entries (each round keeps the
fraction ``1 - p`` of the one before), never fewer than the target count
``int(numel * (1 - target_sparsity))`` (the strategies' counting rule); without it, the fraction
reaches the target in exactly ``rounds - 1`` prunings. If the rounds run out first, the last
one jumps to the target. The last round always trains exactly the target count.

Rewinding: ``rewind_step`` 0 starts every round from the base. ``rewind_step`` r > 0 starts
round j from the base with round 0's values at step r on round j's mask (the pruned entries
stay at the base, as pruned weights go back to zero in the papers): round 0 then keeps its
delta of step r, and that start is exported as a Hugging Face folder,
``OUT/rewind/round_NN``, which the round's ``model.model_name_or_path`` names. Scores always
compare with the untouched base.

Early bird: after each round that is not yet at the target, the target-count mask its scores
would give is drawn; :func:`~mthlib.ticket_schedule.hamming_distance` compares it with the previous round's draw. When
the distance falls below ``early_bird_threshold`` (:func:`~mthlib.ticket_schedule.early_bird_stop`), the ticket has
emerged: the next round trains that draw, at the target, and the search ends.

Summary: ``OUT/tickets.json`` (written atomically after each round) holds the arguments and,
per round, its folder, mask file, start model, entries, sparsity, Hamming distance and stop
reason (``target``, ``early_bird`` or ``rounds`` on the last one), plus ``stop_reason`` and the
final ``ticket`` mask file. A rerun with the same arguments skips the rounds it lists; a round
interrupted mid-training is trained again from its start; a finished search writes nothing.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mthlib.checkpoints import DELTAS, LAST
from mthlib.cli import MthCLI
from mthlib.deltas import build_delta, load_delta
from mthlib.export import export_model
from mthlib.fingerprint import model_fingerprint
from mthlib.masking import Masks, compute_masks, parameter_kinds
from mthlib.models import load_model
from mthlib.ticket_schedule import (
    CRITERIA, Scorer, check_schedule, early_bird_stop, hamming_distance, prune, sparsity_schedule,
)
from mthlib.utils import atomic_write_text

SUMMARY = "tickets.json"
"""The summary file in the output folder."""
DEFAULT_KINDS = ("matrix", "embedding")
"""Parameter kinds whose entries a dense round 0 offers to round 1 (what strategies train by default)."""


def find_tickets(
    config: list[str] | str,
    out: str,
    target_sparsity: float,
    steps_per_round: int | None = None,
    rounds: int = 5,
    prune_fraction: float | None = None,
    criterion: str | Scorer = "diff",
    rewind_step: int = 0,
    early_bird_threshold: float | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) an iterative ticket search into ``out``; return the summary (``tickets.json``).

    Args:
        config: ``mth fit`` YAML config(s), layered as ``mth fit`` layers them.
        out: The search's folder (new, or one this function wrote with the same arguments).
        target_sparsity: Sparsity of the final ticket, over the parameters round 0's mask covers.
        steps_per_round: Training steps of every round (``None``: the config's ``trainer.max_steps``).
        rounds: Rounds at most, round 0 included (>= 2).
        prune_fraction: Share of the entries each round removes (``None``: reach the target in ``rounds - 1`` prunings).
        criterion: ``diff`` or ``magnitude`` (:data:`CRITERIA`), or a :data:`Scorer`.
        rewind_step: 0 starts every round from the base; r > 0 from round 0's values at step r.
        early_bird_threshold: Stop at the target once consecutive draws differ by less than this
            (:func:`hamming_distance`); ``None``: off.
        seed: ``seed_everything`` of every round (``None``: the config's).

    Raises:
        ValueError: A bad argument, a folder that holds something else, or a target no sparser than round 0.
    """
    configs = [config] if isinstance(config, str) else list(config)
    scorer = CRITERIA.get(criterion) if isinstance(criterion, str) else criterion
    _check_arguments(configs, target_sparsity, steps_per_round, rounds, prune_fraction, scorer, criterion, rewind_step,
                     early_bird_threshold)
    folder = Path(out) if Path(out).name else Path(out).resolve()
    arguments = {
        "config": configs, "target_sparsity": target_sparsity, "steps_per_round": steps_per_round, "rounds": rounds,
        "prune_fraction": prune_fraction,
        "criterion": criterion if isinstance(criterion, str) else criterion.__qualname__,
        "rewind_step": rewind_step, "early_bird_threshold": early_bird_threshold, "seed": seed,
    }
    summary = _read_summary(folder, arguments)
    if summary["stop_reason"] is not None:
        print(f"tickets: {folder} is complete ({len(summary['rounds'])} rounds, stop: {summary['stop_reason']}); "
              f"ticket {summary['ticket']}")
        return summary
    search = _Rounds(configs, folder, steps_per_round, rewind_step, seed, scorer)
    _run_rounds(search, summary, target_sparsity, rounds, prune_fraction, early_bird_threshold)
    return summary


def _check_arguments(configs: list[str], target_sparsity: float, steps_per_round: int | None, rounds: int,
                     prune_fraction: float | None, scorer: Scorer | None, criterion: object, rewind_step: int,
                     early_bird_threshold: float | None) -> None:
    """Refuse a bad argument with one line, before anything is loaded or written."""
    if not configs:
        raise ValueError("config: give at least one mth fit config")
    if not 0 < target_sparsity < 1:
        raise ValueError(f"target_sparsity must be in (0, 1) (the fraction of entries the ticket freezes); "
                         f"got {target_sparsity}")
    check_schedule(rounds, prune_fraction)
    if steps_per_round is not None and steps_per_round < 1:
        raise ValueError(f"steps_per_round must be >= 1; got {steps_per_round}")
    if scorer is None:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if rewind_step < 0 or (steps_per_round is not None and rewind_step >= steps_per_round):
        raise ValueError(f"rewind_step must be in [0, steps_per_round) (0: rewind to the base); got {rewind_step}")
    if early_bird_threshold is not None and not 0 < early_bird_threshold <= 1:
        raise ValueError(f"early_bird_threshold must be in (0, 1] (a normalised Hamming distance) or null; "
                         f"got {early_bird_threshold}")


def _read_summary(folder: Path, arguments: dict[str, Any]) -> dict[str, Any]:
    """The summary of ``folder`` (checked against ``arguments``), or a new one for an empty or absent folder."""
    path = folder / SUMMARY
    if not path.is_file():
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"{folder} holds files but no {SUMMARY}: give a new folder for the tickets")
        return {"arguments": arguments, "rounds": [], "stop_reason": None, "ticket": None}
    try:
        summary = json.loads(path.read_text())
        recorded = summary["arguments"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a tickets summary ({err}); give a new folder") from None
    for key, value in arguments.items():
        if recorded.get(key) != value:
            raise ValueError(f"{folder} holds tickets of other arguments ({key}: {recorded.get(key)!r} there, "
                             f"{value!r} now): rerun with the same arguments or give a new folder")
    for entry in summary["rounds"]:
        if not _finished(Path(entry["folder"])):
            raise ValueError(f"{path} lists {entry['folder']} as trained, but it holds no deltas/last.safetensors "
                             "or model/: give a new folder")
    return summary


def _finished(run: Path) -> bool:
    """Whether ``run`` holds a finished run's result (its last delta, or a dense run's model folder)."""
    result = (run / DELTAS / LAST).is_file() or (run / "model" / "config.json").is_file()
    return (run / "config.yaml").is_file() and result


def _run_rounds(search: _Rounds, summary: dict[str, Any], target_sparsity: float, rounds: int,
            prune_fraction: float | None, threshold: float | None) -> None:
    """Train the rounds ``summary`` does not list yet, recording each one; stop at the target."""
    entries = summary["rounds"]
    first_mask = search.first_mask() if not entries else search.mask_of(entries[0])
    numel, first = first_mask.numel, first_mask.total
    target = int(numel * round(1.0 - target_sparsity, 12))
    if not 0 < target < first:
        raise ValueError(f"target_sparsity {target_sparsity} keeps {target:,} of {numel:,} entries; round 0's mask keeps "
                         f"{first:,} (sparsity {1 - first / numel:.6g}): choose a target between that and 1")
    counts, final_reason = sparsity_schedule(first, target, rounds, prune_fraction)
    j = len(entries)
    if j:  # resumed: the last recorded round's scores choose the next mask
        mask = search.mask_of(entries[-1])
        scores = search.scores(Path(entries[-1]["folder"]), mask)
        draw = prune(scores, mask, target)
    else:  # the folder is the search's from now on
        atomic_write_text(search.folder / SUMMARY, json.dumps(summary, indent=2))
    while True:
        if j == 0:
            mask, reason = first_mask, None
        else:
            early = early_bird_stop([entry["hamming"] for entry in entries], threshold)
            reason = final_reason if counts[j] == target else ("early_bird" if early else None)
            mask = draw if reason else prune(scores, mask, counts[j])
        entry = search.train(j, mask, dense=j == 0 and search.dense)
        entry["stop"] = reason
        if reason is None:
            scores = search.scores(Path(entry["folder"]), mask)
            previous, draw = (draw if j else None), prune(scores, mask, target)
            entry["hamming"] = None if previous is None else hamming_distance(draw, previous)
        entries.append(entry)
        if reason:
            summary["stop_reason"], summary["ticket"] = reason, entry["mask"]
        atomic_write_text(search.folder / SUMMARY, json.dumps(summary, indent=2))
        distance = "" if entry["hamming"] is None else f", Hamming distance to the previous draw {entry['hamming']:.4f}"
        print(f"tickets: round {j}: {mask.total:,} of {numel:,} entries (sparsity {entry['sparsity']:.6g}){distance} "
              f"-> {entry['folder']}" + (f"; stop: {reason}, ticket {entry['mask']}" if reason else ""))
        if reason:
            return
        j += 1


class _Rounds:
    """What every round shares: configs, output folder, the base (scores compare with it) and round 0's strategy."""

    def __init__(self, configs: list[str], folder: Path, steps: int | None, rewind_step: int, seed: int | None,
                 scorer: Scorer) -> None:
        self.configs, self.folder, self.rewind_step, self.seed, self.scorer = configs, folder, rewind_step, seed, scorer
        self.cli = MthCLI(args=_config_args(configs, self._seeded({})), run=False)
        module = self.cli.model
        self.steps: int = steps or int(self.cli.config["trainer"]["max_steps"])
        if self.steps < 1:
            raise ValueError(f"a round needs a number of steps: set steps_per_round or trainer.max_steps "
                             f"(got {self.steps})")
        if rewind_step >= self.steps:
            raise ValueError(f"rewind_step must be in [0, steps per round = {self.steps}); got {rewind_step}")
        self.dense = module.mask_strategy is None
        if not self.dense and module.mask_strategy.dynamic:
            raise ValueError(f"round 0 needs a fixed mask, but {module.mask_strategy.name} changes its mask while "
                             "it trains: choose a static strategy (e.g. random, fisher) or no mask")
        if self.dense and rewind_step:
            raise ValueError("rewind_step needs a masked round 0 (set model.mask): a dense run writes no delta "
                             "to rewind to")
        self.base_name, self.dtype = str(module.hparams.model_name_or_path), str(module.hparams.dtype)
        self.base_fingerprint = module.base_fingerprint
        self.base = {name: param.detach() for name, param in module.model.named_parameters()}

    def _seeded(self, overrides: dict[str, Any]) -> dict[str, Any]:
        return overrides if self.seed is None else {**overrides, "seed_everything": self.seed}

    def first_mask(self) -> Masks:
        """Round 0's mask: the config strategy's, computed as ``mth fit`` does; dense: every default-kind entry."""
        module = self.cli.model
        if self.dense:
            kinds = parameter_kinds(module.model)
            shapes = {name: tuple(p.shape) for name, p in self.base.items() if kinds[name] in DEFAULT_KINDS}
            return Masks({name: torch.arange(math.prod(shape)) for name, shape in shapes.items()}, shapes)
        return compute_masks(module.mask_strategy, module.model, self.cli.datamodule, module.tokenizer,
                             module.hparams.calibration_batch_size)

    def mask_of(self, entry: dict[str, Any]) -> Masks:
        """The mask a recorded round trained."""
        return self.first_mask() if entry["mask"] is None else Masks.load(entry["mask"])

    def scores(self, run: Path, mask: Masks) -> dict[str, Tensor]:
        """The criterion's score of every entry of ``mask``, from the trained values of ``run`` and the base."""
        names = [name for name in mask if mask.count(name)]
        if (run / DELTAS / LAST).is_file():
            delta = load_delta(run / DELTAS / LAST)
            for name in names:
                if name not in delta.indices or not torch.equal(delta.indices[name].to(torch.int64), mask[name]):
                    raise ValueError(f"{run / DELTAS / LAST} does not hold the entries of {name} its mask names")
            trained = {name: delta.values[name] for name in names}
        else:
            model = dict(load_model(str(run / "model"), self.dtype)[0].named_parameters())
            trained = {name: model[name].detach().reshape(-1)[mask[name]] for name in names}
        return {name: self.scorer(self.base[name].reshape(-1)[mask[name]], trained[name]) for name in names}

    def train(self, j: int, mask: Masks, dense: bool) -> dict[str, Any]:
        """Train round ``j`` on ``mask`` from its start model, an ordinary ``mth fit`` run; return its summary entry."""
        run = self.folder / f"round_{j:02d}"
        if run.exists():  # interrupted before it was recorded: trained again from its start
            shutil.rmtree(run)
        start, fingerprint = self._start(j, mask)
        model: dict[str, Any] = {} if start == self.base_name else {"model_name_or_path": start}
        path = None
        if not dense:
            path = self.folder / "masks" / f"round_{j:02d}.safetensors"
            origin = (self.cli.model.mask_strategy.config() if j == 0
                      else {"name": "tickets", "from": str(self.folder / f"round_{j - 1:02d}")})
            mask.save(path, metadata={"strategy": json.dumps(origin), "base_model": start,
                                      "base_fingerprint": fingerprint})
            model["mask"] = {"class_path": "file", "init_args": {"path": str(path)}}
        if j == 0 and self.rewind_step:  # keep the delta of the rewind step
            model.update(delta_every_n_steps=self.rewind_step, delta_keep_last=self.steps // self.rewind_step + 1)
        logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                  "init_args": {"save_dir": str(self.folder.parent), "name": self.folder.name, "version": run.name}}
        MthCLI(args=["fit", *_config_args(self.configs, self._seeded(
            {"trainer": {"max_steps": self.steps, "logger": logger}, "model": model}))])
        if not _finished(run):
            raise ValueError(f"round {j} ended without a result in {run} (no deltas/last.safetensors or model/)")
        return {"round": j, "folder": str(run), "mask": None if path is None else str(path), "model": start,
                "entries": mask.total, "sparsity": 1.0 - mask.density, "hamming": None, "stop": None}

    def _start(self, j: int, mask: Masks) -> tuple[str, str]:
        """The model round ``j`` starts from and its fingerprint: the base, or round 0's step-r values on ``mask``."""
        if j == 0 or not self.rewind_step:
            return self.base_name, self.base_fingerprint
        path = self.folder / "round_00" / DELTAS / f"step={self.rewind_step:06d}.safetensors"
        if not path.is_file():
            raise ValueError(f"rewinding to step {self.rewind_step} needs {path}, which round 0 did not keep")
        early = load_delta(path)
        kept = {name: torch.isin(idx.to(torch.int64), mask[name]) for name, idx in early.indices.items() if name in mask}
        kept = {name: keep for name, keep in kept.items() if bool(keep.any())}
        restricted = build_delta(
            {name: early.indices[name][keep] for name, keep in kept.items()},
            {name: early.values[name][keep] for name, keep in kept.items()},
            {name: early.shapes[name] for name in kept}, base_model=early.base_model,
            base_fingerprint=early.base_fingerprint, strategy=early.strategy, sparsity=1.0 - mask.density,
            step=early.step,
        )
        model, tokenizer = load_model(self.base_name, self.dtype)
        folder = export_model(restricted, self.folder / "rewind" / f"round_{j:02d}", base_model=model,
                              tokenizer=tokenizer, overwrite=True)
        return str(folder), model_fingerprint(model)


def _config_args(configs: list[str], overrides: dict[str, Any]) -> list[str]:
    """``--config`` words for ``configs`` and then ``overrides`` (inline JSON, the last and so the winning layer)."""
    layers = [*configs, json.dumps(overrides)] if overrides else configs
    return [word for layer in layers for word in ("--config", layer)]
