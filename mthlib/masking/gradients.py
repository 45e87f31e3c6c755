"""Gradients at the active entries: gathered as autograd produces them, the dense ones freed at once.

:class:`ActiveGradients` registers one post-accumulate-grad hook per trained parameter.
Each hook reads ``grad.view(-1)[indices]`` (or the values of the sparse gradient an
:class:`~mthlib.masking.layers.ActiveEntryLinear` produced) into an fp32 buffer of ``k``
values and sets ``param.grad = None``, so a dense gradient lives only while autograd needs
it. Buffers add up over micro-batches until :meth:`clear`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mthlib.distributed import all_reduce_mean_
from mthlib.masking.masks import holds_every_entry, locate


class ActiveGradients:
    """Name to the fp32 gradient at each trained parameter's active entries.

    Args:
        params: Name to parameter of the model (as :meth:`~torch.nn.Module.named_parameters`).
        indices: Name to sorted flat indices (on the parameter's device) of the parameters to train.
        sums: Gradient sums to start from (aligned with ``indices``), e.g. carried over a mask update.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        indices: Mapping[str, torch.Tensor],
        sums: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self._params = dict(params)
        self._indices: dict[str, torch.Tensor] = {}
        self._hooks: dict[str, RemovableHandle] = {}
        self.buffers: dict[str, torch.Tensor] = dict(sums or {})
        """Name to the gradient summed since :meth:`clear`, aligned with the active indices."""
        self._paused = False
        for name, idx in indices.items():
            self._watch(name, idx)

    def _watch(self, name: str, indices: torch.Tensor) -> None:
        self._indices[name] = indices
        self._hooks[name] = self._params[name].register_post_accumulate_grad_hook(self._gatherer(name))

    def _gatherer(self, name: str) -> Callable[[torch.Tensor], None]:
        def gather(param: torch.Tensor) -> None:
            if self._paused or param.grad is None:
                return
            part = active_part(param.grad, self._indices[name])
            buffer = self.buffers.get(name)
            if buffer is None:
                self.buffers[name] = part
            else:
                buffer.add_(part)
            param.grad = None

        return gather

    @property
    def names(self) -> tuple[str, ...]:
        """The parameters whose gradients are gathered."""
        return tuple(self._indices)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave gradients produced inside the block in ``.grad`` (for passes that are not training steps)."""
        was, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = was

    def clear(self) -> None:
        """Forget the summed gradients (and any ``.grad`` left on a trained parameter)."""
        self.buffers = {}
        for name in self._indices:
            self._params[name].grad = None

    def fill_missing(self) -> None:
        """Give every trained parameter a buffer (zeros where no gradient arrived), e.g. before an all-reduce."""
        for name, idx in self._indices.items():
            if name not in self.buffers:
                self.buffers[name] = torch.zeros(idx.numel(), dtype=torch.float32, device=idx.device)

    @torch.no_grad()
    def all_reduce_mean(self) -> None:
        """Average the buffers over all processes (data parallel); a no-op in a single process.

        Only the ``k`` active entries per parameter travel, bucketed into few collectives.
        A parameter that received no gradient on this process contributes zeros, so every
        process ends with the same buffers.
        """
        self.fill_missing()
        all_reduce_mean_(self.buffers[name] for name in sorted(self._indices))

    @torch.no_grad()
    def clip_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Scale the buffers so their total norm is at most ``max_norm``; returns the norm before.

        Same rule as :func:`torch.nn.utils.clip_grad_norm_` (coefficient
        ``max_norm / (norm + 1e-6)`` clamped to 1), over exactly the gradient entries that
        can change the model.
        """
        grads = list(self.buffers.values())
        if not grads:
            return torch.zeros(())
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads]), norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
        return total

    def remove(self) -> None:
        """Remove every hook (dense gradients accumulate in ``.grad`` again)."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks, self._indices, self.buffers = {}, {}, {}


def active_part(grad: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The fp32 gradient at ``indices`` (sorted flat), from a dense or a sparse COO gradient.

    A coalesced sparse gradient whose entries are exactly ``indices`` (what an
    active-entry backward produces) is read without densifying; any other sparse
    gradient is densified first. Indices of every entry (a complete mask) take the whole
    gradient without a gather.
    """
    if not grad.is_sparse:
        flat = grad.reshape(-1)
        if holds_every_entry(indices, flat.numel()):  # a copy: the gradient's storage may be reused (a DDP bucket view)
            return flat.to(torch.float32, copy=True)
        return flat.index_select(0, indices).float()
    if grad.is_coalesced() and grad._nnz() == indices.numel():
        strides = torch.tensor(_strides(grad.shape), device=indices.device)
        flat = (grad._indices() * strides.unsqueeze(1)).sum(dim=0)
        if torch.equal(flat, indices):
            return grad._values().float()
    return grad.to_dense().reshape(-1).index_select(0, indices).float()


def remap_values(values: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Values aligned with sorted indices ``old``, re-aligned with ``new``: kept entries keep theirs, new ones 0."""
    found, position = locate(old, new.to(old.device))
    out = torch.zeros(new.numel(), dtype=values.dtype, device=values.device)
    out[found] = values[position[found]]
    return out


def _strides(shape: torch.Size) -> list[int]:
    """Row-major strides of a contiguous tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]
