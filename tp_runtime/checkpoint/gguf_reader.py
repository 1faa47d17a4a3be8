"""GGUF files (llama.cpp's format) as tensor records and metadata, read with the `gguf` package.

The package parses the header (a memmap: no tensor data is read); before it lays out its
views, every tensor's info is checked here and refused with the file and the tensor named:
known and supported type, `ne[0]` whole blocks, offset aligned, in bounds, not overlapping
another, no name twice. Records carry the Hugging Face names of names.py (the GGUF names are
mapped here, in one table), so validation, sharding and loading are the safetensors ones.

A sharded set (`name-00001-of-00003.gguf`) is read as one checkpoint: metadata from the first
file, tensors from all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tp_runtime.checkpoint.tensor import StorageType, TensorRecord, block_quantized, plain
from tp_runtime.errors import CheckpointError

SUFFIX = ".gguf"
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")

# the types this runtime reads (what Q4_K_M, Q5_K_M, Q6_K and Q8_0 files hold), by GGML's name
PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name -> Hugging Face name ({i}: the block); llama.cpp's converter's table, reversed
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    **{f"blk.{{i}}.attn_{x}.{kind}": f"model.layers.{{i}}.self_attn.{x}_proj.{kind}" for x in "qkv" for kind in ("weight", "bias")},
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
# tensors a GGUF may carry that the runtime does not load (llama3 frequency factors are read
# from the metadata's rope scaling instead)
IGNORED = ("rope_freqs.weight",)


def hf_name(gguf_name: str) -> str | None:
    m = _BLOCK.match(gguf_name)
    key = f"blk.{{i}}.{m.group(2)}" if m else gguf_name
    hf = _NAMES.get(key)
    return hf.format(i=m.group(1)) if (hf and m) else hf


@dataclass(frozen=True)
class GGUFCheckpoint:
    files: tuple[Path, ...]
    metadata: dict[str, Any]
    records: dict[str, TensorRecord]  # by Hugging Face name
    gguf_names: dict[str, str]  # Hugging Face name -> the file's name for it
    ignored: tuple[str, ...]  # tensors present that are not loaded


def gguf_files(path: str | Path) -> tuple[Path, ...] | None:
    """The GGUF file(s) `path` names: a .gguf file (a shard set from any of its parts), or a
    folder holding exactly one model as GGUF; None when it is not a GGUF checkpoint."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob(f"*{SUFFIX}"))
        if not found:
            return None
        stems = {(_SHARD.match(p.name).group("stem") if _SHARD.match(p.name) else p.name) for p in found}
        if len(stems) > 1:
            raise CheckpointError(f"{path} holds several GGUF models ({', '.join(sorted(p.name for p in found))}): name the file with --model")
        path = found[0]
    elif path.suffix != SUFFIX:
        return None
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    m = _SHARD.match(path.name)
    if not m:
        return (path,)
    n = int(m.group("n"))
    parts = tuple(path.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}{SUFFIX}") for i in range(1, n + 1))
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise CheckpointError(f"{path}: a GGUF set of {n} files, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not beside it")
    return parts


def storage_of(type_name: str) -> StorageType:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if type_name in PLAIN_TYPES:
        return plain(type_name, PLAIN_TYPES[type_name])
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return block_quantized(type_name, block, nbytes)


def _reader_class():
    """GGUFReader with the tensor infos checked before the package lays out its views."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class CheckedReader(GGUFReader):
        def _build_tensors(self, start_offs: int, fields) -> None:
            path, size = self.checked_path, len(self.data)
            spans, seen = [], set()
            for field in fields:
                _, name_data, _, dims, raw_type, offset = field.parts
                name = str(bytes(name_data), encoding="utf-8", errors="replace")
                where = f"{path}: tensor {name}"
                if name in seen:
                    raise CheckpointError(f"{where} is stored twice")
                seen.add(name)
                try:
                    gtype = GGMLQuantizationType(int(raw_type[0]))
                except ValueError:
                    raise CheckpointError(f"{where} has type id {int(raw_type[0])}, which GGML does not define") from None
                if gtype.name not in PLAIN_TYPES and gtype.name not in QUANT_TYPES:
                    raise CheckpointError(f"{where} has type {gtype.name}; supported are {', '.join([*PLAIN_TYPES, *QUANT_TYPES])}")
                ne = [int(d) for d in dims]
                block, type_size = GGML_QUANT_SIZES[gtype]
                if not ne or any(d < 1 for d in ne) or ne[0] % block:
                    raise CheckpointError(f"{where} has shape ne={ne}: ne[0] must be a positive multiple of its {gtype.name} block of {block}")
                count = 1
                for d in ne:
                    count *= d
                start = start_offs + int(offset[0])
                stop = start + count // block * type_size
                if int(offset[0]) % self.alignment:
                    raise CheckpointError(f"{where} starts at data offset {int(offset[0])}, not a multiple of the file's alignment {self.alignment}")
                if stop > size:
                    raise CheckpointError(f"{where} ends at byte {stop}, past the end of the file ({size} bytes): the file is truncated")
                spans.append((start, stop, name))
            spans.sort()
            for (a0, a1, a), (b0, _, b) in zip(spans, spans[1:]):
                if b0 < a1:
                    raise CheckpointError(f"{path}: tensors {a} and {b} overlap (bytes {b0}..{a1})")
            super()._build_tensors(start_offs, fields)

    return CheckedReader


def _read(path: Path):
    reader_class = _reader_class()
    reader = reader_class.__new__(reader_class)
    reader.checked_path = path
    try:
        reader.__init__(path, "r")
    except CheckpointError:
        raise
    except Exception as e:  # the package raises ValueError / KeyError / numpy errors for bad headers
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it is corrupt, truncated or of an unsupported version (2 and 3 are read)") from None
    return reader


def _value(field) -> Any:
    return field.contents()


def read_gguf(files: tuple[Path, ...]) -> GGUFCheckpoint:
    metadata: dict[str, Any] = {}
    records: dict[str, TensorRecord] = {}
    names: dict[str, str] = {}
    ignored: list[str] = []
    for n, path in enumerate(files):
        reader = _read(path)
        if n == 0:
            metadata = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
            metadata["GGUF.version"] = _value(reader.fields["GGUF.version"])
        for t in reader.tensors:
            hf = hf_name(t.name)
            if hf is None:
                if t.name not in IGNORED:
                    raise CheckpointError(f"{path}: tensor {t.name} is not one this runtime knows for {metadata.get('general.architecture')!r} models")
                ignored.append(t.name)
                continue
            if hf in records:
                raise CheckpointError(f"tensor {t.name} is stored twice: in {records[hf].file.name} and {path.name}")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ne[0] is the contiguous one
            records[hf] = TensorRecord(hf, path, int(t.data_offset), shape, storage_of(t.tensor_type.name))
            names[hf] = t.name
        del reader
    return GGUFCheckpoint(files, metadata, records, names, tuple(ignored))
