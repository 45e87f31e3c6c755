"""The ``mth`` command: LightningCLI's ``fit`` / ``validate`` / ``test`` plus ``masks``, ``analyze`` and ``export``.

Training subcommands are a thin LightningCLI subclass over :class:`~mthlib.grpo.GRPOModule`
and :class:`~mthlib.data.PromptDataModule`; the tool subcommands are typed functions
exposed through jsonargparse, so their ``--help`` comes from their docstrings.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import yaml

from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from mthlib.data import PromptDataModule
from mthlib.grpo import GRPOModule
from mthlib.masking import get_mask_class, load_short_names

TOOL_GROUPS = ("masks", "analyze", "export")


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
            },
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )

    def parse_arguments(self, parser, args) -> None:
        """Check short mask names first, so an unknown one fails with the list of registered strategies."""
        words = sys.argv[1:] if args is None else list(args)
        try:
            for name in _mask_names(words):
                get_mask_class(name)
        except ValueError as err:
            sys.exit(f"mth: error: {err}")
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last`` to the newest ``last.ckpt`` of this config's run folder.

        The resumed run logs into a new version folder (nothing already saved is touched).
        The configuration comes from the command line and YAML, not from the checkpoint's
        hyperparameters; the mask callback refuses a checkpoint of another strategy or base.
        """
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path") == "last":
            self.config[subcommand]["ckpt_path"] = str(_last_checkpoint(self.config[subcommand]))

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a bad model path or value is one error line, not a traceback."""
        try:
            super().instantiate_classes()
            self.model.check_strategy(self.trainer.strategy)
        except (FileNotFoundError, ValueError) as err:
            sys.exit(f"mth: error: {err}")

    def instantiate_trainer(self, **kwargs):
        """Build the trainer after recording in the saved config what the mask strategy resolved.

        ``config.yaml`` then holds every strategy argument as the run used it (e.g. the
        ``file`` strategy's digest of the mask file it read), not only what was typed.
        """
        config = self.config.get(str(self.subcommand), self.config)
        strategy = self.model.mask_strategy
        if strategy is not None:
            for key, value in strategy.config()["init_args"].items():
                config[f"model.mask.init_args.{key}"] = value
        return super().instantiate_trainer(**kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``fit`` / ``validate`` / ``test``; bad input found only then (e.g. a mask file for another base) is one line."""
        try:
            super()._run_subcommand(subcommand)
        except ValueError as err:
            sys.exit(f"mth {subcommand}: error: {err}")

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 50})


def _last_checkpoint(config) -> Path:
    """The most recently written ``last.ckpt`` under the run's logger folder (``save_dir/name/*/checkpoints``)."""
    logger = config["trainer"].get("logger")
    init = (logger.get("init_args") if isinstance(logger, dict) else getattr(logger, "init_args", None)) or {}
    folder = Path(init.get("save_dir") or "runs") / (init.get("name") or "lightning_logs")
    found = sorted(folder.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"mth: error: --ckpt_path last: no {folder}/*/checkpoints/last.ckpt to resume from")
    return found[-1]


def _mask_names(words: list[str]) -> list[str]:
    """Short mask names given on the command line (``--model.mask NAME``) or in ``--config`` files."""
    names = []
    for i, word in enumerate(words):
        value = None
        if word in ("--model.mask", "--model.mask.class_path") and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith(("--model.mask=", "--model.mask.class_path=")):
            value = word.split("=", 1)[1]
        elif word == "--config" and i + 1 < len(words) and Path(words[i + 1]).is_file():
            mask = (yaml.safe_load(Path(words[i + 1]).read_text()) or {}).get("model", {}) or {}
            mask = mask.get("mask") if isinstance(mask, dict) else None
            value = mask.get("class_path") if isinstance(mask, dict) else mask
        if isinstance(value, str) and "." not in value and value.lower() not in ("null", "none", "{", ""):
            names.append(value)
    return names


def _tool_parser() -> ArgumentParser:
    from mthlib import tools

    parser = ArgumentParser(prog="mth", description="mthlib tools: masks, analyze, export")
    groups = parser.add_subcommands(dest="group")
    for group, functions in tools.COMMANDS.items():
        group_parser = ArgumentParser(description=tools.DESCRIPTIONS[group])
        if callable(functions):
            group_parser.add_function_arguments(functions)
            groups.add_subcommand(group, group_parser, help=tools.DESCRIPTIONS[group])
            continue
        groups.add_subcommand(group, group_parser, help=tools.DESCRIPTIONS[group])
        commands = group_parser.add_subcommands(dest="command")
        for name, function in functions.items():
            summary = (function.__doc__ or "").splitlines()[0]
            command_parser = ArgumentParser(description=summary)
            command_parser.add_function_arguments(function)
            commands.add_subcommand(name, command_parser, help=summary)
    return parser


def _run_tool(argv: list[str]) -> None:
    from mthlib import tools

    parser = _tool_parser()
    config = parser.parse_args(argv)
    group = config.group
    functions = tools.COMMANDS[group]
    if callable(functions):
        function: Callable = functions
        arguments = config[group]
    else:
        command = config[group].command
        function = functions[command]
        arguments = config[group][command]
    try:
        function(**{k: v for k, v in vars(arguments).items() if not k.startswith("__")})
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        sys.exit(f"mth {group}: error: {err}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``mth`` console script."""
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in TOOL_GROUPS:
        _run_tool(words)
    else:
        MthCLI(args=argv)


if __name__ == "__main__":
    main()
