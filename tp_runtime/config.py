"""Configuration objects, parsed once and frozen.

ModelConfig holds every shape the model needs, read from a Hugging Face config.json
(transformers 4.x `rope_theta`/`rope_scaling` and 5.x `rope_parameters` alike).
ParallelConfig says who this process is; RuntimeConfig says how to run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from tp_runtime.errors import ConfigError

QUANTIZE = (None, "int8", "int4")  # --quantize: the weight formats quantised at load
INT4_GROUP = 32  # values per int4 group (one GGML Q4_0 block)

# settings a config dict carries beyond Hugging Face's keys, for checkpoints whose format holds
# them elsewhere (a GGUF file's rope_freqs tensor and its down_proj block size): a worker that
# receives the dict then builds the same config as the coordinator
EXTRA_KEY = "tp_runtime"

# architecture -> family; model/registry.py maps the families to classes
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",  # DeepSeek-V3, Kimi K2 / K2.5: MLA attention (model/mla.py)
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
QWEN_FAMILIES = ("qwen2", "qwen2_moe", "qwen3_moe")  # sliding window only with use_sliding_window
# how the experts of a MoE layer are split over the ranks (--moe): "tp" slices every expert like
# the dense MLP, "ep" gives each rank whole experts (model/moe.py)
MOE_PARALLEL = ("tp", "ep")
# how attention (and every other dense part) is split (--attention): "tp" by heads, or "dp":
# replicated, each rank running its own sequences, with the experts (--moe ep) reached through
# all-to-all (the DeepSeek / Kimi serving layout)
ATTENTION_PARALLEL = ("tp", "dp")

# config.json `model_type` -> architecture, for configs written without `architectures`
# (transformers' GGUF loader, community converters); transformers infers the class the same way.
MODEL_TYPE_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # yarn: MLA models only (ModelConfig.from_dict)

DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192  # (yarn's too)
    # yarn only (with factor and original_max_position_embeddings)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0  # cos and sin are scaled by it (transformers' attention_scaling)
    # per-frequency divisors given outright (a GGUF's rope_freqs tensor: llama3 scaling as stored
    # by llama.cpp's converter); applied after rope_type
    freq_factors: tuple[float, ...] = ()


def _architecture(raw: dict[str, Any], source: str) -> str:
    archs = raw.get("architectures") or []
    if archs:
        return archs[0]
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: neither 'architectures' nor 'model_type' is given; cannot tell which model this is")
    if model_type not in MODEL_TYPE_ARCHITECTURES:
        raise ConfigError(
            f"{source}: no 'architectures' entry and model_type {model_type!r} is not supported; "
            f"supported model types: {', '.join(sorted(MODEL_TYPE_ARCHITECTURES))}"
        )
    return MODEL_TYPE_ARCHITECTURES[model_type]


@dataclass(frozen=True)
class MoeConfig:
    """The mixture-of-experts part of a config (model/moe.py has the routing rules)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one routed expert
    sparse_layers: tuple[bool, ...]  # per decoder layer: experts (True) or the dense MLP
    scoring: str = "softmax"  # "softmax" (Mixtral, Qwen-MoE) or "sigmoid" (DeepSeek-V3)
    norm_topk_prob: bool = True
    shared_intermediate_size: int = 0  # the shared expert's (0: none)
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert's output times sigmoid(x g^T)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False  # DeepSeek-V3's e_score_correction_bias (choice only)
    parallel: str = "tp"  # how this runtime splits the experts (RuntimeConfig.split_config sets it)
    attention: str = "tp"  # how it splits the rest: ATTENTION_PARALLEL (split_config too)

    @property
    def data_parallel(self) -> bool:
        return self.attention == "dp"


def _parse_moe(raw: dict[str, Any], family: str, num_layers: int, source: str) -> MoeConfig | None:
    if family not in MOE_FAMILIES:
        return None
    if family == "mixtral":
        experts, inter = int(raw.get("num_local_experts") or 0), raw.get("intermediate_size")
        sparse = tuple([True] * num_layers)
        kw: dict[str, Any] = {}
    else:  # Qwen2-MoE / Qwen3-MoE: every decoder_sparse_step-th layer, minus mlp_only_layers
        # transformers 5 writes Qwen3-MoE's count as num_local_experts
        experts, inter = int(raw.get("num_experts") or raw.get("num_local_experts") or 0), raw.get("moe_intermediate_size")
        step = int(raw.get("decoder_sparse_step") or 1)
        dense = set(raw.get("mlp_only_layers") or ())
        sparse = tuple(experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(num_layers))
        kw = {"norm_topk_prob": bool(raw.get("norm_topk_prob", False))}
        if family == "qwen2_moe" and raw.get("shared_expert_intermediate_size"):
            kw.update(shared_intermediate_size=int(raw["shared_expert_intermediate_size"]), shared_expert_gate=True)
    if family == "deepseek_v3":
        experts, inter, kw = _deepseek_moe(raw, source)
        # transformers' DeepseekV3DecoderLayer: experts from layer first_k_dense_replace on, every layer
        first_dense = int(_deepseek_key(raw, "first_k_dense_replace"))
        sparse = tuple(i >= first_dense for i in range(num_layers))
    top_k = int(raw.get("num_experts_per_tok") or 0)
    if experts < 1 or inter is None or int(inter) < 1:
        raise ConfigError(f"{source}: a {family} config needs a positive number of experts and an expert intermediate size")
    if not 1 <= top_k <= experts:
        raise ConfigError(f"{source}: num_experts_per_tok {top_k} must be between 1 and the number of experts ({experts})")
    if kw.get("n_group", 1) > 1 and top_k > kw["topk_group"] * (experts // kw["n_group"]):
        raise ConfigError(f"{source}: num_experts_per_tok {top_k} is more than the {kw['topk_group']} groups (topk_group) of "
                          f"{experts // kw['n_group']} experts that a token may choose from")
    return MoeConfig(num_experts=experts, top_k=top_k, intermediate_size=int(inter), sparse_layers=sparse, **kw)


# transformers' DeepseekV3Config defaults, for the keys a config.json may leave out
_DEEPSEEK_DEFAULTS = {
    "n_group": 8, "topk_group": 4, "n_shared_experts": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "first_k_dense_replace": 3, "rope_interleave": True, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
}


def _deepseek_key(raw: dict[str, Any], key: str) -> Any:
    return raw[key] if key in raw else _DEEPSEEK_DEFAULTS[key]


def _deepseek_moe(raw: dict[str, Any], source: str) -> tuple[int, Any, dict[str, Any]]:
    """(routed experts, expert intermediate size, the other MoeConfig fields) of a DeepSeek-V3
    config: sigmoid scores, grouped choice with e_score_correction_bias, scaled weights; its
    n_shared_experts shared experts are one MLP of n_shared_experts x moe_intermediate_size
    features without a gate."""
    experts, inter = int(raw.get("n_routed_experts") or 0), raw.get("moe_intermediate_size")
    freq = raw.get("moe_layer_freq", 1)
    if freq != 1:
        raise ConfigError(f"{source}: moe_layer_freq {freq} is not supported: transformers' DeepseekV3 makes every layer from "
                          "first_k_dense_replace on a mixture-of-experts layer (moe_layer_freq 1)")
    n_group, topk_group = _deepseek_key(raw, "n_group"), _deepseek_key(raw, "topk_group")
    if not isinstance(n_group, int) or n_group < 1 or (experts and experts % n_group):
        raise ConfigError(f"{source}: n_group {n_group!r} must be a positive divisor of n_routed_experts ({experts})")
    if n_group > 1 and experts // n_group < 2:
        raise ConfigError(f"{source}: n_group {n_group} leaves groups of one expert; a group is scored by its two best")
    if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
        raise ConfigError(f"{source}: topk_group {topk_group!r} must be between 1 and n_group ({n_group})")
    shared = int(_deepseek_key(raw, "n_shared_experts") or 0)
    kw = dict(scoring="sigmoid", norm_topk_prob=bool(_deepseek_key(raw, "norm_topk_prob")), n_group=n_group, topk_group=topk_group,
              routed_scaling_factor=float(_deepseek_key(raw, "routed_scaling_factor")), correction_bias=True,
              shared_intermediate_size=shared * int(inter or 0))
    return experts, inter, kw


@dataclass(frozen=True)
class MlaConfig:
    """DeepSeek's multi-head latent attention (model/mla.py): q from a low-rank latent (or a
    plain projection), keys and values from one shared latent plus one shared RoPE key."""

    q_lora_rank: int | None  # None: a plain q_proj instead of q_a_proj -> q_a_layernorm -> q_b_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float  # qk_head_dim ** -0.5, times YaRN's mscale(mscale_all_dim) squared where given
    rope_interleave: bool = True  # RoPE on the pairs (x0, x1), (x2, x3), ... of the rope part

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def _parse_mla(raw: dict[str, Any], family: str, source: str) -> MlaConfig | None:
    if family != "deepseek_v3":
        return None
    dims = {}
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        v = _deepseek_key(raw, key)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{source}: {key} must be a positive integer, got {v!r}")
        dims[key] = v
    q_lora = _deepseek_key(raw, "q_lora_rank")
    if q_lora is not None and (not isinstance(q_lora, int) or q_lora < 1):
        raise ConfigError(f"{source}: q_lora_rank must be a positive integer or null, got {q_lora!r}")
    if dims["qk_rope_head_dim"] % 2:
        raise ConfigError(f"{source}: qk_rope_head_dim {dims['qk_rope_head_dim']} must be even (RoPE rotates pairs)")
    qk = dims["qk_nope_head_dim"] + dims["qk_rope_head_dim"]
    if dims["v_head_dim"] > qk:
        raise ConfigError(f"{source}: v_head_dim {dims['v_head_dim']} larger than qk_nope_head_dim + qk_rope_head_dim ({qk}) is not "
                          "supported (the KV cache holds each value padded to the key's size)")
    if raw.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias true is not supported for DeepseekV3ForCausalLM (MLA without biases only)")
    # transformers' yarn_apply_mscale: a non-default rope with mscale_all_dim scales q k^T too
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    scale = qk**-0.5
    if params.get("rope_type", params.get("type", "default")) != "default" and params.get("mscale_all_dim"):
        if not params.get("factor"):
            raise ConfigError(f"{source}: rope scaling with mscale_all_dim needs a 'factor' (it scales the attention's softmax)")
        m = _yarn_mscale(float(params["factor"]), float(params["mscale_all_dim"]))
        scale = scale * m * m
    return MlaConfig(q_lora_rank=q_lora, softmax_scale=scale, rope_interleave=bool(_deepseek_key(raw, "rope_interleave")), **dims)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (transformers' yarn_get_mscale)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    checkpoint_dtype: str | None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # the MLP's features are split over ranks in whole units of this where each rank still gets
    # one (a GGUF file's down_proj block: its row-parallel column ranges then fall on blocks)
    mlp_unit: int = 1
    moe: MoeConfig | None = None
    qk_norm: bool = False  # Qwen3: an RMSNorm over each q and k head before RoPE
    # DeepSeek-V3 / Kimi K2: multi-head latent attention; head_dim is then qk_nope + qk_rope (a
    # key's size) and num_kv_heads num_heads (every q head has its own key and value)
    mla: MlaConfig | None = None
    # each rank's share of the heads, MLP features, vocabulary and experts (--shares), by rank;
    # None: equal shares. Read by sharding.py wherever a split over as many ranks is made.
    shares: tuple[float, ...] | None = None

    @property
    def rope_head_dim(self) -> int:
        """The features of a head that RoPE rotates (MLA: only the qk_rope part)."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        h, i_, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if (mla := self.mla) is not None:  # q (latent + norm, or plain), kv latent + rope key, its norm, kv_b, o
            q_in = mla.q_lora_rank or h
            attn = (h * q_in + q_in if mla.q_lora_rank else 0) + q_in * self.q_size + h * (mla.kv_lora_rank + mla.qk_rope_head_dim)
            attn += mla.kv_lora_rank + mla.kv_lora_rank * self.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim) + self.num_heads * mla.v_head_dim * h
        layers = self.num_layers * (attn + 2 * h + (2 * self.head_dim if self.qk_norm else 0))
        moe = self.moe
        for i in range(self.num_layers):
            if moe is not None and moe.sparse_layers[i]:
                layers += moe.num_experts * (3 * h * moe.intermediate_size + h + moe.correction_bias) + 3 * h * moe.shared_intermediate_size + h * moe.shared_expert_gate
            else:
                layers += 3 * h * i_
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + layers + h + head

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        arch = _architecture(raw, source)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: architecture {arch!r} is not supported; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ConfigError(f"{source}: required key {key!r} is missing")
            return raw[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        # MLA: every q head has its own key and value, of qk_nope + qk_rope features; neither
        # num_key_value_heads nor head_dim (transformers writes qk_rope_head_dim there) is read
        mla = _parse_mla(raw, family, source)
        kv_heads = heads if mla is not None else int(raw.get("num_key_value_heads") or heads)
        head_dim = mla.qk_head_dim if mla is not None else raw.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} and no head_dim is given")
            head_dim = hidden // heads
        head_dim = int(head_dim)
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")

        sliding = raw.get("sliding_window")
        if family in QWEN_FAMILIES and not raw.get("use_sliding_window", False):
            sliding = None

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype = raw.get("dtype") or raw.get("torch_dtype")
        rope = _parse_rope(raw, source)
        extra = raw.get(EXTRA_KEY) or {}
        factors = extra.get("rope_freq_factors")
        if factors is not None:
            if len(factors) != head_dim // 2:
                raise ConfigError(f"{source}: {len(factors)} rope frequency factors (a GGUF file's rope_freqs.weight) for a head size of {head_dim}")
            rope = replace(rope, freq_factors=tuple(float(f) for f in factors))
        if rope.rope_type == "yarn" and mla is None:
            raise ConfigError(f"{source}: rope type 'yarn' is supported for DeepseekV3ForCausalLM only (parity-tested there), not {arch}")
        num_layers = int(need("num_hidden_layers"))
        if family == "qwen2_moe":
            qkv_bias = bool(raw.get("qkv_bias", True))
        else:
            qkv_bias = family == "qwen2" or bool(raw.get("attention_bias", False))
        return cls(
            architecture=arch,
            family=family,
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(need("intermediate_size")),
            vocab_size=int(need("vocab_size")),
            max_position_embeddings=int(raw.get("max_position_embeddings") or 4096),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=rope,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=family not in QWEN_FAMILIES and bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            checkpoint_dtype=str(dtype) if dtype else None,
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
            mlp_unit=int(extra.get("mlp_unit", 1)),
            moe=_parse_moe(raw, family, num_layers, source),
            qk_norm=family == "qwen3_moe",
            mla=mla,
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike) -> ModelConfig:
        path = Path(model_dir)
        if not path.is_dir():
            raise ConfigError(f"model folder {str(path)!r} does not exist (expected a Hugging Face folder with config.json)")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{cfg_file}: not found; a model folder needs config.json")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from None
        cfg = cls.from_dict(raw, source=str(cfg_file))
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            try:
                gen = json.loads(gen_file.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{gen_file}: not valid JSON ({e})") from None
            eos = gen.get("eos_token_id")
            extra = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            merged = tuple(dict.fromkeys(cfg.eos_token_ids + extra))
            cfg = replace(cfg, eos_token_ids=merged)
        return cfg


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    # transformers 5 writes rope_parameters (theta inside); 4.x writes rope_theta + rope_scaling
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    kw: dict[str, Any] = {"theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise ConfigError(f"{source}: rope type {rope_type!r} needs a 'factor'")
        kw["factor"] = float(params["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in params:
                raise ConfigError(f"{source}: rope type 'llama3' needs {key!r}")
        kw["low_freq_factor"] = float(params["low_freq_factor"])
        kw["high_freq_factor"] = float(params["high_freq_factor"])
        kw["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    if rope_type == "yarn":  # transformers' _compute_yarn_parameters, defaults included
        orig = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or raw.get("max_position_embeddings") or 4096
        factor = params.get("factor") or (raw.get("max_position_embeddings") or 4096) / orig
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
        kw.update(factor=float(factor), original_max_position_embeddings=int(orig), beta_fast=float(params.get("beta_fast") or 32),
                  beta_slow=float(params.get("beta_slow") or 1), truncate=bool(params.get("truncate", True)), attention_factor=float(attention_factor))
    return RopeConfig(**kw)


@dataclass(frozen=True)
class ParallelConfig:
    """Who this process is. Shard by `rank`; pick the device by `local_rank`."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    init_method: str | None = None  # None: tcp://master_addr:master_port

    @property
    def rendezvous(self) -> str:
        return self.init_method or f"tcp://{self.master_addr}:{self.master_port}"

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world size must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside world size {self.world_size}")


TRANSPORTS = ("auto", "shm", "gloo", "nccl")
DATA_PATHS = ("tcp", "zmq")


@dataclass(frozen=True)
class CommConfig:
    """How ranks talk: transport, collective timeout, latency injection, tracing."""

    transport: str = "auto"  # auto: nccl on CUDA; on CPU shm when every rank is on this host, else gloo
    timeout_s: float = 120.0  # a vanished peer must not hang the others for torch's default 10-30 min
    inject_latency_s: float = 0.0
    inject_bandwidth_Bps: float | None = None
    trace: bool = False
    # a worker job's collectives: over raw TCP links ("tcp", comm/tcp_data.py) or the zmq sockets ("zmq")
    data_path: str = "tcp"

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport {self.transport!r} is not available; choose one of {', '.join(TRANSPORTS)}")
        if self.data_path not in DATA_PATHS:
            raise ConfigError(f"data path {self.data_path!r} is not available; choose one of {', '.join(DATA_PATHS)}")
        if self.inject_latency_s < 0:
            raise ConfigError(f"injected latency must be >= 0, got {self.inject_latency_s}")


# RuntimeConfig fields each rank decides for itself: its devices and cores, its own terminal
RANK_LOCAL_FIELDS = ("device", "num_threads", "show_progress")


@dataclass(frozen=True)
class RuntimeConfig:
    dtype: str | None = None  # None: the checkpoint's, float32 on CPU if it is float16
    max_seq_len: int | None = None  # None: min(max_position_embeddings, 4096)
    max_batch_size: int = 8
    device: str | None = None  # None: cuda:LOCAL_RANK when CUDA is present, else cpu
    num_threads: int | None = None
    show_progress: bool = True
    # weight-only linears quantised per shard at load: "int8" (per output row), "int4" (GGML
    # Q4_0: per 32 values, multiplied by the block kernels on CPU)
    quantize: str | None = None
    # memory budgets per rank, bytes (None: what the device / machine reports, minus headroom);
    # layers beyond them are streamed (see placement.py)
    max_device_memory: int | None = None
    max_host_memory: int | None = None
    # a GGUF file's quantized weights: "native" (kept as blocks, multiplied by kernels/cpu_quant.c;
    # CPU only), "dequantize" (decoded into dtype at load), "auto": native where it can run
    gguf_weights: str = "auto"
    # the prefill GEMMs of those blocks: "bfloat16" (blocks decoded to it, activations rounded to
    # it: ~2.5x float32's speed where the CPU has AVX512-BF16), "float32" (exact decoded values),
    # "auto": bfloat16 where the CPU has AVX512-BF16 (model/blocks.py prefill_in_bf16)
    block_prefill: str = "auto"
    gemv: str = "auto"  # decode GEMV on CPU: "kernel" (kernels/cpu_gemv.c), "blas" (F.linear), "auto": kernel if it builds
    offload_dir: str | None = None  # streamed layers written here once, in the runtime's layout
    # decode on CPU: "fused" (model/fused_decode.py: kernel calls on fixed
    # buffers), "eager" (the model's forward), "auto": fused wherever it applies
    decode_step: str = "auto"
    # --shares: "auto" (each rank's measured GEMV rate at load), or a weight per rank; None: equal
    shares: str | tuple[float, ...] | None = None
    moe: str = "tp"  # MOE_PARALLEL: a MoE model's experts sliced over ranks, or whole experts per rank
    attention: str = "tp"  # ATTENTION_PARALLEL: a MoE model's attention split by heads, or replicated with sequences per rank
    comm: CommConfig = CommConfig()
    # test hook: raise on this rank at this decode step
    fail_rank: int | None = None
    fail_step: int | None = None
    # test hook: this rank's main loop sleeps stall_s seconds at this decode step (a hung compute
    # loop while its heartbeat thread lives; a few seconds: a slow one)
    stall_rank: int | None = None
    stall_step: int = 0
    stall_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPE_NAMES)}")
        if self.block_prefill not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"block prefill {self.block_prefill!r} is not one of auto, float32, bfloat16")
        if self.gemv not in ("auto", "kernel", "blas"):
            raise ConfigError(f"gemv {self.gemv!r} is not one of auto, kernel, blas")
        if self.gguf_weights not in ("auto", "native", "dequantize"):
            raise ConfigError(f"gguf weights {self.gguf_weights!r} is not one of auto, native, dequantize")
        if self.gguf_weights == "native" and self.quantize:
            raise ConfigError(f"--gguf-weights native keeps the file's blocks, and --quantize {self.quantize} asks for another format: drop one of the two")
        if self.decode_step not in ("auto", "fused", "eager"):
            raise ConfigError(f"decode step {self.decode_step!r} is not one of auto, fused, eager")
        if self.decode_step == "fused" and self.gemv == "blas":
            raise ConfigError("--decode-step fused multiplies with the C kernel, and --gemv blas asks for BLAS: drop one of the two")
        if self.moe not in MOE_PARALLEL:
            raise ConfigError(f"--moe {self.moe!r}: choose one of {', '.join(MOE_PARALLEL)}")
        if self.attention not in ATTENTION_PARALLEL:
            raise ConfigError(f"--attention {self.attention!r}: choose one of {', '.join(ATTENTION_PARALLEL)}")
        if self.attention == "dp" and self.moe != "ep":
            raise ConfigError("--attention dp replicates attention and sends each token to its experts' ranks: it needs --moe ep")
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize {self.quantize!r} is not supported; the choices are {', '.join(q for q in QUANTIZE if q)} (weight-only)")
        for flag, v in (("max_device_memory", self.max_device_memory), ("max_host_memory", self.max_host_memory)):
            if v is not None and v <= 0:
                raise ConfigError(f"{flag} must be positive, got {v}")
        if isinstance(self.shares, str) and self.shares != "auto":
            raise ConfigError(f"--shares {self.shares!r}: 'auto' or one positive weight per rank (e.g. 3,1)")
        if isinstance(self.shares, (tuple, list)) and (not self.shares or any(not math.isfinite(w) or w <= 0 for w in self.shares)):
            raise ConfigError(f"--shares {','.join(map(str, self.shares))}: every weight must be a positive number")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be positive, got {self.max_batch_size}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ConfigError(f"max_seq_len must be positive, got {self.max_seq_len}")

    def split_config(self, cfg: ModelConfig) -> ModelConfig:
        """The model's config as this runtime splits it: with --quantize int4 every rank's
        down_proj input must be whole 32-value groups, so the MLP is cut in whole groups; a MoE
        model's experts are split as --moe says."""
        if self.quantize == "int4" and cfg.mlp_unit % INT4_GROUP:
            cfg = replace(cfg, mlp_unit=math.lcm(cfg.mlp_unit, INT4_GROUP))
        if self.attention == "dp" and cfg.moe is None:
            raise ConfigError(f"--attention dp splits a mixture-of-experts model's experts over the ranks; {cfg.architecture} has none (use tensor parallelism)")
        if cfg.moe is not None and (cfg.moe.parallel, cfg.moe.attention) != (self.moe, self.attention):
            cfg = replace(cfg, moe=replace(cfg.moe, parallel=self.moe, attention=self.attention))
        if isinstance(self.shares, (tuple, list)):  # ("auto" is measured at load: LLM.load)
            cfg = replace(cfg, shares=tuple(float(w) for w in self.shares))
        return cfg

    def for_job(self) -> dict[str, Any]:
        """Every setting the other ranks of a job must share, as JSON (the coordinator sends it
        to its workers): all fields but the rank-local ones, the comm settings but the transport."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RANK_LOCAL_FIELDS and f.name != "comm"}
        out["comm"] = {f.name: getattr(self.comm, f.name) for f in fields(CommConfig) if f.name != "transport"}
        return out

    def describe(self) -> str:
        """The shared settings that differ from the defaults, as `name=value` (logs)."""
        default = RuntimeConfig().for_job()
        mine = self.for_job()
        diff = [f"{k}={v}" for k, v in mine.items() if k != "comm" and v != default[k]]
        diff += [f"comm.{k}={v}" for k, v in mine["comm"].items() if v != default["comm"][k]]
        return " ".join(diff) or "(defaults)"

    @classmethod
    def from_job(cls, job: dict[str, Any], **rank_local: Any) -> RuntimeConfig:
        """The inverse of for_job, with this rank's own `rank_local` settings (threads, ...)."""
        job = dict(job)
        comm = dict(job.pop("comm", {}))
        known = {f.name for f in fields(cls)} - set(RANK_LOCAL_FIELDS) - {"comm"}
        unknown = sorted((set(job) - known) | (set(comm) - {f.name for f in fields(CommConfig)}))
        if unknown:
            raise ConfigError(f"the job's runtime settings name {', '.join(unknown)}, which this version does not know; "
                              "run the same tp-runtime version on the coordinator and every worker")
        return cls(**job, **rank_local, comm=CommConfig(**comm))


    def resolve_max_seq_len(self, cfg: ModelConfig) -> int:
        if self.max_seq_len is None:
            n = min(cfg.max_position_embeddings, 4096)
        else:
            n = self.max_seq_len
        if cfg.sliding_window is not None and cfg.sliding_window < n:
            raise ConfigError(
                f"{cfg.architecture} uses a sliding window of {cfg.sliding_window} tokens, which this runtime "
                f"does not implement; run with --max-seq-len {cfg.sliding_window} or less (attention is then exact)"
            )
        return n

    def resolve_dtype(self, cfg: ModelConfig, device_type: str) -> str:
        if self.dtype is not None:
            return self.dtype
        ckpt = cfg.checkpoint_dtype if cfg.checkpoint_dtype in DTYPE_NAMES else "float32"
        if ckpt == "float16" and device_type == "cpu":
            return "float32"
        return ckpt
