"""A GGUF file's metadata as a ModelConfig (the keys llama.cpp writes, per architecture).

The metadata is turned into the Hugging Face config keys `ModelConfig.from_dict` reads, so that
one function checks every model's shapes whatever its file format.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tp_runtime.checkpoint.gguf_reader import GGUFCheckpoint
from tp_runtime.config import EXTRA_KEY, ModelConfig
from tp_runtime.errors import CheckpointError

# general.architecture -> the config's model_type (ModelConfig's architectures); llama-type
# files store q and k rows permuted for llama.cpp's RoPE (undone at load), qwen2 files do not
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
PERMUTED_QK = {"llama", "mistral"}


def architecture(ckpt: GGUFCheckpoint) -> str:
    arch = ckpt.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{ckpt.files[0]}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return arch


def _rope_factors(ckpt: GGUFCheckpoint) -> list[float] | None:
    """llama3-style frequency divisors, stored by the converter as a tensor (rope_freqs)."""
    if "rope_freqs.weight" not in ckpt.ignored:
        return None
    from tp_runtime.checkpoint.gguf_reader import _read

    for path in ckpt.files:
        reader = _read(path)
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                if t.tensor_type.name != "F32":
                    raise CheckpointError(f"{path}: tensor rope_freqs.weight has type {t.tensor_type.name}, expected F32")
                return [float(x) for x in np.asarray(t.data, dtype=np.float32).reshape(-1)]
    return None


def config_dict(ckpt: GGUFCheckpoint) -> dict[str, Any]:
    arch = architecture(ckpt)
    meta = ckpt.metadata
    source = str(ckpt.files[0])

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if meta.get(full) is None:
            raise CheckpointError(f"{source}: GGUF metadata key {full!r} is missing")
        return meta[full]

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        vocab = ckpt.records["model.embed_tokens.weight"].shape[0] if "model.embed_tokens.weight" in ckpt.records else None
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    raw: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv") or heads),
        "head_dim": int(head_dim),
        "intermediate_size": int(need("feed_forward_length")),
        "vocab_size": int(vocab) if vocab is not None else None,
        "max_position_embeddings": int(get("context_length") or 4096),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "lm_head.weight" not in ckpt.records,
        "attention_bias": arch != "qwen2" and "model.layers.0.self_attn.q_proj.bias" in ckpt.records,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        # quantized weights are dequantized into float32 by default (what llama.cpp computes in)
        "torch_dtype": "float32",
    }
    scaling = get("rope.scaling.type")
    if scaling == "linear":
        raw["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
    elif scaling not in (None, "none"):
        raise CheckpointError(f"{source}: rope scaling {scaling!r} is not supported (linear and llama3 are)")
    if get("attention.sliding_window"):
        raw["sliding_window"] = int(get("attention.sliding_window"))
    extra: dict[str, Any] = {}
    factors = _rope_factors(ckpt)
    if factors is not None:
        extra["rope_freq_factors"] = factors
    # down_proj's columns are the MLP features: split them on its blocks (the largest of the layers')
    blocks = [r.storage.block for n, r in ckpt.records.items() if n.endswith(".mlp.down_proj.weight") and r.storage.quantized]
    if blocks and raw["intermediate_size"] % max(blocks) == 0:
        extra["mlp_unit"] = max(blocks)
    if extra:
        raw[EXTRA_KEY] = extra
    return raw


def model_config(ckpt: GGUFCheckpoint) -> ModelConfig:
    return ModelConfig.from_dict(config_dict(ckpt), source=str(ckpt.files[0]))
