"""Static per-shard KV cache, allocated once for (max batch, max sequence length)."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, max_batch: int, kv_heads_local: int, max_seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, max_batch, kv_heads_local, max_seq_len, head_dim)
        # k, v: [layer, batch, kv_heads_local, max_seq, head_dim]
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.batch_index = torch.arange(max_batch, device=device)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        # k, v: [batch, kv_heads_local, seq, head_dim] at positions start..start+seq-1
        b, s = k.shape[0], k.shape[2]
        self.k[layer, :b, :, start : start + s] = k
        self.v[layer, :b, :, start : start + s] = v

    def write_decode(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        # k, v: [batch, kv_heads_local, head_dim]; positions: [batch], one slot per sequence
        b = k.shape[0]
        rows = self.batch_index[:b]
        self.k[layer, rows, :, positions] = k
        self.v[layer, rows, :, positions] = v

    def layer(self, layer: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, :batch], self.v[layer, :batch]
