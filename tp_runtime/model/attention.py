"""One shard of multi-head attention: this rank's q heads and the kv heads they read."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from tp_runtime import kernels
from tp_runtime.communicator import Communicator
from tp_runtime.config import ModelConfig
from tp_runtime.model.kv_cache import KVCache
from tp_runtime.model.linear import FLOAT, LinearKinds, linear_binding_problem
from tp_runtime.model.norm import RMSNorm
from tp_runtime.model.step import StepInfo
from tp_runtime.sharding import HeadLayout


def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, step: StepInfo, kv_map: torch.Tensor | None = None) -> torch.Tensor:
    """Write the step's keys and values into the cache and attend: q [batch, q_heads, seq, d],
    k, v [batch, kv_heads, seq, d] (after RoPE) -> [batch, q_heads, seq, d]. A prefill chunk
    attends causally over its own keys and the cached ones before it; a decode token over its
    sequence's cached keys; a ragged step does both, per sequence."""
    if step.ragged is not None:
        return _attend_ragged(layer, q, k, v, cache, step, kv_map)
    b, s = q.shape[0], q.shape[2]
    if step.prefill:
        cache.write_prefill(layer, k, v, step.start, step.slots)
        if step.start:  # a later chunk of the prompt: attend over the cached start too
            k, v = cache.layer(layer, b, step.slots, step.start + s)
        return kernels.prefill_attention(q, k, v, kv_map, q_offset=step.start)
    cache.write_decode(layer, k[:, :, 0], v[:, :, 0], step.positions[:, 0], step.slots)
    # every slot: the kernel reads each sequence's rows
    return kernels.decode_attention(q[:, :, 0], cache.k[layer], cache.v[layer], step.cache_lens, kv_map, step.max_len, step.slots).unsqueeze(2)


def _attend_ragged(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, step: StepInfo, kv_map: torch.Tensor | None) -> torch.Tensor:
    r = step.ragged
    out = torch.empty_like(q)  # [1, q_heads, total, d]
    for c in r.chunks:
        rows = slice(c.offset, c.offset + c.length)
        kc, vc = k[:, :, rows], v[:, :, rows]
        cache.write_row(layer, c.slot, kc, vc, c.start)
        if c.start:
            kc, vc = cache.row(layer, c.slot, c.start + c.length)
        out[:, :, rows] = kernels.prefill_attention(q[:, :, rows], kc, vc, kv_map, q_offset=c.start)
    if r.positions is not None:
        rows = slice(r.decode_offset, None)
        kd, vd = k[0, :, rows].transpose(0, 1), v[0, :, rows].transpose(0, 1)  # [n_decode, kv_heads, d]
        cache.write_decode(layer, kd, vd, r.positions, r.slots)
        qd = q[0, :, rows].transpose(0, 1).contiguous()  # [n_decode, q_heads, d]
        out[0, :, rows] = kernels.decode_attention(qd, cache.k[layer], cache.v[layer], r.cache_lens, kv_map, r.max_len, r.slots).transpose(0, 1)
    return out


class ParallelAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, heads: HeadLayout, layer: int, dtype: torch.dtype, comm: Communicator, linears: LinearKinds = FLOAT) -> None:
        super().__init__()
        self.layer = layer
        self.head_dim = cfg.head_dim
        self.q_heads_local = heads.num_q_local
        self.kv_heads_local = heads.num_kv_local
        hd = cfg.head_dim
        self.qkv_proj = linears.column(
            cfg.hidden_size,
            [("q", heads.num_q_local * hd), ("k", heads.num_kv_local * hd), ("v", heads.num_kv_local * hd)],
            bias=cfg.qkv_bias,
            dtype=dtype,
        )
        self.o_proj = linears.row(heads.num_q_local * hd, cfg.hidden_size, cfg.o_bias, dtype, comm, site=f"layer.{layer}.attn_out")
        # Qwen3: each q and k head RMS-normalised before RoPE (replicated weights of one head's size)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
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
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = kernels.apply_rope_qk_(q, k, cos, sin)  # in place, in the qkv output
        out = attend(self.layer, q, k, v, cache, step, self.kv_head_of_q if self._kv_of_q else None)  # [batch, q_local, seq, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.q_heads_local * hd))

    def fused_problem(self) -> str | None:
        if self.q_norm is not None:
            return "attention with per-head q/k norms has no fused binding yet"
        for m in (self.qkv_proj, self.o_proj):
            if why := linear_binding_problem(m):
                return f"attention {why}"
        return None

    def bind_decode(self, binder):
        """qkv GEMV, bias + RoPE + cache write at each sequence's position and slot, attention
        over its cached keys, o GEMV + all-reduce into binder.h."""
        b, lib, ptr = binder, binder.lib, binder.ptr
        qkv = self.qkv_proj.bind_decode(b, b.buffer(self.qkv_proj.out_features_local))
        o = self.o_proj.bind_decode(b, b.h)
        k, v = b.cache.k[self.layer], b.cache.v[self.layer]  # [slots, kv_local, max_seq, hd]
        hd, nq, nkv = self.head_dim, self.q_heads_local, self.kv_heads_local
        rope = partial(
            lib.tp_qkv_rope, ptr(qkv.out), ptr(self.qkv_proj.bias), ptr(b.rotary.cos), ptr(b.rotary.sin), ptr(k), ptr(v), k.stride(1), k.stride(0), nq, nkv, hd, b.mbf,
        )
        kv_map = self.kv_head_of_q if self._kv_of_q else None
        attend = partial(
            lib.tp_decode_attn, ptr(qkv.out), qkv.out.shape[1], ptr(k), ptr(v), ptr(o.x), ptr(kv_map),
            ptr(b.scratch), b.scratch.shape[1], k.stride(1), k.stride(0), hd**-0.5, nq, nkv, hd, int(o.x.dtype == torch.bfloat16), b.mbf,
        )

        def run(nb: int) -> None:
            qkv(nb)
            rope(nb, b.positions, b.slots)
            attend(nb, b.lengths, b.slots)
            o(nb)

        return b.bound(qkv.x, run)
