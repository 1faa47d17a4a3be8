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
    seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q (positions q_offset..q_offset+seq-1) over keys 0..q_offset+seq-1.

    seq_lens (optional, int [batch]): sequence b has seq_lens[b] real queries (right-padded);
    its padded query rows come back as zeros. The real rows never see a padded key anyway
    (causality), so seq_lens changes nothing else.
    """
    seq, keys = q.shape[2], k.shape[2]
    if keys != q_offset + seq:
        raise ValueError(f"prefill_attention: {keys} keys for {seq} queries at offset {q_offset}")
    k, v, gqa = _expand_kv(q, k, v, kv_head_of_q)
    if q_offset == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        # query i sees keys j <= q_offset + i
        mask = torch.ones(seq, keys, dtype=torch.bool, device=q.device).tril(diagonal=q_offset)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if seq_lens is not None:
        # [batch, 1, seq, 1]: rows past a sequence's own length
        live = (torch.arange(seq, device=q.device) < seq_lens.to(q.device)[:, None])[:, None, :, None]
        out = torch.where(live, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    kv_head_of_q: torch.Tensor | None = None,
    max_len: int | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence over its first cache_lens[b] cached keys.

    q [batch, q_heads, head_dim]; k_cache, v_cache [rows, kv_heads, max_seq, head_dim], sequence
    b's keys in row slots[b] (int64 [batch]; None: row b); cache_lens [batch] (int64). max_len,
    when the caller knows it, saves a device->host sync.
    """
    if max_len is None:
        max_len = int(cache_lens.max())
    k = k_cache[:, :, :max_len]
    v = v_cache[:, :, :max_len]
    if slots is not None:
        k, v = k.index_select(0, slots), v.index_select(0, slots)
    else:
        k, v = k[: q.shape[0]], v[: q.shape[0]]
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


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the pre-norm block's add and the next norm in one call."""
    h = x + residual
    return rms_norm(h, weight, eps), h


def apply_rope_qk_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope on q [batch, q_heads, seq, hd] and k [batch, kv_heads, seq, hd], written back in place; returns (q, k)."""
    q.copy_(apply_rope(q, cos, sin))
    k.copy_(apply_rope(k, cos, sin))
    return q, k


_INT8PACK_MAX_ROWS = 8


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y = x @ (qweight * scales[:, None])^T: weight-only int8 with one scale per output channel.

    x [..., in] (float32/bfloat16/float16); qweight int8 [out, in]; scales [out] in x's dtype.
    On CPU this is aten's int8 weight-pack GEMM (it reads the int8 weight as is) with bfloat16
    activations: its float32-activation path is ~7x slower (../shared/MEASURED.md), and bf16
    rounding of the activations is small next to the int8 rounding of the weights. Elsewhere
    the weight is dequantised first (correct, not fast: the reference).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    cpu = x.device.type == "cpu"
    if cpu and x2.shape[0] > _INT8PACK_MAX_ROWS:
        # many rows (prefill): aten's kernel goes row by row; a bf16 copy of the int8 weight and
        # a BLAS GEMM, scaled after, is faster here (TinyLlama, 128-token prompt: 70 -> ~118 tok/s)
        y = (F.linear(x2.to(torch.bfloat16), qweight.to(torch.bfloat16)) * scales.to(torch.bfloat16)).to(x.dtype)
    elif cpu and hasattr(torch.ops.aten, "_weight_int8pack_mm") and x2.shape[1] % 16 == 0:
        # aten's bf16 CPU kernel needs the inner dimension to be a multiple of 16 (torch 2.13: it
        # returns garbage for one row and crashes with SIGSEGV for more); other shapes dequantise
        y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), qweight, scales.to(torch.bfloat16)).to(x.dtype)
    else:
        y = F.linear(x2, qweight.to(x.dtype)) * scales.to(x.dtype)
    return y.reshape(*lead, qweight.shape[0])
