"""Weight-only int8 layers, made from this rank's loaded float shard (`--quantize int8`).

Each column- or row-parallel linear is replaced by its int8 twin: the weight becomes int8
with one float scale per output channel (symmetric, absmax / 127), quantised per shard right
after loading, so no rank ever holds more than its own slice in float. The embedding, the LM
head and the norms stay in float. Separate classes, not a branch inside the float layers.
"""

from __future__ import annotations

import torch
from torch import nn

from tp_runtime import kernels
from tp_runtime.model.linear import ColumnParallelLinear, RowParallelLinear, bind_row_parallel


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (int8 [out, in], scales [out] float32)."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class _Int8Linear(nn.Module):
    def __init__(self, src: nn.Module) -> None:
        super().__init__()
        q, scales = quantize_per_channel(src.weight.data)
        dtype = src.weight.dtype
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.to(dtype))
        # the CPU kernel's int8 path takes the weight's 64-block sums (a 3% side table, rebuilt
        # from qweight, so not saved)
        sums = kernels.cpu_gemv.int8_block_sums(q) if q.device.type == "cpu" else None
        self.register_buffer("block_sums", sums, persistent=False)
        self.bias = src.bias

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int8_linear(x, self.qweight, self.scales, self.block_sums)

    def fused_problem(self) -> str | None:
        if self.block_sums is None or not kernels.cpu_gemv.has_int8_dot():
            return "has int8 weights, which need AVX512-VNNI and input sizes divisible by 64"
        return None

    def _bind_gemv(self, binder, out: torch.Tensor):
        return binder.int8_gemv(self.qweight, self.block_sums, self.scales, out)


class Int8ColumnParallelLinear(_Int8Linear):
    def __init__(self, src: ColumnParallelLinear) -> None:
        super().__init__(src)
        self.slot_rows, self.out_features_local = src.slot_rows, src.out_features_local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        return y if self.bias is None else y + self.bias

    def bind_decode(self, binder, out: torch.Tensor):
        return self._bind_gemv(binder, out)


class Int8RowParallelLinear(_Int8Linear):
    def __init__(self, src: RowParallelLinear) -> None:
        super().__init__(src)
        self.comm, self.site = src.comm, src.site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        y = self.comm.all_reduce(y, site=self.site)  # row-parallel: partial sums -> full output
        return y if self.bias is None else y + self.bias

    def bind_decode(self, binder, out: torch.Tensor):
        return bind_row_parallel(binder, self._bind_gemv(binder, out), self.site, self.bias)


def quantize_int8_(model: nn.Module) -> int:
    """Replace every parallel linear of `model` by its int8 twin, in place; returns how many."""
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, ColumnParallelLinear):
            swaps.append((name, Int8ColumnParallelLinear(module)))
        elif isinstance(module, RowParallelLinear):
            swaps.append((name, Int8RowParallelLinear(module)))
    for name, new in swaps:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return len(swaps)
