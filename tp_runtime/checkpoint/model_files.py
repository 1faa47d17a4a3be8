"""A model path opened as what loading needs, whatever its format: a Hugging Face folder
(config.json, safetensors, tokenizer.json) or a GGUF file (or a folder holding one).

Everything here reads headers and metadata only; the weights are read later, slice by slice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from tokenizers import Tokenizer

from tp_runtime.checkpoint import gguf_config, gguf_reader
from tp_runtime.checkpoint.gguf_tokenizer import build_tokenizer
from tp_runtime.checkpoint.index import CheckpointIndex, open_index
from tp_runtime.checkpoint.tokenizer import load_tokenizer
from tp_runtime.config import ModelConfig


@dataclass(frozen=True)
class ModelFiles:
    path: Path
    format: str  # "safetensors" or "gguf"
    cfg: ModelConfig
    index: CheckpointIndex
    tokenizer: Tokenizer | None
    chat_template: str | None
    # the config as a dict ModelConfig.from_dict reads (a GGUF's metadata turned into it): what a
    # coordinator sends a worker that has no copy of the model, so both build the same config
    config_json: dict


def _hf_chat_template(folder: Path) -> str | None:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    return template if isinstance(template, str) else None


def _open_gguf(path: Path, files: tuple[Path, ...]) -> ModelFiles:
    ckpt = gguf_reader.read_gguf(files)
    raw = gguf_config.config_dict(ckpt)
    cfg = ModelConfig.from_dict(raw, source=str(files[0]))
    records = ckpt.records
    if gguf_config.architecture(ckpt) in gguf_config.PERMUTED_QK:
        qk = (".self_attn.q_proj.", ".self_attn.k_proj.")
        records = {n: replace(r, rope_row_groups=cfg.head_dim) if any(k in n for k in qk) else r for n, r in records.items()}
    index = CheckpointIndex(files[0].parent, files, records)
    meta = ckpt.metadata
    return ModelFiles(path, "gguf", cfg, index, build_tokenizer(meta, str(files[0])), meta.get("tokenizer.chat_template"), raw)


def open_model(path: str | Path) -> ModelFiles:
    path = Path(path)
    files = gguf_reader.gguf_files(path)
    if files is not None:
        return _open_gguf(path, files)
    cfg = ModelConfig.from_model_dir(path)
    raw = json.loads((path / "config.json").read_text())  # from_model_dir has checked it
    return ModelFiles(path, "safetensors", cfg, open_index(path), load_tokenizer(path), _hf_chat_template(path), raw)


def load_config(path: str | Path) -> ModelConfig:
    """The model's config alone (a GGUF's metadata is read, not its tokenizer)."""
    files = gguf_reader.gguf_files(path)
    if files is not None:
        return gguf_config.model_config(gguf_reader.read_gguf(files))
    return ModelConfig.from_model_dir(path)
