"""Tensor-parallel linear layers. Each owns its per-rank weight and fills it from checkpoint slices.

Column-parallel layers may merge several checkpoint projections (q/k/v, gate/up) into one
weight, so a decode step runs one GEMV instead of three; `slots` name the row ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tp_runtime.checkpoint.loader import copy_checked
from tp_runtime.communicator import Communicator
from tp_runtime.model.embedding import ParallelLMHead, VocabParallelEmbedding


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W_local^T: W [out, in] split on out; no communication.

    slots: ordered (name, local rows) of the checkpoint tensors merged into this weight.
    """

    def __init__(self, in_features: int, slots: list[tuple[str, int]], bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.slot_rows = self.slot_table(slots)
        self.out_features_local = start = sum(rows for _, rows in slots)
        self.weight = nn.Parameter(torch.empty(start, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(start, dtype=dtype), requires_grad=False) if bias else None

    @staticmethod
    def slot_table(slots: list[tuple[str, int]]) -> dict[str, tuple[int, int]]:
        """Each merged slot's row range [lo, hi)."""
        table, start = {}, 0
        for name, rows in slots:
            table[name] = (start, start + rows)
            start += rows
        return table

    def load_weight(self, name: str, data: torch.Tensor, slot: str | None) -> None:
        param = getattr(self, name)
        lo, hi = self.slot_rows[slot] if slot is not None else (0, param.shape[0])
        copy_checked(param[lo:hi], data)

    # the GEMM; kernels.cpu_linear on CPU (use_cpu_gemv_)
    matmul = staticmethod(F.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out_local]
        y = self.matmul(x, self.weight)
        return y if self.bias is None else y + self.bias

    def fused_problem(self) -> str | None:
        return None if self.weight.is_contiguous() else "has a weight that is not row-major"

    def bind_decode(self, binder, out: torch.Tensor):
        """The fused step's GEMV into out (the bias is its consumer's: RoPE, SiLU)."""
        return binder.float_gemv(self.weight, out)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b: W [out, in] split on in."""

    def __init__(self, in_features_local: int, out_features: int, bias: bool, dtype: torch.dtype, comm: Communicator, site: str) -> None:
        super().__init__()
        self.comm = comm
        self.site = site
        self.weight = nn.Parameter(torch.empty(out_features, in_features_local, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    matmul = staticmethod(F.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_local] -> [..., out]
        y = self.matmul(x, self.weight)
        y = self.comm.all_reduce(y, site=self.site)  # row-parallel: partial sums -> full output
        if self.bias is not None:
            y = y + self.bias
        return y

    fused_problem = ColumnParallelLinear.fused_problem

    def bind_decode(self, binder, out: torch.Tensor):
        """The fused step's GEMV into out, then its all-reduce and bias: (x, run(nb))."""
        return bind_row_parallel(binder, binder.float_gemv(self.weight, out), self.site, self.bias)


def bind_row_parallel(binder, gemv, site: str, bias: torch.Tensor | None):
    """A row-parallel linear in the fused step: its GEMV, then the sum over ranks and the bias."""
    reduce = binder.all_reduce(gemv.out, site, bias)

    def run(nb: int) -> None:
        gemv(nb)
        reduce(nb)

    return binder.bound(gemv.x, run)


def linear_binding_problem(m: nn.Module) -> str | None:
    """Why linear `m` cannot bind into the fused decode step ("<Class> ..."), or None."""
    probe = getattr(m, "fused_problem", None)
    if probe is None or not hasattr(m, "bind_decode"):
        return f"{type(m).__name__} has no fused binding"
    why = probe()
    return f"{type(m).__name__} {why}" if why else None


@dataclass(frozen=True)
class LinearKinds:
    """The linear classes of one weight format, chosen when the model is built on meta: each
    loads its format's data (floats, or raw quantized blocks) straight into its own storage.
    The vocab-parallel embedding and LM head stay float unless the format has its own."""

    column: type
    row: type
    embedding: type = VocabParallelEmbedding
    head: type = ParallelLMHead


FLOAT = LinearKinds(ColumnParallelLinear, RowParallelLinear)


def use_cpu_gemv_(modules) -> int:
    """Route the single-row products of every parallel linear and LM head in `modules` (a model,
    or staging layers) through kernels.cpu_linear; returns how many."""
    from tp_runtime import kernels

    n = 0
    for root in modules:
        for m in root.modules():
            if type(m) in (ColumnParallelLinear, RowParallelLinear, ParallelLMHead):  # float weights, not their block twins
                m.matmul = kernels.cpu_linear
                n += 1
    return n
