"""Weight-only int8 layers (`--quantize int8`): the int8 weight format's linear classes.

The model is built with these in place of the float ones (LinearKinds INT8, chosen on meta):
each float slice is quantised as it loads, a block of rows at a time, to int8 with one scale
per output channel (symmetric, absmax / 127), so no rank ever holds a float copy of its shard.
The checkpoint's own values are quantised (a float32 checkpoint run in bfloat16 is not rounded
to bfloat16 first). The embedding,
the LM head and the norms stay in float. Separate classes, not a branch inside the float layers.
"""

from __future__ import annotations

import torch
from torch import nn

from tp_runtime import kernels
from tp_runtime.checkpoint.loader import copy_checked
from tp_runtime.checkpoint.mapped import release_pages
from tp_runtime.communicator import Communicator
from tp_runtime.model.linear import ColumnParallelLinear, LinearKinds, bind_row_parallel


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (int8 [out, in], scales [out] float32)."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


_CHUNK_VALUES = 1 << 21  # float values quantised at once (8 MiB of float32)


class _Int8Linear(nn.Module):
    """int8 weight [out, in] with one scale per output row (in the model's dtype), filled from
    float checkpoint slices as they load: each slice's rows are quantised on their own, so
    quantising a slot at a time gives what quantising the whole shard would."""

    def __init__(self, out_features: int, in_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype))
        # the CPU kernel's int8 path takes the weight's 64-block sums (a 3% side table, rebuilt
        # from qweight, so not saved); None where it cannot run (in % 64)
        blocks = in_features // kernels.cpu_gemv.INT8_BLOCK
        sums = torch.empty(out_features, blocks, dtype=torch.int16) if in_features % kernels.cpu_gemv.INT8_BLOCK == 0 else None
        self.register_buffer("block_sums", sums, persistent=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def _rows(self, slot: str | None) -> tuple[int, int]:
        return 0, self.qweight.shape[0]

    def load_weight(self, name: str, data: torch.Tensor, slot: str | None) -> None:
        lo, hi = self._rows(slot)
        if name == "bias":
            copy_checked(self.bias[lo:hi], data)
            return
        if tuple(data.shape) != (hi - lo, self.qweight.shape[1]):
            raise ValueError(f"slice of shape {list(data.shape)} does not fit rows [{lo}, {hi}) of an int8 weight of shape {list(self.qweight.shape)}")
        # a block of rows at a time (per-row scales: the same result), so the float temporaries
        # stay small whatever the slice
        step = max(1, _CHUNK_VALUES // max(1, data.shape[1]))
        for r in range(0, hi - lo, step):
            rows = data[r : r + step]
            q, scales = quantize_per_channel(rows)
            release_pages(rows)
            self.qweight[lo + r : lo + r + rows.shape[0]].copy_(q)
            self.scales[lo + r : lo + r + rows.shape[0]].copy_(scales)
            if self.block_sums is not None and self.qweight.device.type == "cpu":
                self.block_sums[lo + r : lo + r + rows.shape[0]].copy_(kernels.cpu_gemv.int8_block_sums(q))

    def rederive(self) -> None:
        """qweight copied in whole (an offloaded layer): its block sums again."""
        if self.block_sums is not None and self.qweight.device.type == "cpu":
            step = max(1, _CHUNK_VALUES // max(1, self.qweight.shape[1]))
            for r in range(0, self.qweight.shape[0], step):
                self.block_sums[r : r + step].copy_(kernels.cpu_gemv.int8_block_sums(self.qweight[r : r + step]))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        sums = self.block_sums if self.qweight.device.type == "cpu" else None
        return kernels.int8_linear(x, self.qweight, self.scales, sums)

    def fused_problem(self) -> str | None:
        if self.block_sums is None or not kernels.cpu_gemv.has_int8_dot():
            return "has int8 weights, which need AVX512-VNNI and input sizes divisible by 64"
        return None

    def _bind_gemv(self, binder, out: torch.Tensor):
        return binder.int8_gemv(self.qweight, self.block_sums, self.scales, out)


class Int8ColumnParallelLinear(_Int8Linear):
    """ColumnParallelLinear's twin: the same constructor and merged slots."""

    def __init__(self, in_features: int, slots: list[tuple[str, int]], bias: bool, dtype: torch.dtype) -> None:
        self.slot_rows = ColumnParallelLinear.slot_table(slots)
        self.out_features_local = sum(rows for _, rows in slots)
        super().__init__(self.out_features_local, in_features, bias, dtype)

    def _rows(self, slot: str | None) -> tuple[int, int]:
        return self.slot_rows[slot] if slot is not None else (0, self.out_features_local)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        return y if self.bias is None else y + self.bias

    def bind_decode(self, binder, out: torch.Tensor):
        return self._bind_gemv(binder, out)


class Int8RowParallelLinear(_Int8Linear):
    """RowParallelLinear's twin: the same constructor, the all-reduce after the product."""

    def __init__(self, in_features_local: int, out_features: int, bias: bool, dtype: torch.dtype, comm: Communicator, site: str) -> None:
        super().__init__(out_features, in_features_local, bias, dtype)
        self.comm, self.site = comm, site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        y = self.comm.all_reduce(y, site=self.site)  # row-parallel: partial sums -> full output
        return y if self.bias is None else y + self.bias

    def bind_decode(self, binder, out: torch.Tensor):
        return bind_row_parallel(binder, self._bind_gemv(binder, out), self.site, self.bias)


INT8 = LinearKinds(Int8ColumnParallelLinear, Int8RowParallelLinear)
