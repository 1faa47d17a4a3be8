"""Weight-only 4-bit layers (`--quantize int4`): float checkpoints quantised at load into GGML's
Q4_0 blocks, then multiplied by the native block kernels like a GGUF file's Q4_0 weights.

Why Q4_0: it is exactly per-32 groups with one scale each, round-to-nearest (the value of
largest magnitude maps to -8, llama.cpp's rule), and the block kernels (kernels/cpu_quant.py)
already multiply it with int8 activations on VNNI; a second 4-bit layout would need a second
kernel and give the same bytes. Quantising here is bit-exact with gguf.quants.quantize (Q4_0),
so a checkpoint quantised by us and one converted by llama.cpp's gguf-py hold the same blocks.
Each float slice is quantised a block of rows at a time as it loads: no rank holds a float copy
of its shard. The norms stay in float.

The vocab-parallel embedding and LM head get 8 bits, not 4 (llama.cpp's habit: its 4-bit files
keep the output at 6-8 bits, a 4-bit head costs the most accuracy per byte saved): Q8_0 blocks,
quantised at load bit for bit as gguf-py's quantiser, the table type the GGUF path already
holds (blocks.py's vocab classes: a looked-up row decoded alone, the head's decode row the
native GEMV, float32 logits). Q8_0 rather than per-row int8: the block kernels run it on every
CPU (the int8 per-row GEMV needs AVX512-VNNI), and its per-32 scales round less. Tied, one table
serves both.
"""

from __future__ import annotations

import torch

from tp_runtime.checkpoint.mapped import release_pages
from tp_runtime.config import INT4_GROUP as GROUP  # values per Q4_0 block, each with its float16 scale
from tp_runtime.config import ModelConfig
from tp_runtime.kernels import cpu_quant
from tp_runtime.model.blocks import BlockColumnParallelLinear, BlockParallelLMHead, BlockRowParallelLinear, BlockVocabParallelEmbedding
from tp_runtime.model.linear import LinearKinds

BLOCK_BYTES = 18
STORAGE = "Q4_0"
VOCAB_STORAGE = "Q8_0"  # the embedding's and the LM head's blocks
VOCAB_BLOCK_BYTES = 34  # a float16 scale and 32 int8 values
_CHUNK_VALUES = 1 << 21  # float values quantised at once (8 MiB of float32)


def quantize_q4_0(weight: torch.Tensor) -> torch.Tensor:
    """weight [rows, K] (K a multiple of 32) -> uint8 [rows, K / 32 * 18], GGML Q4_0 blocks:
    a float16 scale d = m / -8 (m the block's value of largest magnitude), then 32 nibbles
    q = trunc(x / d + 8.5) clipped to 0..15, value j in the low nibble of byte j (j < 16), value
    j + 16 in its high nibble."""
    rows, k = weight.shape
    if k % GROUP:
        raise ValueError(f"int4 quantises rows of whole {GROUP}-value groups; a row has {k} values")
    w = weight.float().reshape(rows, k // GROUP, GROUP)
    m = torch.gather(w, -1, w.abs().argmax(dim=-1, keepdim=True))
    d = m / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(w * inv + 8.5).clamp(0, 15).to(torch.uint8)
    nibbles = q[..., : GROUP // 2] | (q[..., GROUP // 2 :] << 4)
    scale = d.to(torch.float16).view(torch.uint8)  # [rows, groups, 2]: the float16's bytes
    return torch.cat([scale, nibbles], dim=-1).reshape(rows, k // GROUP * BLOCK_BYTES)


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """weight [rows, K] (K a multiple of 32) -> uint8 [rows, K / 32 * 34], GGML Q8_0 blocks: a
    float16 scale d = amax / 127, then 32 int8 values round(x / d), halves away from zero (gguf-py's
    np_roundf, from the float32 reciprocal 1 / d as it computes it)."""
    rows, k = weight.shape
    if k % GROUP:
        raise ValueError(f"Q8_0 quantises rows of whole {GROUP}-value groups; a row has {k} values")
    w = weight.float().reshape(rows, k // GROUP, GROUP)
    d = w.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    x = w * inv
    a = x.abs()
    whole = torch.floor(a)
    q = (torch.sign(x) * (whole + torch.floor(2 * (a - whole)))).to(torch.int8)
    scale = d.to(torch.float16).view(torch.uint8)  # [rows, groups, 2]: the float16's bytes
    return torch.cat([scale, q.view(torch.uint8)], dim=-1).reshape(rows, k // GROUP * VOCAB_BLOCK_BYTES)


class _Int4:
    """What both int4 linears add to their block twins: float slices become Q4_0 blocks."""

    @staticmethod
    def takes_blocks(storage: str) -> bool:
        return False  # a checkpoint's own blocks are other bits: they arrive as values, and are quantised

    def load_weight(self, name: str, data: torch.Tensor, slot: str | None) -> None:
        if name == "bias":
            return super().load_weight(name, data, slot)
        lo, hi = self._rows(slot)
        if tuple(data.shape) != (hi - lo, self.in_features):
            raise ValueError(f"slice of shape {list(data.shape)} does not fit rows [{lo}, {hi}) of an int4 weight with {self.in_features} inputs")
        blocks = torch.empty(hi - lo, self.in_features // GROUP * BLOCK_BYTES, dtype=torch.uint8)
        step = max(1, _CHUNK_VALUES // max(1, data.shape[1]))
        for r in range(0, hi - lo, step):
            rows = data[r : r + step]
            blocks[r : r + rows.shape[0]] = quantize_q4_0(rows)
            release_pages(rows)
        self._add(slot, STORAGE, blocks)


class Int4ColumnParallelLinear(_Int4, BlockColumnParallelLinear):
    """ColumnParallelLinear's twin holding Q4_0 blocks quantised at load."""


class Int4RowParallelLinear(_Int4, BlockRowParallelLinear):
    """RowParallelLinear's twin holding Q4_0 blocks quantised at load."""


class _Q8Row:
    """One row's Q8_0 round trip in place, on scratch allocated once: the fused step's lookup in
    the mapped checkpoint (tp > 1) allocates nothing per token. quantize_q8_0's steps, then the
    values dequantize_ gives its blocks (the float16 scale times each int8, in float32)."""

    def __init__(self, hidden: int) -> None:
        groups = hidden // GROUP
        self.v, self.mag, self.whole = (torch.empty(groups, GROUP) for _ in range(3))
        self.d, self.inv = torch.empty(groups, 1), torch.empty(groups, 1)
        self.zero, self.d16 = torch.empty(groups, 1, dtype=torch.bool), torch.empty(groups, 1, dtype=torch.float16)

    def __call__(self, row: torch.Tensor, storage: str | None, out: torch.Tensor) -> None:
        """out [1, hidden] <- the Q8_0 values of a checkpoint row as stored (see stored_row_into_)."""
        v, mag = self.v, self.mag
        if storage is None:
            v.view(1, -1).copy_(row)
        else:
            cpu_quant.dequantize_(row, storage, v.view(1, -1))
        torch.abs(v, out=mag)
        torch.amax(mag, dim=-1, keepdim=True, out=self.d)
        self.d.div_(127)
        torch.reciprocal(self.d, out=self.inv)  # what 1 / d computes
        torch.eq(self.d, 0, out=self.zero)
        self.inv.masked_fill_(self.zero, 0)
        v.mul_(self.inv)
        torch.abs(v, out=mag)  # round half away from zero: |x| -> floor + floor(2 * fraction)
        torch.floor(mag, out=self.whole)
        mag.sub_(self.whole).mul_(2).floor_().add_(self.whole)
        torch.sign(v, out=v)
        v.mul_(mag)  # the int8 values
        self.d16.copy_(self.d)
        self.d.copy_(self.d16)
        v.mul_(self.d)
        out.copy_(v.view(1, -1))


class _Q8Vocab:
    """What both int4 vocab classes add to their block twins: a Q8_0 table [rows_padded, row bytes]
    allocated with the model (its size is known), filled from float slices as they load."""

    @staticmethod
    def takes_blocks(storage: str) -> bool:
        return False  # a checkpoint's own blocks arrive as values, and are quantised

    def _make_table(self) -> None:
        self.storage = VOCAB_STORAGE
        self.register_buffer("table", torch.empty(self.rows_padded, self.hidden // GROUP * VOCAB_BLOCK_BYTES, dtype=torch.uint8))

    def load_weight(self, name: str, data: torch.Tensor, slot: str | None) -> None:
        if tuple(data.shape) != (self.rows, self.hidden):
            raise ValueError(f"slice of shape {list(data.shape)} does not fit the {self.rows} vocab rows of {self.hidden} values of a Q8_0 table")
        step = max(1, _CHUNK_VALUES // self.hidden)
        for r in range(0, self.rows, step):
            rows = data[r : r + step]
            self.table[r : r + rows.shape[0]] = quantize_q8_0(rows)
            release_pages(rows)
        self.table[self.rows :].zero_()  # padding rows: zero values in Q8_0 too


class Int4VocabParallelEmbedding(_Q8Vocab, BlockVocabParallelEmbedding):
    """The embedding under --quantize int4: Q8_0 rows quantised at load."""

    def _make_weight(self) -> None:
        super()._make_weight()
        self._make_table()
        self._row: _Q8Row | None = None

    def init_buffers(self) -> None:
        self._row = _Q8Row(self.hidden)

    def stored_row_into_(self, row: torch.Tensor, storage: str | None, out: torch.Tensor) -> None:
        self._row(row, storage, out)  # one row: what loading it gave


class Int4ParallelLMHead(_Q8Vocab, BlockParallelLMHead):
    """The LM head under --quantize int4: the tied embedding's Q8_0 table, or its own."""

    def _make_weight(self, embedding, tied: bool) -> None:
        super()._make_weight(embedding, tied)
        if not tied:
            self._make_table()


INT4 = LinearKinds(Int4ColumnParallelLinear, Int4RowParallelLinear, Int4VocabParallelEmbedding, Int4ParallelLMHead)


def unsupported(cfg: ModelConfig, mlp_unit: int, device_type: str) -> str | None:
    """Why --quantize int4 cannot run this model here, or None. Every linear's input (hidden for
    q/k/v and gate/up, whole heads for o_proj, the rank's MLP slice for down_proj, cut in
    `mlp_unit`s) must be whole 32-value groups; the kernels run on CPU."""
    if device_type != "cpu":
        return f"--quantize int4 runs on the CPU's block kernels, and this rank runs on {device_type}"
    for what, size in (("hidden_size", cfg.hidden_size), ("head_dim", cfg.head_dim), ("intermediate_size", cfg.intermediate_size)):
        if size % GROUP:
            return f"--quantize int4 needs {what} ({size}) a multiple of {GROUP}, the values of one group"
    if mlp_unit % GROUP:
        return f"--quantize int4 cuts the MLP's {cfg.intermediate_size} features in groups of {GROUP}, too few for every rank; use a smaller tp"
    return None
