"""Linear layers whose weights stay in a GGUF file's blocks (Q4_0, Q4_K, Q8_0, ...) in memory.

The GGUF weight format's linear classes (LinearKinds BLOCKS, chosen on meta for a GGUF model
on CPU): the loader hands each rank's slice over as raw blocks (`load_blocks`), never as
floats, and decode multiplies them natively (kernels/cpu_quant.py: int8 dot products against
activations quantised per block). Prefill decodes the weight into the activation dtype and
runs one GEMM, as llama.cpp does with its tiles. A merged weight (q/k/v, gate/up) may hold
slots of different types (a Q4_K_M file mixes Q4_K and Q6_K): each slot is a part with its own
GEMV. A slice that cannot be cut on blocks (a row-parallel column range inside a K-quant
block) is loaded as floats instead (`load_weight`), a part multiplied in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tp_runtime.checkpoint.loader import copy_checked
from tp_runtime.communicator import Communicator
from tp_runtime.kernels import cpu_decode, cpu_quant
from tp_runtime.model.linear import ColumnParallelLinear, LinearKinds, bind_row_parallel


@dataclass
class Part:
    lo: int  # its output rows [lo, hi) of the merged weight
    hi: int
    storage: str | None  # the GGML type of `data`'s blocks; None: float32 values
    name: str  # the buffer holding it


class _BlockLinear(nn.Module):
    @staticmethod
    def takes_blocks(storage: str) -> bool:
        """Whether the loader should hand a slice stored as `storage` over as its blocks."""
        return cpu_quant.supported(storage)

    def __init__(self, out_features: int, in_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features_local, self.in_features = out_features, in_features
        self.dtype = dtype
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.parts: list[Part] = []

    def _rows(self, slot: str | None) -> tuple[int, int]:
        return 0, self.out_features_local

    def _add(self, slot: str | None, storage: str | None, data: torch.Tensor) -> None:
        lo, hi = self._rows(slot)
        if data.shape[0] != hi - lo:
            raise ValueError(f"a slice of {data.shape[0]} rows for rows [{lo}, {hi}) of a {type(self).__name__}")
        same = [p for p in self.parts if (p.lo, p.hi) == (lo, hi)]  # a staging layer refilled
        if same:
            same[0].storage = storage
            self.register_buffer(same[0].name, data)
            return
        name = f"part{len(self.parts)}"
        self.register_buffer(name, data)
        self.parts.append(Part(lo, hi, storage, name))
        self.parts.sort(key=lambda p: p.lo)

    def load_blocks(self, name: str, data: torch.Tensor, storage: str, slot: str | None) -> None:
        """A slice of the weight as its file stores it: uint8 [rows, bytes per row] of `storage`."""
        if not cpu_quant.supported(storage):
            raise ValueError(f"no native kernel for {storage} blocks")
        self._add(slot, storage, data.contiguous().clone())

    def load_weight(self, name: str, data: torch.Tensor, slot: str | None) -> None:
        if name == "bias":
            lo, hi = self._rows(slot)
            copy_checked(self.bias[lo:hi], data)
            return
        w = torch.empty(data.shape, dtype=torch.float32)
        copy_checked(w, data)
        self._add(slot, None, w)

    def data(self, part: Part) -> torch.Tensor:
        return getattr(self, part.name)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 1:  # a decode row: the native GEMV per part
            xf = x2.float().contiguous()
            y = torch.empty(1, self.out_features_local, dtype=torch.float32)
            for p in self.parts:
                if p.storage is None:
                    y[:, p.lo : p.hi] = F.linear(xf, self.data(p))
                else:
                    cpu_quant.gemv_(self.data(p), p.storage, xf, y[:, p.lo : p.hi])
            return y.to(x.dtype).view(*lead, -1)
        pieces = [F.linear(x2, self._dense(p, x.dtype)) for p in self.parts]  # prefill: decode, then one GEMM
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)).view(*lead, -1)

    def _dense(self, p: Part, dtype: torch.dtype) -> torch.Tensor:
        if p.storage is None:
            return self.data(p).to(dtype)
        out = torch.empty(p.hi - p.lo, self.in_features, dtype=dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32)
        return cpu_quant.dequantize_(self.data(p), p.storage, out).to(dtype)

    def fused_problem(self) -> str | None:
        covered = sum(p.hi - p.lo for p in self.parts)
        if covered != self.out_features_local:
            return f"has {covered} of its {self.out_features_local} rows loaded"
        return None

    def _bind_gemv(self, binder, out: torch.Tensor):
        """The parts' GEMVs into out (per-part buffers copied in when there are several), bound
        with its input `.x` and `.out`."""
        lib = cpu_quant.lib()
        x = binder.buffer(self.in_features, torch.float32)
        calls = []
        single = len(self.parts) == 1
        for p in self.parts:
            target = out if single else binder.buffer(p.hi - p.lo, out.dtype)
            data = self.data(p)
            if p.storage is None:
                call = lambda nb, data=data, target=target: cpu_decode.gemv_(data, x[:nb], target[:nb])
            else:
                call = _bound_qgemv(lib, binder, cpu_quant.TYPES[p.storage], data, x, target, self.in_features, p.hi - p.lo)
            calls.append((call, p, target))

        def run(nb: int) -> None:
            for call, p, target in calls:
                call(nb)
                if not single:
                    out[:nb, p.lo : p.hi].copy_(target[:nb])

        bound = binder.bound(x, run)
        bound.out = out
        return bound


def _bound_qgemv(lib, binder, type_id: int, blocks: torch.Tensor, x: torch.Tensor, out: torch.Tensor, k: int, n: int):
    ybf = int(out.dtype == torch.bfloat16)
    wp, xp, yp = binder.ptr(blocks), binder.ptr(x), binder.ptr(out)

    def call(nb: int) -> None:
        rc = lib.tp_qgemv(type_id, wp, xp, yp, k, n, ybf, nb)
        if rc:
            raise RuntimeError(f"quantized GEMV failed with code {rc} (K={k}, N={n}, nb={nb})")

    return call


class BlockColumnParallelLinear(_BlockLinear):
    """ColumnParallelLinear's twin for GGUF blocks: the same constructor and merged slots."""

    def __init__(self, in_features: int, slots: list[tuple[str, int]], bias: bool, dtype: torch.dtype) -> None:
        self.slot_rows = ColumnParallelLinear.slot_table(slots)
        super().__init__(sum(rows for _, rows in slots), in_features, bias, dtype)

    def _rows(self, slot: str | None) -> tuple[int, int]:
        return self.slot_rows[slot] if slot is not None else (0, self.out_features_local)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        return y if self.bias is None else y + self.bias

    def bind_decode(self, binder, out: torch.Tensor):
        return self._bind_gemv(binder, out)


class BlockRowParallelLinear(_BlockLinear):
    """RowParallelLinear's twin for GGUF blocks: the all-reduce after the product."""

    def __init__(self, in_features_local: int, out_features: int, bias: bool, dtype: torch.dtype, comm: Communicator, site: str) -> None:
        super().__init__(out_features, in_features_local, bias, dtype)
        self.comm, self.site = comm, site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        y = self.comm.all_reduce(y, site=self.site)  # row-parallel: partial sums -> full output
        return y if self.bias is None else y + self.bias

    def bind_decode(self, binder, out: torch.Tensor):
        return bind_row_parallel(binder, self._bind_gemv(binder, out), self.site, self.bias)


BLOCKS = LinearKinds(BlockColumnParallelLinear, BlockRowParallelLinear)
