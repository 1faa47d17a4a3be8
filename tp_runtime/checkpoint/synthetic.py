"""Random-weight checkpoints in Hugging Face layout, for the demo, tests and benchmarks.

Writes config.json, generation_config.json, model.safetensors (or a sharded set with
model.safetensors.index.json) and, optionally, a byte-level BPE tokenizer.json trained with
the `tokenizers` library on a small built-in text. No download involved.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tp_runtime.checkpoint.index import INDEX_FILE, SINGLE_FILE
from tp_runtime.checkpoint.names import expected_tensors
from tp_runtime.config import MODEL_TYPE_ARCHITECTURES, ModelConfig

_CORPUS = """\
Tensor parallelism splits every weight matrix of a transformer across several devices.
Each rank computes a slice of the attention heads and of the feed-forward network, and the
ranks add their partial results with an all-reduce after every block. When the link between
the ranks is slow, the time spent waiting for those all-reduces dominates, and the number of
tokens per second for a single user is set by the latency of the link, not by the speed of the
chips. The quick brown fox jumps over the lazy dog; 0123456789 + - * / = ( ) [ ] { } < > ! ?
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def train_byte_tokenizer(vocab_size: int, path: Path) -> int:
    """A byte-level BPE (every byte representable) with <s>/</s>; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.save(str(path))
    return tok.get_vocab_size()


def llama_config_dict(
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vocab_size: int,
    architecture: str = "LlamaForCausalLM",
    head_dim: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    dtype: str = "float32",
    **extra: Any,
) -> dict[str, Any]:
    model_type = {a: t for t, a in MODEL_TYPE_ARCHITECTURES.items()}[architecture]
    cfg = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim or hidden_size // num_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }
    cfg.update(extra)
    return cfg


def random_state_dict(cfg: ModelConfig, seed: int, dtype: torch.dtype, std: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for e in expected_tensors(cfg):
        if e.hf_name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(e.shape, generator=gen)
        else:
            t = std * torch.randn(e.shape, generator=gen)
        out[e.hf_name] = t.to(dtype).contiguous()
    return out


def write_checkpoint(
    path: str | os.PathLike,
    config: dict[str, Any],
    seed: int = 0,
    shards: int = 1,
    tokenizer_vocab: int | None = None,
) -> Path:
    """Writes a complete model folder atomically (built beside, then renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        if tokenizer_vocab:
            config = dict(config, vocab_size=max(config["vocab_size"], train_byte_tokenizer(tokenizer_vocab, tmp / "tokenizer.json")))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}, indent=2))
        cfg = ModelConfig.from_dict(config)
        dtype = getattr(torch, config.get("torch_dtype", "float32"))
        state = random_state_dict(cfg, seed, dtype)
        if shards == 1:
            save_file(state, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            names = list(state)
            per = -(-len(names) // shards)
            weight_map = {}
            for i in range(shards):
                fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                part = {n: state[n] for n in names[i * per : (i + 1) * per]}
                save_file(part, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in part})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
