"""Causal flash attention forward for prefill, over one shard's heads.

Algorithm (FlashAttention-2 forward, one program per (query block, batch, q head)):
    q_i is the query at absolute position q_offset + i; it sees keys j <= q_offset + i.
    The program holds a [BLOCK_M, head_dim] tile of queries and streams the keys and values
    in [BLOCK_N, head_dim] tiles, keeping per row a running maximum m, a running sum l and an
    un-normalised output acc (all float32, "online softmax"):
        s = q k^T * scale * log2(e);  m' = max(m, rowmax(s));  p = 2^(s - m')
        l = l * 2^(m - m') + rowsum(p);  acc = acc * 2^(m - m') + p v;  m = m'
    and writes acc / l at the end. The score matrix never exists beyond one tile.
    Key tiles split in two stages: tiles wholly before the block's first query position
    need no mask at all; the tiles across the diagonal (and the ragged end of the keys)
    are masked with -inf.
    GQA: the program reads the kv head of its q head in place (kv = h // group, or
    kv_head_of_q[h] for an uneven tensor-parallel split); nothing is repeated or copied.
    head_dim is padded up to a power of two inside the kernel (80 -> 128, 96 -> 128) with
    masked loads, so any head_dim from 16 to 256 works.
    seq_lens (optional, [batch]): sequence b has seq_lens[b] real queries (positions
    q_offset .. q_offset + seq_lens[b] - 1) and q_offset + seq_lens[b] real keys; its
    padded query rows are written as zeros and its padded keys are never read.

How it differs from the reference (reference.prefill_attention, torch SDPA):
    - scores and the softmax are float32 whatever the input dtype; P is rounded to the
      input dtype (fp16/bf16) before the P @ V product, as FlashAttention does, so results
      match SDPA to the usual fp16/bf16 tolerance, not bit for bit. float32 inputs use
      IEEE float32 products (no TF32), to about 1e-5.
    - rows past seq_lens[b] are zeros here; the reference computes them like any row
      unless seq_lens is given to it too.

Caution:
    - head_dim must be at most 256 (one tile holds a whole head) and at least 16.
    - The grid is (query blocks, batch * q heads): a batch of one short prompt on a big GPU
      leaves most SMs idle; decode-like shapes belong to flash_decode.
    - No dropout, no sliding window, no attention bias, forward only.
    - Under TRITON_INTERPRET=1 (the CPU test path) a single small config is used and the
      bf16 products are computed in float32, because the interpreter's tl.dot mishandles
      bf16 operands (Triton 3.9: it multiplies their raw uint16 bits). The interpreter
      also truncates float32 -> bf16 casts where a GPU rounds to nearest even, so bf16
      results there are up to one bf16 ulp further from the reference than on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def on_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRET = on_interpreter()


def dot_options(dtype: torch.dtype) -> dict:
    """Constexprs for `_mma`: IEEE float32 for fp32 inputs; bf16 upcast under the interpreter."""
    return {
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST_DOT": INTERPRET and dtype == torch.bfloat16,
    }


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One key tile of the online softmax: s (scaled, log2 units) [rows, keys], v [keys, dim].
    Returns the new running max, running sum and un-normalised output (shared with flash_decode)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST_DOT)
    return m_new, l_i, acc


def check_heads(kernel: str, q_heads: int, kv_heads: int, head_dim: int, kv_head_of_q: torch.Tensor | None) -> None:
    """The head layout both attention kernels accept (shared by flash_decode)."""
    if not 16 <= head_dim <= 256:
        raise ValueError(f"{kernel}: head_dim {head_dim} outside the kernel's 16..256")
    if kv_head_of_q is None and q_heads % kv_heads:
        raise ValueError(f"{kernel}: {q_heads} q heads over {kv_heads} kv heads needs kv_head_of_q")
    if kv_head_of_q is not None and kv_head_of_q.numel() != q_heads:
        raise ValueError(f"{kernel}: kv_head_of_q has {kv_head_of_q.numel()} entries for {q_heads} q heads")


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b with float32 accumulation (see `dot_options`)."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


def _configs() -> list[triton.Config]:
    if INTERPRET:
        # one config: autotuning under the interpreter only burns time. BLOCK_M != BLOCK_N
        # so the tests cross a diagonal made of several masked key tiles.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # Hopper (H100/H200): 128x128 with 8 warps or 128x64 with 4 warps and 3-4 stages win for
    # head_dim 64..128. Ampere (A100, sm_80/86): 128x64 / 64x64 with 4 warps and 2-3 stages
    # (less shared memory per SM). bench/kernels.py prints the config each shape picked.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 128, 8, 3),
            (128, 64, 4, 3),
            (128, 64, 4, 4),
            (128, 64, 8, 3),
            (128, 32, 4, 3),
            (64, 64, 4, 3),
            (64, 64, 4, 2),
            (64, 32, 4, 2),
        ]
    ]


def _prune(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    seq_bucket = kwargs.get("SEQ_BUCKET", named_args.get("SEQ_BUCKET"))
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if block_d >= 256 and bm * bn > 64 * 64:
            continue  # the q tile, two kv tiles and acc must fit in shared memory and registers
        if seq_bucket <= 64 and bm > 64:
            continue  # a short prompt wants more, smaller query blocks
        keep.append(c)
    return keep or configs[-1:]


@triton.autotune(configs=_configs(), key=["BLOCK_D", "SEQ_BUCKET", "HAS_SEQ_LENS"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _prefill_fwd(
    Q, K, V, O, KV_OF_Q, SEQ_LENS,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    q_heads, seq, q_offset,
    SEQ_BUCKET,  # autotune key only: next power of two of seq, capped
    GROUP: tl.constexpr,  # q heads per kv head (uniform GQA; unused with KV_OF_Q)
    HAS_KV_MAP: tl.constexpr,
    HAS_SEQ_LENS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # heavy (late, long-diagonal) query blocks are launched first for a better tail
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    h = pid_bh % q_heads
    if HAS_KV_MAP:
        kvh = tl.load(KV_OF_Q + h)
    else:
        kvh = h // GROUP
    seq_b = seq
    if HAS_SEQ_LENS:
        seq_b = tl.load(SEQ_LENS + b).to(tl.int32)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kv64 = kvh.to(tl.int64)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)  # query rows, relative to the first query
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    # K is read transposed: a [BLOCK_D, BLOCK_N] tile
    k_ptrs = K + b64 * stride_kb + kv64 * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd
    v_ptrs = V + b64 * stride_vb + kv64 * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd

    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seq) & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # keys of this sequence: 0 .. kv_len-1; this block's rows see keys <= q_offset + row
    kv_len = q_offset + seq_b
    block_live = start_m < seq_b
    # stage 1: keys below the block's first query position, all visible, no mask
    lo = tl.where(block_live, ((q_offset + start_m) // BLOCK_N) * BLOCK_N, 0)
    # stage 2: the tiles across the diagonal, up to the last key any row of the block sees
    hi = tl.where(block_live, tl.minimum(q_offset + start_m + BLOCK_M, kv_len), 0)

    for start_n in range(0, lo, BLOCK_N):
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs + start_n * stride_ks)
            v = tl.load(v_ptrs + start_n * stride_vs)
        else:
            k = tl.load(k_ptrs + start_n * stride_ks, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vs, mask=d_ok[None, :], other=0.0)
        s = _mma(q, k, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION, UPCAST_DOT) * qk_scale
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION, UPCAST_DOT)

    # The first tile any row meets holds key 0, which every row sees, so m_i is finite
    # from then on and a row with no visible key in a later tile gets p = 0, not NaN.
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < hi
        k = tl.load(k_ptrs + start_n * stride_ks, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = _mma(q, k, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION, UPCAST_DOT)
        visible = (cols[None, :] <= q_offset + offs_m[:, None]) & n_ok[None, :]
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION, UPCAST_DOT)

    row_live = offs_m < seq_b
    out = acc / tl.where(row_live, l_i, 1.0)[:, None]
    out = tl.where(row_live[:, None], out, 0.0)
    o_ptrs = O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < seq) & d_ok[None, :])


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_head_of_q: torch.Tensor | None = None,
    q_offset: int = 0,
    seq_lens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q (positions q_offset..q_offset+seq-1) over keys 0..q_offset+seq-1.

    q [batch, q_heads, seq, head_dim]; k, v [batch, kv_heads, q_offset + seq, head_dim]
    (any strides); kv_head_of_q None (uniform GQA) or int [q_heads]; seq_lens None or int
    [batch]; out, when given, [batch, q_heads, seq, head_dim] to write into.
    Returns [batch, q_heads, seq, head_dim] in q's dtype.
    """
    batch, q_heads, seq, head_dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    if keys != q_offset + seq:
        raise ValueError(f"prefill_attention: {keys} keys for {seq} queries at offset {q_offset}")
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"prefill_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    check_heads("prefill_attention", q_heads, kv_heads, head_dim, kv_head_of_q)
    if out is None:
        out = _empty(q.shape, dtype=q.dtype, device=q.device)
    if batch * q_heads * seq == 0:
        return out
    grid = lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * q_heads)  # noqa: E731
    _prefill_fwd[grid](
        q, k, v, out,
        kv_head_of_q if kv_head_of_q is not None else q,  # unused pointer when HAS_KV_MAP is off
        seq_lens if seq_lens is not None else q,
        head_dim**-0.5 * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        q_heads, seq, q_offset,
        min(triton.next_power_of_2(seq), 4096),
        GROUP=max(q_heads // kv_heads, 1),
        HAS_KV_MAP=kv_head_of_q is not None,
        HAS_SEQ_LENS=seq_lens is not None,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        **dot_options(q.dtype),
    )
    return out


# every allocation goes through here, so that tests can poison it (fill with NaN)
_empty = torch.empty
