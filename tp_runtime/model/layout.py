"""Memory layout of the weights that decode multiplies one row against.

A weight stays logically [out, in] (loading, streaming, quantisation see no difference); only
its strides change. Column-major storage makes `F.linear` hand BLAS an [in, out] row-major
matrix, and on the CPU this project measures on (bench/gemv.py, 2-core Zen 4) the float32
single-row product then streams weights 5-28% faster (TinyLlama shapes: 16-19 -> 17-24 GB/s at
2 threads, 17-19 -> 20-25 GB/s at 1), while bfloat16 is 20-40% slower that way. So "auto" is
column-major for float32 on CPU, row-major otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from tp_runtime.model.embedding import ParallelLMHead
from tp_runtime.model.linear import ColumnParallelLinear, RowParallelLinear

LAYOUTS = ("auto", "row", "col")


def resolve_layout(layout: str, dtype: torch.dtype, device: torch.device) -> str:
    if layout != "auto":
        return layout
    return "col" if dtype == torch.float32 and device.type == "cpu" else "row"


def column_major_(model: nn.Module) -> int:
    """Store every parallel linear's and the LM head's weight column-major, in place (one
    weight at a time, so the transient copy is one tensor). Returns how many."""
    done = set()
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)) and id(m.weight) not in done:
            w = m.weight
            w.data = w.data.t().contiguous().t()  # same Parameter: a tied embedding follows
            done.add(id(w))
    return len(done)
