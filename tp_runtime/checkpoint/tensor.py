"""What one checkpoint tensor is, whatever the file format: the format-neutral record.

A reader per format (safetensors_reader.py; GGUF next) turns a file's header into one
`TensorRecord` per tensor: which file, where its bytes start, its shape in values, and its
storage type. The storage is a plain dtype (one value per item) or a block-quantized type
(`block` values in `block_bytes` bytes, along the last dimension). Validation, byte accounting,
slicing and mapping work on records only, so a new format adds a reader, not a branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class StorageType:
    name: str  # as the file names it: F32, BF16, I8, Q8_0, Q4_K, ...
    block: int  # values per block along the last dimension (1: a plain dtype)
    block_bytes: int  # bytes per block (a plain dtype: its item size)
    torch_dtype: torch.dtype  # how the bytes are viewed: the dtype, or uint8 for quantized blocks
    is_float: bool  # plain floating point (loads into a float parameter by a dtype cast)

    @property
    def quantized(self) -> bool:
        return self.block > 1

    def nbytes(self, values: int) -> int:
        """Bytes of `values` values along the last dimension (a whole number of blocks)."""
        if values % self.block:
            raise ValueError(f"{values} values are not whole {self.name} blocks of {self.block}")
        return values // self.block * self.block_bytes


def plain(name: str, dtype: torch.dtype) -> StorageType:
    return StorageType(name, 1, dtype.itemsize, dtype, dtype.is_floating_point)


def block_quantized(name: str, block: int, block_bytes: int) -> StorageType:
    return StorageType(name, block, block_bytes, torch.uint8, False)


@dataclass(frozen=True)
class TensorRecord:
    name: str
    file: Path
    offset: int  # of its first byte, from the start of the file
    shape: tuple[int, ...]  # in values, row-major (the last dimension contiguous)
    storage: StorageType
    # rows stored in llama.cpp's interleaved RoPE order, in groups (heads) of this many rows
    # (a llama-type GGUF's q and k): undone row by row when read, blocks untouched; 0: as is
    rope_row_groups: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def row_values(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one step along dimension 0 (a row of a matrix, an item of a vector)."""
        if len(self.shape) < 2:
            return self.storage.block_bytes if not self.storage.quantized else self.nbytes
        return self.storage.nbytes(self.numel // self.shape[0])

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes(self.numel)
