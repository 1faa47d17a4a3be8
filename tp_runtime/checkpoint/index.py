"""Which checkpoint files a model folder has, and a record of every tensor they hold.

Reads headers only (through the format's reader): nothing here touches tensor data.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from tp_runtime.checkpoint.gguf_reader import gguf_files, read_gguf
from tp_runtime.checkpoint.safetensors_reader import read_records
from tp_runtime.checkpoint.tensor import TensorRecord
from tp_runtime.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# a worker's cache of one rank's slices: SLICES_FILE holds them under their checkpoint names,
# SLICES_META says for which checkpoint (fingerprint), tp and rank
SLICES_FILE = "slices.safetensors"
SLICES_META = "slices.json"


@dataclass(frozen=True)
class CheckpointIndex:
    model_dir: Path
    files: tuple[Path, ...]
    tensors: dict[str, TensorRecord]
    sliced_for: tuple[int, int] | None = None  # (tp, rank) when the files hold one rank's slices only


def _checkpoint_files(model_dir: Path) -> list[Path]:
    if (model_dir / SLICES_META).is_file():
        return [model_dir / SLICES_FILE]
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{index_path} names files that are not in {model_dir}: {', '.join(missing)}")
        return [model_dir / f for f in files]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    bins = sorted(p.name for p in model_dir.glob("*.bin"))
    hint = f" (found {', '.join(bins)}: convert PyTorch .bin weights to safetensors first)" if bins else ""
    raise CheckpointError(f"{model_dir}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file{hint}")


def index_files(folder: Path, files: tuple[Path, ...], sliced_for: tuple[int, int] | None = None) -> CheckpointIndex:
    """The records of every tensor in `files`; a name stored twice is refused."""
    tensors: dict[str, TensorRecord] = {}
    for path in files:
        for name, record in read_records(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is stored twice: in {tensors[name].file.name} and {path.name}")
            tensors[name] = record
    return CheckpointIndex(folder, files, tensors, sliced_for)


def open_index(model_dir: str | Path) -> CheckpointIndex:
    model_dir = Path(model_dir)
    files = tuple(_checkpoint_files(model_dir))
    sliced_for = None
    if (model_dir / SLICES_META).is_file():
        meta = json.loads((model_dir / SLICES_META).read_text())
        sliced_for = (int(meta["tp"]), int(meta["rank"]))
    return index_files(model_dir, files, sliced_for)


def _gguf_fingerprint(files: tuple[Path, ...], records: list[TensorRecord]) -> str:
    """Each file's bytes before its first tensor (header, metadata, tensor infos), name and size."""
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        first = min((r.offset for r in records if r.file == path), default=size)
        with open(path, "rb") as f:
            h.update(path.name.encode() + f.read(min(first, 100 << 20)) + str(size).encode())
    return h.hexdigest()[:32]


def fingerprint(model_path: str | Path, index: CheckpointIndex | None = None) -> str:
    """Identity of a checkpoint: config.json and every safetensors header (names, dtypes, shapes,
    offsets), with file sizes; for a GGUF model, every file's header and metadata. Reads headers
    only, so it is cheap for a 100 GB model; two models with the same fingerprint hold the same
    tensors laid out the same way. A GGUF's tensor offsets come from `index` where the caller has
    it (parsing a file's metadata takes seconds for a large vocabulary), else from the file."""
    gguf = gguf_files(model_path)
    if gguf is not None:
        records = list(index.tensors.values()) if index is not None else list(read_gguf(gguf).records.values())
        return _gguf_fingerprint(gguf, records)
    model_dir = Path(model_path)
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for path in _checkpoint_files(model_dir):
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            h.update(path.name.encode() + head + f.read(min(n, 100 << 20)) + str(path.stat().st_size).encode())
    return h.hexdigest()[:32]
