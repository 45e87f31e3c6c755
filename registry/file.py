"""File: train exactly the entries of a saved mask (``mth masks build`` output, a mask file or a sparse delta)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn

from mthlib.fingerprint import file_sha256, model_fingerprint
from mthlib.masking import Batch, Masks, MaskStrategy, register_mask


@register_mask("file")
class MaskFile(MaskStrategy):
    """Train exactly the entries of a saved mask file, so a sweep computes a costly mask once.

    Source: none (a way to reuse any strategy's result). ``mth masks build --config C --out F``
    writes the mask ``mth fit --config C`` would compute; ``mask: {class_path: file,
    init_args: {path: F}}`` (or ``--model.mask file --model.mask.path F``) then trains on it,
    bitwise the same run as computing it. A sparse delta (a finished run's
    ``deltas/last.safetensors``) is accepted too: its trained entries are the mask.

    Selection rule: the file's indices, unchanged. ``sparsity`` is the file's (the fraction of
    the entries of the parameters it names that it leaves frozen), not an argument.

    Checks: ``digest`` is the file's SHA-256; left out, it is read from the file when the
    strategy is built, so the run's config, checkpoint and deltas record which file was
    trained, and a file changed before a resume is refused. When the file records its
    base model's fingerprint (``mth masks build`` and deltas do), :meth:`compute` refuses
    a model with another one; the masks must name parameters of the model with their
    shapes. Every failure is one line naming the file.

    Args:
        path: The mask file (``.safetensors``).
        digest: Expected SHA-256 of the file (hex); ``None`` reads it from the file.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Not a mask file or delta, the digest differs, or it trains nothing.
    """

    def __init__(self, path: str, digest: str | None = None) -> None:
        self.path = path
        actual = _sha256(Path(path))
        if digest is not None and digest != actual:
            raise ValueError(f"mask file {path} has SHA-256 {actual}, but the config expects {digest}: the file changed")
        self.digest = actual
        self._masks = Masks.load(path)
        if self._masks.total == 0:
            raise ValueError(f"mask file {path} has no active entry: there is nothing to train")
        super().__init__(sparsity=round(1.0 - self._masks.density, 12))

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """The file's masks, after checking they fit ``model``."""
        recorded = self._masks.metadata.get("base_fingerprint")
        if recorded:
            actual = model_fingerprint(model)
            if recorded != actual:
                raise ValueError(
                    f"mask file {self.path} was built for base fingerprint {recorded} "
                    f"({self._masks.metadata.get('base_model', 'unknown model')}), but this model has {actual}"
                )
        params = dict(model.named_parameters())
        for name in self._masks:
            if name not in params:
                raise ValueError(f"mask file {self.path} names parameter {name}, which the model does not have")
            if tuple(params[name].shape) != self._masks.shape(name):
                raise ValueError(
                    f"mask file {self.path} has shape {self._masks.shape(name)} for {name}; "
                    f"the model has {tuple(params[name].shape)}"
                )
        return self._masks


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    return file_sha256(path)
