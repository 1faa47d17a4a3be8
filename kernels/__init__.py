"""Kernel dispatch: the one place the model calls for attention, norms and RoPE.

Triton on CUDA, the torch reference elsewhere. TP_RUNTIME_KERNELS=triton|torch forces one
(read once, at import; `set_backend` changes it in-process).
"""

from __future__ import annotations

import os

from tp_runtime.kernels import reference

_BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("TP_RUNTIME_KERNELS", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"TP_RUNTIME_KERNELS={_backend!r}: choose one of {', '.join(_BACKENDS)}")


def set_backend(name: str) -> None:
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend {name!r}: choose one of {', '.join(_BACKENDS)}")
    _backend = name


def backend() -> str:
    return _backend


prefill_attention = reference.prefill_attention
decode_attention = reference.decode_attention
rms_norm = reference.rms_norm
apply_rope = reference.apply_rope
