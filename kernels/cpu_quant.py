"""GGML block-quantized weights on CPU (cpu_quant.c, built into the CPU GEMV kernel's library):
a GEMV straight from the blocks, and the blocks decoded to float32 or bfloat16.

Why: a GGUF model's quantized weights can stay in their blocks in memory (Q4_0 is 4.5 bits a
value: 7x fewer bytes than float32, 3.5x fewer than bfloat16), and decode, which is nothing but
memory-bound GEMVs, then reads 3.5-7x fewer bytes a token: `gemv_` multiplies the blocks
natively, with the activations quantised to int8 inside the call (per 32 values for the
32-blocks, per 256 with 16-value sums for the K-quants, llama.cpp's habit) and AVX512-VNNI
integer dot products where the CPU has them (plain C otherwise). Its error is the activations'
rounding: at most amax/254 per value, amax the largest |x| of its block (32 or 256 values).
Prefill, a GEMM, instead decodes tiles of rows with `dequantize_` (bit-exact with
gguf.quants.dequantize) and multiplies them in float.

Types are GGML's (`TYPES`): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32-value blocks) and Q4_K, Q5_K,
Q6_K (256-value superblocks). A weight is `blocks`, uint8 [N, row_bytes], row n the K values
of output n as K / block consecutive blocks (GGUF's layout). Q4_0, Q4_1 and Q8_0 also have a
layout of 8 interleaved rows ("Q4_0x8", ...: `pack`, same size, a row range on multiples of 8
still a slice), whose kernel reads 1.3-1.7x faster on AVX2 without VNNI; the block linears
pack at load where the library prefers it (`pack_at_load`).

Threads: the rows are split over the GEMV kernel's pool (cpu_gemv.load(), started at torch's
thread count). A call holds the library's quantised-activation buffer for its whole length, so
calls from several Python threads run one after the other (never on each other's buffer).
"""

from __future__ import annotations

import ctypes

import torch

from tp_runtime.kernels import cpu_gemv

TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
# name -> (values per block, bytes per block), as tp_qtype_block says
BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}

# the 8-row interleaved layouts (cpu_quant.c X8 + the type's id): name -> base type's name
PACKED = {"Q4_0": "Q4_0x8", "Q4_1": "Q4_1x8", "Q8_0": "Q8_0x8"}
PACK_ROWS = 8
_X8 = 100
_IDS = {**TYPES, **{packed: _X8 + TYPES[base] for base, packed in PACKED.items()}}
_BASE = {packed: base for base, packed in PACKED.items()}
pack_at_load: bool | None = None  # None: the library's preference (tp_qpack_preferred); tests set it

_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "tp_qpack": (_I, [_I, _P, _P, _I64, _I64]),
    "tp_qpack_preferred": (_I, []),
    "tp_qgemv": (_I, [_I, _P, _P, _P, _I64, _I64, _I, _I64]),
    "tp_qdequant": (_I, [_I, _P, _P, _I64, _I64, _I]),
    "tp_qtype_block": (_I, [_I, ctypes.POINTER(_I64), ctypes.POINTER(_I64)]),
    "tp_qgemv_has_int8_dot": (_I, []),
}
_OUT_DTYPES = (torch.float32, torch.bfloat16)


def lib() -> ctypes.CDLL | None:
    """The kernel library with the quantized ops' signatures set, or None: no compiler, or a
    forked child (cpu_gemv gives the library up there: its pool threads did not come along)."""
    lib = cpu_gemv.load()
    if lib is not None and not getattr(lib, "_tp_quant_ops", False):
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        lib._tp_quant_ops = True
    return lib


def supported(type_name: str) -> bool:
    """Whether this build multiplies / decodes blocks of `type_name` (a key of TYPES)."""
    return type_name in TYPES and lib() is not None


def type_id(type_name: str) -> int:
    """The C library's id of a GGML type or of its packed layout."""
    return _IDS[type_name]


def base_type(type_name: str) -> str:
    """The GGML type a packed layout holds ("Q4_0x8" -> "Q4_0"); a GGML type itself."""
    return _BASE.get(type_name, type_name)


def packs() -> bool:
    """Whether block linears should hold Q4_0 / Q4_1 / Q8_0 weights packed (`pack_at_load`)."""
    if pack_at_load is not None:
        return pack_at_load and lib() is not None
    return lib() is not None and bool(lib().tp_qpack_preferred())


def pack(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """`type_name` blocks (uint8 [N, row_bytes], N a multiple of 8) in PACKED[type_name]'s layout."""
    if type_name not in PACKED:
        raise ValueError(f"pack: {type_name} has no packed layout (only {', '.join(PACKED)})")
    k = _row_values("pack", blocks, type_name)
    out = torch.empty_like(blocks)
    rc = lib().tp_qpack(TYPES[type_name], blocks.data_ptr(), out.data_ptr(), k, blocks.shape[0])
    cpu_gemv.check_rc(rc, f"{type_name} pack", k, blocks.shape[0], 1)
    return out


def has_int8_dot() -> bool:
    """Whether the GEMV runs on AVX512-VNNI (else plain C: same values, slower)."""
    return lib() is not None and bool(lib().tp_qgemv_has_int8_dot())


def _row_values(what: str, blocks: torch.Tensor, type_name: str) -> int:
    """K, the values per row of `blocks` (checked: uint8 [rows, whole blocks], contiguous, CPU)."""
    if type_name not in _IDS:
        raise ValueError(f"{what}: unknown block type {type_name!r} (one of {', '.join(_IDS)})")
    if lib() is None:
        raise RuntimeError(f"{what}: the CPU kernel library could not be built (no C compiler?)")
    block, nbytes = BLOCKS[base_type(type_name)]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.device.type != "cpu":
        raise ValueError(f"{what}: blocks must be a CPU uint8 tensor [rows, row_bytes], got {blocks.dtype} {tuple(blocks.shape)} on {blocks.device}")
    if not blocks.is_contiguous():
        raise ValueError(f"{what}: blocks of shape {tuple(blocks.shape)} are not contiguous")
    rows, row_bytes = blocks.shape
    if rows < 1 or row_bytes < 1 or row_bytes % nbytes:
        raise ValueError(f"{what}: {rows} rows of {row_bytes} bytes are not rows of whole {type_name} blocks ({nbytes} bytes for {block} values)")
    if (type_name in _BASE or what == "pack") and rows % PACK_ROWS:
        raise ValueError(f"{what}: {rows} rows of {type_name} are not whole groups of {PACK_ROWS} interleaved rows")
    return row_bytes // nbytes * block


def _check_out(what: str, out: torch.Tensor, shape: tuple[int, ...]) -> None:
    if out.dtype not in _OUT_DTYPES or out.device.type != "cpu":
        raise ValueError(f"{what}: out must be a CPU float32 or bfloat16 tensor, got {out.dtype} on {out.device}")
    if tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"{what}: out of shape {tuple(out.shape)} (contiguous: {out.is_contiguous()}) where a contiguous {shape} is needed")


def gemv_(blocks: torch.Tensor, type_name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [nb, N] = x [nb, K] @ W^T, W [N, K] the weight stored as `type_name` blocks
    (uint8 [N, row_bytes]); x float32 [nb, K] or [K] (then out [N] or [1, N]); out float32 or
    bfloat16 (rounded to nearest even). x is quantised to int8 inside (module docstring)."""
    k = _row_values("gemv_", blocks, type_name)
    n = blocks.shape[0]
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() not in (1, 2):
        raise ValueError(f"gemv_: x must be a CPU float32 tensor [nb, K] or [K], got {x.dtype} {tuple(x.shape)} on {x.device}")
    if x.shape[-1] != k or not x.is_contiguous():
        raise ValueError(f"gemv_: x of shape {tuple(x.shape)} (contiguous: {x.is_contiguous()}) for a weight of rows of {k} values ({type_name})")
    nb = 1 if x.dim() == 1 else x.shape[0]
    if nb < 1:
        raise ValueError(f"gemv_: x has no rows (shape {tuple(x.shape)})")
    _check_out("gemv_", out, (n,) if x.dim() == 1 and out.dim() == 1 else (nb, n))
    rc = lib().tp_qgemv(_IDS[type_name], blocks.data_ptr(), x.data_ptr(), out.data_ptr(), k, n, int(out.dtype == torch.bfloat16), nb)
    cpu_gemv.check_rc(rc, f"{type_name} GEMV", k, n, nb)
    return out


def dequantize_(blocks: torch.Tensor, type_name: str, out: torch.Tensor) -> torch.Tensor:
    """out [rows, K] = the values of `type_name` blocks (uint8 [rows, row_bytes]), float32 (bit-
    exact with gguf.quants.dequantize) or bfloat16 (those values rounded to nearest even)."""
    k = _row_values("dequantize_", blocks, type_name)
    _check_out("dequantize_", out, (blocks.shape[0], k))
    rc = lib().tp_qdequant(_IDS[type_name], blocks.data_ptr(), out.data_ptr(), k, blocks.shape[0], int(out.dtype == torch.bfloat16))
    cpu_gemv.check_rc(rc, f"{type_name} dequantize", k, blocks.shape[0], blocks.shape[0])
    return out
