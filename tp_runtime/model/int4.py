"""Weight-only 4-bit layers (`--quantize int4`): float checkpoints quantised at load into GGML's
Q4_0 blocks, then multiplied by the native block kernels like a GGUF file's Q4_0 weights.

Why Q4_0: it is exactly per-32 groups with one scale each, round-to-nearest (the value of
largest magnitude maps to -8, llama.cpp's rule), and the block kernels (kernels/cpu_quant.py)
already multiply it with int8 activations on VNNI; a second 4-bit layout would need a second
kernel and give the same bytes. Quantising here is bit-exact with gguf.quants.quantize (Q4_0),
so a checkpoint quantised by us and one converted by llama.cpp's gguf-py hold the same blocks.
Each float slice is quantised a block of rows at a time as it loads: no rank holds a float copy
of its shard. The embedding, the LM head and the norms stay in float (as with int8).
"""

from __future__ import annotations

import torch

from tp_runtime.checkpoint.mapped import release_pages
from tp_runtime.config import INT4_GROUP as GROUP  # values per Q4_0 block, each with its float16 scale
from tp_runtime.config import ModelConfig
from tp_runtime.model.blocks import BlockColumnParallelLinear, BlockRowParallelLinear
from tp_runtime.model.linear import LinearKinds

BLOCK_BYTES = 18
STORAGE = "Q4_0"
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


INT4 = LinearKinds(Int4ColumnParallelLinear, Int4RowParallelLinear)


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
