"""Rows of token ids of different lengths as padded tensors, and their attention masks."""

from __future__ import annotations

import torch


def pad_rows(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Stack integer rows of different lengths into a ``(len(rows), longest)`` tensor padded with ``value``."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            (out[i, width - len(row):] if left else out[i, : len(row)]).copy_(torch.tensor(row, dtype=torch.long))
    return out


def attention_rows(rows: list[list[int]], left: bool = False) -> torch.Tensor:
    """The attention mask matching :func:`pad_rows`: 1 on real tokens, 0 on padding."""
    return pad_rows([[1] * len(r) for r in rows], 0, left)
