"""DeepSeek-V3 / Kimi K2 (DeepseekV3ForCausalLM, model/mla.py) without processes: the config as
transformers writes it, refusals naming the key, the checkpoint names against transformers'
save_pretrained, the by-heads specs, placement's byte counts against the meta-built shard,
YaRN and the interleaved RoPE against transformers' own functions. Parity of whole models at
world 1-4 is in test_moe.py (hf_models.MOE_MODELS "deepseek_v3", "kimi_like").
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tp_runtime import kernels, placement, sharding
from tp_runtime.checkpoint.names import expected_tensors, is_ignored
from tp_runtime.config import ModelConfig
from tp_runtime.errors import ConfigError
from tp_runtime.model.kv_cache import KVCache
from tp_runtime.model.mla import MlaAttention, deinterleave
from tp_runtime.model.registry import linear_kinds, model_class
from tp_runtime.model.rope import inv_frequencies

TINY = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=3, intermediate_size=96, vocab_size=300, q_lora_rank=32, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=16,
            n_shared_experts=2, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5)


def hf_config(**kw):
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(**{**TINY, **kw})
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    return cfg


def raw_config(**kw) -> dict:
    """config.json as transformers writes it."""
    return json.loads(hf_config(**kw).to_json_string())


def test_config_as_transformers_writes_it():
    cfg = ModelConfig.from_dict(raw_config())
    mla, moe = cfg.mla, cfg.moe
    assert cfg.family == "deepseek_v3" and (mla.q_lora_rank, mla.kv_lora_rank, mla.v_head_dim, mla.rope_interleave) == (32, 16, 12, True)
    # head_dim is a key's size (config.json's head_dim is qk_rope_head_dim); no kv heads of its own
    assert (cfg.head_dim, cfg.rope_head_dim, cfg.num_kv_heads) == (24, 8, 4)
    assert mla.softmax_scale == 24**-0.5
    assert moe.sparse_layers == (False, True, True) and (moe.num_experts, moe.top_k, moe.intermediate_size) == (16, 4, 16)
    assert (moe.scoring, moe.n_group, moe.topk_group, moe.routed_scaling_factor, moe.norm_topk_prob, moe.correction_bias) == ("sigmoid", 4, 2, 2.5, True, True)
    assert moe.shared_intermediate_size == 32 and not moe.shared_expert_gate  # 2 shared experts as one MLP
    assert not ModelConfig.from_dict(raw_config(q_lora_rank=None, rope_interleave=False)).mla.rope_interleave


@pytest.mark.parametrize("change, match", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(v_head_dim=32), "v_head_dim 32 larger than"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim 7 must be even"),
    (dict(n_group=3), "n_group 3 must be a positive divisor of n_routed_experts"),
    (dict(n_group=16, topk_group=4), "groups of one expert"),
    (dict(topk_group=5), "topk_group 5 must be between 1 and n_group"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok 9 is more than the 2 groups"),
    (dict(moe_layer_freq=2), "moe_layer_freq 2"),
    (dict(kv_lora_rank=0), "kv_lora_rank must be a positive integer"),
])
def test_configs_it_cannot_run_are_refused_naming_the_key(change, match):
    raw = {**raw_config(), **change}
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(raw)


def test_yarn_only_where_parity_tested():
    raw = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=32, vocab_size=100,
               rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    with pytest.raises(ConfigError, match="rope type 'yarn' is supported for DeepseekV3ForCausalLM only"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("rope", [
    dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=0.8),
    dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0, beta_fast=32, beta_slow=1),  # DeepSeek-V3
    dict(rope_type="yarn", rope_theta=50000.0, factor=32.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0, beta_fast=1, beta_slow=1),  # Kimi K2
    dict(rope_type="yarn", rope_theta=10000.0, factor=8.0),  # transformers' defaults for the rest
    dict(rope_type="default", rope_theta=10000.0),
])
@pytest.mark.parametrize("rope_dim", [8, 64])
def test_rope_frequencies_and_scales_equal_transformers(rope, rope_dim):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    hf = hf_config(qk_rope_head_dim=rope_dim, max_position_embeddings=512, rope_parameters=dict(rope))
    cfg = ModelConfig.from_dict(json.loads(hf.to_json_string()))
    init = DeepseekV3RotaryEmbedding.compute_default_rope_parameters if rope["rope_type"] == "default" else ROPE_INIT_FUNCTIONS["yarn"]
    inv_freq, attention_factor = init(hf)
    assert torch.equal(inv_frequencies(cfg.rope, cfg.rope_head_dim), inv_freq)
    assert cfg.rope.attention_factor == attention_factor
    assert cfg.mla.softmax_scale == yarn_apply_mscale(hf.rope_parameters, (16 + rope_dim) ** -0.5)


def test_interleaved_rope_is_rotate_half_of_the_deinterleaved_pairs():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding, apply_rotary_pos_emb_interleave

    hf = hf_config(qk_rope_head_dim=16)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 16, generator=gen), torch.randn(2, 1, 5, 16, generator=gen)
    cos, sin = DeepseekV3RotaryEmbedding(hf)(q, torch.arange(3, 8)[None].expand(2, 5))
    want_q, want_k = apply_rotary_pos_emb_interleave(q, k, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    assert torch.allclose(kernels.apply_rope(deinterleave(q), cos, sin), want_q, atol=1e-6)
    assert torch.allclose(kernels.apply_rope(deinterleave(k), cos, sin), want_k, atol=1e-6)


@pytest.mark.parametrize("q_lora", [32, None])
def test_names_and_shapes_equal_transformers_save_pretrained(q_lora, tmp_path):
    from safetensors import safe_open
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    DeepseekV3ForCausalLM(hf_config(q_lora_rank=q_lora)).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    cfg = ModelConfig.from_model_dir(tmp_path)
    assert {e.hf_name: e.shape for e in expected_tensors(cfg)} == saved
    assert is_ignored("model.layers.3.eh_proj.weight", cfg)  # a multi-token-prediction layer after the last
    assert not is_ignored("model.layers.2.self_attn.kv_b_proj.weight", cfg)


def _meta_shard(cfg: ModelConfig, tp: int, rank: int, dtype: torch.dtype, quantize: str | None = None):
    with torch.device("meta"):
        return model_class(cfg)(cfg, SimpleNamespace(rank=rank, world_size=tp), dtype, 16, linear_kinds(quantize))


def _state_bytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


@pytest.mark.parametrize("q_lora", [32, None])
def test_heads_split_unevenly_and_placement_counts_every_byte(q_lora):
    cfg = ModelConfig.from_dict(raw_config(q_lora_rank=q_lora))
    n, nope, vd, qk = cfg.num_heads, cfg.mla.qk_nope_head_dim, cfg.mla.v_head_dim, cfg.head_dim
    assert cfg.num_params == sum(p.numel() for p in _meta_shard(cfg, 1, 0, torch.float32).parameters())
    for tp in (1, 2, 3, 4):
        covered = {"q": [], "kv": [], "o": []}
        for rank in range(tp):
            heads = sharding.head_layout(cfg, tp, rank)
            for role, key, per in (("q_b_proj" if q_lora else "q_proj", "q", qk), ("kv_b_proj", "kv", nope + vd), ("o_proj", "o", vd)):
                s = sharding.spec(role, "weight", cfg, tp, rank)
                assert (s.start, s.stop) == (heads.q_start * per, heads.q_stop * per), (tp, rank, role)
                covered[key].append((s.start, s.stop))
            for role in ("kv_a_proj", "kv_a_layernorm", "q_a_proj", "q_a_layernorm"):
                assert sharding.spec(role, "weight", cfg, tp, rank).dim is None  # replicated
            for dtype, quantize in (("float32", None), ("bfloat16", None), ("bfloat16", "int8")):
                model = _meta_shard(cfg, tp, rank, getattr(torch, dtype), quantize)
                s = placement.shard_bytes(cfg, tp, rank, dtype, max_seq_len=16, max_batch=2, quantize=quantize)
                assert list(s.layers) == [_state_bytes(layer) for layer in model.layers], (tp, rank, dtype, quantize)
                attn = model.layers[0].attn
                assert isinstance(attn, MlaAttention) and attn.kv_heads_local == heads.num_q_local
                cache = KVCache(cfg.num_layers, 2, attn.kv_heads_local, 16, cfg.head_dim, getattr(torch, dtype), torch.device("meta"))
                assert s.kv_cache == cache.nbytes
        for key, per in (("q", qk), ("kv", nope + vd), ("o", vd)):  # contiguous, disjoint, every head once
            ranges = covered[key]
            assert ranges[0][0] == 0 and ranges[-1][1] == n * per and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
