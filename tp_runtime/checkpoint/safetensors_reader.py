"""Records of a safetensors file's tensors, from its header (no tensor data is read).

The safetensors library checks the header first (its own rules: offsets, sizes, dtypes); the
records then take each tensor's byte offset from the same header.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from tp_runtime.checkpoint.tensor import StorageType, TensorRecord, plain
from tp_runtime.errors import CheckpointError

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
    records = {}
    for name in names:
        meta = header[name]
        start, _ = meta["data_offsets"]
        records[name] = TensorRecord(name, path, 8 + n + start, tuple(meta["shape"]), storage_type(meta["dtype"]))
    return records
