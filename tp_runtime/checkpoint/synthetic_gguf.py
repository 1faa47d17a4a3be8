"""Random-weight GGUF files as llama.cpp's converter writes them, for tests and benchmarks.

The weights are `synthetic.random_state_dict`'s; 2-D weights are stored in the chosen GGML type
(the `gguf` package's own quantizers; K-quant blocks, which it cannot quantize, are made of
random bytes with finite scales), norms in F32; llama-type files get the converter's q/k row
permutation. A byte-level BPE tokenizer goes into the metadata (gpt2-type, as llama.cpp reads it).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tp_runtime.checkpoint.gguf_reader import hf_name
from tp_runtime.checkpoint.synthetic import random_state_dict, train_byte_tokenizer
from tp_runtime.config import ModelConfig

_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# K-quants: (block bytes, byte offsets of the float16 scales in a block, their magnitude: the
# weights come out of the order of the float ones)
_K_SCALES = {"Q4_K": (144, (0, 2), 2e-4), "Q5_K": (176, (0, 2), 1e-4), "Q6_K": (210, (208,), 3e-5)}


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The converter's q/k permutation: per head, HF's half-split rows interleaved pairwise."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    nbytes, scale_offsets, magnitude = _K_SCALES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, nbytes), dtype=np.uint8)
    for off in scale_offsets:
        scale = rng.uniform(-magnitude, magnitude, size=blocks.shape[0]).astype(np.float16)
        blocks[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def encode(values: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """values float32 [rows, cols] stored as `qtype` (bytes for the block types)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if qtype == "F32":
        return values.astype(np.float32)
    if qtype == "F16":
        return values.astype(np.float16)
    if qtype == "BF16":
        return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    if qtype in _K_SCALES:
        return random_k_blocks(*values.shape, qtype, rng)
    return quantize(values, GGMLQuantizationType[qtype])


def _tokenizer_metadata(vocab_size: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tokenizer.json"
        train_byte_tokenizer(vocab_size, path)
        model = json.loads(path.read_text())["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    tokens = [by_id.get(i, f"<unused{i}>") for i in range(vocab_size)]
    types = [3 if t in ("<unk>", "<s>", "</s>") else (5 if t.startswith("<unused") else 1) for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(path: str | Path, cfg_dict: dict[str, Any], weight_type: str = "Q8_0", seed: int = 0, std: float = 0.05,
               embedding_type: str | None = None, rope_freq_factors: list[float] | None = None,
               tensor_types: dict[str, str] | None = None) -> Path:
    """A GGUF file of a random model with config `cfg_dict` (synthetic.llama_config_dict), its
    2-D weights in `weight_type` (the embedding in `embedding_type`, default the same; single
    tensors by GGUF name in `tensor_types`, as a Q4_K_M file mixes Q4_K and Q6_K), and
    llama3-style RoPE frequency divisors as a rope_freqs tensor where given."""
    from gguf import GGMLQuantizationType, GGUFWriter

    cfg = ModelConfig.from_dict(cfg_dict)
    arch = _ARCH[cfg.family]
    rng = np.random.default_rng(seed)
    state = random_state_dict(cfg, seed, torch.float32, std)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tok = _tokenizer_metadata(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    gguf_of = {}
    for name in _gguf_names(cfg):
        gguf_of[hf_name(name)] = name
    for hf, t in state.items():
        values = t.numpy()
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            values = permute_rope_rows(values, cfg.num_heads if ".q_proj." in hf else cfg.num_kv_heads)
        if values.ndim == 2:
            qtype = embedding_type if (hf == "model.embed_tokens.weight" and embedding_type) else weight_type
            qtype = (tensor_types or {}).get(gguf_of[hf], qtype)
        else:
            qtype = "F32"
        data = encode(np.ascontiguousarray(values, dtype=np.float32), qtype, rng)
        w.add_tensor(gguf_of[hf], data, raw_dtype=GGMLQuantizationType[qtype])
    if rope_freq_factors is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freq_factors, dtype=np.float32), raw_dtype=GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_names(cfg: ModelConfig) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"] + ([] if cfg.tie_word_embeddings else ["output.weight"])
    for i in range(cfg.num_layers):
        names += [f"blk.{i}.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
        if cfg.qkv_bias:
            names += [f"blk.{i}.attn_{x}.bias" for x in "qkv"]
    return names
