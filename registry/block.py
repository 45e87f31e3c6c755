"""Block: train whole square tiles of each weight matrix, the best-scored tiles first."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from mthlib.masking import (
    DATA_SCORES,
    Batch,
    EntryScore,
    Masks,
    MaskStrategy,
    check_entry_score,
    entry_scores,
    register_mask,
)


@register_mask("block")
class Block(MaskStrategy):
    """Block-structured: whole ``block_size x block_size`` tiles of each matrix, the best-scored first.

    Source: Gray, Radford, Kingma, "GPU Kernels for Block-Sparse Weights" (OpenAI, 2017),
    for block-sparse weights that GPU kernels skip tile by tile; Narang, Undersander,
    Diamos, "Block-Sparse Recurrent Neural Networks" (arXiv:1711.02782), for pruning
    whole blocks by a block score.

    Selection rule: every eligible parameter must be a matrix. Each is cut into tiles of
    ``block_size`` rows by ``block_size`` columns from its top-left corner; a matrix whose
    dimensions are not multiples of ``block_size`` has smaller tiles along its last rows
    and columns, which count their real entries. A tile's score is the *mean* of its
    entries' ``score`` (a sum would rank a small edge tile below a full one of the same
    entry scores; for whole tiles the two rank alike). Tiles are ranked by score (ties:
    earlier parameter, then the tile's row-major position) and kept whole, best first,
    while the kept entries total at most ``k = keep_count(n)``, ``n`` being all eligible
    entries (``global``) or each tensor's (``per_tensor``). The count therefore lands
    within one tile below ``k``, in ``(k - block_size**2, k]``, and is exactly
    ``block_size**2 * (k // block_size**2)`` when every tile is whole. A tile holding an
    ``exclude_mask`` entry is never kept. :func:`check_blocks` verifies the result.

    Cost: ``magnitude`` and ``random``: one pass over the weights, no data; ``fisher``
    and ``snip``: one forward and backward pass per calibration batch over
    ``num_samples`` sequences. Then one sort of the tile scores (``n / block_size**2``
    of them). ``seed`` seeds the ``random`` score and the calibration stream.

    Args:
        block_size: Tile side. 32 by default: block-sparse GPU kernels work on tiles of
            16 to 64 (larger tiles skip more work per stored index), and at 99% sparsity
            a 576 x 576 matrix still keeps three 32 x 32 tiles on average.
        score: ``magnitude`` (``|w|``), ``random`` (seeded uniform), ``fisher`` (squared
            calibration gradients) or ``snip`` (``|g * w|``); see
            :func:`~mthlib.masking.entry_scores`.
        num_samples: Calibration sequences (``fisher`` and ``snip`` only).
        **options: The shared options (``sparsity``, ``allocation``, ``include``, ``seed``, ...)
            of :class:`~mthlib.masking.MaskStrategy`.
    """

    def __init__(self, block_size: int = 32, score: EntryScore = "magnitude", num_samples: int = 128,
                 **options: Any) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 (tile side in entries); got {block_size}")
        check_entry_score(score)
        super().__init__(**options)
        self.block_size = block_size
        self.score = score
        self.use_calibration(num_samples, needed=score in DATA_SCORES)

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Keep the best whole tiles while the count stays at most ``k``, then :func:`check_blocks`."""
        params = self.eligible(model)
        for name, p in params.items():
            if p.dim() != 2:
                raise ValueError(f"block masks tile matrices; {name} has shape {tuple(p.shape)} (leave it out with exclude)")
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        excluded = self.excluded_indices(shapes)
        means = {}
        for name, scores in entry_scores(self, model, batches, self.score).items():
            blocked = excluded.get(name)
            means[name] = tile_means(scores, self.block_size, blocked, name)
        sizes = {name: tile_sizes(shapes[name], self.block_size) for name in shapes}
        if self.allocation == "global":
            kept = best_tiles(means, sizes, self.keep_count(sum(math.prod(s) for s in shapes.values())))
        else:
            kept = {}
            for name in shapes:
                kept.update(best_tiles({name: means[name]}, {name: sizes[name]}, self.keep_count(math.prod(shapes[name]))))
        if not any(bool(tiles.any()) for tiles in kept.values()):
            raise ValueError(
                f"no whole {self.block_size}x{self.block_size} tile fits in the {1 - self.sparsity:.4g} of entries "
                "to keep: lower block_size or sparsity"
            )
        masks = Masks({name: tile_entries(kept[name], shapes[name], self.block_size) for name in shapes}, shapes)
        check_blocks(masks, self.block_size)
        return masks


def tile_sizes(shape: tuple[int, ...], block_size: int) -> torch.Tensor:
    """Real entries of each tile of a ``shape`` matrix, ``(ceil(rows / b), ceil(cols / b))`` int64 (edge tiles smaller)."""
    rows, cols = shape
    heights = (rows - torch.arange(0, rows, block_size)).clamp(max=block_size)
    widths = (cols - torch.arange(0, cols, block_size)).clamp(max=block_size)
    return heights.unsqueeze(1) * widths.unsqueeze(0)


def _tiled(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """``values`` zero-padded to whole tiles, viewed as ``(tile rows, b, tile cols, b)``."""
    rows, cols = values.shape
    tile_rows, tile_cols = -(-rows // block_size), -(-cols // block_size)
    if (rows, cols) != (tile_rows * block_size, tile_cols * block_size):
        padded = torch.zeros(tile_rows * block_size, tile_cols * block_size, dtype=values.dtype, device=values.device)
        padded[:rows, :cols] = values
        values = padded
    return values.reshape(tile_rows, block_size, tile_cols, block_size)


def tile_means(scores: torch.Tensor, block_size: int, blocked: torch.Tensor | None = None,
               name: str = "scores") -> torch.Tensor:
    """Mean entry score of each tile of the matrix ``scores``; ``-inf`` for tiles holding a ``blocked`` flat index.

    Raises:
        ValueError: A score is NaN.
    """
    scores = scores.detach()
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"scores of {name} contain NaN")
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    sums = _tiled(scores.to(dtype), block_size).sum(dim=(1, 3))
    means = sums / tile_sizes(tuple(scores.shape), block_size).to(device=sums.device, dtype=dtype)
    if blocked is not None and blocked.numel():
        hit = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        hit[blocked.to(scores.device)] = True
        means[_tiled(hit.view(scores.shape), block_size).any(dim=3).any(dim=1)] = -torch.inf
    return means


def best_tiles(means: Mapping[str, torch.Tensor], sizes: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The best tiles of all tensors together, kept while their entries total at most ``k``.

    Tiles are ranked by mean score (ties: the order of ``means``, then row-major tile
    position; a stable sort) and taken in that order until the next one would pass
    ``k``; ``-inf`` tiles are never taken.

    Args:
        means: Name to tile scores ``(tile rows, tile cols)``, in the order that breaks ties.
        sizes: Name to the real entries of each tile, same shapes.
        k: Most entries to keep.

    Returns:
        Name to a boolean ``(tile rows, tile cols)`` tensor (CPU), ``True`` at kept tiles.

    Raises:
        ValueError: The tiles not ruled out by ``-inf`` hold fewer than ``k`` entries.
    """
    values = torch.cat([t.reshape(-1).cpu() for t in means.values()])
    counts = torch.cat([sizes[name].reshape(-1) for name in means])
    free = int(counts[torch.isfinite(values)].sum())
    if free < k:
        raise ValueError(f"cannot keep {k} entries in whole tiles: only {free} lie in tiles free of exclude_mask")
    order = torch.sort(values, descending=True, stable=True).indices
    taken = order[(torch.cumsum(counts[order], 0) <= k) & torch.isfinite(values[order])]
    flags = torch.zeros(values.numel(), dtype=torch.bool)
    flags[taken] = True
    out, offset = {}, 0
    for name, tile_scores in means.items():
        out[name] = flags[offset: offset + tile_scores.numel()].view(tile_scores.shape)
        offset += tile_scores.numel()
    return out


def tile_entries(kept: torch.Tensor, shape: tuple[int, ...], block_size: int) -> torch.Tensor:
    """Sorted flat int64 indices of every entry of the kept tiles of a ``shape`` matrix."""
    rows, cols = shape
    dense = kept.repeat_interleave(block_size, dim=0).repeat_interleave(block_size, dim=1)[:rows, :cols]
    return torch.nonzero(dense.reshape(-1)).view(-1)


def check_blocks(masks: Masks, block_size: int) -> None:
    """Raise :class:`ValueError` unless every tile of every matrix is kept whole or not at all.

    Tiles are ``block_size`` square from the top-left corner, edge tiles smaller (as
    :class:`Block` cuts them).
    """
    for name, indices in masks.items():
        shape = masks.shape(name)
        if len(shape) != 2:
            raise ValueError(f"{name} has shape {shape}: block masks cover matrices only")
        tile_cols = -(-shape[1] // block_size)
        rows, cols = indices.long() // shape[1], indices.long() % shape[1]
        tiles = (rows // block_size) * tile_cols + cols // block_size
        counts = torch.bincount(tiles, minlength=-(-shape[0] // block_size) * tile_cols).view(-1, tile_cols)
        sizes = tile_sizes(shape, block_size)
        broken = torch.nonzero((counts != 0) & (counts != sizes))
        if broken.numel():
            row, col = (int(i) * block_size for i in broken[0])
            tile = int(counts[tuple(broken[0])])
            raise ValueError(
                f"{name} keeps {tile} of the {int(sizes[tuple(broken[0])])} entries of the tile at rows "
                f"{row}-{min(row + block_size, shape[0]) - 1}, columns {col}-{min(col + block_size, shape[1]) - 1}: "
                "tiles must be kept whole"
            )
