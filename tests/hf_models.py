"""Checkpoints built with transformers itself (random weights, saved with safetensors).

Weights are redrawn with a scale that keeps logits O(1), so greedy decoding has clear winners
and tp=N vs transformers comparisons are not decided by rounding-level ties.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

# name -> (architecture, config kwargs, save kwargs)
MODELS = {
    # GQA 8 q over 2 kv heads: tp=3 cuts a group (uneven q->kv map), tp=4 > kv heads
    "llama_gqa": ("LlamaForCausalLM", dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, intermediate_size=200, vocab_size=256), {}),
    # q/k/v bias, tied embeddings, vocab 1001 that tp=2,3,4 do not divide
    "qwen2_tied": ("Qwen2ForCausalLM", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=160, vocab_size=1001, tie_word_embeddings=True), {}),
    # llama3 rope scaling (positions past original_max matter), explicit head_dim != hidden/heads
    "llama3_rope": (
        "LlamaForCausalLM",
        dict(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=32, intermediate_size=128, vocab_size=300,
            max_position_embeddings=256,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            rope_theta=500000.0,
        ),
        {},
    ),
    # several safetensors files with an index; MQA (1 kv head) replicated on every rank
    "llama_sharded": ("LlamaForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, intermediate_size=96, vocab_size=260), {"max_shard_size": "60KB"}),
    # Mistral with a window larger than the context we run (exact attention)
    "mistral": ("MistralForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=270, sliding_window=4096), {}),
}


# Mixture-of-experts models (tests/test_moe.py): 8 experts, so that --moe ep splits them unevenly
# at world 3; routers scaled by ROUTER_SCALE so that routing decisions are not near-ties
MOE_MODELS = {
    "mixtral": ("MixtralForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, vocab_size=300,
                                           num_local_experts=8, num_experts_per_tok=2), {}),
    # shared expert with its sigmoid gate, weights not renormalised, layer 1 dense (mlp_only_layers)
    "qwen2_moe": ("Qwen2MoeForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=300,
                                              num_hidden_layers=3, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                                              num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1]), {}),
    # renormalised top-4, every second layer sparse (decoder_sparse_step 2), no shared expert sizes
    "qwen2_moe_step": ("Qwen2MoeForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=80, vocab_size=300,
                                                   moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=4,
                                                   norm_topk_prob=True, decoder_sparse_step=2), {}),
    # per-head q/k norms, explicit head_dim
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=96, vocab_size=300,
                                              moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True), {}),
    # DeepSeek-V3: MLA with a q latent, interleaved RoPE, values (16) narrower than keys (16 + 8);
    # grouped sigmoid routing (top-2 of 4 groups, then top-4 of 16) with a correction bias, scaled
    # weights; a shared expert; layer 0 dense. num_key_value_heads is left at transformers' 128
    # (MLA does not read it)
    "deepseek_v3": ("DeepseekV3ForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=3, intermediate_size=96, vocab_size=300,
                                                  q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                                  n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=16, n_shared_experts=1,
                                                  n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True), {}),
    # Kimi K2's shape scaled down: one group, many small experts, top-8, a shared expert, layer 0
    # dense, YaRN (mscale_all_dim != mscale, so both the cos/sin factor and the softmax's mscale
    # count); a plain q_proj (no q latent), values as wide as keys, and RoPE not interleaved (the
    # other layout: together the two models run both q paths and both RoPE layouts)
    "kimi_like": ("DeepseekV3ForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, vocab_size=300,
                                                q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
                                                rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=16.0, original_max_position_embeddings=32,
                                                                     mscale=1.0, mscale_all_dim=0.8, beta_fast=32.0, beta_slow=1.0),
                                                rope_interleave=False, n_routed_experts=32, num_experts_per_tok=8, moe_intermediate_size=16,
                                                n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.827,
                                                norm_topk_prob=True), {}),
}
ROUTER_SCALE = 4.0


def _config(arch: str, kwargs: dict):
    import transformers

    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    base = dict(num_hidden_layers=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    base.update(kwargs)
    cfg = cls(**base)
    cfg.architectures = [arch]
    return cfg


def build(name: str, root: Path, seed: int = 0):
    """Builds checkpoint `name` (of MODELS or MOE_MODELS) under root/name; returns (path,
    transformers model in float32)."""
    import transformers

    arch, cfg_kwargs, save_kwargs = MODELS[name] if name in MODELS else MOE_MODELS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(_config(arch, cfg_kwargs)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2 and "embed_tokens" in pname:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:  # transformers 5 holds a MoE layer's experts as one [E, out, in] tensor
                scale = ROUTER_SCALE if pname.endswith("mlp.gate.weight") else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
            else:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):  # DeepSeek's router bias: a buffer, zero at init
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    path = root / name
    model.save_pretrained(path, **save_kwargs)
    return path, model


@torch.no_grad()
def reference(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """transformers float32: logits at every prompt position, and greedy tokens by full recompute."""
    logits, tokens = [], []
    for p in prompts:
        ids = torch.tensor([p])
        logits.append(model(ids).logits[0].float())
        out = []
        for _ in range(new_tokens):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        tokens.append(out)
    return logits, tokens
