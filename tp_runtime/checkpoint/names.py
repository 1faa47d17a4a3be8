"""The one table from Hugging Face tensor names to this runtime's parameters.

Each checkpoint tensor lands in a parameter of ours, possibly as one slot of a merged
parameter (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`). Quirks of checkpoint layouts
are resolved here, never in forward().
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tp_runtime import sharding
from tp_runtime.config import ModelConfig


@dataclass(frozen=True)
class TensorEntry:
    hf_name: str
    shape: tuple[int, ...]  # global shape the config implies
    target: str  # our parameter, e.g. "layers.3.attn.qkv_proj.weight"
    slot: str | None  # slot of a merged parameter ("q", "k", "v", "gate", "up")
    layer: int | None  # the decoder layer it belongs to (None: embedding, final norm, head)
    role: str  # what it is, for sharding.spec: "q_proj", "down_proj", "embed_tokens", ...
    kind: str  # "weight" or "bias"
    expert: int | None = None  # the routed expert it belongs to (sharding.holds_expert: which ranks read it)

    @property
    def target_in_layer(self) -> str:
        """The parameter's name inside its decoder layer ("attn.qkv_proj.weight")."""
        return self.target.removeprefix(f"layers.{self.layer}.")


EMBEDDING_NAME = "model.embed_tokens.weight"

# tensors some checkpoints carry that the runtime recomputes or does not need
_IGNORED = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"),)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def expected_tensors(cfg: ModelConfig) -> list[TensorEntry]:
    h, inter, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.q_size, cfg.kv_size
    out = [TensorEntry(EMBEDDING_NAME, (v, h), "embed_tokens.weight", None, None, "embed_tokens", "weight")]

    def add(layer: int, hf_module: str, role: str, shape: tuple[int, ...], target: str, slot: str | None, bias: bool) -> None:
        hf = f"model.layers.{layer}.{hf_module}"
        ours = f"layers.{layer}.{target}"
        out.append(TensorEntry(f"{hf}.weight", shape, f"{ours}.weight", slot, layer, role, "weight"))
        if bias:
            out.append(TensorEntry(f"{hf}.bias", shape[:1], f"{ours}.bias", slot, layer, role, "bias"))

    for i in range(cfg.num_layers):
        if cfg.mla is not None:
            out += _mla_tensors(cfg, i)
        else:
            for slot, rows in (("q", q), ("k", kv), ("v", kv)):
                add(i, f"self_attn.{slot}_proj", f"{slot}_proj", (rows, h), "attn.qkv_proj", slot, cfg.qkv_bias)
            add(i, "self_attn.o_proj", "o_proj", (h, q), "attn.o_proj", None, cfg.o_bias)
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                out.append(TensorEntry(f"model.layers.{i}.self_attn.{norm}.weight", (cfg.head_dim,), f"layers.{i}.attn.{norm}.weight", None, i, norm, "weight"))
        if cfg.moe is not None and cfg.moe.sparse_layers[i]:
            out += _moe_tensors(cfg, i)
        else:
            for slot in ("gate", "up"):
                add(i, f"mlp.{slot}_proj", f"{slot}_proj", (inter, h), "mlp.gate_up_proj", slot, cfg.mlp_bias)
            add(i, "mlp.down_proj", "down_proj", (h, inter), "mlp.down_proj", None, cfg.mlp_bias)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out.append(TensorEntry(f"model.layers.{i}.{norm}.weight", (h,), f"layers.{i}.{norm}.weight", None, i, norm, "weight"))
    out.append(TensorEntry("model.norm.weight", (h,), "norm.weight", None, None, "norm", "weight"))
    if not cfg.tie_word_embeddings:
        out.append(TensorEntry("lm_head.weight", (v, h), "lm_head.weight", None, None, "lm_head", "weight"))
    return out


def _mla_tensors(cfg: ModelConfig, i: int) -> list[TensorEntry]:
    """Layer i's multi-head latent attention, into model/mla.py's MlaAttention at layers.i.attn:
    the q and kv down projections (both read the hidden state, both replicated) merged into
    a_proj (slots "q_a", "kv_a"), their RMSNorms replicated, q_b_proj (or the plain q_proj) and
    kv_b_proj column-parallel by heads, o_proj row-parallel over the heads' values."""
    mla, h, n = cfg.mla, cfg.hidden_size, cfg.num_heads
    hf, ours = f"model.layers.{i}.self_attn", f"layers.{i}.attn"

    def entry(module: str, shape: tuple[int, ...], target: str, slot: str | None, role: str) -> TensorEntry:
        return TensorEntry(f"{hf}.{module}.weight", shape, f"{ours}.{target}.weight", slot, i, role, "weight")

    out = []
    if mla.q_lora_rank:
        out += [
            entry("q_a_proj", (mla.q_lora_rank, h), "a_proj", "q_a", "q_a_proj"),
            entry("q_a_layernorm", (mla.q_lora_rank,), "q_a_layernorm", None, "q_a_layernorm"),
            entry("q_b_proj", (cfg.q_size, mla.q_lora_rank), "q_proj", None, "q_b_proj"),
        ]
    else:
        out.append(entry("q_proj", (cfg.q_size, h), "q_proj", None, "q_proj"))
    return out + [
        entry("kv_a_proj_with_mqa", (mla.kv_lora_rank + mla.qk_rope_head_dim, h), "a_proj", "kv_a", "kv_a_proj"),
        entry("kv_a_layernorm", (mla.kv_lora_rank,), "kv_a_layernorm", None, "kv_a_layernorm"),
        entry("kv_b_proj", (n * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank), "kv_b_proj", None, "kv_b_proj"),
        entry("o_proj", (h, n * mla.v_head_dim), "o_proj", None, "o_proj"),
    ]


# a MoE layer's checkpoint names per family: (module, router, expert's gate / up / down, shared
# expert's module or None)
_MOE_NAMES = {
    "mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2"), None),
    "qwen2_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), "shared_expert"),
    "qwen3_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), None),
    "deepseek_v3": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
}


def _moe_tensors(cfg: ModelConfig, i: int) -> list[TensorEntry]:
    """Layer i's router, routed experts (per-expert names, as checkpoints keep them) and shared
    expert, into model/moe.py's SparseMoe at layers.i.mlp."""
    moe, h = cfg.moe, cfg.hidden_size
    module, router, (gate, up, down), shared = _MOE_NAMES[cfg.family]
    hf, ours = f"model.layers.{i}.{module}", f"layers.{i}.mlp"
    out = [TensorEntry(f"{hf}.{router}.weight", (moe.num_experts, h), f"{ours}.router.weight", None, i, "router", "weight")]
    if moe.correction_bias:
        out.append(TensorEntry(f"{hf}.{router}.e_score_correction_bias", (moe.num_experts,), f"{ours}.router.correction_bias", None, i, "router_bias", "weight"))
    inter = moe.intermediate_size
    for e in range(moe.num_experts):
        x = f"{hf}.experts.{e}"
        out += [
            TensorEntry(f"{x}.{gate}.weight", (inter, h), f"{ours}.experts.{e}.gate_up_proj.weight", "gate", i, "expert_gate_proj", "weight", e),
            TensorEntry(f"{x}.{up}.weight", (inter, h), f"{ours}.experts.{e}.gate_up_proj.weight", "up", i, "expert_up_proj", "weight", e),
            TensorEntry(f"{x}.{down}.weight", (h, inter), f"{ours}.experts.{e}.down_proj.weight", None, i, "expert_down_proj", "weight", e),
        ]
    if moe.shared_intermediate_size:
        s, x = moe.shared_intermediate_size, f"{hf}.{shared}"
        out += [
            TensorEntry(f"{x}.gate_proj.weight", (s, h), f"{ours}.shared.gate_up_proj.weight", "gate", i, "shared_gate_proj", "weight"),
            TensorEntry(f"{x}.up_proj.weight", (s, h), f"{ours}.shared.gate_up_proj.weight", "up", i, "shared_up_proj", "weight"),
            TensorEntry(f"{x}.down_proj.weight", (h, s), f"{ours}.shared.down_proj.weight", None, i, "shared_down_proj", "weight"),
        ]
    if moe.shared_expert_gate:
        out.append(TensorEntry(f"{hf}.shared_expert_gate.weight", (1, h), f"{ours}.shared_gate", None, i, "shared_expert_gate", "weight"))
    return out


def held_by(entries: list[TensorEntry], cfg: ModelConfig, tp: int, rank: int) -> list[TensorEntry]:
    """The entries `rank` reads any part of: all but other ranks' routed experts (--moe ep)."""
    if cfg.moe is None or cfg.moe.parallel == "tp":
        return list(entries)
    return [e for e in entries if sharding.holds_expert(cfg, tp, rank, e.expert)]


def is_ignored(name: str, cfg: ModelConfig) -> bool:
    if cfg.tie_word_embeddings and name == "lm_head.weight":
        return True  # some tied checkpoints still save the (identical) head
    if cfg.mla is not None and (m := _LAYER.match(name)) and int(m.group(1)) >= cfg.num_layers:
        return True  # DeepSeek-V3's multi-token-prediction layer(s) after the last: transformers does not load them either
    return any(p.search(name) for p in _IGNORED)
