"""The running batch's KV cache: one preallocated row (slot) per sequence, written in place.

Every decoder layer keeps two buffers [slots, kv_heads, capacity, head_dim]. A sequence's keys and values sit at
the start of its own row, so rows have their own lengths and a new sequence is copied into a free row without
touching the others. A decode step writes each row's new token at that row's length and attention reads the view
up to the longest row, a mask hiding each row's unused tail (rows then see exactly their own tokens, as alone).
Finished rows are refilled by moving the last row in, so the running rows are always slots 0..n-1 and the view
is a plain slice. Capacity doubles when a row would pass it; the buffers are kept for the next requests (at most
slots x context length tokens per layer).

transformers' StaticCache does not fit: all its rows share one length and attention always reads the whole
capacity; DynamicCache concatenates (copies) the whole cache at every step.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

MIN_CAPACITY = 256


class SlotLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, owner: "SlotCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states) -> None:
        raise RuntimeError("SlotCache.add allocates the buffers")  # never reached: update does not call it

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        o = self.owner
        self.keys[o.rows, :, o.cols] = key_states[:, :, 0]  # [n, heads, dim] at (row i, column length_i)
        self.values[o.rows, :, o.cols] = value_states[:, :, 0]
        return self.keys[:o.n, :, :o.width], self.values[:o.n, :, :o.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.width, 0

    def get_seq_length(self) -> int:
        return self.owner.width - 1

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """KV cache of up to `slots` running sequences; decode one token per row with `step_inputs` then `advance`."""

    def __init__(self, num_layers: int, slots: int):
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])
        self.slots = slots
        self.lengths: list[int] = []  # tokens cached per running row
        self.rows = self.cols = None  # index tensors of the step in progress
        self.width = 0

    @property
    def n(self) -> int:
        return len(self.lengths)

    def add(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put one sequence (per layer (keys, values) of shape [1, kv_heads, length, head_dim]) in a free row."""
        length = kv[0][0].shape[2]
        if self.layers[0].keys is None:
            k = kv[0][0]
            shape = (self.slots, k.shape[1], max(MIN_CAPACITY, length + 1), k.shape[3])
            for layer in self.layers:
                layer.keys, layer.values = k.new_zeros(shape), k.new_zeros(shape)
        self._reserve(length + 1)
        row = self.n
        for layer, (k, v) in zip(self.layers, kv):
            layer.keys[row, :, :length] = k[0]
            layer.values[row, :, :length] = v[0]
        self.lengths.append(length)

    def row(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of row i's cached tokens: per layer (keys, values) of shape [1, kv_heads, length, head_dim]."""
        n = self.lengths[i]
        return [(layer.keys[i:i + 1, :, :n].clone(), layer.values[i:i + 1, :, :n].clone()) for layer in self.layers]

    def keep(self, keep: list[int]) -> list[int]:
        """Keep only the rows `keep`: rows past the new end move into the freed rows below it (one copy per
        finished sequence). Returns, for each new row, the row it came from."""
        order, kept = list(range(len(keep))), set(keep)
        holes = [i for i in order if i not in kept]
        for hole, old in zip(holes, [i for i in keep if i >= len(keep)]):
            order[hole] = old
            n = self.lengths[old]
            for layer in self.layers:
                layer.keys[hole, :, :n] = layer.keys[old, :, :n]
                layer.values[hole, :, :n] = layer.values[old, :, :n]
        self.lengths = [self.lengths[i] for i in order]
        return order

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids [n, 1] and the attention mask [n, 1, 1, width] for one new token per row."""
        device = self.layers[0].keys.device
        self.width = max(self.lengths) + 1
        self._reserve(self.width)
        self.cols = torch.tensor(self.lengths, device=device)
        self.rows = torch.arange(self.n, device=device)
        mask = torch.arange(self.width, device=device) <= self.cols[:, None]
        return self.cols[:, None], mask[:, None, None, :]

    def advance(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]

    def _reserve(self, width: int) -> None:
        capacity = self.layers[0].keys.shape[2]
        if width <= capacity:
            return
        capacity = max(width, 2 * capacity)
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros(old.shape[:2] + (capacity,) + old.shape[3:])
                new[:, :, :old.shape[2]] = old
                setattr(layer, name, new)
