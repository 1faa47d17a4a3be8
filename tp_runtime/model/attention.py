"""One shard of multi-head attention: this rank's q heads and the kv heads they read."""

from __future__ import annotations

import torch
from torch import nn

from tp_runtime import kernels
from tp_runtime.communicator import Communicator
from tp_runtime.config import ModelConfig
from tp_runtime.model.kv_cache import KVCache
from tp_runtime.model.linear import ColumnParallelLinear, RowParallelLinear
from tp_runtime.model.step import StepInfo
from tp_runtime.sharding import HeadLayout


class ParallelAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, heads: HeadLayout, layer: int, dtype: torch.dtype, comm: Communicator) -> None:
        super().__init__()
        self.layer = layer
        self.head_dim = cfg.head_dim
        self.q_heads_local = heads.num_q_local
        self.kv_heads_local = heads.num_kv_local
        hd = cfg.head_dim
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size,
            [("q", heads.num_q_local * hd), ("k", heads.num_kv_local * hd), ("v", heads.num_kv_local * hd)],
            bias=cfg.qkv_bias,
            dtype=dtype,
        )
        self.o_proj = RowParallelLinear(heads.num_q_local * hd, cfg.hidden_size, cfg.o_bias, dtype, comm, site=f"layer.{layer}.attn_out")
        # an uneven q->kv mapping (a group cut by the split) is passed to the kernel explicitly
        self._kv_of_q = None if heads.uniform_group is not None else list(heads.kv_head_of_q)
        self.register_buffer("kv_head_of_q", torch.empty(len(heads.kv_head_of_q) if self._kv_of_q else 0, dtype=torch.long), persistent=False)

    def init_buffers(self) -> None:
        if self._kv_of_q:
            self.kv_head_of_q.copy_(torch.tensor(self._kv_of_q, dtype=torch.long))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, step: StepInfo) -> torch.Tensor:
        # x: [batch, seq, hidden]
        b, s, _ = x.shape
        hd = self.head_dim
        qkv = self.qkv_proj(x)  # [batch, seq, (q_local + 2 kv_local) * head_dim]
        q, k, v = qkv.split([self.q_heads_local * hd, self.kv_heads_local * hd, self.kv_heads_local * hd], dim=-1)
        q = q.view(b, s, self.q_heads_local, hd).transpose(1, 2)  # [batch, q_local, seq, hd]
        k = k.view(b, s, self.kv_heads_local, hd).transpose(1, 2)  # [batch, kv_local, seq, hd]
        v = v.view(b, s, self.kv_heads_local, hd).transpose(1, 2)
        q, k = kernels.apply_rope_qk_(q, k, cos, sin)  # in place, in the qkv output
        kv_map = self.kv_head_of_q if self._kv_of_q else None
        if step.prefill:
            cache.write_prefill(self.layer, k, v, step.start)
            if step.start:
                k_all, v_all = cache.layer(self.layer, b)
                k, v = k_all[:, :, : step.start + s], v_all[:, :, : step.start + s]
            out = kernels.prefill_attention(q, k, v, kv_map, q_offset=step.start)  # [batch, q_local, seq, hd]
            out = out.transpose(1, 2).reshape(b, s, self.q_heads_local * hd)
        else:
            pos = step.positions[:, 0]
            cache.write_decode(self.layer, k[:, :, 0], v[:, :, 0], pos)
            k_cache, v_cache = cache.layer(self.layer, b)
            out = kernels.decode_attention(q[:, :, 0], k_cache, v_cache, step.cache_lens, kv_map, step.max_len)  # [batch, q_local, hd]
            out = out.reshape(b, 1, self.q_heads_local * hd)
        return self.o_proj(out)
