"""Split-K decode attention ("flash-decoding") over the static KV cache, GQA-aware.

Algorithm (two kernels):
    1. `_decode_split`, grid (batch, kv heads, splits). The cache of sequence b is cut into
       chunks of `chunk` keys; program (b, g, s) streams the keys s*chunk ..
       min((s+1)*chunk, cache_lens[b]) - 1 of kv head g in BLOCK_N tiles and runs the online
       softmax (float32) for every q head that reads kv head g at once: the queries of the
       group form the rows of one [ROWS, head_dim] tile, so each K/V tile is loaded once per
       group, not once per q head. It writes, per q head, the partial maximum m (log2
       units), the partial sum l and the un-normalised partial output acc. A chunk that
       lies wholly past cache_lens[b] writes m = -inf, l = 0, acc = 0.
    2. `_decode_reduce`, grid (batch, q heads): with M = max_s m_s and w_s = 2^(m_s - M),
           out = sum_s w_s acc_s / sum_s w_s l_s.
    The number of splits is chosen on the host from max_len (no device sync when the
    caller passes it) so that batch * kv_heads * splits fills the GPU.

How it differs from the reference (reference.decode_attention, torch SDPA with a mask):
    - float32 softmax and accumulation; P is rounded to the cache dtype before P @ V, so
      fp16/bf16 results match to the usual tolerance, not bit for bit.
    - the reference slices the caches to max_len and masks; the kernel reads exactly
      cache_lens[b] keys of sequence b and nothing past them.
    - a sequence with cache_lens[b] == 0 gets zeros (the reference gives NaN).

Caution:
    - The group tile has at least 16 rows (tl.dot's minimum on GPUs): with plain MHA
      (group 1) 15 of 16 rows are padding. The work is memory-bound, so this costs FLOPs
      that are free, not bandwidth.
    - With an uneven kv_head_of_q (a tensor-parallel split that cuts a group) the rows
      are all the shard's q heads, masked to those of kv head g: still one K/V read per
      kv head, but ROWS = next power of two of q_heads.
    - The partial results live in a float32 workspace of batch * q_heads * splits *
      (head_dim + 2) elements, allocated per call (the CUDA caching allocator makes that
      cheap; it is not yet CUDA-graph friendly if splits changes between calls).
    - head_dim must be 16..256. cache_lens must be <= the cache's max_seq (not checked
      on the device).
    - Under TRITON_INTERPRET=1 a single small config is used; see flash_prefill for the
      interpreter's bf16 tl.dot workaround.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tp_runtime.kernels.flash_prefill import INTERPRET, LOG2E, _mma, check_heads, dot_options, online_softmax_step

# keys per split are a multiple of this (every autotuned BLOCK_N divides it)
CHUNK_QUANTUM = 32 if INTERPRET else 128
MAX_SPLITS = 4 if INTERPRET else 64


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # Memory-bound: enough bytes in flight per SM matters more than tile shape. Hopper likes
    # 64..128-key tiles with 3-4 stages; Ampere 64 keys, 2-3 stages. Small ROWS (the group)
    # keeps register pressure low, so 4 warps are usually enough.
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (32, 4, 3)]
    ]


@triton.autotune(configs=_configs(), key=["BLOCK_D", "ROWS", "HAS_KV_MAP", "HAS_SLOTS"])
@triton.jit
def _decode_split(
    Q, K, V, KV_OF_Q, CACHE_LENS, SLOTS, ACC, M, L,
    qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    q_heads, num_splits, chunk,
    GROUP: tl.constexpr,
    HAS_KV_MAP: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, ROWS)
    if HAS_KV_MAP:
        # rows are all q heads of the shard; keep those that read this kv head
        heads = rows
        in_range = rows < q_heads
        row_ok = in_range & (tl.load(KV_OF_Q + rows, mask=in_range, other=-1) == kvh)
    else:
        heads = kvh * GROUP + rows
        row_ok = rows < GROUP
    b64 = b.to(tl.int64)
    if HAS_SLOTS:  # the sequence's cache row
        row64 = tl.load(SLOTS + b).to(tl.int64)
    else:
        row64 = b64
    kv64 = kvh.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b64 * stride_qb + heads[:, None].to(tl.int64) * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = K + row64 * stride_kb + kv64 * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd
    v_ptrs = V + row64 * stride_vb + kv64 * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd

    cache_len = tl.load(CACHE_LENS + b).to(tl.int32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, cache_len)

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    # every tile holds at least one valid key (start < hi), so m_i is finite after the first
    for start in range(lo, hi, BLOCK_N):
        n_ok = start + offs_n < hi
        k = tl.load(k_ptrs + start * stride_ks, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs + start * stride_vs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = _mma(q, k, tl.zeros([ROWS, BLOCK_N], dtype=tl.float32), DOT_PRECISION, UPCAST_DOT)
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION, UPCAST_DOT)

    # workspace: ACC [batch, q_heads, splits, BLOCK_D], M and L [batch, q_heads, splits]
    ml_off = (b64 * q_heads + heads.to(tl.int64)) * num_splits + split
    tl.store(M + ml_off, m_i, mask=row_ok)
    tl.store(L + ml_off, l_i, mask=row_ok)
    tl.store(ACC + ml_off[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _decode_reduce(
    ACC, M, L, O,
    stride_ob, stride_oh, stride_od,
    q_heads, num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,  # num_splits padded to a power of two
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    base = (b * q_heads + h) * num_splits
    m = tl.load(M + base + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(L + base + offs_s, mask=s_ok, other=0.0)
    acc = tl.load(ACC + (base + offs_s[:, None]) * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no key at all: every weight is 0
    w = tl.math.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    l_sum = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(l_sum == 0.0, 1.0, l_sum)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_plan(batch: int, kv_heads: int, max_len: int, device: torch.device) -> tuple[int, int]:
    """(splits, chunk): enough programs for about two waves of the GPU, chunks of whole tiles."""
    target = 2 * _num_sms(device)
    splits = max(1, min(MAX_SPLITS, triton.cdiv(target, batch * kv_heads), triton.cdiv(max_len, CHUNK_QUANTUM)))
    chunk = triton.cdiv(triton.cdiv(max_len, splits), CHUNK_QUANTUM) * CHUNK_QUANTUM
    return triton.cdiv(max_len, chunk), chunk


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    kv_head_of_q: torch.Tensor | None = None,
    max_len: int | None = None,
    out: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence over its first cache_lens[b] cached keys.

    q [batch, q_heads, head_dim]; k_cache, v_cache [rows, kv_heads, max_seq, head_dim] (any
    strides), sequence b's keys in row slots[b] (int [batch]; None: row b, rows >= batch);
    cache_lens int [batch]; max_len,
    when the caller knows max(cache_lens), saves a device->host sync. Returns
    [batch, q_heads, head_dim] in q's dtype.
    """
    batch, q_heads, head_dim = q.shape
    kv_heads, max_seq = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != v_cache.shape or (slots is None and k_cache.shape[0] < batch) or k_cache.shape[3] != head_dim:
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not match")
    check_heads("decode_attention", q_heads, kv_heads, head_dim, kv_head_of_q)
    if max_len is None:
        max_len = int(cache_lens.max())
    max_len = max(1, min(max_len, max_seq))
    if out is None:
        out = _empty((batch, q_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch * q_heads == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    group = q_heads // kv_heads
    rows = triton.next_power_of_2(q_heads if kv_head_of_q is not None else group)
    splits, chunk = split_plan(batch, kv_heads, max_len, q.device)
    acc = _empty((batch, q_heads, splits, block_d), dtype=torch.float32, device=q.device)
    m = _empty((batch, q_heads, splits), dtype=torch.float32, device=q.device)
    l = _empty((batch, q_heads, splits), dtype=torch.float32, device=q.device)
    _decode_split[(batch, kv_heads, splits)](
        q, k_cache, v_cache,
        kv_head_of_q if kv_head_of_q is not None else cache_lens,  # unused pointer without a map
        cache_lens, slots if slots is not None else cache_lens, acc, m, l,
        head_dim**-0.5 * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        q_heads, splits, chunk,
        GROUP=max(group, 1),
        HAS_KV_MAP=kv_head_of_q is not None,
        HAS_SLOTS=slots is not None,
        ROWS=max(16, rows),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        **dot_options(q.dtype),
    )
    _decode_reduce[(batch, q_heads)](
        acc, m, l, out,
        *out.stride(),
        q_heads, splits,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        SPLITS=triton.next_power_of_2(splits),
    )
    return out


# every allocation goes through here, so that tests can poison it (fill with NaN)
_empty = torch.empty
