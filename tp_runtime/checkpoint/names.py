"""The one table from Hugging Face tensor names to this runtime's parameters.

Each checkpoint tensor lands in a parameter of ours, possibly as one slot of a merged
parameter (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`). Quirks of checkpoint layouts
are resolved here, never in forward().
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tp_runtime.config import ModelConfig


@dataclass(frozen=True)
class TensorEntry:
    hf_name: str
    shape: tuple[int, ...]  # global shape the config implies
    target: str  # our parameter, e.g. "layers.3.attn.qkv_proj.weight"
    slot: str | None  # slot of a merged parameter ("q", "k", "v", "gate", "up")
    layer: int | None = None  # the decoder layer it belongs to (None: embedding, final norm, head)

    @property
    def target_in_layer(self) -> str:
        """The parameter's name inside its decoder layer ("attn.qkv_proj.weight")."""
        return self.target.removeprefix(f"layers.{self.layer}.")


EMBEDDING_NAME = "model.embed_tokens.weight"

# tensors some checkpoints carry that the runtime recomputes or does not need
_IGNORED = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"),)


def expected_tensors(cfg: ModelConfig) -> list[TensorEntry]:
    h, inter, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.q_size, cfg.kv_size
    out = [TensorEntry(EMBEDDING_NAME, (v, h), "embed_tokens.weight", None)]
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        attn = [("q", q), ("k", kv), ("v", kv)]
        for slot, rows in attn:
            out.append(TensorEntry(f"{hf}.self_attn.{slot}_proj.weight", (rows, h), f"{ours}.attn.qkv_proj.weight", slot, i))
            if cfg.qkv_bias:
                out.append(TensorEntry(f"{hf}.self_attn.{slot}_proj.bias", (rows,), f"{ours}.attn.qkv_proj.bias", slot, i))
        out.append(TensorEntry(f"{hf}.self_attn.o_proj.weight", (h, q), f"{ours}.attn.o_proj.weight", None, i))
        if cfg.o_bias:
            out.append(TensorEntry(f"{hf}.self_attn.o_proj.bias", (h,), f"{ours}.attn.o_proj.bias", None, i))
        for slot in ("gate", "up"):
            out.append(TensorEntry(f"{hf}.mlp.{slot}_proj.weight", (inter, h), f"{ours}.mlp.gate_up_proj.weight", slot, i))
            if cfg.mlp_bias:
                out.append(TensorEntry(f"{hf}.mlp.{slot}_proj.bias", (inter,), f"{ours}.mlp.gate_up_proj.bias", slot, i))
        out.append(TensorEntry(f"{hf}.mlp.down_proj.weight", (h, inter), f"{ours}.mlp.down_proj.weight", None, i))
        if cfg.mlp_bias:
            out.append(TensorEntry(f"{hf}.mlp.down_proj.bias", (h,), f"{ours}.mlp.down_proj.bias", None, i))
        out.append(TensorEntry(f"{hf}.input_layernorm.weight", (h,), f"{ours}.input_layernorm.weight", None, i))
        out.append(TensorEntry(f"{hf}.post_attention_layernorm.weight", (h,), f"{ours}.post_attention_layernorm.weight", None, i))
    out.append(TensorEntry("model.norm.weight", (h,), "norm.weight", None))
    if not cfg.tie_word_embeddings:
        out.append(TensorEntry("lm_head.weight", (v, h), "lm_head.weight", None))
    return out


def is_ignored(name: str, cfg: ModelConfig) -> bool:
    if cfg.tie_word_embeddings and name == "lm_head.weight":
        return True  # some tied checkpoints still save the (identical) head
    return any(p.search(name) for p in _IGNORED)
