"""The ``mth`` command: LightningCLI's ``fit`` / ``validate`` / ``test`` plus ``masks``, ``analyze`` and ``export``.

Training subcommands are a thin LightningCLI subclass over :class:`~mthlib.grpo.GRPOModule`
and :class:`~mthlib.data.PromptDataModule`; the tool subcommands are typed functions
exposed through jsonargparse, so their ``--help`` comes from their docstrings. Every user
error of either kind is one line on stderr and exit status 2 (:mod:`mthlib.cli_errors`).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from mthlib.checkpoint_io import PICKLE_REFUSED, read_checkpoint
from mthlib.checkpoints import DELTAS
from mthlib.cli_errors import UsageError, describe, fail, load_config_file, reported, unknown, valid_names
from mthlib.data import PromptDataModule
from mthlib.grpo import GRPOModule
from mthlib.masking import get_mask_class, load_short_names
from mthlib.monitor import filter_known_warnings
from mthlib.utils import remove_stale_temps

TOOL_GROUPS = ("masks", "analyze", "export", "plot", "tickets", "sweep", "report")
POSITIONAL_GROUPS = {"plot", "report"}
"""Tool commands whose required arguments are positional (``mth plot RUN_DIR``, ``mth report RUNS_DIR``)."""
STRICT_PARSING = {"exit_on_error": False, "allow_abbrev": False}
"""Parser settings of every ``mth`` command: errors raise (one line, see :mod:`mthlib.cli_errors`); no prefix matching."""
IGNORED_TRAINER_FLAGS = {
    "accumulate_grad_batches": (1, "model.micro_batch_size (completions per forward/backward pass; a step always "
                                   "uses its whole batch, data.batch_size prompts)"),
    "gradient_clip_val": (None, "model.max_grad_norm (null turns clipping off)"),
    "gradient_clip_algorithm": (None, "model.max_grad_norm (clips the global L2 norm)"),
}
"""Trainer flag -> (its default, the model option to use instead): manual optimisation ignores these flags."""


warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")


class MthCLI(LightningCLI):
    """LightningCLI with mthlib's defaults: CSV metrics and checkpoints in the run folder, seed 0."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        load_short_names()
        super().__init__(
            GRPOModule,
            PromptDataModule,
            seed_everything_default=0,
            trainer_defaults={
                "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "flush_logs_every_n_steps": 1}},
                "log_every_n_steps": 1,
                "num_sanity_val_steps": 0,
                "check_val_every_n_epoch": None,
                "val_check_interval": 50,
                "max_steps": 100,
                "plugins": [{"class_path": "mthlib.checkpoint_io.AtomicCheckpointIO"}],
            },
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            auto_configure_optimizers=False,
            parser_kwargs=dict(STRICT_PARSING),
        )

    def parse_arguments(self, parser, args) -> None:
        """Parse, turning every mistake into one :class:`~mthlib.cli_errors.UsageError` line before anything is built.

        ``--config`` files are read first (a missing file or YAML syntax error names
        ``file:line:col``) and short mask names looked up (an unknown one lists the registered
        strategies); jsonargparse's own message is reduced to its cause, with the closest valid
        names for an unknown option or key. Options are never abbreviated: ``--model.learning_rat``
        is an error, not ``--model.learning_rate``. Trainer flags that manual optimisation
        ignores are refused with the model option to use instead.
        """
        words = sys.argv[1:] if args is None else list(args)
        for name in _mask_names(words):
            try:
                get_mask_class(name)
            except ValueError as err:
                raise UsageError(str(err)) from err
        subparsers = {(name,): sub for name, sub in getattr(self, "_subcommand_parsers", {}).items()}
        self.config = _parse(parser, words, subparsers)
        subcommand = self.config.get("subcommand")
        trainer = (self.config[subcommand] if subcommand else self.config)["trainer"]
        for flag, (default, instead) in IGNORED_TRAINER_FLAGS.items():
            if trainer.get(flag) != default:
                raise UsageError(f"trainer.{flag}={trainer.get(flag)} has no effect: GRPO optimises manually; use {instead}")

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` and ``--weights_only`` before anything is built or written.

        ``last`` resolves to the newest intact checkpoint of this config's run folder (one
        warning line when a newer one is truncated); an explicit path must be a complete
        checkpoint that loads with ``weights_only=True`` (else one error line), and
        ``--weights_only false`` is refused: a checkpoint is data, never code. The staging
        folders that writes killed mid-way left next to the checkpoint and its deltas are removed.
        The resumed run logs into a new version folder (nothing already saved is touched).
        The configuration comes from the command line and YAML, not from the checkpoint's
        hyperparameters; the module and mask callback refuse a checkpoint of another
        strategy, strategy argument or base (one line naming the setting and both values).
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if config.get("weights_only") is False:
            sys.exit(f"mth: error: --weights_only false is refused: {PICKLE_REFUSED}")
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            path = _last_checkpoint(config)
            config["ckpt_path"] = str(path)
        elif ckpt_path and "://" not in str(ckpt_path) and (
            str(ckpt_path).split(":")[0].lower() not in ("best", "hpc", "registry")  # Lightning's own keywords
        ):
            path = Path(ckpt_path)
            try:
                read_checkpoint(path, mmap=True)
            except (FileNotFoundError, ValueError) as err:
                sys.exit(f"mth: error: --ckpt_path: {err}")
        else:
            return
        for folder in (path.parent, path.parent.parent / DELTAS):  # what writes killed in the resumed run left
            remove_stale_temps(folder)

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; the module refuses a training strategy it cannot train (one line, nothing written)."""
        super().instantiate_classes()
        self.model.check_strategy(self.trainer.strategy)

    def before_fit(self) -> None:
        """Refuse a ``--ckpt_path`` of another base or mask setting before ``fit`` creates the run folder."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            self.model.check_checkpoint(read_checkpoint(Path(ckpt_path), mmap=True))

    def instantiate_trainer(self, **kwargs):
        """Build the trainer after recording in the saved config what the mask strategy resolved.

        ``config.yaml`` then holds every strategy argument as the run used it (e.g. the
        ``file`` strategy's digest of the mask file it read), not only what was typed. The
        strategy's ``include``/``exclude`` patterns are matched against the model first, so a
        pattern that matches nothing is one error line before the trainer starts or writes.
        """
        config = self.config.get(str(self.subcommand), self.config)
        strategy = self.model.mask_strategy
        if strategy is not None:
            strategy.eligible(self.model.model)
            for key, value in strategy.config()["init_args"].items():
                config[f"model.mask.init_args.{key}"] = value
        return super().instantiate_trainer(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 50})


def _last_checkpoint(config) -> Path:
    """The newest intact checkpoint under the run's logger folder (``save_dir/name/*/checkpoints/*.ckpt``).

    Newest by modification time (``last.ckpt`` first among equals); intact means it loads with
    ``weights_only=True``. Newer files that do not load are skipped with one warning line.
    """
    logger = config["trainer"].get("logger")
    init = (logger.get("init_args") if isinstance(logger, dict) else getattr(logger, "init_args", None)) or {}
    folder = Path(init.get("save_dir") or "runs") / (init.get("name") or "lightning_logs")
    found = sorted(folder.glob("*/checkpoints/*.ckpt"), key=lambda p: (os.lstat(p).st_mtime, p.name == "last.ckpt"))
    if not found:
        sys.exit(f"mth: error: --ckpt_path last: no {folder}/*/checkpoints/*.ckpt to resume from")
    broken = []
    for path in reversed(found):
        try:
            read_checkpoint(path, mmap=True)
        except (FileNotFoundError, ValueError) as err:
            broken.append(str(err))
            continue
        if broken:
            print(f"mth: warning: --ckpt_path last: resuming from {path}, the newest intact checkpoint; skipped "
                  f"{len(broken)} newer: {broken[0]}", file=sys.stderr)
        return path
    sys.exit(f"mth: error: --ckpt_path last: no checkpoint under {folder} loads; the newest: {broken[0]}")


def _mask_names(words: list[str]) -> list[str]:
    """Short mask names given on the command line (``--model.mask NAME``) or in ``--config`` files.

    Every ``--config`` file is read here, before jsonargparse sees it, so a missing file or a
    YAML syntax error is one line naming ``file:line:col``.
    """
    names = []
    for i, word in enumerate(words):
        value = None
        if word in ("--model.mask", "--model.mask.class_path") and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith(("--model.mask=", "--model.mask.class_path=")):
            value = word.split("=", 1)[1]
        elif path := _config_path(words, i):
            mask = load_config_file(path).get("model") or {}
            mask = mask.get("mask") if isinstance(mask, dict) else None
            value = mask.get("class_path") if isinstance(mask, dict) else mask
        if isinstance(value, str) and "." not in value and value.lower() not in ("null", "none", "{", ""):
            names.append(value)
    return names


def _config_path(words: list[str], i: int) -> str | None:
    """The file named by ``--config PATH``, ``--config=PATH`` or ``-c PATH`` at ``words[i]`` (not inline YAML)."""
    word = words[i]
    if word in ("--config", "-c") and i + 1 < len(words):
        value = words[i + 1]
    elif word.startswith("--config="):
        value = word.split("=", 1)[1]
    else:
        return None
    return None if any(mark in value for mark in ("\n", "{", ": ")) else value


def _parse(parser: ArgumentParser, words: list[str], subparsers: dict[tuple[str, ...], ArgumentParser]):
    """``parser.parse_args(words)``; a mistake is a :class:`UsageError` with the closest names of the (sub)command that refused it."""
    try:
        return parser.parse_args(words)
    except ArgumentError as err:
        matching = [key for key in subparsers if tuple(words[:len(key)]) == key]
        raised = subparsers[max(matching, key=len)] if matching else parser
        raise UsageError(describe(err, valid_names(raised))) from err


def _tool_parser() -> tuple[ArgumentParser, dict[tuple[str, ...], ArgumentParser]]:
    """The parser of the tool commands, and each command's own parser by its words (``("masks", "build")``)."""
    from mthlib import tools

    parser = ArgumentParser(prog="mth", description="mthlib tools: masks, analyze, export", **STRICT_PARSING)
    subparsers: dict[tuple[str, ...], ArgumentParser] = {}
    groups = parser.add_subcommands(dest="group")
    for group, functions in tools.COMMANDS.items():
        group_parser = subparsers[(group,)] = ArgumentParser(description=tools.DESCRIPTIONS[group], **STRICT_PARSING)
        if callable(functions):
            group_parser.add_function_arguments(functions, as_positional=group in POSITIONAL_GROUPS)
            groups.add_subcommand(group, group_parser, help=tools.DESCRIPTIONS[group])
            continue
        groups.add_subcommand(group, group_parser, help=tools.DESCRIPTIONS[group])
        commands = group_parser.add_subcommands(dest="command")
        for name, function in functions.items():
            summary = (function.__doc__ or "").splitlines()[0]
            command_parser = subparsers[(group, name)] = ArgumentParser(description=summary, **STRICT_PARSING)
            command_parser.add_function_arguments(function)
            commands.add_subcommand(name, command_parser, help=summary)
    return parser, subparsers


def _layered_configs(words: list[str]) -> list[str]:
    """``--config a.yaml --config b.yaml`` as one list option, ``--config '["a.yaml", "b.yaml"]'``.

    A tool that reads fit configs (``mth masks build``) layers repeated ``--config`` files in
    order, as ``mth fit`` does, instead of keeping only the last; a value already written as a
    list adds its files in place.
    """
    paths: list[str] = []
    rest: list[str] = []
    first = None
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--config" and i + 1 < len(words) or word.startswith("--config="):
            value = words[i + 1] if word == "--config" else word.split("=", 1)[1]
            listed = yaml.safe_load(value) if value.lstrip().startswith("[") else None
            paths += [str(path) for path in listed] if isinstance(listed, list) else [value]
            first = len(rest) if first is None else first
            i += 2 if word == "--config" else 1
            continue
        rest.append(word)
        i += 1
    if first is None or len(paths) < 2:
        return words
    return [*rest[:first], "--config", json.dumps(paths), *rest[first:]]


def _run_tool(argv: list[str]) -> None:
    from mthlib import tools

    parser, subparsers = _tool_parser()
    config = _parse(parser, _layered_configs(argv), subparsers)
    group = config.group
    functions = tools.COMMANDS[group]
    if callable(functions):
        function: Callable = functions
        arguments = config[group]
    else:
        command = config[group].command
        function = functions[command]
        arguments = config[group][command]
    function(**{k: v for k, v in vars(arguments).items() if not k.startswith("__")})


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``mth`` console script.

    A user error (bad config, option, value, file or folder) is one line on stderr,
    ``mth <command>: error: ...``, and exit status 2 (see :mod:`mthlib.cli_errors`);
    ``--traceback`` anywhere on the command line, or ``MTH_TRACEBACK=1``, shows the traceback instead.
    """
    filter_known_warnings()
    words = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in words or os.environ.get("MTH_TRACEBACK", "0") not in ("", "0")
    words = [word for word in words if word != "--traceback"]
    commands = [*MthCLI.subcommands(), *TOOL_GROUPS]
    if not words:
        fail("", f"a command is needed: {', '.join(commands)} (mth COMMAND --help describes one)")
    if not words[0].startswith("-") and words[0] not in commands:
        fail("", unknown(f"command {words[0]!r}", words[0], commands) + f"; commands: {', '.join(commands)}")
    command = words[0] if words[0] in commands else ""
    with reported(command, show_traceback):
        if command in TOOL_GROUPS:
            _run_tool(words)
        else:
            MthCLI(args=words)


if __name__ == "__main__":
    main()
