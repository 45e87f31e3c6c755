"""Lightning checkpoints written durably and read without pickle.

Lightning's own :class:`~lightning.fabric.plugins.io.torch_io.TorchCheckpointIO` serialises to
memory and hands the bytes to an fsspec transaction, which on a local disk ends in a move that
is neither fsynced nor, across file systems or on a full disk, safe from leaving a truncated file
under the final name. :class:`AtomicCheckpointIO` writes through :func:`~mthlib.utils.atomic_path`
instead (temp file in the destination folder, fsync, rename), so ``last.ckpt`` and every other
checkpoint is either the previous complete file or the new complete one. It loads with
``weights_only=True`` only: a checkpoint is data, never code. ``mth fit`` installs it by default.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from mthlib.utils import atomic_path, write_error

PICKLE_REFUSED = (
    "weights_only=False would let a checkpoint run arbitrary code (pickle); mthlib loads checkpoints "
    "with weights_only=True only"
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save checkpoints atomically and durably; load them with ``weights_only=True`` only.

    A save that fails (a full disk, a read-only folder) or is killed leaves any previous file
    at the path byte-identical and no temporary file under a checkpoint name. Paths with a URL
    scheme (``s3://``...) are handed to Lightning's fsspec writer unchanged.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` (temp file in its folder, fsync, rename).

        Raises:
            OSError: The file could not be written (it names ``path``; any previous file there is unchanged).
        """
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except OSError as err:
            raise write_error(err, path) from err

    def load_checkpoint(
        self, path: _PATH, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load ``path`` with ``weights_only=True``.

        Raises:
            ValueError: ``weights_only=False`` was asked for, or the file is truncated or not a
                checkpoint that loads without pickle.
            FileNotFoundError: No file at ``path``.
        """
        if weights_only is False:
            raise ValueError(PICKLE_REFUSED)
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return read_checkpoint(path, map_location)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a local checkpoint with ``weights_only=True``, with one-line errors.

    Args:
        path: The checkpoint file.
        map_location: As for :func:`torch.load`.
        mmap: Map the tensors instead of reading them (a cheap test that the file is intact).

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: The file is truncated, not a torch checkpoint, or needs pickle.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    if Path(path).stat().st_size == 0:
        raise ValueError(f"{path} is empty (a write that never finished)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} holds objects only pickle can load; {PICKLE_REFUSED}") from None
    except (RuntimeError, EOFError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise ValueError(f"{path} is truncated or not a torch checkpoint ({reason})") from None
