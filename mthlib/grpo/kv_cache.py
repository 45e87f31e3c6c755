"""The native engine's KV cache: one buffer per layer allocated for the whole rollout, and a prefill that shares it.

:func:`prefill` runs each distinct context through the model once and gives its cache rows to
every row that repeats it (a GRPO group repeats each prompt G times); :class:`PreallocatedLayer`
then takes each decode step's key and value into the next free slot of its buffer.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from mthlib.grpo.padding import attention_rows, pad_rows


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in a buffer allocated once for the whole rollout.

    Behaves as Hugging Face's ``DynamicLayer`` (the cache holds exactly the tokens seen, so
    attention masks and positions are the same), but a decode step writes its key and value
    into the next free slot of a preallocated ``(B, H, capacity, D)`` buffer instead of
    concatenating a new tensor of the whole cache: at ~100 cached tokens that concatenation
    was a fifth of a CPU decode step. A write past ``capacity`` grows the buffer (doubling).
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            shape = (*key_states.shape[:2], max(self.capacity, key_states.shape[2]))
            self._key_buffer = key_states.new_empty(*shape, key_states.shape[3])
            self._value_buffer = value_states.new_empty(*shape, value_states.shape[3])
        end = self.length + key_states.shape[2]
        if end > self._key_buffer.shape[2]:  # past the planned length: grow (once per doubling)
            size = max(end, 2 * self._key_buffer.shape[2])
            self._key_buffer, self._value_buffer = _grown(self._key_buffer, size), _grown(self._value_buffer, size)
        self._key_buffer[:, :, self.length:end] = key_states
        self._value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._key_buffer, self._value_buffer = self._key_buffer[indices], self._value_buffer[indices]
            self.keys, self.values = self._key_buffer[:, :, :self.length], self._value_buffer[:, :, :self.length]


def _grown(buffer: torch.Tensor, size: int) -> torch.Tensor:
    """``buffer`` ``(B, H, T, D)`` extended along ``T`` to ``size`` slots (the new ones unset)."""
    return torch.cat([buffer, buffer.new_empty(*buffer.shape[:2], size - buffer.shape[2], buffer.shape[3])], dim=2)


def preallocated_cache(model: PreTrainedModel, capacity: int) -> Cache:
    """A KV cache of :class:`PreallocatedLayer` for every decoder layer of ``model``, ``capacity`` tokens each."""
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(layers)])


def prefill(
    model: PreTrainedModel, contexts: list[list[int]], pad_id: int, share: bool = True, max_new_tokens: int = 0,
) -> tuple[torch.Tensor, Cache, torch.Tensor, torch.Tensor]:
    """Run the contexts through the model once, left-padded, for decoding to continue.

    With ``share``, each distinct context is computed once and its KV cache rows are given to
    every row that repeats it, so a group of G completions of one prompt costs one prefill.
    The cache is preallocated for ``max_new_tokens`` more tokens.

    Returns:
        Next-token logits ``(N, V)``, the KV cache, the attention mask ``(N, T)`` and the
        position of every row's last token ``(N,)``, all in the order of ``contexts``.
    """
    device = model.device
    distinct = list(dict.fromkeys(map(tuple, contexts))) if share else [tuple(c) for c in contexts]
    row_of = {context: row for row, context in enumerate(distinct)}
    source = torch.tensor([row_of[tuple(c)] for c in contexts], device=device)
    ids = pad_rows([list(c) for c in distinct], pad_id, left=True).to(device)
    mask = attention_rows([list(c) for c in distinct], left=True).to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = preallocated_cache(model, ids.shape[1] + max_new_tokens)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    if share:
        cache.batch_select_indices(source)
    return out.logits[source, -1], cache, mask[source], positions[source, -1]
