"""Kernel dispatch: the one place the model calls for attention, norms and RoPE.

Triton on CUDA tensors (when triton imports), the torch reference elsewhere (decode attention
on CPU: the C kernel of the fused decode step, where it builds).
TP_RUNTIME_KERNELS=triton|torch forces one (read once, at import; `set_backend` changes it
in-process). Forcing triton on CPU tensors runs Triton's interpreter, which Triton only
enables when TRITON_INTERPRET=1 is set before the kernels are first used (tests do this to
exercise the kernels end to end without a GPU; it is slow).

Every function here has a torch twin in `reference` (same signature, same semantics) and a
Triton twin in flash_prefill / flash_decode / norm_rope. Triton is imported lazily, on the
first call that needs it, so importing this package never fails without triton.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from tp_runtime.kernels import reference
from tp_runtime.kernels import cpu_decode, cpu_gemv
from tp_runtime.kernels.cpu_gemv import cpu_linear  # noqa: F401  (re-exported for the model)

_BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("TP_RUNTIME_KERNELS", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"TP_RUNTIME_KERNELS={_backend!r}: choose one of {', '.join(_BACKENDS)}")


class KernelBackendError(RuntimeError):
    """The requested kernel backend cannot run here (triton missing, or CPU tensors without the interpreter)."""


def set_backend(name: str) -> None:
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend {name!r}: choose one of {', '.join(_BACKENDS)}")
    _backend = name


def backend() -> str:
    return _backend


_triton_mods: dict[str, ModuleType] = {}
_triton_import_error: list[BaseException] = []


def _load_triton() -> bool:
    """Import the Triton kernel modules once; False (and the error kept) when triton is unusable."""
    if _triton_mods:
        return True
    if _triton_import_error:
        return False
    try:
        from tp_runtime.kernels import flash_decode, flash_prefill, norm_rope
    except Exception as e:  # ImportError, or a triton build that fails at import
        _triton_import_error.append(e)
        return False
    _triton_mods.update(prefill=flash_prefill, decode=flash_decode, norm_rope=norm_rope)
    return True


def backend_problem(device_type: str) -> str | None:
    """Why the chosen backend cannot run kernels on `device_type` tensors, or None. The engine
    asks at load, so that a forced backend fails before any weight is read, not mid-prefill."""
    if _backend != "triton":
        return None
    if not _load_triton():
        return (f"TP_RUNTIME_KERNELS=triton but triton cannot be imported ({_triton_import_error[0]!r}): "
                "install triton, or use TP_RUNTIME_KERNELS=torch")
    if device_type != "cuda" and not _triton_mods["prefill"].INTERPRET:
        return (f"TP_RUNTIME_KERNELS=triton with {device_type} tensors needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 in the environment before the first kernel call (slow, for tests), "
                "or use TP_RUNTIME_KERNELS=auto|torch")
    return None


def _use_triton(t: torch.Tensor) -> bool:
    if _backend == "torch":
        return False
    if _backend == "auto":
        return t.is_cuda and _load_triton()
    why = backend_problem(t.device.type)
    if why is not None:
        raise KernelBackendError(why)
    return True


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_head_of_q: torch.Tensor | None = None,
    q_offset: int = 0,
    seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention, q [batch, q_heads, seq, hd] over k, v [batch, kv_heads, q_offset + seq, hd]."""
    if _use_triton(q):
        return _triton_mods["prefill"].prefill_attention(q, k, v, kv_head_of_q, q_offset, seq_lens)
    return reference.prefill_attention(q, k, v, kv_head_of_q, q_offset, seq_lens)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    kv_head_of_q: torch.Tensor | None = None,
    max_len: int | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence, q [batch, q_heads, hd], over its first cache_lens[b] cached keys
    in cache row slots[b] (None: row b)."""
    if _use_triton(q):
        return _triton_mods["decode"].decode_attention(q, k_cache, v_cache, cache_lens, kv_head_of_q, max_len, slots=slots)
    if _backend == "auto" and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and k_cache.dtype == q.dtype:
        # the fused decode step's C kernel: it reads each sequence's own keys in place, where the
        # reference gathers every slot's up to the longest and masks (3-5x slower at batch 8)
        if cpu_decode.lib() is not None:
            lengths = cache_lens.tolist()
            out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype)
            scratch = torch.empty(q.shape[0] * q.shape[1], max(lengths), dtype=torch.float32)
            cpu_decode.decode_attention_(q.contiguous(), k_cache, v_cache, lengths, kv_head_of_q, out, scratch, None if slots is None else slots.tolist())
            return out.view_as(q)
    return reference.decode_attention(q, k_cache, v_cache, cache_lens, kv_head_of_q, max_len, slots)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_triton(x):
        return _triton_mods["norm_rope"].rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual, weight, eps), x + residual)."""
    if _use_triton(x):
        return _triton_mods["norm_rope"].rms_norm_residual(x, residual, weight, eps)
    return reference.rms_norm_residual(x, residual, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if _use_triton(x):
        return _triton_mods["norm_rope"].apply_rope(x, cos, sin)
    return reference.apply_rope(x, cos, sin)


def apply_rope_qk_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k in place (one launch on the Triton path); returns (q, k)."""
    if _use_triton(q):
        return _triton_mods["norm_rope"].apply_rope_qk_(q, k, cos, sin)
    return reference.apply_rope_qk_(q, k, cos, sin)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, block_sums: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8 linear (per-output-channel scales): a decode row through the CPU GEMV
    kernel's int8 path when it is loaded and `block_sums` (cpu_gemv.int8_block_sums) is given,
    else reference.int8_linear."""
    if block_sums is not None:
        y = cpu_gemv.int8_linear(x, qweight, block_sums, scales)
        if y is not None:
            return y
    return reference.int8_linear(x, qweight, scales)
