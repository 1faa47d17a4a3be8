"""`--offload-dir`: a rank's streamed layers written once as it runs them, then streamed from there.

Streaming straight from the checkpoint converts dtype (a bfloat16 file run in float32 on a
CPU), gathers a row-parallel slice from every row of the full tensor, and merges q/k/v and
gate/up on every use. An offload folder holds each streamed layer of this rank exactly as the
staging layer wants it (runtime dtype, merged, contiguous: one sequential read per parameter),
like Accelerate's offload_folder. One file per layer, written beside and renamed into place,
so an interrupted run leaves no half file; a later run with the same checkpoint, tp, rank and
dtype reuses what is there (a different budget only adds the layers it lacks).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import save_file

from tp_runtime.checkpoint.index import fingerprint, index_files
from tp_runtime.checkpoint.loader import copy_checked
from tp_runtime.checkpoint.mapped import MappedCheckpoint
from tp_runtime.errors import CheckpointError

META_FILE = "offload.json"


def rank_folder(root: str | Path, model_dir: str | Path, tp: int, rank: int, dtype: str) -> Path:
    return Path(root) / f"{fingerprint(model_dir)[:16]}-tp{tp}-rank{rank}-{dtype}"


def _layer_file(folder: Path, layer: int) -> Path:
    return folder / f"layer{layer:04d}.safetensors"


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
    module: torch.nn.Module,
    fill: Callable[[int, torch.nn.Module], int],
    meta: dict,
    progress: Callable[[Iterable[int]], Iterable[int]] = lambda it: it,
) -> int:
    """Write the layers the folder lacks (each filled into `module` by `fill`, then saved);
    a folder made from other files than `meta` names is emptied first. Returns the bytes written."""
    try:
        return _prepare(folder, sorted(layers), layer_bytes, module, fill, meta, progress)
    except OSError as e:
        raise CheckpointError(f"--offload-dir {folder.parent}: cannot write the offloaded layers ({e.strerror or e}: {e.filename or folder})") from None


def _prepare(folder, layers, layer_bytes, module, fill, meta, progress) -> int:
    meta_file = folder / META_FILE
    if meta_file.is_file():
        try:
            old = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            old = None
        if old != meta:  # another checkpoint (or a rewritten one) made these files
            for f in folder.glob("layer*.safetensors"):
                f.unlink()
    missing = [i for i in layers if not _layer_file(folder, i).is_file()]
    if not missing:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    need = sum(layer_bytes[i] for i in missing)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise CheckpointError(f"--offload-dir {folder.parent}: {need / 2**20:.0f} MiB needed for {len(missing)} layers of this rank, {free / 2**20:.0f} MiB free")
    meta_file.write_text(json.dumps(meta))
    written = 0
    for i in progress(missing):
        fill(i, module)
        tensors = {name: p.detach().to("cpu").contiguous() for name, p in module.named_parameters()}
        tmp = _layer_file(folder, i).with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, _layer_file(folder, i))
        written += sum(t.numel() * t.element_size() for t in tensors.values())
    return written


class OffloadedLayerSource:
    """Layers read back from an offload folder through the mapping (a LayerSource)."""

    def __init__(self, folder: Path, layers: Iterable[int]) -> None:
        self.layers = sorted(layers)
        files = tuple(_layer_file(folder, i) for i in self.layers)
        self._file_index = {i: n for n, i in enumerate(self.layers)}
        self.files = [MappedCheckpoint(index_files(folder, (f,))) for f in files]

    def fill(self, layer: int, module: torch.nn.Module) -> int:
        files = self.files[self._file_index[layer]]
        nbytes = 0
        with torch.no_grad():
            for name, p in module.named_parameters():
                data = files.view(name)
                copy_checked(p.data, data)  # releases the mapped pages as it goes
                nbytes += data.numel() * data.element_size()
        return nbytes

    def prefetch(self, layer: int) -> None:
        files = self.files[self._file_index[layer]]
        for name in files.names():
            files.willneed(name)

    def close(self) -> None:
        for f in self.files:
            f.close()
