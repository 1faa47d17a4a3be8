"""Weight-only int8 layers (`--quantize int8`): the int8 weight format's linear classes.

The model is built with these in place of the float ones (LinearKinds INT8, chosen on meta):
each float slice is quantised as it loads, a block of rows at a time, to int8 with one scale
per output channel (symmetric, absmax / 127), so no rank ever holds a float copy of its shard.
The checkpoint's own values are quantised (a float32 checkpoint run in bfloat16 is not rounded
to bfloat16 first). The vocab-parallel embedding and LM head are int8 too, one scale per vocab
row (llama.cpp keeps them at 6-8 bits): for a small model the head is the largest weight a
token reads (SmolLM2-135M: 113 MB of its 220 as float32). Tied, the two share one int8 table,
which a token then reads once, as the head. The head's logits stay float32. The norms stay
in float. Separate classes, not a branch inside the float layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tp_runtime import kernels
from tp_runtime.checkpoint.loader import copy_checked
from tp_runtime.checkpoint.mapped import release_pages
from tp_runtime.communicator import Communicator
from tp_runtime.kernels import cpu_quant
from tp_runtime.model.embedding import HEAD_TILE_ROWS, ParallelLMHead, VocabParallelEmbedding
from tp_runtime.model.linear import ColumnParallelLinear, LinearKinds, bind_row_parallel


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (int8 [out, in], scales [out] float32)."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


_CHUNK_VALUES = 1 << 21  # float values quantised at once (8 MiB of float32)
_NO_INT8_GEMV = "has int8 weights, which need AVX512-VNNI and input sizes divisible by 64"


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
            return _NO_INT8_GEMV
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


class _Int8Vocab:
    """A shard's vocab rows (the embedding's, or an untied LM head's) as int8 `qweight`
    [rows_padded, hidden] with one float32 scale per row, quantised as they load (per row, so
    every split holds tp=1's rows); the padding rows zero. The scales stay float32, unlike the
    linears': they are 1/hidden of the table, and a bfloat16 scale would scale a whole row's
    logit by up to 0.4%. A table the LM head multiplies also keeps its 64-block sums (the int8
    GEMV's side table, `keep_block_sums`). Needs rows_padded, rows (this shard's real ones),
    hidden."""

    def _make_table(self) -> None:
        self.register_buffer("qweight", torch.empty(self.rows_padded, self.hidden, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(self.rows_padded, dtype=torch.float32))
        self.register_buffer("block_sums", None, persistent=False)

    def keep_block_sums(self) -> None:
        """The LM head multiplies this table: keep its block sums, where the kernel can run."""
        block = kernels.cpu_gemv.INT8_BLOCK
        if self.hidden % block == 0:
            self.register_buffer("block_sums", torch.empty(self.rows_padded, self.hidden // block, dtype=torch.int16), persistent=False)

    def load_weight(self, name: str, data: torch.Tensor, slot: str | None) -> None:
        if tuple(data.shape) != (self.rows, self.hidden):
            raise ValueError(f"slice of shape {list(data.shape)} does not fit the {self.rows} vocab rows of {self.hidden} values of an int8 table")
        sums = self.block_sums if self.block_sums is not None and self.qweight.device.type == "cpu" else None
        step = max(1, _CHUNK_VALUES // self.hidden)
        for r in range(0, self.rows, step):
            rows = data[r : r + step]
            q, scales = quantize_per_channel(rows)
            release_pages(rows)
            self.qweight[r : r + q.shape[0]].copy_(q)
            self.scales[r : r + q.shape[0]].copy_(scales)
            if sums is not None:
                sums[r : r + q.shape[0]].copy_(kernels.cpu_gemv.int8_block_sums(q))
        # padding rows: zero logits, dropped after the gather
        self.qweight[self.rows :].zero_()
        self.scales[self.rows :].zero_()
        if sums is not None:
            sums[self.rows :].zero_()

    def dense_rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of the table as float32 values."""
        return self.qweight[lo:hi].float() * self.scales[lo:hi, None]


class Int8VocabParallelEmbedding(_Int8Vocab, VocabParallelEmbedding):
    """VocabParallelEmbedding's twin holding int8 rows: a looked-up row is its int8 values times
    its scale (in float32), then rounded to the model's dtype."""

    def _make_weight(self) -> None:
        self.rows = self.vocab_stop - self.vocab_start
        self._make_table()
        self._scratch: list[torch.Tensor] = []

    def init_buffers(self) -> None:
        # float32 scratch for the fused step's lookups, which allocate nothing per token (an int8
        # x float32 product written straight to bfloat16 would make a float32 temporary): a
        # row's values, their magnitudes, its scale
        kw = dict(dtype=torch.float32, device=self.qweight.device)
        self._scratch = [torch.empty(1, self.hidden, **kw), torch.empty(1, self.hidden, **kw), torch.empty(1, 1, **kw)]

    def lookup(self, local_ids: torch.Tensor) -> torch.Tensor:
        flat = local_ids.reshape(-1)
        rows = self.qweight.index_select(0, flat).float() * self.scales.index_select(0, flat)[:, None]
        return rows.to(self.dtype).view(*local_ids.shape, self.hidden)

    def row_into_(self, local_id: int, out: torch.Tensor) -> None:
        row = self._scratch[0][0]
        row.copy_(self.qweight[local_id])
        row.mul_(self.scales[local_id])  # float32 x float32, as lookup
        out.copy_(row)

    def stored_row_into_(self, row: torch.Tensor, storage: str | None, out: torch.Tensor) -> None:
        # quantize_per_channel's steps on one row, in place: the values loading that row gave
        v, mag, scale = self._scratch
        if storage is None:
            v.copy_(row)
        else:
            cpu_quant.dequantize_(row, storage, v)
        torch.abs(v, out=mag)
        torch.amax(mag, dim=1, keepdim=True, out=scale)
        scale.div_(127.0).clamp_(min=1e-12)
        v.div_(scale).round_().clamp_(-127, 127).mul_(scale)
        out.copy_(v)


class Int8ParallelLMHead(_Int8Vocab, ParallelLMHead):
    """ParallelLMHead's twin over an int8 table (the tied embedding's, or its own): a decode row's
    logits by the int8 GEMV (activations quantised per 64 values, as the int8 linears'; what the
    fused step runs), several rows' (a prompt's scores) by tiles of vocab rows dequantised into
    one float32 GEMM each, as where the kernel cannot run (no AVX512-VNNI, hidden % 64, a GPU).
    Why not the GEMV for every row: on SmolLM2-135M, scoring a paragraph, the activations'
    rounding cost more than the table's (KL to float 0.0070 against 0.0062; the table's alone
    0.001). Logits float32 either way."""

    def _make_weight(self, embedding: Int8VocabParallelEmbedding, tied: bool) -> None:
        self.hidden = embedding.hidden
        self._tied = [embedding] if tied else None  # a list: not registered as a submodule
        if tied:
            embedding.keep_block_sums()
        else:
            self._make_table()
            self.keep_block_sums()

    def tie_(self, embedding: Int8VocabParallelEmbedding) -> None:
        self._tied = [embedding]

    @property
    def _source(self) -> _Int8Vocab:
        return self._tied[0] if self._tied else self

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        src = self._source
        h2 = h.reshape(-1, self.hidden).float()
        if h2.shape[0] == 1 and src.block_sums is not None:
            y = kernels.cpu_gemv.int8_linear(h2, src.qweight, src.block_sums, src.scales)
            if y is not None:  # None: no kernel here (or not on CPU)
                return y
        pieces = [F.linear(h2, src.dense_rows(lo, min(lo + HEAD_TILE_ROWS, self.rows_padded))) for lo in range(0, self.rows_padded, HEAD_TILE_ROWS)]
        return torch.cat(pieces, dim=-1)

    def fused_problem(self) -> str | None:
        if self._source.block_sums is None or not kernels.cpu_gemv.has_int8_dot():
            return _NO_INT8_GEMV
        return None

    def bind_decode(self, binder):
        src = self._source
        return binder.int8_gemv(src.qweight, src.block_sums, src.scales, binder.buffer(self.rows_padded, torch.float32))


INT8 = LinearKinds(Int8ColumnParallelLinear, Int8RowParallelLinear, Int8VocabParallelEmbedding, Int8ParallelLMHead)
