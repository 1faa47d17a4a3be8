"""Torch reference kernels: the test oracle and the CPU path.

Shapes (per shard):
    q [batch, q_heads, seq, head_dim]; k, v [batch, kv_heads, keys, head_dim]
    kv_head_of_q: None when the q heads form equal consecutive groups per kv head (plain GQA),
    else an int64 tensor [q_heads] naming the kv head each q head reads (a tensor-parallel
    split may cut a group, giving a shard an uneven mapping).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_head_of_q: torch.Tensor | None):
    """(k, v, enable_gqa): SDPA groups uniform GQA itself; an uneven mapping is gathered per q head."""
    if kv_head_of_q is None:
        return k, v, k.shape[1] != q.shape[1]
    return k.index_select(1, kv_head_of_q), v.index_select(1, kv_head_of_q), False


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_head_of_q: torch.Tensor | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """Causal attention of q (positions q_offset..q_offset+seq-1) over keys 0..q_offset+seq-1."""
    seq, keys = q.shape[2], k.shape[2]
    if keys != q_offset + seq:
        raise ValueError(f"prefill_attention: {keys} keys for {seq} queries at offset {q_offset}")
    k, v, gqa = _expand_kv(q, k, v, kv_head_of_q)
    if q_offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # query i sees keys j <= q_offset + i
    mask = torch.ones(seq, keys, dtype=torch.bool, device=q.device).tril(diagonal=q_offset)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    kv_head_of_q: torch.Tensor | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """One query per sequence over its first cache_lens[b] cached keys.

    q [batch, q_heads, head_dim]; k_cache, v_cache [batch, kv_heads, max_seq, head_dim];
    cache_lens [batch] (int64). max_len, when the caller knows it, saves a device->host sync.
    """
    if max_len is None:
        max_len = int(cache_lens.max())
    k = k_cache[:, :, :max_len]
    v = v_cache[:, :, :max_len]
    k, v, gqa = _expand_kv(q, k, v, kv_head_of_q)
    mask = None
    if q.shape[0] > 1:
        # [batch, 1, 1, max_len]: keys past a sequence's own length are masked out
        mask = (torch.arange(max_len, device=q.device) < cache_lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, enable_gqa=gqa)
    return out.squeeze(2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as transformers does, then cast back."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face layout). x [batch, heads, seq, head_dim]; cos, sin [batch, 1, seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
