"""The fused CPU decode step's ops (cpu_decode.c, built into the CPU GEMV kernel's library):
RMSNorm with the residual add, bias + RoPE + KV-cache write, one-query attention over the
cache, SiLU(gate) * up; and the GEMVs writing into a given buffer.

Each writes into tensors the caller allocated once (model/fused_decode.py), so a decode step
allocates nothing, and each is the twin of a torch reference op (kernels/reference.py;
tests/test_fused_decode.py compares them). Values follow the eager model's rounding: computed
in float32 and, for a bfloat16 model, rounded to bfloat16 where the eager ops round. Buffers
hold the model's dtype except the GEMV inputs (`x`, `out` of norm / attention / SiLU), which
may be float32 or bfloat16, whichever the consuming GEMV reads.

The tensor functions check nothing beyond what the C code needs to stay in bounds: they are
called with shapes the fused step derived from the model.
"""

from __future__ import annotations

import ctypes

import torch

from tp_runtime.kernels import cpu_gemv

_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "tp_rmsnorm": (None, [_P, _P, _P, _P, _I64, _F, _I, _I, _I]),
    "tp_qkv_rope": (_I, [_P, _P, _P, _P, _P, _P, _I64, _I, _I, _I, _I, _I64]),
    "tp_decode_attn": (_I, [_P, _P, _P, _P, _P, _P, _I64, _I64, _F, _I, _I, _I, _I, _I, _I64]),
    "tp_silu_mul": (None, [_P, _P, _P, _I64, _I, _I]),
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


def rms_norm_(res: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """out = rms_norm(h + res) with res = h + res written back (h given), else rms_norm(res):
    reference.rms_norm_residual / rms_norm for one row [hidden]."""
    lib().tp_rmsnorm(_ptr(h), res.data_ptr(), weight.data_ptr(), out.data_ptr(), res.numel(), eps, int(h is not None), is_bf16(out), is_bf16(res))
    return out


def qkv_rope_(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, nq: int, nkv: int) -> None:
    """One token's q|k|v [(nq + 2 nkv) * hd] (plus bias): RoPE at `pos` (cos, sin: the float32
    tables [max_seq, hd]) on q in place and on k; k and v written to slot `pos` of the caches
    [nkv, max_seq, hd] (one layer, one sequence)."""
    hd = cos.shape[-1]
    if lib().tp_qkv_rope(qkv.data_ptr(), _ptr(bias), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), nq, nkv, hd, is_bf16(qkv), pos):
        raise ValueError(f"qkv_rope_: head size {hd} (the kernel takes even sizes up to 1024)")


def decode_attention_(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int, kv_head_of_q: torch.Tensor | None, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """reference.decode_attention for one sequence: q [nq * hd] over the first `length` keys of
    k_cache, v_cache [nkv, max_seq, hd]; out [nq * hd]; scratch float32 [nq, >= length]."""
    nkv, _, hd = k_cache.shape
    nq = q.numel() // hd
    err = lib().tp_decode_attn(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), _ptr(kv_head_of_q), scratch.data_ptr(), scratch.shape[1],
        k_cache.stride(0), hd**-0.5, nq, nkv, hd, is_bf16(out), is_bf16(q), length,
    )
    if err:
        raise ValueError(f"decode_attention_: head size {hd} over 1024 or {length} keys over the scratch's {scratch.shape[1]}")
    return out


def silu_mul_(gate_up: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out = silu(gate) * up for gate_up = gate|up [2n] (plus bias [2n])."""
    lib().tp_silu_mul(gate_up.data_ptr(), _ptr(bias), out.data_ptr(), out.numel(), is_bf16(out), is_bf16(gate_up))
    return out


def gemv_(weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = weight @ x for a row-major float32 / bfloat16 weight [n, k]: x float32, or
    bfloat16 against a bfloat16 weight where the CPU has AVX512-BF16 (`gemv_kind`)."""
    lib().tp_gemv(weight.data_ptr(), x.data_ptr(), out.data_ptr(), weight.shape[1], weight.shape[0], gemv_kind(weight), is_bf16(out))
    return out


def gemv_kind(weight: torch.Tensor) -> int:
    """The kernel's path for a float weight (cpu_gemv.c: 0 float32, 1 bfloat16 weight and
    float32 x, 2 both bfloat16); its x is bfloat16 only for 2."""
    if weight.dtype == torch.float32:
        return 0
    return 2 if cpu_gemv._bf16_dot else 1


def int8_gemv_(qweight: torch.Tensor, block_sums: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = (qweight * scales[:, None]) @ x, x float32 quantised per 64 values (cpu_gemv.int8_linear)."""
    if lib().tp_gemv_q8(qweight.data_ptr(), block_sums.data_ptr(), scales.data_ptr(), x.data_ptr(), out.data_ptr(), qweight.shape[1], qweight.shape[0], is_bf16(out)):
        raise MemoryError("int8 GEMV: the activation buffer could not be allocated")
    return out
