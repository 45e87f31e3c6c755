"""Exact top-k selection over named score tensors: the counting and tie rules every strategy shares.

Ties break by higher score, then earlier tensor (the order of the mapping), then lower flat
index; entries listed as excluded are never chosen. Memory stays at one fp32 (fp64 for fp64
scores) copy of the scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def select_top(scores: Mapping[str, torch.Tensor], k: int, excluded: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``k`` best entries of ``scores`` taken together (ties: tensor order, then flat index).

    Args:
        scores: Name to scores (any shape), in the order that breaks ties.
        k: Entries to keep over all tensors together.
        excluded: Name to flat indices that may never be chosen.

    Returns:
        Name to sorted flat int64 indices (CPU).

    Raises:
        ValueError: Fewer than ``k`` entries are left after the exclusion.
    """
    numel = sum(s.numel() for s in scores.values())
    blocked = sum(int(excluded[name].numel()) for name in scores if name in excluded)
    if k > numel - blocked:
        raise ValueError(f"cannot keep {k} entries: only {numel - blocked} of {numel} are not in exclude_mask")
    if k == 0:
        return {name: torch.zeros(0, dtype=torch.int64) for name in scores}
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores.values()) else torch.float32
    values = torch.cat([s.detach().reshape(-1).to(dtype) for s in scores.values()])
    offsets, offset = {}, 0
    for name, score in scores.items():
        offsets[name] = offset
        if name in excluded and excluded[name].numel():
            values[offset + excluded[name].to(values.device)] = -math.inf
        offset += score.numel()
    threshold = kth_largest(values, k)
    remaining = k - int(torch.count_nonzero(values > threshold))
    chosen = {}
    for name, score in scores.items():
        flat = values[offsets[name]: offsets[name] + score.numel()]
        above = torch.nonzero(flat > threshold).view(-1)
        taken = first_ties(flat, threshold, remaining, excluded.get(name))
        remaining -= int(taken.numel())
        chosen[name] = torch.sort(torch.cat([above, taken])).values.cpu()
    return chosen


def first_ties(
    flat: torch.Tensor, threshold: torch.Tensor, limit: int, excluded: torch.Tensor | None, chunk: int = 1 << 22
) -> torch.Tensor:
    """The first ``limit`` positions where ``flat == threshold``, outside ``excluded``, in order.

    Searched a chunk at a time, so a huge tie class (e.g. millions of zero scores) costs
    the positions actually taken, not an index of every tied entry.
    """
    found = [torch.zeros(0, dtype=torch.int64, device=flat.device)]
    for start in range(0, flat.numel(), chunk):
        if limit <= 0:
            break
        part = torch.nonzero(flat[start: start + chunk] == threshold).view(-1) + start
        if excluded is not None and part.numel():
            part = part[~torch.isin(part, excluded.to(part.device))]
        part = part[:limit]
        found.append(part)
        limit -= part.numel()
    return torch.cat(found)


def kth_largest(values: torch.Tensor, k: int, sample_size: int = 1 << 20) -> torch.Tensor:
    """The ``k``-th largest entry of the 1-D ``values``, exactly, ranking only a small part of them.

    :func:`torch.kthvalue` on the whole vector would copy it and add int64 indices (three
    times the scores' memory: 1.5 GiB for a 134M-parameter model). Instead a fixed-seed
    random sample gives a lower bound that about ``2k`` entries exceed, and only the
    entries at or above it are ranked; an unlucky bound is lowered until enough pass.

    Entries at ``-inf`` (excluded, or pruned by an iterative strategy) are never ranked:
    when fewer than ``k`` entries are finite the answer is ``-inf``, and otherwise the
    sample and the bound come from the finite entries only, so a vector that is mostly
    ``-inf`` costs its finite part, not a ranking of everything.
    """
    n = values.numel()
    finite = values > -math.inf
    count = int(torch.count_nonzero(finite))
    if k > count:
        return torch.tensor(-math.inf, dtype=values.dtype, device=values.device)
    if count <= 4 * sample_size:
        candidates = values if count == n else values[finite]
        return torch.kthvalue(candidates, count - k + 1).values
    generator = torch.Generator(device=values.device).manual_seed(0)
    sample = values[torch.randint(n, (sample_size,), generator=generator, device=values.device)]
    sample = sample[sample > -math.inf]
    level = 1.0 - min(1.0, 2.0 * k / count + 1e-3)
    while True:
        if level > 0 and sample.numel():
            bound = torch.quantile(sample, level, interpolation="lower")
        else:
            bound = values[finite].min()
        above = values[values >= bound]
        if above.numel() >= k:
            return torch.kthvalue(above, above.numel() - k + 1).values
        level = max(0.0, 2.0 * level - 1.0)
