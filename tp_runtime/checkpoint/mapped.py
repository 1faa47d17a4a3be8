"""The checkpoint's safetensors files mapped into memory, tensors as zero-copy views.

Reads go through the mapping, so pages come from the page cache (or the disk) on demand.
Mapped pages that were touched count in the process's resident memory until they are
dropped: after each copy the range is released (madvise DONTNEED), so reading a model larger
than the memory budget never holds more than the tensor in flight; and the next tensors'
pages can be requested ahead (madvise WILLNEED: the kernel's readahead, no thread of ours).
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from tp_runtime import sharding
from tp_runtime.checkpoint.index import CheckpointIndex
from tp_runtime.errors import CheckpointError

_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8}
_PAGE = mmap.PAGESIZE
# live mappings by address, so that a copy can release the pages of any view it just read
_LIVE: dict[int, tuple[int, mmap.mmap]] = {}  # base address -> (length, mapping)


def release_pages(view: torch.Tensor) -> None:
    """Drop the mapped pages under `view` from this process, if it views a mapped checkpoint
    (any other tensor: nothing happens). Pages only partly under it go too: they are re-read
    from the file if touched again, so this never changes what is read."""
    if view.numel() == 0:
        return
    start = view.data_ptr()
    last = start + sum((n - 1) * st for n, st in zip(view.shape, view.stride())) * view.element_size() + view.element_size()
    for base, (length, mm) in _LIVE.items():
        if base <= start < base + length:
            lo = (start - base) - (start - base) % _PAGE
            hi = min((last - base) + (-(last - base)) % _PAGE, length)
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            return


@dataclass(frozen=True)
class _Located:
    mm: mmap.mmap
    offset: int  # of the first byte, from the start of the file
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return (self.shape[1] if len(self.shape) > 1 else 1) * self.dtype.itemsize


class MappedCheckpoint:
    def __init__(self, index: CheckpointIndex) -> None:
        self._tensors: dict[str, _Located] = {}
        self._maps: list[mmap.mmap] = []
        for path in index.files:
            self._map_file(path)

    def _map_file(self, path: Path) -> None:
        with open(path, "rb") as f:
            # a private mapping is writable from torch's point of view (no read-only buffer
            # warning) and never written, so it shares the page cache's pages
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._maps.append(mm)
        base = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
        _LIVE[base] = (len(mm), mm)
        (n,) = struct.unpack("<Q", mm[:8])
        header = json.loads(mm[8 : 8 + n])
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in _TORCH_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has dtype {meta['dtype']}, which cannot be streamed")
            start, _ = meta["data_offsets"]
            self._tensors[name] = _Located(mm, 8 + n + start, tuple(meta["shape"]), _TORCH_DTYPES[meta["dtype"]])

    def names(self) -> list[str]:
        return list(self._tensors)

    def view(self, name: str, spec: sharding.ShardSpec | None = None) -> torch.Tensor:
        """This rank's rows or columns of `name` (all of it without a spec), viewing the mapping."""
        t = self._tensors[name]
        full = torch.frombuffer(t.mm, dtype=t.dtype, count=max(1, _numel(t.shape)), offset=t.offset).view(t.shape)
        if spec is None or spec.dim is None:
            return full
        return full.narrow(spec.dim, spec.start, spec.stop - spec.start)

    def _span(self, name: str, spec: sharding.ShardSpec | None) -> tuple[int, int]:
        """Page-aligned byte range of the file that holds the slice."""
        t = self._tensors[name]
        start, stop = t.offset, t.offset + _numel(t.shape) * t.dtype.itemsize
        if spec is not None and spec.dim == 0:  # a row block is contiguous; a column block spans every row
            start, stop = t.offset + spec.start * t.row_bytes, t.offset + spec.stop * t.row_bytes
        lo = start - start % _PAGE
        hi = min(stop + (-stop) % _PAGE, len(t.mm))
        return lo, hi

    def willneed(self, name: str, spec: sharding.ShardSpec | None = None) -> None:
        lo, hi = self._span(name, spec)
        self._tensors[name].mm.madvise(mmap.MADV_WILLNEED, lo, hi - lo)

    def close(self) -> None:
        """Unmap the files. Views made by `view` must not be used afterwards (they would point at
        unmapped memory): every caller copies out of a view before it lets go of it."""
        for base in [b for b, (_, mm) in _LIVE.items() if any(mm is m for m in self._maps)]:
            del _LIVE[base]
        for mm in self._maps:
            mm.close()
        self._maps.clear()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
