"""Block-quantized storage decoded to float32 values: GGML's types through the `gguf` package's
own reference codecs (numpy), used where a quantized tensor loads into a float parameter."""

from __future__ import annotations

import numpy as np
import torch

from tp_runtime.checkpoint.tensor import StorageType


def dequantize(blocks: torch.Tensor, storage: StorageType) -> torch.Tensor:
    """blocks: uint8 [rows, bytes per row] of `storage` -> float32 [rows, values per row]."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    data = np.ascontiguousarray(blocks.numpy())
    values = gguf_dequantize(data, GGMLQuantizationType[storage.name])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(blocks.shape[0], -1)


def unpermute_rope_rows(rows: torch.Tensor, group: int) -> torch.Tensor:
    """Rows in llama.cpp's interleaved RoPE order (within each group of `group` rows: pairs
    (j, j + group/2) stored side by side) back in Hugging Face's half-split order; any row
    payload (values or quantized bytes) moves whole."""
    n = rows.shape[0]
    if n % group or group % 2:
        raise ValueError(f"{n} rows are not whole RoPE groups of {group}")
    tail = rows.shape[1:]
    return rows.reshape(n // group, group // 2, 2, *tail).transpose(1, 2).reshape(n, *tail)
