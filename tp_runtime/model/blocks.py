"""Linear layers whose weights stay in a GGUF file's blocks (Q4_0, Q4_K, Q8_0, ...) in memory.

The GGUF weight format's linear classes (LinearKinds BLOCKS, chosen on meta for a GGUF model
on CPU): the loader hands each rank's slice over as raw blocks (`load_blocks`), never as
floats, and decode multiplies them natively (kernels/cpu_quant.py: int8 dot products against
activations quantised per block). Prefill decodes the weight into the activation dtype and
runs one GEMM, as llama.cpp does with its tiles. A merged weight (q/k/v, gate/up) may hold
slots of different types (a Q4_K_M file mixes Q4_K and Q6_K): each slot is a part with its own
GEMV. A slice that cannot be cut on blocks (a row-parallel column range inside a K-quant
block) is loaded as floats instead (`load_weight`), a part multiplied in float32. An F16
tensor (a GGUF converted with --outtype f16) stays float16 (`keeps_f16`): decode reads its
2 bytes a value, each widened exactly to float32 in the GEMV (cpu_gemv.c rows_f16), where a
float32 copy would read twice the bytes llama.cpp's f16 decode reads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from tp_runtime.checkpoint.loader import copy_checked
from tp_runtime.communicator import Communicator
from tp_runtime.kernels import cpu_gemv, cpu_quant
from tp_runtime.model.embedding import HEAD_TILE_ROWS, ParallelLMHead, VocabParallelEmbedding, load_vocab_rows
from tp_runtime.model.fused_decode import Gemv
from tp_runtime.model.linear import ColumnParallelLinear, LinearKinds, bind_row_parallel


@dataclass
class Part:
    lo: int  # its output rows [lo, hi) of the merged weight
    hi: int
    storage: str | None  # the GGML type of `data`'s blocks; None: float values (float32, or float16 from an F16 tensor)
    name: str  # the buffer holding it


def keeps_f16(data: torch.Tensor) -> bool:
    """Whether float values loaded from `data` stay float16 (the GEMV kernel reads them natively)
    rather than become float32."""
    return data.dtype == torch.float16 and cpu_gemv.load() is not None


prefill_bf16: bool | None = None  # the process's default for layers without a choice (None: the CPU's); tests set it


def choose_prefill(model: nn.Module, block_prefill: str) -> None:
    """--block-prefill for every block linear of `model` (streamed layers' staging included)."""
    choice = {"auto": None, "float32": False, "bfloat16": True}[block_prefill]
    for m in model.modules():
        if isinstance(m, _BlockLinear):
            m.prefill_bf16 = choice


def prefill_in_bf16(choice: bool | None = None) -> bool:
    """Whether a float32 model's prefill multiplies quantized blocks in bfloat16: the blocks
    decoded to bfloat16 and the activations rounded to it, one bfloat16 GEMM (oneDNN: ~390
    GFLOPS on this 2-core AVX512-BF16 CPU, against ~150 for float32), as llama.cpp's prefill
    multiplies them against activations quantised to 8 bits. A 4-8-bit weight's own rounding is
    far above bfloat16's (a Q4_0 value is off by up to 1/16 of its block's range), so the
    logits stay within the quantisation's own error; float values (F16, F32 parts) keep float32.
    Where the CPU lacks AVX512-BF16, bfloat16 GEMMs are emulated and slower: float32 there.
    choice: the layer's --block-prefill (None: auto)."""
    if choice is not None:
        return choice
    if prefill_bf16 is not None:
        return prefill_bf16
    return cpu_gemv.load() is not None and cpu_gemv._bf16_dot


_scratch = threading.local()


def dense_values(data: torch.Tensor, storage: str | None, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A weight's values in `dtype` for a prefill GEMM (rows of `k` values): blocks of `storage`
    decoded, float16 values widened (exactly), both into this thread's reused buffer (valid
    until its next call; the GEMM reads it at once). A fresh tensor per product faulted in
    ~4 GB of new pages per TinyLlama F16 prefill (2.8 s against 1.9 s for the float32 file); the
    buffer holds the largest weight once. Float values already in `dtype` are returned as is."""
    if storage is None and (data.dtype == dtype or data.dtype != torch.float16):
        return data.to(dtype)
    wide = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    n = data.shape[0] * k
    bufs = _scratch.__dict__.setdefault("bufs", {})  # by dtype: a model may widen F16 parts and decode blocks to bfloat16
    buf = bufs.get(wide)
    if buf is None or buf.numel() < n:
        buf = bufs[wide] = torch.empty(n, dtype=wide)
    out = buf[:n].view(data.shape[0], k)
    if storage is None:
        return out.copy_(data).to(dtype)
    return cpu_quant.dequantize_(data, storage, out).to(dtype)


def _float_values(data: torch.Tensor) -> torch.Tensor:
    """A copy of a float slice as a block linear or vocab table holds it: float16 kept, else float32."""
    out = torch.empty(data.shape, dtype=torch.float16 if keeps_f16(data) else torch.float32)
    copy_checked(out, data)
    return out


class _BlockLinear(nn.Module):
    prefill_bf16: bool | None = None  # --block-prefill (choose_prefill); None: prefill_in_bf16's default

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
        if storage in cpu_quant.PACKED and data.shape[0] % cpu_quant.PACK_ROWS == 0 and cpu_quant.packs():
            # 8 rows interleaved (the faster kernel here); slices of whole groups concatenate
            data, storage = cpu_quant.pack(data, storage), cpu_quant.PACKED[storage]
        for p in self.parts:
            if p.lo <= lo and hi <= p.hi and p.storage == storage and self.data(p).shape[1:] == data.shape[1:]:
                self.data(p)[lo - p.lo : hi - p.lo].copy_(data)  # a staging layer refilled: in place
                return
            if p.lo < hi and lo < p.hi:
                raise ValueError(f"rows [{lo}, {hi}) as {storage or 'float32'} over rows [{p.lo}, {p.hi}) held as {p.storage or 'float32'}")
        for p in self.parts:  # slots stored alike (q, k, v of one type) become one part: one GEMV
            if p.hi == lo and p.storage == storage and self.data(p).shape[1:] == data.shape[1:]:
                self.register_buffer(p.name, torch.cat([self.data(p), data]))
                p.hi = hi
                return
        name = f"part{len(self.parts)}"
        self.register_buffer(name, data)
        self.parts.append(Part(lo, hi, storage, name))
        self.parts.sort(key=lambda p: p.lo)

    def layout(self) -> list[list]:
        """Its parts as [lo, hi, storage, buffer name]: what a staging layer refilled with
        another layer must match, or be rebuilt to."""
        return [[p.lo, p.hi, p.storage, p.name] for p in self.parts]

    def set_layout(self, layout: list[list], like: dict[str, torch.Tensor]) -> None:
        """Parts as `layout` lists them, each buffer allocated like `like[name]` (unfilled); the
        old parts go (a staging layer about to hold a layer stored otherwise: a Q4_K_M file's
        layers differ in which slots are Q6_K)."""
        for p in self.parts:
            delattr(self, p.name)
        self.parts = []
        for lo, hi, storage, name in layout:
            self.register_buffer(name, torch.empty_like(like[name]))
            self.parts.append(Part(lo, hi, storage, name))

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
        self._add(slot, None, _float_values(data))

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
                    y[:, p.lo : p.hi] = cpu_gemv.cpu_linear(xf, self.data(p))
                else:
                    cpu_quant.gemv_(self.data(p), p.storage, xf, y[:, p.lo : p.hi])
            return y.to(x.dtype).view(*lead, -1)
        # prefill: each part decoded, then one GEMM; quantized blocks in bfloat16 where that is fast
        blocks = any(p.storage is not None for p in self.parts)
        low = torch.bfloat16 if blocks and x.dtype == torch.float32 and prefill_in_bf16(self.prefill_bf16) else x.dtype
        x_low = x2.to(low)  # the same tensor when low is x's dtype
        pieces = [cpu_gemv.gemm(x_low, self._dense(p, low)).to(x.dtype) if p.storage is not None
                  else cpu_gemv.gemm(x2, self._dense(p, x.dtype)) for p in self.parts]
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)).view(*lead, -1)

    def _dense(self, p: Part, dtype: torch.dtype) -> torch.Tensor:
        return dense_values(self.data(p), p.storage, self.in_features, dtype)

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
            if p.storage is None:  # float32 or float16 values (a float32 x): the float GEMV, bound by pointer (recorded, on huge pages)
                call = binder.float_gemv(data, target, x)
            else:
                call = _bound_qgemv(lib, binder, cpu_quant.type_id(p.storage), data, x, target, self.in_features, p.hi - p.lo)
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


class _VocabBlocks:
    """A shard's vocab rows (the embedding's, or an untied LM head's) kept as the file stores
    them: uint8 `table` [rows_padded, row bytes] of `storage` blocks, the padding rows zero bytes
    (zero values in every GGML type); or, for a float tensor (`storage` None), values: float16 as
    an F16 file stores them (`keeps_f16`), else in the model's dtype. Needs rows_padded, rows
    (this shard's real ones), hidden, dtype."""

    storage: str | None = None
    takes_blocks = staticmethod(_BlockLinear.takes_blocks)

    def load_blocks(self, name: str, data: torch.Tensor, storage: str, slot: str | None) -> None:
        if not cpu_quant.supported(storage):
            raise ValueError(f"no native kernel for {storage} blocks")
        if data.shape[0] != self.rows:
            raise ValueError(f"a slice of {data.shape[0]} vocab rows for a shard of {self.rows}")
        table = torch.zeros(self.rows_padded, data.shape[1], dtype=torch.uint8)
        table[: self.rows].copy_(data)
        self.storage = storage
        self.register_buffer("table", table)

    def load_weight(self, name: str, data: torch.Tensor, slot: str | None) -> None:
        table = torch.empty(self.rows_padded, self.hidden, dtype=torch.float16 if keeps_f16(data) else self.dtype)
        load_vocab_rows(table, data, self.rows)
        self.storage = None
        self.register_buffer("table", table)

    def dense_rows(self, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [lo, hi) of the table as values in dtype (`dense_values`: valid until the next call)."""
        return dense_values(self.table[lo:hi], self.storage, self.hidden, dtype)

    def table_problem(self) -> str | None:
        return None if hasattr(self, "table") else "has no weight loaded"


class BlockVocabParallelEmbedding(_VocabBlocks, VocabParallelEmbedding):
    """VocabParallelEmbedding's twin for GGUF blocks: a looked-up row is decoded on its own."""

    def _make_weight(self) -> None:
        self.rows = self.vocab_stop - self.vocab_start

    def lookup(self, local_ids: torch.Tensor) -> torch.Tensor:
        flat = local_ids.reshape(-1)
        if self.storage is None:
            rows = self.table.index_select(0, flat)
        else:
            raw = self.table.index_select(0, flat)
            rows = cpu_quant.dequantize_(raw, self.storage, torch.empty(flat.numel(), self.hidden, dtype=torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float32))
        return rows.to(self.dtype).view(*local_ids.shape, self.hidden)

    def row_into_(self, local_id: int, out: torch.Tensor) -> None:
        if self.storage is None or out.dtype not in (torch.float32, torch.bfloat16):
            out.copy_(self.lookup(torch.tensor([local_id]))[0])
        else:
            cpu_quant.dequantize_(self.table[local_id : local_id + 1], self.storage, out.view(1, -1))


class BlockParallelLMHead(_VocabBlocks, ParallelLMHead):
    """ParallelLMHead's twin for GGUF blocks (the tied embedding's table, or its own): a decode
    row's logits straight from the blocks (the native GEMV, as the block linears), several rows'
    by tiles of vocab rows decoded into one GEMM each (float values, as a prefill). A table of
    blocks gives float32 logits either way (the GEMV's own output; no rounding to the model's
    dtype before the gather), a table of float values the model dtype's, as the float head."""

    def _make_weight(self, embedding, tied: bool) -> None:
        self.hidden, self.dtype = embedding.hidden, embedding.dtype
        self._tied = [embedding] if tied else None  # a list: not registered as a submodule

    def tie_(self, embedding) -> None:
        self._tied = [embedding]

    @property
    def _source(self) -> _VocabBlocks:
        return self._tied[0] if self._tied else self

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        src = self._source
        h2 = h.reshape(-1, self.hidden)
        dtype = h.dtype if src.storage is None else torch.float32
        if src.storage is None and src.table.dtype == torch.float16 and h2.shape[0] == 1:  # F16 table: the native GEMV
            return cpu_gemv.cpu_linear(h2.float(), src.table).to(dtype)
        if src.storage is not None and h2.shape[0] == 1:
            out = torch.empty(h2.shape[0], self.rows_padded, dtype=torch.float32)
            return cpu_quant.gemv_(src.table, src.storage, h2.float().contiguous(), out)
        h2 = h2.to(dtype)
        pieces = [cpu_gemv.gemm(h2, src.dense_rows(lo, min(lo + HEAD_TILE_ROWS, self.rows_padded), dtype)) for lo in range(0, self.rows_padded, HEAD_TILE_ROWS)]
        return torch.cat(pieces, dim=-1)

    def fused_problem(self) -> str | None:
        return self._source.table_problem()

    def bind_decode(self, binder):
        src = self._source
        if src.storage is None:
            return binder.float_gemv(src.table, binder.buffer(self.rows_padded))
        out = binder.buffer(self.rows_padded, torch.float32)  # the eager GEMV's float32 logits
        x = binder.buffer(self.hidden, torch.float32)
        call = _bound_qgemv(cpu_quant.lib(), binder, cpu_quant.TYPES[src.storage], src.table, x, out, self.hidden, self.rows_padded)
        return Gemv(x, out, call)


BLOCKS = LinearKinds(BlockColumnParallelLinear, BlockRowParallelLinear, BlockVocabParallelEmbedding, BlockParallelLMHead)
