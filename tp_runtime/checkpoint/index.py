"""Which safetensors files a model folder has, and what tensors (name, shape, dtype) they hold.

Reads headers only: nothing here touches tensor data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from tp_runtime.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorMeta:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, F16, I64, ...


@dataclass(frozen=True)
class CheckpointIndex:
    model_dir: Path
    files: tuple[Path, ...]
    tensors: dict[str, TensorMeta]

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def _checkpoint_files(model_dir: Path) -> list[Path]:
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


def open_index(model_dir: str | Path) -> CheckpointIndex:
    model_dir = Path(model_dir)
    tensors: dict[str, TensorMeta] = {}
    files = _checkpoint_files(model_dir)
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    if name in tensors:
                        raise CheckpointError(f"tensor {name!r} is stored twice: in {tensors[name].file.name} and {path.name}")
                    tensors[name] = TensorMeta(path, tuple(sl.get_shape()), sl.get_dtype())
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path}: cannot read the safetensors header ({type(e).__name__}: {e}); the file is corrupt or truncated") from None
    return CheckpointIndex(model_dir, tuple(files), tensors)
