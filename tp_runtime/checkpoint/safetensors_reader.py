"""Records of a safetensors file's tensors, from its header (no tensor data is read).

The safetensors library checks the header first (its own rules: offsets, sizes, dtypes); the
records then take each tensor's byte offset from the same header. A worker's cache of GGUF
slices stores block-quantized tensors as their bytes (U8 [rows, bytes per row]) and names their
GGML types in the header's metadata (BLOCKS_KEY); those become block-quantized records again.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from tp_runtime.checkpoint.gguf_reader import QUANT_TYPES, storage_of
from tp_runtime.checkpoint.tensor import StorageType, TensorRecord, plain
from tp_runtime.errors import CheckpointError

BLOCKS_KEY = "tp_runtime.blocks"

STORAGE = {
    name: plain(name, dtype)
    for name, dtype in {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    }.items()
}


def storage_type(name: str) -> StorageType:
    return STORAGE.get(name) or StorageType(name, 1, 1, torch.uint8, False)  # an exotic dtype: refused by validation


def read_records(path: Path) -> dict[str, TensorRecord]:
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: cannot read the safetensors header ({type(e).__name__}: {e}); the file is corrupt or truncated") from None
    blocks = _block_types(path, header)
    records = {}
    for name in names:
        meta = header[name]
        start, _ = meta["data_offsets"]
        shape, storage = tuple(meta["shape"]), storage_type(meta["dtype"])
        if name in blocks:
            shape, storage = _block_storage(path, name, meta, blocks[name])
        records[name] = TensorRecord(name, path, 8 + n + start, shape, storage)
    return records


def _block_types(path: Path, header: dict) -> dict[str, str]:
    text = (header.get("__metadata__") or {}).get(BLOCKS_KEY)
    if text is None:
        return {}
    try:
        types = json.loads(text)
        assert isinstance(types, dict)
    except (json.JSONDecodeError, AssertionError):
        raise CheckpointError(f"{path}: metadata {BLOCKS_KEY!r} is not a JSON object of tensor name -> GGML type") from None
    bad = {k: v for k, v in types.items() if v not in QUANT_TYPES or k not in header}
    if bad:
        raise CheckpointError(f"{path}: metadata {BLOCKS_KEY!r} names unknown tensors or types: {bad}")
    return types


def _block_storage(path: Path, name: str, meta: dict, type_name: str) -> tuple[tuple[int, ...], StorageType]:
    """A tensor of blocks stored as U8 [rows, bytes]: its shape in values and its GGML storage."""
    storage = storage_of(type_name)
    shape = tuple(meta["shape"])
    if meta["dtype"] != "U8" or len(shape) != 2 or shape[1] % storage.block_bytes:
        raise CheckpointError(f"{path}: tensor {name} ({meta['dtype']} {list(shape)}) is not whole {type_name} blocks of {storage.block_bytes} bytes per row")
    return (shape[0], shape[1] // storage.block_bytes * storage.block), storage
