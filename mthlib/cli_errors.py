"""How ``mth`` reports a user error: one line on stderr, exit status 2, no traceback.

Every mistake a user can make (a config that does not parse, an unknown or abbreviated
option, a bad value, a missing or unreadable file, a folder that cannot be written) ends in
:func:`reported`, which prints ``mth <command>: error: <what is wrong and what is allowed>``
and exits with status 2, argparse's status for usage errors. jsonargparse's messages are
reduced to their cause: usage text, the "Union subtypes" wrapper and given-value dumps are
dropped, and an unknown option or key gets the closest valid names. ``--traceback`` (or
``MTH_TRACEBACK=1``) lets the exception through instead, for a bug report.
"""

from __future__ import annotations

import difflib
import errno
import importlib
import re
import sys
from argparse import ArgumentError
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException

EXIT_USAGE = 2
"""Exit status of every user error (argparse's, so shells and CI treat it as a usage error)."""


class UsageError(Exception):
    """A mistake in what the user gave ``mth``; the message is the whole error line, without the prefix."""


USER_ERRORS = (UsageError, ArgumentError, ValueError, OSError, KeyError, MisconfigurationException)
"""Exceptions reported as a user error: bad input (a value, a file, a folder, a Trainer setting).
A bug that raises one of them reads the same; ``--traceback`` shows where it came from."""

_UNION = "Does not validate against any of the Union subtypes"
_FOLDER_HINT = {
    errno.ENOSPC: "free some space or choose another output folder (trainer.logger.init_args.save_dir)",
    errno.EDQUOT: "free some space or choose another output folder (trainer.logger.init_args.save_dir)",
    errno.EACCES: "choose a folder you may write to (trainer.logger.init_args.save_dir)",
    errno.EPERM: "choose a folder you may write to (trainer.logger.init_args.save_dir)",
    errno.EROFS: "choose a folder on a writable file system (trainer.logger.init_args.save_dir)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


@contextmanager
def reported(command: str, show_traceback: bool) -> Iterator[None]:
    """Turn a user error raised inside the block into one line on stderr and exit status 2.

    Args:
        command: The subcommand named in the line (``fit``, ``masks``...), or ``""``.
        show_traceback: Let the exception through unchanged (``--traceback``).
    """
    try:
        yield
    except SystemExit as stop:
        if show_traceback or not isinstance(stop.code, str):
            raise
        fail(command, re.sub(r"^mth( \S+)?: error: ", "", stop.code))
    except USER_ERRORS as error:
        if show_traceback:
            raise
        fail(command, describe(error))


def fail(command: str, message: str) -> NoReturn:
    """Print ``mth <command>: error: <message>`` as one line on stderr and exit with status 2."""
    prefix = f"mth {command}: error: " if command else "mth: error: "
    print(prefix + " ".join(message.split()), file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def describe(error: BaseException, names: Sequence[str] = ()) -> str:
    """The user-facing text of ``error``: its cause without jsonargparse's wrapping.

    Args:
        error: The exception raised by parsing, building or running.
        names: Valid option names (``--model.learning_rate``) and keys (``model.learning_rate``),
            from which the closest to an unknown one are suggested.
    """
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        where = f" {error.filename}" if error.filename else ""
        hint = _FOLDER_HINT.get(error.errno)
        return f"{error.strerror.lower()}:{where}" + (f" ({hint})" if hint else "")
    return clean(str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error), names)


def clean(message: str, names: Sequence[str] = ()) -> str:
    """Reduce a jsonargparse / argparse message to one line that names the key, the problem and what is allowed."""
    text = message.strip()
    key = re.match(r'Parser key "([^"]+)":\s*', text)
    if key:
        text = text[key.end():]
    text = _unwrap_union(text)
    unrecognized = re.match(r"unrecognized arguments: (-\S+)", text)
    rejected = re.match(r"(?:Subcommand '\S+'|Group '(\S+)') does not accept option '([^']+)'|Option '([^']+)' is not accepted$",
                        text)
    valueless = re.match(r"argument (\S+): expected one argument", text)
    if unrecognized:
        option = unrecognized.group(1).split("=")[0]
        text = unknown(f"option {option}", option, names)
    elif rejected:
        group, option, top = rejected.groups()
        name = top or (f"{group}.{option}" if group else option)
        text = unknown(f"key {name}", name, names)
    elif valueless:
        option = valueless.group(1)
        text = f"{option} needs a value (write a value that starts with '-' as {option}=VALUE)"
    else:
        text = _plain_types(_class_problem(text))
    text = " ".join(text.split())
    return f"{key.group(1)}: {text}" if key else text


def _unwrap_union(text: str) -> str:
    """The real error inside jsonargparse's "Does not validate against any of the Union subtypes" message."""
    if _UNION not in text:
        return text
    errors = text.split("Errors:", 1)[-1].split("Given value type:", 1)[0]
    items = [item.strip() for item in re.split(r"\n\s*- ", "\n" + errors) if item.strip()]
    items = [item for item in items if not item.startswith("Expected a <class 'NoneType'>")]
    problems = [_class_problem(item) for item in items]
    return _unwrap_union("; ".join(problems)) if problems else text


def _class_problem(item: str) -> str:
    """``Problem with given class_path 'X': Option 'y' is not accepted`` -> the option, X's closest options."""
    found = re.match(r"Problem with given class_path '([^']+)':\s*(.*)", item, re.S)
    if not found:
        return item
    class_path, problem = found.group(1), found.group(2).strip()
    option = re.match(r"Option '([^']+)' is not accepted", problem)
    if option:
        return unknown(f"option {option.group(1)!r} of {class_path}", option.group(1), _init_options(class_path))
    return f"{class_path}: {problem}"


def _init_options(class_path: str) -> list[str]:
    """The options jsonargparse accepts for ``class_path`` (empty when it cannot be imported)."""
    from jsonargparse import ArgumentParser

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls)
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return [action.dest for action in parser._actions if action.dest not in ("help", "config")]


def valid_names(parser: Any) -> list[str]:
    """The option strings (``--model.learning_rate``) and keys (``model.learning_rate``) ``parser`` accepts."""
    return [*parser._option_string_actions, *(action.dest for action in parser._actions)]


def unknown(what: str, name: str, names: Sequence[str]) -> str:
    """``unknown <what>; closest valid: a, b``: the names ``name`` abbreviates, else the most similar ones."""
    names = [valid for valid in names if valid.startswith("-") == name.startswith("-")]  # options, or keys
    completions = sorted({valid for valid in names if valid.startswith(name) and valid != name})
    closest = completions[:3] or difflib.get_close_matches(name, names, n=3, cutoff=0.75)
    text = f"unknown {what}; " + (f"closest valid: {', '.join(closest)}" if closest else "--help lists the valid ones")
    return text + (" (names are never abbreviated)" if completions else "")


def _plain_types(text: str) -> str:
    """``Expected a typing.Literal['a', 'b']. Got value: x`` -> ``got 'x'; allowed: 'a', 'b'``, and plain type names."""
    literal = re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", text, re.S)
    if literal:
        return f"got {literal.group(2).strip()!r}; allowed: {literal.group(1)}"
    expected = re.match(r"Expected an? (.*?)\. Got value: (.*)", text, re.S)
    if expected:
        wanted = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", expected.group(1))
        return f"got {expected.group(2).strip()!r}; expected {wanted}"
    return re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", text)


def load_config_file(path: str) -> dict[str, Any]:
    """Read a ``--config`` YAML file; a missing file or a syntax error is a :class:`UsageError` naming ``file:line:col``."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        context = f" ({err.context})" if err.context else ""
        raise UsageError(f"{where}: invalid YAML: {err.problem}{context}") from err
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not a YAML file ({err})") from err
    if data is not None and not isinstance(data, dict):
        raise UsageError(f"{path}: a config is a YAML mapping (model:, data:, trainer:, ...); got a {type(data).__name__}")
    return data or {}
