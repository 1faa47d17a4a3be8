"""The checkpoint's files mapped into memory, tensors as zero-copy views of their records.

Reads go through the mapping, so pages come from the page cache (or the disk) on demand.
Mapped pages that were touched count in the process's resident memory until they are
dropped: after each copy the range is released (madvise DONTNEED), so reading a model larger
than the memory budget never holds more than the tensor in flight; and the next tensors'
pages can be requested ahead (madvise WILLNEED: the kernel's readahead, no thread of ours).
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

from tp_runtime import sharding
from tp_runtime.checkpoint.codecs import dequantize, unpermute_rope_rows
from tp_runtime.checkpoint.index import CheckpointIndex
from tp_runtime.errors import CheckpointError

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


class MappedCheckpoint:
    def __init__(self, index: CheckpointIndex) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._records = index.tensors
        for path in index.files:
            self._map_file(path)

    def _map_file(self, path: Path) -> None:
        with open(path, "rb") as f:
            # a private mapping is writable from torch's point of view (no read-only buffer
            # warning) and never written, so it shares the page cache's pages
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._maps[path] = mm
        base = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
        _LIVE[base] = (len(mm), mm)

    def names(self) -> list[str]:
        return list(self._records)

    def view(self, name: str, spec: sharding.ShardSpec | None = None) -> torch.Tensor:
        """This rank's rows or columns of `name` (all of it without a spec), viewing the mapping.
        A block-quantized tensor is viewed as its bytes, [rows, bytes per row]; its columns are
        taken in whole blocks."""
        t = self._records[name]
        st = t.storage
        mm = self._maps[t.file]
        if st.quantized:
            rows = t.numel // t.row_values
            full = torch.frombuffer(mm, dtype=torch.uint8, count=t.nbytes, offset=t.offset).view(rows, t.nbytes // rows)
            if spec is None or spec.dim is None:
                return full
            if spec.dim == 0:
                return full[spec.start : spec.stop]
            if spec.start % st.block or spec.stop % st.block:
                raise CheckpointError(f"{name}: columns [{spec.start}, {spec.stop}) do not fall on its {st.name} blocks of {st.block} values")
            return full[:, st.nbytes(spec.start) : st.nbytes(spec.stop)]
        full = torch.frombuffer(mm, dtype=st.torch_dtype, count=max(1, t.numel), offset=t.offset).view(t.shape)
        if spec is None or spec.dim is None:
            return full
        return full.narrow(spec.dim, spec.start, spec.stop - spec.start)

    def has_blocks(self, name: str, spec: sharding.ShardSpec | None = None) -> bool:
        """Whether `blocks` gives this part of `name`: block-quantized, its columns on blocks."""
        st = self._records[name].storage
        return st.quantized and not (spec is not None and spec.dim == 1 and (spec.start % st.block or spec.stop % st.block))

    def blocks(self, name: str, spec: sharding.ShardSpec | None = None) -> torch.Tensor | None:
        """This rank's part of a block-quantized `name` as its stored blocks, uint8 [rows, bytes
        per row], rows in the Hugging Face order; None for a plain tensor or a column range that
        does not fall on blocks (`values` decodes those)."""
        if not self.has_blocks(name, spec):
            return None
        t = self._records[name]
        raw = self.view(name, spec)
        return unpermute_rope_rows(raw, t.rope_row_groups) if t.rope_row_groups else raw

    def storage(self, name: str) -> str:
        return self._records[name].storage.name

    def values(self, name: str, spec: sharding.ShardSpec | None = None) -> torch.Tensor:
        """This rank's part of `name` as values in the Hugging Face layout: the view itself for a
        plain tensor stored as is; otherwise a copy, rows put back in order (`rope_row_groups`)
        and blocks dequantized to float32 (a column range inside blocks decodes the blocks
        around it and keeps its columns)."""
        t = self._records[name]
        st = t.storage
        if not st.quantized and not t.rope_row_groups:
            return self.view(name, spec)
        if st.quantized and spec is not None and spec.dim == 1:
            lo, hi = spec.start - spec.start % st.block, -(-spec.stop // st.block) * st.block
            raw = self.view(name, sharding.ShardSpec(spec.style, 1, lo, hi))
            data = dequantize(raw, st)[:, spec.start - lo : spec.stop - lo]
        else:
            raw = self.view(name, spec)
            data = unpermute_rope_rows(raw, t.rope_row_groups) if t.rope_row_groups else raw
            if st.quantized:
                data = dequantize(data.contiguous(), st)
            elif data.data_ptr() == raw.data_ptr():
                data = data.clone()
        release_pages(raw)
        return data.reshape(-1) if len(t.shape) == 1 else data

    def _span(self, name: str, spec: sharding.ShardSpec | None) -> tuple[int, int]:
        """Page-aligned byte range of the file that holds the slice."""
        t = self._records[name]
        start, stop = t.offset, t.offset + t.nbytes
        if spec is not None and spec.dim == 0:  # a row block is contiguous; a column block spans every row
            start, stop = t.offset + spec.start * t.row_bytes, t.offset + spec.stop * t.row_bytes
        lo = start - start % _PAGE
        hi = min(stop + (-stop) % _PAGE, len(self._maps[t.file]))
        return lo, hi

    def willneed(self, name: str, spec: sharding.ShardSpec | None = None) -> None:
        lo, hi = self._span(name, spec)
        self._maps[self._records[name].file].madvise(mmap.MADV_WILLNEED, lo, hi - lo)

    def close(self) -> None:
        """Unmap the files. Views made by `view` must not be used afterwards (they would point at
        unmapped memory): every caller copies out of a view before it lets go of it."""
        maps = list(self._maps.values())
        for base in [b for b, (_, mm) in _LIVE.items() if any(mm is m for m in maps)]:
            del _LIVE[base]
        for mm in maps:
            mm.close()
        self._maps.clear()
