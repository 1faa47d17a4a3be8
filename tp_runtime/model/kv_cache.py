"""Static per-shard KV cache: one row (a slot) per sequence, allocated once for (slots, max length).

A sequence owns a slot from admission to finish: its keys and values stay in that row while
its neighbours in the batch come and go. Every read and write names the slots of the rows it
touches (`slots` int64 [batch]); None means rows 0..batch-1, the common case of a batch that
fills the first slots, where the cache is read as a view instead of gathered.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, max_batch: int, kv_heads_local: int, max_seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, max_batch, kv_heads_local, max_seq_len, head_dim)
        # k, v: [layer, slot, kv_heads_local, max_seq, head_dim]
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.batch_index = torch.arange(max_batch, device=device)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, slots: torch.Tensor | None = None) -> None:
        # k, v: [batch, kv_heads_local, seq, head_dim] at positions start..start+seq-1
        b, s = k.shape[0], k.shape[2]
        rows = slice(0, b) if slots is None else slots
        self.k[layer, rows, :, start : start + s] = k
        self.v[layer, rows, :, start : start + s] = v

    def write_decode(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None = None) -> None:
        # k, v: [batch, kv_heads_local, head_dim]; positions: [batch], one position per sequence
        rows = self.batch_index[: k.shape[0]] if slots is None else slots
        self.k[layer, rows, :, positions] = k
        self.v[layer, rows, :, positions] = v

    def write_row(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        # k, v: [1, kv_heads_local, seq, head_dim], one sequence's keys at positions start..
        s = k.shape[2]
        self.k[layer, slot : slot + 1, :, start : start + s] = k
        self.v[layer, slot : slot + 1, :, start : start + s] = v

    def row(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first `length` positions, [1, kv_heads_local, length, head_dim] views."""
        return self.k[layer, slot : slot + 1, :, :length], self.v[layer, slot : slot + 1, :, :length]

    def layer(self, layer: int, batch: int, slots: torch.Tensor | None = None, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions (default all) of the batch's rows: a view for slots None,
        else a gathered copy."""
        k, v = self.k[layer, :, :, :length], self.v[layer, :, :, :length]
        if slots is None:
            return k[:batch], v[:batch]
        return k.index_select(0, slots), v.index_select(0, slots)
