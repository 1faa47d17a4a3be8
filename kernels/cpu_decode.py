"""The fused CPU decode step's ops (cpu_decode.c, built into the CPU GEMV kernel's library):
RMSNorm with the residual add, bias + RoPE + KV-cache write, one-query attention over the
cache, SiLU(gate) * up; and the GEMVs writing into a given buffer.

Each writes into tensors the caller allocated once (model/fused_decode.py), so a decode step
allocates nothing, and each is the twin of a torch reference op (kernels/reference.py;
tests/test_fused_decode.py compares them). Values follow the eager model's rounding: computed
in float32 and, for a bfloat16 model, rounded to bfloat16 where the eager ops round. Buffers
hold the model's dtype except the GEMV inputs (`x`, `out` of norm / attention / SiLU), which
may be float32 or bfloat16, whichever the consuming GEMV reads.

The tensor functions (tests, benchmarks; the fused step binds the C calls directly) check the
sizes the C code relies on: contiguous buffers, as many rows and values as it will touch.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import torch

from tp_runtime.kernels import cpu_gemv

_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "tp_rmsnorm": (None, [_P, _P, _P, _P, _I64, _F, _I, _I, _I, _I64]),
    "tp_qkv_rope": (_I, [_P, _P, _P, _P, _P, _P, _I64, _I64, _I, _I, _I, _I, _I64, _P, _P]),
    "tp_decode_attn": (_I, [_P, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _F, _I, _I, _I, _I, _I, _I64, _P, _P]),
    "tp_silu_mul": (None, [_P, _P, _P, _I64, _I, _I, _I64]),
    "tp_program_run": (_I64, [_P, _I64]),
}


def lib() -> ctypes.CDLL | None:
    """The kernel library with the decode ops' signatures set, or None: no compiler, or a forked
    child, where cpu_gemv gives the library up (its pool threads did not come along)."""
    lib = cpu_gemv.load()
    if lib is not None and not getattr(lib, "_tp_decode_ops", False):
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        lib._tp_decode_ops = True
    return lib


def is_bf16(t: torch.Tensor) -> int:
    return int(t.dtype == torch.bfloat16)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(what: str, *tensors_and_sizes) -> None:
    """Each (tensor, values it must hold at least) pair: contiguous and big enough for the C op."""
    for t, need in tensors_and_sizes:
        if t is not None and (not t.is_contiguous() or t.numel() < need):
            raise ValueError(f"{what}: a buffer of shape {tuple(t.shape)} (contiguous: {t.is_contiguous()}) where {need} contiguous values are needed")


def int64_array(values: Sequence[int] | None) -> ctypes.Array | None:
    """Per-sequence positions, lengths or cache slots as the C ops read them (None: none)."""
    return None if values is None else (ctypes.c_int64 * len(values))(*values)


def _check_slots(what: str, slots: Sequence[int] | None, nb: int, cache_rows: int) -> None:
    if slots is not None and (len(slots) != nb or not all(0 <= s < cache_rows for s in slots)):
        raise ValueError(f"{what}: cache slots {list(slots)} for {nb} sequences and a cache of {cache_rows} rows")


def rms_norm_(res: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of res [nb, hidden] (or [hidden]): out = rms_norm(h + res) with res = h + res
    written back (h given), else rms_norm(res): reference.rms_norm_residual / rms_norm."""
    n = weight.numel()
    nb = res.numel() // n
    _check("rms_norm_", (res, nb * n), (out, nb * n), (h, nb * n), (weight, n))
    lib().tp_rmsnorm(_ptr(h), res.data_ptr(), weight.data_ptr(), out.data_ptr(), n, eps, int(h is not None), is_bf16(out), is_bf16(res), res.numel() // n)
    return out


def qkv_rope_(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              positions: Sequence[int], nq: int, nkv: int, slots: Sequence[int] | None = None) -> None:
    """Each sequence's token q|k|v, qkv [nb, (nq + 2 nkv) * hd] (plus bias): RoPE at its position
    (cos, sin: the float32 tables [max_seq, hd]) on q in place and on k; k and v written at that
    position of its cache row slots[b] (default b) of k_cache, v_cache [rows, nkv, max_seq, hd]."""
    hd = cos.shape[-1]
    kc = k_cache if k_cache.dim() == 4 else k_cache[None]
    nb, row = len(positions), (nq + 2 * nkv) * hd
    _check_slots("qkv_rope_", slots, nb, kc.shape[0])
    if (slots is None and nb > kc.shape[0]) or kc.shape[1] != nkv or v_cache.shape != k_cache.shape or not all(0 <= p < min(kc.shape[2], cos.shape[0]) for p in positions):
        raise ValueError(f"qkv_rope_: positions {list(positions)} for caches of shape {tuple(k_cache.shape)} ({nkv} kv heads) and a table of {cos.shape[0]}")
    _check("qkv_rope_", (qkv, nb * row), (bias, row), (k_cache, 0), (v_cache, 0), (cos, 0), (sin, 0))
    err = lib().tp_qkv_rope(
        qkv.data_ptr(), _ptr(bias), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), kc.stride(1), kc.stride(0),
        nq, nkv, hd, is_bf16(qkv), len(positions), int64_array(positions), int64_array(slots),
    )
    if err:
        raise ValueError(f"qkv_rope_: head size {hd} (the kernel takes even sizes up to 1024)")


def decode_attention_(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: Sequence[int], kv_head_of_q: torch.Tensor | None,
                      out: torch.Tensor, scratch: torch.Tensor, slots: Sequence[int] | None = None) -> torch.Tensor:
    """reference.decode_attention: each sequence's query q [nb, nq * hd] (or the q part of each
    row of q [nb, >= nq * hd], the qkv projection's output) over the first lengths[b] keys of
    its cache row slots[b] (default b) of k_cache, v_cache [rows, nkv, max_seq, hd];
    out [nb, nq * hd]; scratch float32 [nb * nq, >= max(lengths)]."""
    kc = k_cache if k_cache.dim() == 4 else k_cache[None]
    _, nkv, max_seq, hd = kc.shape
    nb = len(lengths)
    nq = out.numel() // (hd * nb)
    _check_slots("decode_attention_", slots, nb, kc.shape[0])
    if not 0 < nb or (slots is None and nb > kc.shape[0]) or v_cache.shape != k_cache.shape or not all(0 < n <= max_seq for n in lengths):
        raise ValueError(f"decode_attention_: lengths {list(lengths)} for caches of shape {tuple(k_cache.shape)}")
    if kv_head_of_q is not None and (kv_head_of_q.numel() != nq or not bool(((kv_head_of_q >= 0) & (kv_head_of_q < nkv)).all())):
        raise ValueError(f"decode_attention_: a kv map {kv_head_of_q.tolist()} for {nq} q heads over {nkv} kv heads")
    if kv_head_of_q is None and nq % nkv:
        raise ValueError(f"decode_attention_: {nq} q heads in equal groups over {nkv} kv heads")
    if scratch.dim() != 2 or scratch.shape[0] < nb * nq or scratch.dtype != torch.float32:
        raise ValueError(f"decode_attention_: a scratch of shape {tuple(scratch.shape)} ({scratch.dtype}) for {nb} sequences x {nq} heads (float32 rows)")
    _check("decode_attention_", (q, nb * nq * hd), (out, nb * nq * hd), (scratch, 0), (kv_head_of_q, 0), (k_cache, 0), (v_cache, 0))
    err = lib().tp_decode_attn(
        q.data_ptr(), q.numel() // len(lengths), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), _ptr(kv_head_of_q), scratch.data_ptr(), scratch.shape[1],
        kc.stride(1), kc.stride(0), hd**-0.5, nq, nkv, hd, is_bf16(out), is_bf16(q), len(lengths), int64_array(lengths), int64_array(slots),
    )
    if err:
        raise ValueError(f"decode_attention_: head size {hd} over 1024, or a length in {list(lengths)} outside 1..{scratch.shape[1]} (the scratch)")
    return out


def silu_mul_(gate_up: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out = silu(gate) * up per row, gate_up = gate|up [nb, 2n] (plus bias [2n]); out [nb, n]."""
    n = out.shape[-1]
    nb = out.numel() // n
    _check("silu_mul_", (gate_up, nb * 2 * n), (out, nb * n), (bias, 2 * n))
    lib().tp_silu_mul(gate_up.data_ptr(), _ptr(bias), out.data_ptr(), n, is_bf16(out), is_bf16(gate_up), out.numel() // n)
    return out


def gemv_(weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [nb, n] = x [nb, k] @ weight^T for a row-major float32 / bfloat16 / float16 weight [n, k]: x
    float32, or bfloat16 against a bfloat16 weight where the CPU has AVX512-BF16 (`gemv_kind`)."""
    n, k = weight.shape
    if k < 1 or n < 1:
        cpu_gemv.check_rc(cpu_gemv.BAD_SIZE, "GEMV", k, n, 0)
    nb = x.numel() // k
    if x.numel() % k:
        raise ValueError(f"gemv_: x of {x.numel()} values is not rows of {k}")
    _check("gemv_", (weight, n * k), (x, nb * k), (out, nb * n))
    cpu_gemv.check_rc(lib().tp_gemv(weight.data_ptr(), x.data_ptr(), out.data_ptr(), k, n, gemv_kind(weight), is_bf16(out), nb), "GEMV", k, n, nb)
    return out


def gemv_kind(weight: torch.Tensor) -> int:
    """The kernel's path for a float weight (cpu_gemv.c: 0 float32, 1 bfloat16 weight and
    float32 x, 2 both bfloat16, 5 float16 weight and float32 x); its x is bfloat16 only for 2."""
    if weight.dtype == torch.float32:
        return 0
    if weight.dtype == torch.float16:
        return 5
    return 2 if cpu_gemv._bf16_dot else 1


def int8_gemv_(qweight: torch.Tensor, block_sums: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = x @ (qweight * scales[:, None])^T, x float32 [nb, k] quantised per 64 values (cpu_gemv.int8_linear)."""
    n, k = qweight.shape
    nb = x.numel() // k
    if x.numel() % k or k % 64 or x.dtype != torch.float32:
        raise ValueError(f"int8_gemv_: x of {x.numel()} {x.dtype} values for rows of {k} (float32, rows of a multiple of 64)")
    _check("int8_gemv_", (qweight, n * k), (block_sums, n * (k // 64)), (scales, n), (x, nb * k), (out, nb * n))
    rc = lib().tp_gemv_q8(qweight.data_ptr(), block_sums.data_ptr(), scales.data_ptr(), x.data_ptr(), out.data_ptr(), k, n, is_bf16(out), nb)
    cpu_gemv.check_rc(rc, "int8 GEMV", k, n, nb)
    return out
