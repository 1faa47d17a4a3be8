"""`--offload-dir`: a rank's streamed layers written once as it runs them, then streamed from there.

Streaming straight from the checkpoint converts dtype (a bfloat16 file run in float32 on a
CPU), gathers a row-parallel slice from every row of the full tensor, and merges q/k/v and
gate/up on every use. An offload folder holds each streamed layer of this rank exactly as the
staging layer wants it (runtime dtype, merged, contiguous: one sequential read per parameter),
like Accelerate's offload_folder. One file per layer, written beside and renamed into place,
so an interrupted run leaves no half file; a later run with the same checkpoint, tp, rank and
dtype reuses what is there (a different budget only adds the layers it lacks).

A MoE layer's streamed routed experts go in a file of their own per layer (`experts0003.safetensors`,
tensors named "<expert>.<parameter>"), written one expert at a time (never a layer's experts at
once in memory), so that a forward maps and reads only the experts it chose.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tp_runtime.checkpoint.index import CheckpointIndex, fingerprint, index_files
from tp_runtime.checkpoint.layer_state import block_layouts, rederive, set_block_layouts, weight_tensors
from tp_runtime.checkpoint.loader import copy_checked
from tp_runtime.checkpoint.mapped import MappedCheckpoint
from tp_runtime.errors import CheckpointError

META_FILE = "offload.json"
LAYOUT_KEY = "tp_runtime.layout"  # a layer file's metadata: its block linears' parts (JSON)


def rank_folder(root: str | Path, index: CheckpointIndex, tp: int, rank: int, layout: str) -> Path:
    """layout: how the runtime holds the layers (dtype, quantization), e.g. "float32-int8"."""
    gguf = next((f for f in index.files if f.suffix == ".gguf"), None)  # its folder may hold others
    identity = fingerprint(gguf, index) if gguf is not None else fingerprint(index.model_dir)
    return Path(root) / f"{identity[:16]}-tp{tp}-rank{rank}-{layout}"


def _layer_file(folder: Path, layer: int) -> Path:
    return folder / f"layer{layer:04d}.safetensors"


def _experts_file(folder: Path, layer: int) -> Path:
    return folder / f"experts{layer:04d}.safetensors"


_WRITTEN = ("layer*.safetensors", "experts*.safetensors")


def source_identity(files: Iterable[Path]) -> list[dict]:
    """What the offloaded layers were made from: the fingerprint covers shapes, not values, so a
    checkpoint rewritten in place (same shapes, new weights) must show in size, mtime or inode."""
    out = []
    for f in files:
        st = f.stat()
        out.append({"file": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino})
    return out


def prepare(
    folder: Path,
    layers: Iterable[int],
    layer_bytes: dict[int, int],
    module: torch.nn.Module | Callable[[int], torch.nn.Module],
    fill: Callable[[int, torch.nn.Module], int],
    meta: dict,
    progress: Callable[[Iterable[int]], Iterable[int]] = lambda it: it,
) -> int:
    """Write the layers the folder lacks (each filled into `module`, or `module(layer)`: a layer
    of its kind, by `fill`, then saved); a folder made from other files than `meta` names is
    emptied first. Returns the bytes written."""
    try:
        return _prepare(folder, sorted(layers), layer_bytes, module, fill, meta, progress)
    except OSError as e:
        raise CheckpointError(f"--offload-dir {folder.parent}: cannot write the offloaded layers ({e.strerror or e}: {e.filename or folder})") from None


def _clean(folder: Path, meta: dict) -> None:
    """Empty a folder that other files than `meta` names made."""
    meta_file = folder / META_FILE
    if meta_file.is_file():
        try:
            old = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            old = None
        if old != meta:  # another checkpoint (or a rewritten one) made these files
            for pattern in _WRITTEN:
                for f in folder.glob(pattern):
                    f.unlink()


def _reserve(folder: Path, meta: dict, missing: list[int], need: int, what: str) -> None:
    """Check the disk has room for what is missing, and write the meta file."""
    meta_file = folder / META_FILE
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise CheckpointError(f"--offload-dir {folder.parent}: {need / 2**20:.0f} MiB needed for {len(missing)} {what} of this rank, {free / 2**20:.0f} MiB free")
    meta_file.write_text(json.dumps(meta))


def _prepare(folder, layers, layer_bytes, module, fill, meta, progress) -> int:
    _clean(folder, meta)
    missing = [i for i in layers if not _layer_file(folder, i).is_file()]
    if not missing:
        return 0
    _reserve(folder, meta, missing, sum(layer_bytes[i] for i in missing), "layers")
    written = 0
    for i in progress(missing):
        target = module if isinstance(module, torch.nn.Module) else module(i)
        fill(i, target)
        tensors = {name: p.detach().to("cpu").contiguous() for name, p in weight_tensors(target).items()}
        tmp = _layer_file(folder, i).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={LAYOUT_KEY: json.dumps(block_layouts(target))})
        os.replace(tmp, _layer_file(folder, i))
        written += sum(t.numel() * t.element_size() for t in tensors.values())
    return written


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8", torch.uint8: "U8",
                       torch.int32: "I32", torch.int64: "I64"}


def prepare_experts(
    folder: Path,
    experts: dict[int, list[int]],
    layer_bytes: dict[int, int],
    module: torch.nn.Module,
    fill: Callable[[int, int, torch.nn.Module], int],
    meta: dict,
) -> int:
    """Write the expert files the folder lacks: layer -> its experts (this rank's), each filled
    into `module` (an ExpertMLP) by `fill(layer, expert, module)` and written at its place in the
    layer's file, one expert at a time. Returns the bytes written."""
    try:
        _clean(folder, meta)
        missing = [i for i in sorted(experts) if not _experts_file(folder, i).is_file()]
        if not missing:
            return 0
        _reserve(folder, meta, missing, sum(layer_bytes[i] for i in missing), "layers' experts")
        return sum(_write_experts(_experts_file(folder, i), i, experts[i], module, fill) for i in missing)
    except OSError as e:
        raise CheckpointError(f"--offload-dir {folder.parent}: cannot write the offloaded experts ({e.strerror or e}: {e.filename or folder})") from None


def _write_experts(path: Path, layer: int, experts: list[int], module: torch.nn.Module, fill) -> int:
    """A safetensors file of `experts` ("<expert>.<name>" each), written as each is filled: the
    header first (every expert's shapes are `module`'s), then each expert's tensors at their
    offsets (largest elements first, as safetensors aligns them)."""
    shapes = {name: (t.dtype, tuple(t.shape), t.numel() * t.element_size()) for name, t in weight_tensors(module).items()}
    order = sorted(((x, name) for x in experts for name in shapes), key=lambda k: (-shapes[k[1]][0].itemsize, k[0], k[1]))
    header, offsets, at = {}, {}, 0
    for x, name in order:
        dtype, shape, n = shapes[name]
        header[f"{x}.{name}"] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        offsets[(x, name)] = at
        at += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    start = 8 + len(blob)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(start + at)
        for x in experts:
            fill(layer, x, module)
            for name, t in weight_tensors(module).items():
                f.seek(start + offsets[(x, name)])
                f.write(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)
    return at


class OffloadedExpertSource:
    """Routed experts read back from an offload folder's expert files through the mapping (a
    model/offload.py ExpertSource): only the tensors of the expert asked for are touched."""

    def __init__(self, folder: Path, layers: Iterable[int]) -> None:
        self.files = {i: MappedCheckpoint(index_files(folder, (_experts_file(folder, i),))) for i in sorted(layers)}
        self.names: dict[tuple[int, int], list[str]] = {}  # (layer, expert) -> its tensors' names
        for i, files in self.files.items():
            for name in files.names():
                self.names.setdefault((i, int(name.split(".", 1)[0])), []).append(name)

    def fill(self, layer: int, expert: int, module: torch.nn.Module) -> int:
        files = self.files[layer]
        nbytes = 0
        with torch.no_grad():
            for name, p in weight_tensors(module).items():
                data = files.view(f"{expert}.{name}")
                copy_checked(p.data, data)  # releases the mapped pages as it goes
                nbytes += data.numel() * data.element_size()
        rederive(module)
        return nbytes

    def prefetch(self, layer: int, expert: int) -> None:
        for name in self.names[(layer, expert)]:
            self.files[layer].willneed(name)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _layouts(file: Path) -> dict[str, list[list]]:
    """The block linears' layouts a layer file was written with (none for float or int8 layers)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return json.loads((f.metadata() or {}).get(LAYOUT_KEY, "{}"))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"offloaded layer {file}: unreadable ({e}); delete the folder to have it written again") from None


class OffloadedLayerSource:
    """Layers read back from an offload folder through the mapping (a LayerSource)."""

    def __init__(self, folder: Path, layers: Iterable[int]) -> None:
        self.layers = sorted(layers)
        files = tuple(_layer_file(folder, i) for i in self.layers)
        self._file_index = {i: n for n, i in enumerate(self.layers)}
        self.files = [MappedCheckpoint(index_files(folder, (f,))) for f in files]
        self.layouts = [_layouts(f) for f in files]

    def fill(self, layer: int, module: torch.nn.Module) -> int:
        n = self._file_index[layer]
        files = self.files[n]
        if self.layouts[n]:
            set_block_layouts(module, self.layouts[n], {name: files.view(name) for name in files.names()})
        nbytes = 0
        with torch.no_grad():
            for name, p in weight_tensors(module).items():
                data = files.view(name)
                copy_checked(p.data, data)  # releases the mapped pages as it goes
                nbytes += data.numel() * data.element_size()
        rederive(module)
        return nbytes

    def prefetch(self, layer: int) -> None:
        files = self.files[self._file_index[layer]]
        for name in files.names():
            files.willneed(name)

    def close(self) -> None:
        for f in self.files:
            f.close()
