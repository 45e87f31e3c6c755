"""Small shared helpers: durable atomic file writes and safetensors metadata.

Every file mthlib writes goes through :func:`atomic_path` or :func:`atomic_dir`: the data goes
to a hidden staging name in the destination folder, is flushed to disk (fsync), and only
then renamed onto the final name, so a reader (or a resume after a crash, a ``kill -9`` or a
full disk) sees the previous file or the complete new one, never a truncated one. Staging
names are ``.<name>.<pid>-<8 hex>.tmp`` (``.old`` for a folder being replaced): every glob of
final names ignores them, and the next atomic write into the same folder removes those whose
process is gone. Files and folders are created with ``os.open``/``os.mkdir`` modes
``0o666``/``0o777``, so the user's umask applies as to any other file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.(?P<kind>tmp|old)$")


def _temp_path(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}"


def _process_gone(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would signal the process on Windows: never judge
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the staging folders of atomic writes in ``folder`` whose process is gone; return them.

    Only folders of this module's pattern (``.<name>.<pid>-<8 hex>.tmp`` or ``.old``) whose
    process id no longer runs on this machine are touched; a write in progress (in this
    process or another) keeps its staging folder. A process killed while :func:`atomic_dir`
    swapped folders can leave ``<name>`` missing and its previous content in the ``.old``
    folder: that content is moved back to ``<name>`` first.
    """
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in Path(folder).iterdir():
            match = _TEMP_NAME.match(entry.name)
            if not (match and entry.is_dir() and not entry.is_symlink() and _process_gone(int(match["pid"]))):
                continue
            previous, target = entry / match["name"], entry.parent / match["name"]
            if match["kind"] == "old" and previous.exists() and not target.exists():
                os.replace(previous, target)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for ``path``; on success fsync it and rename it onto ``path``.

    The temporary path has ``path``'s file name, inside a hidden staging folder in the same
    folder (``.<name>.<pid>-<8 hex>.tmp/``), so a writer that makes its own temporary files
    (safetensors does) makes them there too. It exists (empty) when the block starts, created
    with the user's umask; a writer that replaces it (safetensors writes ``0600`` files) gets
    that mode back before the rename. A block that raises, or a process killed before the
    rename, leaves any previous file at ``path`` byte-identical; the staging folder is removed
    on an exception, and a killed process's one by the next atomic write into the folder
    (:func:`remove_stale_temps`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    staging = _temp_path(target, "tmp")
    os.mkdir(staging, 0o700)
    tmp_path = staging / target.name
    try:
        os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(tmp_path.stat().st_mode)
        yield tmp_path
        if stat.S_IMODE(tmp_path.stat().st_mode) != mode:
            os.chmod(tmp_path, mode)
        _fsync(tmp_path)
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_error(error: Exception, path: str | os.PathLike) -> OSError:
    """The :class:`OSError` to raise when writing ``path`` failed with ``error``: it names ``path``, not a staging file.

    The error number is kept (``OSError(errno, strerror, path)``, so a full disk stays
    ``ENOSPC`` and a read-only folder a :class:`PermissionError`), also when a library reported
    it only as text (safetensors: ``IoError(Os { code: 28, ... })``).
    """
    code = error.errno if isinstance(error, OSError) else None
    if code is None:
        found = re.search(r"\bcode: (\d+)", str(error))
        code = int(found[1]) if found else None
    if code is None:
        return OSError(f"cannot write {path}: {error}")
    return OSError(code, os.strerror(code), str(path))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh folder beside ``target``; on success fsync its files and swap it into place.

    Any old folder at ``target`` is replaced. Readers see the old folder or the complete new
    one, never a half-written one; the folders are created with the user's umask.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    tmp = _temp_path(target, "tmp")
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        for file in sorted(p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()):
            _fsync(file)
        old: Path | None = None
        if target.exists():
            old = _temp_path(target, "old")
            os.mkdir(old, 0o777)
            os.replace(target, old / target.name)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old / target.name, target)
            raise
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file, read from its header alone (no tensor is loaded).

    Raises:
        ValueError: The file is not a readable safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None


def safetensors_format(path: str | os.PathLike) -> str | None:
    """The ``format`` metadata of a safetensors file (``None`` if it has none).

    Raises:
        ValueError: The file is not a readable safetensors file.
    """
    return safetensors_metadata(path).get("format")


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` and string ``metadata`` as a safetensors file, atomically and reproducibly.

    safetensors writes its metadata in hash-map order, which changes from one write to the
    next, so the same content would give different bytes (and a file's SHA-256, by which a
    run names the mask it trained, would not identify the content). Here the metadata keys
    are sorted: the header is re-serialised (compact JSON, padded with spaces to 8 bytes as
    the format requires) and the tensor data copied after it unchanged, in 1 MiB blocks.
    """
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        raw = tmp.parent / f"{tmp.name}.unsorted"
        save_file(dict(tensors), str(raw), metadata=dict(metadata))
        with open(raw, "rb") as source, open(tmp, "wb") as target:
            length = int.from_bytes(source.read(8), "little")
            header = json.loads(source.read(length))
            header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
            text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
            text += b" " * (-len(text) % 8)
            target.write(len(text).to_bytes(8, "little") + text)
            shutil.copyfileobj(source, target, 1 << 20)
