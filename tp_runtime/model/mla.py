"""One shard of multi-head latent attention (MLA: DeepSeek-V3, Kimi K2), split by heads.

Per token, as transformers' DeepseekV3Attention computes it:
    q        = q_b_proj(rmsnorm(q_a_proj(x)))      (q_proj(x) where q_lora_rank is None)
    c, k_r   = kv_a_proj_with_mqa(x)                one latent [kv_lora_rank] and one RoPE key
                                                    [qk_rope_head_dim] shared by every head
    k_n, v   = kv_b_proj(rmsnorm(c))                per head: [qk_nope_head_dim], [v_head_dim]
    k        = [k_n, rope(k_r)],  q = [q_n, rope(q_r)]     per head: qk_nope + qk_rope features
    out      = o_proj(softmax(q k^T * softmax_scale) v)
The latent norms use eps 1e-6 whatever rms_norm_eps says (transformers builds them with the
default; so does DeepSeek's own code).

Split over ranks Megatron-style, by heads (sharding.head_layout, uneven counts allowed; MLA has no
kv heads of its own, so a rank's kv heads are its q heads): the two down projections (both read
x, so merged into one replicated `a_proj` with slots q_a | kv_a) and their norms are whole on
every rank, which computes the latents itself (no communication); q_b_proj (or q_proj) and
kv_b_proj are column-parallel by heads; o_proj is row-parallel and ends in the layer's one
all-reduce (site layer.N.attn_out), as in attention.py.

RoPE turns only the qk_rope part. With rope_interleave (DeepSeek's and Kimi's checkpoints) it
rotates the pairs (x0, x1), (x2, x3), ... and transformers writes the results de-interleaved
(the even results, then the odd ones): that is the rotate-half RoPE of the de-interleaved
vector, so the rope part is de-interleaved and the usual kernel runs. q and k are permuted
alike, so q . k is what an in-place interleaved rotation gives.

KV cache: the simplest correct layout, not MLA's compressed one. Each local head's full key
(nope + rope, after RoPE) and its value, padded with zeros to the key's size, go into the
engine's KVCache [slot, heads_local, max_seq, qk_nope + qk_rope] (ModelConfig.head_dim is the
key's size, num_kv_heads num_heads), so the attention kernels run unchanged; the padded columns
of the output are dropped. Their softmax scale is head_dim ** -0.5 = qk_head_dim ** -0.5,
transformers' own for default RoPE; a YaRN mscale (MlaConfig.softmax_scale) is applied by
scaling q first.
Caution: the cache holds heads x 2 x (qk_nope + qk_rope) values per token and layer where the
latent form needs kv_lora_rank + qk_rope_head_dim (DeepSeek-V3 at tp=1: 49152 vs 576).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tp_runtime import kernels
from tp_runtime.communicator import Communicator
from tp_runtime.config import ModelConfig
from tp_runtime.model.attention import attend
from tp_runtime.model.kv_cache import KVCache
from tp_runtime.model.linear import FLOAT, LinearKinds
from tp_runtime.model.norm import RMSNorm
from tp_runtime.model.step import StepInfo
from tp_runtime.sharding import HeadLayout

LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default, used for q_a_layernorm and kv_a_layernorm


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., d] with RoPE pairs (x0, x1), (x2, x3), ... -> [x0, x2, ..., x1, x3, ...] (a copy)."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class MlaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, heads: HeadLayout, layer: int, dtype: torch.dtype, comm: Communicator, linears: LinearKinds = FLOAT) -> None:
        super().__init__()
        mla = cfg.mla
        self.layer = layer
        n = heads.num_q_local
        self.q_heads_local = self.kv_heads_local = n  # every q head reads its own key and value
        self.nope, self.rope, self.v_dim, self.qk_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, mla.qk_head_dim
        self.q_lora, self.kv_lora, self.interleave = mla.q_lora_rank, mla.kv_lora_rank, mla.rope_interleave
        # the kernels scale q k^T by qk_head_dim ** -0.5; anything else (YaRN's mscale) goes into q
        self.q_scale = 1.0 if mla.softmax_scale == mla.qk_head_dim**-0.5 else mla.softmax_scale * mla.qk_head_dim**0.5
        slots = [("kv_a", mla.kv_lora_rank + mla.qk_rope_head_dim)]
        if mla.q_lora_rank:
            slots.insert(0, ("q_a", mla.q_lora_rank))
        self.a_proj = linears.column(cfg.hidden_size, slots, False, dtype)  # replicated: whole on every rank
        self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS, dtype) if mla.q_lora_rank else None
        # q_b_proj after the q latent, or the plain q_proj: this rank's heads
        self.q_proj = linears.column(mla.q_lora_rank or cfg.hidden_size, [("q", n * self.qk_dim)], False, dtype)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS, dtype)
        self.kv_b_proj = linears.column(mla.kv_lora_rank, [("kv", n * (self.nope + self.v_dim))], False, dtype)
        self.o_proj = linears.row(n * self.v_dim, cfg.hidden_size, False, dtype, comm, site=f"layer.{layer}.attn_out")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, step: StepInfo) -> torch.Tensor:
        # x: [batch, seq, hidden]; cos, sin: [batch, 1, seq, qk_rope]
        b, s, _ = x.shape
        n, nope, rope, qk = self.q_heads_local, self.nope, self.rope, self.qk_dim
        a = self.a_proj(x)  # [batch, seq, (q_lora +) kv_lora + rope]: the latents, computed on every rank
        if self.q_a_layernorm is not None:
            q_latent, kv_a = a.split([self.q_lora, self.kv_lora + rope], dim=-1)
            q = self.q_proj(self.q_a_layernorm(q_latent))
        else:
            kv_a, q = a, self.q_proj(x)
        latent, k_rot = kv_a.split([self.kv_lora, rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent))  # [batch, seq, heads_local * (nope + v)]
        q = q.view(b, s, n, qk).transpose(1, 2)  # [batch, heads_local, seq, qk]
        kv = kv.view(b, s, n, nope + self.v_dim).transpose(1, 2)  # [batch, heads_local, seq, nope + v]
        q_rot, k_rot = q[..., nope:], k_rot.reshape(b, 1, s, rope)  # one RoPE key for every head
        if self.interleave:
            q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)
        q_rot, k_rot = kernels.apply_rope(q_rot.contiguous(), cos, sin), kernels.apply_rope(k_rot.contiguous(), cos, sin)
        q = torch.cat((q[..., :nope], q_rot), dim=-1)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        k = torch.cat((kv[..., :nope], k_rot.expand(b, n, s, rope)), dim=-1)  # [batch, heads_local, seq, qk]
        v = F.pad(kv[..., nope:], (0, qk - self.v_dim))  # zeros up to the key's size: one cache layout
        out = attend(self.layer, q, k, v, cache, step)  # [batch, heads_local, seq, qk]
        return self.o_proj(out[..., : self.v_dim].transpose(1, 2).reshape(b, s, n * self.v_dim))

    def fused_problem(self) -> str | None:
        return "multi-head latent attention (MLA) has no fused decode binding yet"
