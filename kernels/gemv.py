"""Decode-time GEMV (one activation row against a [out, in] weight) written for the compiler.

`F.linear` with a single row goes to a BLAS GEMV that reads fp32 weights at ~10-13 GB/s on the
2-core Zen 4 this project measures on (../shared/MEASURED.md); the same product written as a
broadcast multiply and a row sum and compiled by inductor streams the weight at ~22-28 GB/s,
and upcasts 16-bit weights inside the loop instead of materialising a float copy.

Caution: the first call of each weight shape compiles (about 15 s for the first, ~1 s for each
next on this machine; inductor caches the result on disk). Rows > 1 (prefill) keep F.linear.
The sum runs in a different order than BLAS: results differ from F.linear by float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_compiled = None


def _row_times_weight(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # x [in], w [out, in] -> [out], accumulated in float32
    return (w.float() * x.float()).sum(-1).to(x.dtype)


def compiled_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w[out, in]^T, compiled when x is a single row on CPU."""
    global _compiled
    if x.device.type != "cpu" or x.shape[:-1].numel() != 1:
        return F.linear(x, w)
    if _compiled is None:
        _compiled = torch.compile(_row_times_weight, dynamic=False)
    return _compiled(x.reshape(-1), w).reshape(*x.shape[:-1], w.shape[0])
