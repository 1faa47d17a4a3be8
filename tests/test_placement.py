"""placement.py: per-rank byte counts, tiers, layer assignment, smallest tp, and `tp-run plan`.

The byte counts are checked against the real model: every shard is built on the meta device
(no memory, no checkpoint) with a stand-in communicator, and its parameters (and, for int8,
the quantised buffers) are summed. The planner tests then take those verified counts and
check the tier arithmetic exactly. No processes are started; the CLI runs in-process.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from tp_runtime import placement, sol
from tp_runtime.cli import main
from tp_runtime.config import ModelConfig
from tp_runtime.errors import ConfigError
from tp_runtime.model.kv_cache import KVCache
from tp_runtime.model.quant import INT8, Int8ColumnParallelLinear, Int8RowParallelLinear
from tp_runtime.model.registry import linear_kinds
from tp_runtime.model.registry import model_class
from tp_runtime.placement import PlacementError, Tier
from tp_runtime.units import format_bytes, parse_bytes

import model_configs

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_raw(heads: int, kv_heads: int, layers: int = 2, **kw) -> dict:
    return model_configs.make_raw(heads, kv_heads, layers=layers, **kw)


def make_cfg(heads: int, kv_heads: int, **kw) -> ModelConfig:
    return ModelConfig.from_dict(make_raw(heads, kv_heads, **kw))


def build_meta(cfg: ModelConfig, tp: int, rank: int, dtype: str, max_seq_len: int = 16, quantize: str | None = None):
    """This rank's shard of the real model, on the meta device (shapes and dtypes, no data)."""
    comm = SimpleNamespace(rank=rank, world_size=tp)
    with torch.device("meta"):
        model = model_class(cfg)(cfg, comm, TORCH_DTYPES[dtype], max_seq_len, linear_kinds(quantize))
    return model


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def module_bytes(m: torch.nn.Module) -> int:
    """Parameters plus persistent buffers (int8 weights and scales), each counted once; the
    non-persistent index buffers (kv_head_of_q, keep, rotary tables) are not weights."""
    return sum(nbytes(t) for t in m.state_dict().values())


# (heads, kv_heads, tp, extra config): GQA with tp cutting a group, tp > kv heads, uneven
# head splits, MHA, vocab (101) and intermediate (37) never divisible by tp, tied and untied
# embeddings, qwen2's qkv bias, llama's attention_bias (qkv + o) and mlp_bias
SHARD_CASES = [
    (8, 2, 1, {}),
    (8, 2, 2, {}),
    (8, 2, 3, {}),  # group of 4 cut by tp=3
    (8, 2, 4, {}),  # tp > kv heads: kv heads replicated
    (8, 2, 8, {}),
    (12, 4, 5, {}),  # 12 heads over 5 ranks: 3,3,2,2,2
    (12, 4, 5, {"tie_word_embeddings": True}),
    (8, 2, 3, {"tie_word_embeddings": True}),
    (4, 4, 3, {}),  # MHA, uneven
    (8, 2, 3, {"architecture": "Qwen2ForCausalLM"}),  # qkv bias
    (12, 4, 5, {"architecture": "Qwen2ForCausalLM", "tie_word_embeddings": True}),
    (8, 2, 3, {"attention_bias": True, "mlp_bias": True}),  # qkv + o + mlp biases
    (6, 3, 4, {"vocab": 7, "hidden": 12}),  # tiny vocab: padded shards
]


def case_id(case) -> str:
    heads, kv, tp, extra = case
    tags = "-".join(f"{k}={v}" for k, v in extra.items())
    return f"h{heads}kv{kv}tp{tp}" + (f"-{tags}" if tags else "")


# ---------------------------------------------------------------------------------------------
# shard_bytes: exact against the real model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", SHARD_CASES, ids=case_id)
def test_shard_bytes_equal_real_parameters(case, dtype):
    heads, kv, tp, extra = case
    cfg = make_cfg(heads, kv, layers=3, **extra)
    nb = torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
    for rank in range(tp):
        s = placement.shard_bytes(cfg, tp, rank, dtype, max_seq_len=16, max_batch=2)
        model = build_meta(cfg, tp, rank, dtype)
        assert list(s.layers) == [module_bytes(layer) for layer in model.layers], (rank, s)
        assert s.embedding == nbytes(model.embed_tokens.weight), rank
        if cfg.tie_word_embeddings:
            assert model.lm_head.weight is model.embed_tokens.weight
            assert s.lm_head == 0
        else:
            assert s.lm_head == nbytes(model.lm_head.weight) > 0
        assert s.norm == nbytes(model.norm.weight) == cfg.hidden_size * nb
        # every unique parameter of the shard is counted exactly once
        assert s.weights == sum(nbytes(p) for p in model.parameters()), rank
        # the embedding is padded to the largest vocab shard, on every rank
        assert s.embedding == -(-cfg.vocab_size // tp) * cfg.hidden_size * nb


@pytest.mark.parametrize("case", SHARD_CASES, ids=case_id)
def test_shard_bytes_int8_equal_quantized_model(case):
    """int8: linear weights 1 byte per element + one scale per output row in the activation
    dtype; the embedding and LM head 1 byte per element + a float32 scale per (padded) vocab
    row, one table when tied; biases and norms stay in float."""
    heads, kv, tp, extra = case
    cfg = make_cfg(heads, kv, **extra)
    rows = -(-cfg.vocab_size // tp)
    for dtype in ("bfloat16", "float32"):
        for rank in range(tp):
            s = placement.shard_bytes(cfg, tp, rank, dtype, 16, 1, quantize="int8")
            model = build_meta(cfg, tp, rank, dtype, quantize="int8")
            assert list(s.layers) == [module_bytes(layer) for layer in model.layers], (dtype, rank)
            assert (s.embedding, s.lm_head) == (module_bytes(model.embed_tokens), module_bytes(model.lm_head))
            assert s.weights == sum(module_bytes(m) for m in (model.embed_tokens, model.norm, model.lm_head, *model.layers))
            float_s = placement.shard_bytes(cfg, tp, rank, dtype, 16, 1)
            assert s.embedding == rows * (cfg.hidden_size + 4) < float_s.embedding
            assert s.lm_head == (0 if cfg.tie_word_embeddings else s.embedding) and s.norm == float_s.norm
            assert s.layers[0] < float_s.layers[0]


@pytest.mark.parametrize("tied", [False, True])
def test_shard_bytes_int4_count_q8_0_vocab_tables(tied):
    """int4: the embedding and LM head are Q8_0 blocks (34 bytes per 32 values, padded rows
    included), allocated with the meta-built model; one table when tied."""
    cfg = make_cfg(8, 2, hidden=64, head_dim=32, inter=64, tie_word_embeddings=tied)
    for tp in (1, 2, 3):
        for rank in range(tp):
            s = placement.shard_bytes(cfg, tp, rank, "bfloat16", 16, 1, quantize="int4")
            model = build_meta(cfg, tp, rank, "bfloat16", quantize="int4")
            assert s.embedding == module_bytes(model.embed_tokens) == -(-cfg.vocab_size // tp) * 64 // 32 * 34
            assert s.lm_head == module_bytes(model.lm_head) == (0 if tied else s.embedding)


def test_shard_bytes_int8_real_cpu_model():
    """The same on a materialised CPU model, quantised by the runtime's own code."""
    cfg = make_cfg(8, 2, architecture="Qwen2ForCausalLM")
    tp, rank, dtype = 3, 1, "bfloat16"
    model = model_class(cfg)(cfg, SimpleNamespace(rank=rank, world_size=tp), torch.bfloat16, 16, INT8)
    assert sum(isinstance(m, (Int8ColumnParallelLinear, Int8RowParallelLinear)) for m in model.modules()) == 4 * cfg.num_layers
    s = placement.shard_bytes(cfg, tp, rank, dtype, 16, 1, quantize="int8")
    assert list(s.layers) == [module_bytes(layer) for layer in model.layers]
    for layer in model.layers:
        lin = layer.attn.qkv_proj
        assert lin.qweight.dtype == torch.int8 and lin.scales.dtype == torch.bfloat16
        assert lin.scales.shape == (lin.qweight.shape[0],)


# mixture-of-experts shapes: every layer MoE (Mixtral); a shared expert with its gate and a dense
# layer between MoE ones (Qwen2-MoE's mlp_only_layers); MLA with a dense first layer, grouped
# routing with the correction bias (DeepSeek-V3). Expert intermediate sizes no tp divides.
MOE_RAWS = {
    "mixtral": make_raw(4, 2, layers=2, inter=10, architecture="MixtralForCausalLM", num_local_experts=5, num_experts_per_tok=2),
    "qwen2_moe": make_raw(4, 2, layers=3, inter=37, architecture="Qwen2MoeForCausalLM", num_experts=5, num_experts_per_tok=2,
                          moe_intermediate_size=11, shared_expert_intermediate_size=14, mlp_only_layers=[1]),
    "deepseek_v3": make_raw(4, 4, layers=3, inter=37, architecture="DeepseekV3ForCausalLM", q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=4,
                            qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=7,
                            n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1),
}
MOE_SPLITS = {"tp": dict(moe="tp"), "ep": dict(moe="ep"), "dp": dict(moe="ep", attention="dp")}


def moe_cfg(name: str, split: str, layers: int | None = None) -> ModelConfig:
    from tp_runtime.config import RuntimeConfig

    raw = dict(MOE_RAWS[name], **({"num_hidden_layers": layers} if layers else {}))
    return RuntimeConfig(**MOE_SPLITS[split]).split_config(ModelConfig.from_dict(raw))


def build_meta_moe(cfg: ModelConfig, tp: int, rank: int, dtype: str, quantize: str | None = None):
    """build_meta for any split: --attention dp gives the dense parts a world of 1."""
    comm = SimpleNamespace(rank=rank, world_size=tp)
    dense = SimpleNamespace(rank=0, world_size=1) if cfg.moe.data_parallel else None
    with torch.device("meta"):
        return model_class(cfg)(cfg, comm, TORCH_DTYPES[dtype], 16, linear_kinds(quantize), dense_comm=dense)


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("split", list(MOE_SPLITS))
@pytest.mark.parametrize("name", list(MOE_RAWS))
def test_shard_bytes_equal_real_parameters_moe(name, split, quantize):
    """A MoE layer's bytes, and of them its routed experts' (what streams first), exact against
    the meta-built shard at tp 1-3 (ep: uneven expert counts; tp: uneven expert slices)."""
    cfg = moe_cfg(name, split)
    for tp in (1, 2, 3):
        for rank in range(tp):
            s = placement.shard_bytes(cfg, tp, rank, "bfloat16", 16, 2, quantize=quantize)
            model = build_meta_moe(cfg, tp, rank, "bfloat16", quantize)
            where = (tp, rank)
            assert list(s.layers) == [module_bytes(layer) for layer in model.layers], where
            experts = [module_bytes(layer.mlp.experts) if cfg.moe.sparse_layers[i] else 0 for i, layer in enumerate(model.layers)]
            assert list(s.experts) == experts and any(experts), where
            moe_layer = model.layers[cfg.moe.sparse_layers.index(True)]
            assert s.local_experts == len(moe_layer.mlp.experts) and s.one_expert == module_bytes(next(iter(moe_layer.mlp.experts.values()))), where
            assert [s.core(i) for i in range(cfg.num_layers)] == [module_bytes(layer) - x for layer, x in zip(model.layers, experts)]
            head = 0 if cfg.tie_word_embeddings else module_bytes(model.lm_head)  # a tied float head holds the embedding's weight
            assert s.weights == sum(module_bytes(m) for m in (model.embed_tokens, model.norm, *model.layers)) + head, where


def _staging_bytes(model, plan, device_type: str) -> int:
    """What engine/offload.py builds for `plan`: a staging layer per kind (experts left out), and
    the staging experts; built on meta, summed."""
    from tp_runtime.checkpoint.layer_state import weight_tensors
    from tp_runtime.model.offload import build_expert_staging, build_staging

    kinds = placement.layer_kinds(model.cfg)
    count = 2 if device_type == "cuda" else 1
    mods = [m for k in plan.staging_kinds for m in build_staging(model.make_layer, count, torch.device("meta"), kinds.index(k))]
    if plan.experts_streamed:
        mods += build_expert_staging(model.make_layer, plan.experts_streamed[0], plan.staged_experts, torch.device("meta"))
    return sum(nbytes(t) for m in mods for t in weight_tensors(m).values())


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("split, tp", [("tp", 1), ("ep", 2), ("tp", 3), ("dp", 2)])
@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_plan_streams_experts_before_layers(name, split, tp, device_type):
    """Between the total and the minimum, on every rank: first the routed experts of the last
    MoE layers leave the fastest tier (every core stays), the most MoE layers' experts kept that
    fit; only with every layer's experts out do whole layers (their cores) stream. Every byte
    count is the meta-built model's: what stays resident, what streams, the staging."""
    cfg = moe_cfg(name, split, layers=6)
    moe_layers = [i for i, sparse in enumerate(cfg.moe.sparse_layers) if sparse]
    fast = "host" if device_type == "cpu" else "device"
    for rank in range(tp):
        s = placement.shard_bytes(cfg, tp, rank, "float32", SEQ, BATCH)
        full = build_meta_moe(cfg, tp, rank, "float32")
        staging: dict = {}
        # a layer stripped of its experts holds what its module holds less its experts' module
        stripped = build_meta_moe(cfg, tp, rank, "float32")
        for i in moe_layers:
            stripped.layers[i].mlp.stream_experts(None)
        layer_bytes = [module_bytes(layer) for layer in full.layers]
        expert_bytes = [layer_bytes[i] - module_bytes(stripped.layers[i]) for i in range(cfg.num_layers)]
        assert expert_bytes == [module_bytes(full.layers[i].mlp.experts) if i in moe_layers else 0 for i in range(cfg.num_layers)]
        stage = min(cfg.moe.top_k, s.local_experts) * s.one_expert
        cores = sum(s.core(i) for i in range(cfg.num_layers))
        total = _fixed(s) + sum(s.layers)
        low = _fixed(s) + stage
        caps = {total - 1, low + cores + s.experts[moe_layers[0]], low + cores, low + cores - 1}
        caps |= {low + (total - low) * f // 12 for f in range(12)}
        phases = set()
        for cap in sorted(caps):
            tiers = cpu_tiers(cap) if device_type == "cpu" else gpu_tiers(cap, total)
            try:
                p = placement.plan_rank(cfg, tp, rank, "float32", SEQ, BATCH, device_type, tiers)
            except PlacementError:
                continue
            where = (rank, cap)
            assert p.used(fast) <= cap, where
            out = p.experts_streamed
            assert out == moe_layers[len(moe_layers) - len(out):], where  # the last MoE layers' experts leave first
            assert p.staged_experts == min(cfg.moe.top_k, s.local_experts)
            if p.streamed:  # whole layers only once every layer's experts are out
                phases.add("whole")
                assert out == moe_layers, where
                assert set(p.staging_kinds) >= {placement.layer_kinds(cfg)[i] for i in p.streamed}
            else:
                phases.add("experts")
                assert p.staging_kinds == () and p.fixed["staging"] == stage, where
                # the most MoE layers' experts kept: one more would not fit
                if out:
                    assert p.used(fast) + s.experts[out[0]] > cap, where
            # the split, in the meta-built model's bytes: resident layers (experts left out where
            # they stream) + fixed = used; the streamed tiers hold the cores and experts it left out
            resident = sum(layer_bytes[i] - (expert_bytes[i] if i in out else 0) for i in range(cfg.num_layers) if i not in p.streamed)
            assert resident == p.layer_bytes_on(fast), where
            assert sum(expert_bytes[i] for i in out) == sum(p.expert_bytes_on(t.name) for t in p.tiers[1:]) == sum(s.experts[i] for i in out), where
            key = (p.staging_kinds, bool(out))
            staging.setdefault(key, _staging_bytes(full, p, device_type))
            assert p.fixed["staging"] == staging[key], where
            assert sum(p.layer_bytes_on(t.name) for t in p.tiers) == sum(s.layers), where
            rows = placement.plan_rows(p)
            assert sum(r["num_expert_layers"] for r in rows) == len(moe_layers) and sum(r["expert_bytes"] for r in rows) == sum(s.experts)
        assert phases == {"experts", "whole"}, (rank, caps)


def test_plan_text_names_the_streamed_experts():
    cfg = moe_cfg("qwen2_moe", "ep")
    s = placement.shard_bytes(cfg, 2, 0, "float32", SEQ, BATCH)
    cap = _fixed(s) + min(cfg.moe.top_k, s.local_experts) * s.one_expert + sum(s.core(i) for i in range(cfg.num_layers)) + s.experts[0]
    p = placement.plan_rank(cfg, 2, 0, "float32", SEQ, BATCH, "cpu", cpu_tiers(cap))
    assert p.streamed == [] and p.experts_streamed == [2]
    text = placement.format_plan([p])
    assert "experts" in text.splitlines()[0] and "routed experts streamed: 1 of 2 MoE layers' (2, " in text
    host, disk = placement.plan_rows(p)
    assert (host["layers"], host["expert_layers"], disk["layers"], disk["expert_layers"]) == ("0-2", "0", "-", "2")
    assert disk["expert_bytes"] == s.experts[2] == p.disk_read_bytes
    # a decode step reads top-k of a streamed layer's experts: faster than reading them all
    assert p.expert_share == cfg.moe.top_k * BATCH / cfg.moe.num_experts < 1
    everything = placement.RankPlan(0, 2, "cpu", s, p.tiers, p.layer_tier, p.fixed, expert_tier=p.expert_tier)
    assert p.decode_seconds(page_cache=False) < everything.decode_seconds(page_cache=False)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", SHARD_CASES, ids=case_id)
def test_kv_cache_bytes_equal_kvcache(case, dtype):
    heads, kv, tp, extra = case
    cfg = make_cfg(heads, kv, layers=3, **extra)
    seq, batch = 24, 3
    for rank in range(tp):
        s = placement.shard_bytes(cfg, tp, rank, dtype, seq, batch)
        model = build_meta(cfg, tp, rank, dtype, seq)
        kv_local = model.layers[0].attn.kv_heads_local
        cache = KVCache(cfg.num_layers, batch, kv_local, seq, cfg.head_dim, TORCH_DTYPES[dtype], torch.device("meta"))
        assert s.kv_cache == cache.nbytes, rank
        nb = torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
        assert s.kv_cache == 2 * cfg.num_layers * batch * kv_local * seq * cfg.head_dim * nb


def test_shard_bytes_kv_replicated_when_tp_exceeds_kv_heads():
    cfg = make_cfg(8, 2)
    one = placement.shard_bytes(cfg, 1, 0, "float32", 16, 1).kv_cache
    # tp=8 over 2 kv heads: each rank holds one whole kv head -> half the tp=1 cache, not 1/8
    assert [placement.shard_bytes(cfg, 8, r, "float32", 16, 1).kv_cache for r in range(8)] == [one // 2] * 8
    # tp=3 cuts the group of 4: rank 1 (q heads 3..5) reads both kv heads
    assert [placement.shard_bytes(cfg, 3, r, "float32", 16, 1).kv_cache for r in range(3)] == [one // 2, one, one // 2]


def test_activations_scale_and_cover_logits():
    cfg = make_cfg(8, 2)
    a1 = placement.shard_bytes(cfg, 2, 0, "float32", 16, 1).activations
    a2 = placement.shard_bytes(cfg, 2, 0, "float32", 16, 2).activations
    assert a2 == 2 * a1  # linear in the batch
    assert placement.shard_bytes(cfg, 2, 0, "float32", 32, 1).activations > a1
    # at least the fp32 logits of every sequence and the hidden states of a full prefill
    assert a1 >= cfg.vocab_size * 4 + 16 * cfg.hidden_size * 4


# ---------------------------------------------------------------------------------------------
# plan_rank


def _fixed(s: placement.ShardBytes) -> int:
    return s.kv_cache + s.activations + s.embedding + s.lm_head + s.norm


PLAN_CFG = dict(heads=8, kv=2, layers=6)
SEQ, BATCH = 32, 2


def plan_cfg() -> ModelConfig:
    return make_cfg(PLAN_CFG["heads"], PLAN_CFG["kv"], layers=PLAN_CFG["layers"])


def cpu_tiers(host: int, mem_Bps: float = 34e9, disk_Bps: float = 3e9) -> list[Tier]:
    return [Tier("host", host, mem_Bps), Tier("disk", None, disk_Bps)]


def gpu_tiers(device: int, host: int) -> list[Tier]:
    return [Tier("device", device, 3.35e12), Tier("host", host, 25e9), Tier("disk", None, 3e9)]


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_plan_everything_fits(device_type):
    cfg = plan_cfg()
    s = placement.shard_bytes(cfg, 2, 1, "float32", SEQ, BATCH)
    total = _fixed(s) + sum(s.layers)
    fast = "host" if device_type == "cpu" else "device"
    for cap in (total, total + 1, 10 * total):
        tiers = cpu_tiers(cap) if device_type == "cpu" else gpu_tiers(cap, 1)
        p = placement.plan_rank(cfg, 2, 1, "float32", SEQ, BATCH, device_type, tiers)
        assert p.layer_tier == [fast] * cfg.num_layers
        assert p.fixed["staging"] == 0 and p.host_staging == 0
        assert p.streamed == [] and p.streamed_fraction == 0.0
        assert p.used(fast) == total <= cap
        for t in p.tiers[1:]:
            assert p.used(t.name) == 0
    # unbounded fast tier: everything resident
    p = placement.plan_rank(cfg, 2, 1, "float32", SEQ, BATCH, "cpu", [Tier("host", None, 1e9), Tier("disk", None, 1e9)])
    assert p.layer_tier == ["host"] * cfg.num_layers


@pytest.mark.parametrize("device_type, staging", [("cpu", 1), ("cuda", 2)])
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_plan_prefix_resident(device_type, staging, rank):
    """Between the minimum and the total: the first k layers stay, k the largest that fits."""
    cfg = plan_cfg()
    tp = 3
    s = placement.shard_bytes(cfg, tp, rank, "float32", SEQ, BATCH)
    L = s.layers[0]
    assert set(s.layers) == {L}
    n = cfg.num_layers
    fixed = _fixed(s)
    total = fixed + n * L
    minimum = fixed + staging * L
    assert minimum < total
    caps = {minimum, minimum + 1, minimum + L - 1, minimum + L, minimum + 2 * L + L // 2, total - L, total - 1}
    caps |= {minimum + (total - minimum) * f // 7 for f in range(7)}
    fast = "host" if device_type == "cpu" else "device"
    for cap in sorted(c for c in caps if minimum <= c < total):
        tiers = cpu_tiers(cap) if device_type == "cpu" else gpu_tiers(cap, 10 * total)
        p = placement.plan_rank(cfg, tp, rank, "float32", SEQ, BATCH, device_type, tiers)
        k = (cap - minimum) // L
        assert 0 <= k < n
        assert minimum + k * L <= cap < minimum + (k + 1) * L
        slow = "disk" if device_type == "cpu" else "host"
        assert p.layer_tier == [fast] * k + [slow] * (n - k), (cap, k)
        assert p.fixed == {"kv_cache": s.kv_cache, "activations": s.activations, "embedding": s.embedding, "lm_head": s.lm_head, "norm": s.norm, "staging": staging * L}
        assert p.streamed == list(range(k, n))
        assert p.streamed_fraction == pytest.approx((n - k) / n)
        assert p.host_staging == 0  # no disk layers on the GPU (host is big enough)
        for t in p.tiers:
            if t.capacity is not None:
                assert p.used(t.name) <= t.capacity, (cap, t.name)
        assert p.used(fast) == minimum + k * L


def test_plan_gpu_three_tiers():
    """device layers first, then host, then disk; a pinned host buffer of one layer when any
    layer is read from disk, counted on the host tier."""
    cfg = make_cfg(8, 2, layers=10)
    tp, rank = 2, 0
    s = placement.shard_bytes(cfg, tp, rank, "bfloat16", SEQ, BATCH)
    L, n = s.layers[0], cfg.num_layers
    minimum = _fixed(s) + 2 * L
    seen = set()
    for kd in range(0, n - 2):  # n - 2 resident would be everything (the staging is 2 layers)
        for host_cap in (L - 1, L, 2 * L - 1, 2 * L, 3 * L + 5, 5 * L, (n - kd) * L - 1, (n - kd) * L, (n - kd + 1) * L):
            if host_cap < L:
                continue  # below one layer: see test_plan_gpu_host_budget_below_staging
            dev_cap = minimum + kd * L + L // 3
            p = placement.plan_rank(cfg, tp, rank, "bfloat16", SEQ, BATCH, "cuda", gpu_tiers(dev_cap, host_cap))
            kh_all = host_cap // L
            if kd + kh_all >= n:  # no disk layers: no host staging
                kh, staged = n - kd, 0
            else:
                kh, staged = (host_cap - L) // L, L
            kdisk = n - kd - kh
            assert p.layer_tier == ["device"] * kd + ["host"] * kh + ["disk"] * kdisk, (kd, host_cap)
            assert p.host_staging == staged
            assert p.used("host") == kh * L + staged <= host_cap
            assert p.used("device") == minimum + kd * L <= dev_cap
            assert p.used("disk") == kdisk * L
            assert p.streamed == list(range(kd, n))
            rows = placement.plan_rows(p)
            assert [r["tier"] for r in rows] == ["device", "host", "disk"]
            assert [r["num_layers"] for r in rows] == [kd, kh, kdisk]
            assert rows[0]["kv_cache"] == s.kv_cache and rows[1]["kv_cache"] == rows[2]["kv_cache"] == 0
            assert rows[1]["headroom"] == host_cap - p.used("host") and rows[2]["headroom"] is None
            seen.add((kd > 0, kh > 0, kdisk > 0))
    assert (True, True, True) in seen and (False, False, True) in seen and (True, True, False) in seen


def test_plan_gpu_host_budget_below_staging():
    cfg = make_cfg(8, 2, layers=6)
    s = placement.shard_bytes(cfg, 1, 0, "float32", 16, 1)
    L = s.layers[0]
    dev_cap = _fixed(s) + 2 * L + 2 * L  # two layers resident on the device, the rest streamed
    host_cap = L // 2  # not even the pinned staging buffer of one disk layer fits
    try:
        p = placement.plan_rank(cfg, 1, 0, "float32", 16, 1, "cuda", gpu_tiers(dev_cap, host_cap))
    except PlacementError as e:
        assert "--max-host-memory" in str(e)
    else:
        assert p.used("host") <= host_cap, f"host used {p.used('host')} > capacity {host_cap}, plan accepted"


@pytest.mark.parametrize("device_type, flag, other, label", [("cpu", "--max-host-memory", "--max-device-memory", "host RAM"), ("cuda", "--max-device-memory", "--max-host-memory", "device memory")])
def test_plan_below_minimum_raises(device_type, flag, other, label):
    # 12 heads over tp=5: ranks 0, 1 hold 3 heads, ranks 2-4 hold 2 -> different minimums
    cfg = make_cfg(12, 4, layers=4)
    tp = 5
    staging = 1 if device_type == "cpu" else 2
    minimum = {}
    for r in range(tp):
        s = placement.shard_bytes(cfg, tp, r, "float32", SEQ, BATCH)
        minimum[r] = _fixed(s) + staging * max(s.layers)
    assert minimum[0] > minimum[4]
    cap = minimum[4]  # exactly rank 4's minimum: rank 4 plans, rank 0 cannot
    tiers = cpu_tiers(cap) if device_type == "cpu" else gpu_tiers(cap, 10**9)
    p4 = placement.plan_rank(cfg, tp, 4, "float32", SEQ, BATCH, device_type, tiers)
    assert p4.streamed == list(range(cfg.num_layers)) and p4.used(p4.fast.name) == cap
    for rank in (0, 1):
        with pytest.raises(PlacementError) as info:
            placement.plan_rank(cfg, tp, rank, "float32", SEQ, BATCH, device_type, tiers)
        msg = str(info.value)
        assert isinstance(info.value, ConfigError)
        assert f"rank {rank} of tp={tp}" in msg
        assert f"{format_bytes(minimum[rank] - cap)} missing" in msg
        assert f"needs at least {format_bytes(minimum[rank])} in {label}" in msg
        assert f"allows {format_bytes(cap)}" in msg and flag in msg
        assert flag in msg and other not in msg
        assert "--tp" in msg and "--max-seq-len" in msg


def test_plan_below_minimum_names_kv_cache():
    cfg = make_cfg(8, 2)
    s = placement.shard_bytes(cfg, 1, 0, "float32", 4096, 8)
    with pytest.raises(PlacementError, match=re.escape(f"kv cache {format_bytes(s.kv_cache)}")):
        placement.plan_rank(cfg, 1, 0, "float32", 4096, 8, "cpu", cpu_tiers(s.kv_cache))


# ---------------------------------------------------------------------------------------------
# smallest_tp


def _rank_need(cfg, tp, r, dtype, seq, batch, quantize=None) -> int:
    s = placement.shard_bytes(cfg, tp, r, dtype, seq, batch, quantize)
    return s.weights + s.kv_cache + s.activations


def _fits(cfg, tp, budget, dtype, seq, batch, quantize=None) -> bool:
    return all(_rank_need(cfg, tp, r, dtype, seq, batch, quantize) <= budget for r in range(tp))


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("heads, kv, extra", [(8, 2, {}), (12, 4, {"tie_word_embeddings": True}), (6, 6, {"inter": 301, "hidden": 48})])
def test_smallest_tp(heads, kv, extra, quantize):
    cfg = make_cfg(heads, kv, layers=4, **extra)
    dtype, seq, batch = "bfloat16", 8, 1
    worst = {tp: max(_rank_need(cfg, tp, r, dtype, seq, batch, quantize) for r in range(tp)) for tp in range(1, heads + 1)}
    found = set()
    for budget in sorted(set(worst.values()) | {v - 1 for v in worst.values()} | {10**12}):
        tp = placement.smallest_tp(cfg, dtype, seq, batch, budget, quantize)
        if tp is None:
            assert not any(_fits(cfg, t, budget, dtype, seq, batch, quantize) for t in range(1, heads + 1)), budget
            continue
        found.add(tp)
        assert _fits(cfg, tp, budget, dtype, seq, batch, quantize), (budget, tp)
        assert not any(_fits(cfg, t, budget, dtype, seq, batch, quantize) for t in range(1, tp)), (budget, tp)
        # consistent with plan_rank: at tp every rank is all resident, at tp - 1 some rank is not
        for r in range(tp):
            p = placement.plan_rank(cfg, tp, r, dtype, seq, batch, "cpu", cpu_tiers(budget), quantize)
            assert p.streamed == []
        if tp > 1:
            streams = []
            for r in range(tp - 1):
                try:
                    streams.append(bool(placement.plan_rank(cfg, tp - 1, r, dtype, seq, batch, "cpu", cpu_tiers(budget), quantize).streamed))
                except PlacementError:
                    streams.append(True)
            assert any(streams), (budget, tp)
    assert 1 in found and len(found) >= 3, found


def test_smallest_tp_none_when_nothing_fits():
    cfg = make_cfg(8, 2)
    least = min(max(_rank_need(cfg, tp, r, "float32", 16, 1) for r in range(tp)) for tp in range(1, 9))
    assert placement.smallest_tp(cfg, "float32", 16, 1, least - 1) is None
    assert placement.smallest_tp(cfg, "float32", 16, 1, 1) is None
    assert placement.smallest_tp(cfg, "float32", 16, 1, least) is not None


# ---------------------------------------------------------------------------------------------
# decode_seconds


def test_decode_seconds_cpu_more_streamed_is_slower():
    cfg = make_cfg(8, 2, layers=8)
    s = placement.shard_bytes(cfg, 1, 0, "float32", 16, 1)
    L, n = s.layers[0], cfg.num_layers
    minimum = _fixed(s) + L
    for page_cache in (True, False):
        times = []
        # resident layers, from all to none (n - 1 is never a plan: its staging makes it n)
        for k in [n, *range(n - 2, -1, -1)]:
            cap = _fixed(s) + n * L if k == n else minimum + k * L
            p = placement.plan_rank(cfg, 1, 0, "float32", 16, 1, "cpu", cpu_tiers(cap))
            assert len(p.streamed) == n - k
            times.append(p.decode_seconds(page_cache))
        assert all(a < b for a, b in zip(times, times[1:])), (page_cache, times)
        assert times[0] == pytest.approx(s.weights / 34e9)  # all resident: one read of the weights


def test_decode_seconds_page_cache_vs_disk():
    cfg = make_cfg(8, 2, layers=4)
    s = placement.shard_bytes(cfg, 1, 0, "float32", 16, 1)
    cap = _fixed(s) + 2 * s.layers[0]  # one resident layer, three read from disk
    mem = 34e9
    slow_disk = placement.plan_rank(cfg, 1, 0, "float32", 16, 1, "cpu", cpu_tiers(cap, mem, disk_Bps=mem / 2 / 10))
    assert slow_disk.layer_bytes_on("disk") == 3 * s.layers[0]
    assert slow_disk.decode_seconds(page_cache=False) > slow_disk.decode_seconds(page_cache=True)
    disk = slow_disk.layer_bytes_on("disk")
    assert slow_disk.decode_seconds(False) == pytest.approx(s.weights / mem + disk / (mem / 20))
    assert slow_disk.decode_seconds(True) == pytest.approx(s.weights / mem + disk / (mem / 2))
    fast_disk = placement.plan_rank(cfg, 1, 0, "float32", 16, 1, "cpu", cpu_tiers(cap, mem, disk_Bps=mem))
    assert fast_disk.decode_seconds(page_cache=False) < fast_disk.decode_seconds(page_cache=True)
    # GPU: disk layers go disk -> pinned host -> device; a slow disk is slower than the page cache
    g = placement.shard_bytes(cfg, 1, 0, "bfloat16", 16, 1)
    tiers = [Tier("device", _fixed(g) + 3 * g.layers[0], 3.35e12), Tier("host", g.layers[0], 25e9), Tier("disk", None, 1e9)]
    p = placement.plan_rank(cfg, 1, 0, "bfloat16", 16, 1, "cuda", tiers)
    assert p.layers_on("disk") == [1, 2, 3] and p.host_staging == g.layers[0]
    assert p.decode_seconds(False) > p.decode_seconds(True) >= g.weights / 3.35e12


# ---------------------------------------------------------------------------------------------
# parse_bytes / format_bytes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8GiB", 8 * 2**30), ("8G", 8 * 2**30), ("8g", 8 * 2**30), ("8 GiB", 8 * 2**30), (" 8gib ", 8 * 2**30),
        ("512MiB", 512 * 2**20), ("512M", 512 * 2**20), ("1K", 1024), ("1KiB", 1024), ("1T", 2**40), ("2TiB", 2 * 2**40),
        ("1.5GiB", 3 * 2**29), ("0.5M", 2**19),
        ("500MB", 500_000_000), ("10GB", 10_000_000_000), ("1kB", 1000), ("1TB", 10**12), ("2.5GB", 2_500_000_000),
        ("123", 123), ("123B", 123), ("0", 0), ("1e3", 1000), ("4096b", 4096), (".5K", 512),
    ],
)
def test_parse_bytes(text, expected):
    got = parse_bytes(text)
    assert got == expected and isinstance(got, int)


@pytest.mark.parametrize("text", ["", "   ", "abc", "G", "8XB", "8 GiBs", "-1G", "1.2.3G", "8 G B", "eight GiB", "8GiB/s", "0x10", None])
def test_parse_bytes_bad_input(text):
    with pytest.raises(ConfigError) as info:
        parse_bytes(text)
    msg = str(info.value)
    assert repr(text) in msg and "cannot read size" in msg
    assert "GiB" in msg and "MB" in msg  # names the units it takes


@pytest.mark.parametrize("text, expected", [("2.01KB", 2010), ("2.01MB", 2_010_000), ("2.03GB", 2_030_000_000)])
def test_parse_bytes_decimal_exact(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_overflow_is_config_error():
    with pytest.raises(ConfigError):
        parse_bytes("1e400")


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (2**20, "1.0 MiB"),
        (12345678, "11.8 MiB"), (8 * 2**30, "8.0 GiB"), (3 * 2**40, "3.0 TiB"), (2**50, "1024.0 TiB"), (-2048, "-2.0 KiB"), (-5, "-5 B"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("n", [1, 999, 4096, 10**6, 123456789, 7 * 2**30 + 12345, 10**13])
def test_format_parse_round_trip(n):
    back = parse_bytes(format_bytes(n))
    assert abs(back - n) <= 0.05 * n, (n, format_bytes(n), back)


# ---------------------------------------------------------------------------------------------
# model_facts


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_facts_match_real_model(tied, dtype):
    cfg = make_cfg(8, 2, layers=3, tie_word_embeddings=tied)
    model = build_meta(cfg, 1, 0, dtype)
    params = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    embedding = cfg.vocab_size * cfg.hidden_size
    f = placement.model_facts(cfg, dtype)
    assert f["parameters"] == params
    assert f["parameters"] == cfg.num_params
    untied = placement.model_facts(make_cfg(8, 2, layers=3, tie_word_embeddings=False), dtype)["parameters"]
    assert untied - f["parameters"] == (embedding if tied else 0)
    nb = placement.DTYPE_BYTES[dtype]
    assert f["weight_bytes"] == params * nb == sum(nbytes(p) for p in model.parameters())
    # 2 FLOPs per multiplied weight: everything but the (looked-up) embedding table, the LM
    # head included (when tied, the table is the head and is multiplied)
    embed = cfg.vocab_size * cfg.hidden_size
    assert f["flops_per_token"] == 2 * (f["parameters"] - embed + (embed if cfg.tie_word_embeddings else 0))
    assert f["chinchilla_tokens"] == 20 * f["parameters"]
    assert f["chinchilla_training_flops"] == pytest.approx(6 * f["parameters"] * 20 * f["parameters"])
    cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, 1, cfg.head_dim, TORCH_DTYPES[dtype], torch.device("meta"))
    assert f["kv_bytes_per_token"] == cache.nbytes


def test_model_facts_leave_out_biases():
    """Documented (sol.ModelShape.from_config): qwen2's qkv biases are not counted."""
    cfg = make_cfg(8, 2, layers=3, architecture="Qwen2ForCausalLM")
    model = build_meta(cfg, 1, 0, "float32")
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    assert biases == cfg.num_layers * (cfg.q_size + 2 * cfg.kv_size)
    assert placement.model_facts(cfg, "float32")["parameters"] == sum(p.numel() for p in model.parameters()) - biases


# ---------------------------------------------------------------------------------------------
# tp-run plan


CLI_SEQ = 64


@pytest.fixture()
def plan_model(tmp_path):
    """A model folder with config.json only: `plan` reads nothing else."""
    raw = make_raw(8, 2, hidden=32, inter=53, vocab=301, layers=6)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path, ModelConfig.from_dict(raw)


def _cpu_budget(cfg: ModelConfig, tp: int, resident: int) -> int:
    """A host budget with which every rank keeps exactly `resident` layers."""
    caps = []
    for r in range(tp):
        s = placement.shard_bytes(cfg, tp, r, "float32", CLI_SEQ, 1)
        caps.append(_fixed(s) + (1 + resident) * max(s.layers))
    return max(caps)


def test_plan_cli_json_matches_plan_rank(plan_model, capsys):
    folder, cfg = plan_model
    tp = 2
    budget = _cpu_budget(cfg, tp, resident=2)
    rc = main(["plan", "--model", str(folder), "--tp", str(tp), "--device", "cpu", "--max-host-memory", str(budget), "--max-seq-len", str(CLI_SEQ), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    got = json.loads(out)
    assert (got["tp"], got["device"], got["dtype"], got["max_seq_len"], got["max_batch_size"]) == (tp, "cpu", "float32", CLI_SEQ, 1)
    tiers = placement.make_tiers("cpu", None, budget, sol.load_hardware("this-cpu"))
    plans = [placement.plan_rank(cfg, tp, r, "float32", CLI_SEQ, 1, "cpu", tiers) for r in range(tp)]
    assert got["ranks"] == [placement.plan_rows(p) for p in plans]
    assert got["layer_tier"] == [p.layer_tier for p in plans]
    assert got["fixed"] == [p.fixed for p in plans]
    for r, rows in enumerate(got["ranks"]):
        assert got["layer_tier"][r][:2] == ["host", "host"] and set(got["layer_tier"][r][2:]) == {"disk"}
        assert [row["tier"] for row in rows] == ["host", "disk"] and all(row["rank"] == r for row in rows)
        assert rows[0]["capacity"] == budget and rows[0]["used"] <= budget and rows[0]["layers"] == "0-1"
        assert rows[1]["capacity"] is None and rows[1]["layers"] == "2-5"
    assert got["smallest_tp_fitting"] == placement.smallest_tp(cfg, "float32", CLI_SEQ, 1, budget)
    assert got["smallest_tp_fitting"] is not None and got["smallest_tp_fitting"] > tp
    assert got["model"] == placement.model_facts(cfg, "float32")
    assert got["model"]["parameters"] == cfg.num_params
    assert got["estimate"]["decode_tokens_per_s"] > 0
    assert got["estimate"]["streamed_from"] in ("page cache", "disk")


def test_plan_cli_json_gpu_three_tiers(plan_model, capsys):
    folder, cfg = plan_model
    tp = 2
    sizes = [placement.shard_bytes(cfg, tp, r, "bfloat16", CLI_SEQ, 2) for r in range(tp)]
    L = max(max(s.layers) for s in sizes)
    device = max(_fixed(s) for s in sizes) + 2 * L + L  # one layer resident
    host = 3 * L  # the pinned buffer + two host layers
    rc = main(["plan", "--model", str(folder), "--tp", str(tp), "--device", "cuda", "--dtype", "bfloat16", "--max-batch-size", "2",
               "--max-device-memory", str(device), "--max-host-memory", str(host), "--max-seq-len", str(CLI_SEQ), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    got = json.loads(out)
    tiers = placement.make_tiers("cuda", device, host, sol.load_hardware("h100"))
    plans = [placement.plan_rank(cfg, tp, r, "bfloat16", CLI_SEQ, 2, "cuda", tiers, disk_dtype=cfg.checkpoint_dtype) for r in range(tp)]
    assert got["ranks"] == [placement.plan_rows(p) for p in plans]
    assert got["layer_tier"] == [["device", "host", "host", "disk", "disk", "disk"]] * tp
    assert got["hardware"] == sol.load_hardware("h100").name


def test_plan_cli_text(plan_model, capsys):
    folder, cfg = plan_model
    tp = 3
    # 8 heads over 3 ranks cut the kv groups: rank 1 reads two kv heads, so the ranks differ
    budget = _cpu_budget(cfg, tp, resident=3)
    rc = main(["plan", "--model", str(folder), "--tp", str(tp), "--device", "cpu", "--max-host-memory", f"{budget}B", "--max-seq-len", str(CLI_SEQ)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    tiers = placement.make_tiers("cpu", None, budget, sol.load_hardware("this-cpu"))
    plans = [placement.plan_rank(cfg, tp, r, "float32", CLI_SEQ, 1, "cpu", tiers) for r in range(tp)]
    assert plans[1].layers_on("host") == [0, 1, 2] and plans[0].layers_on("host") != [0, 1, 2]
    for r, plan in enumerate(plans):
        for label in ("host RAM", "disk (mmap)"):
            rows = [ln for ln in lines if re.match(rf"^\s*{r}\s+{re.escape(label)}\s", ln)]
            assert len(rows) == 1, (r, label, out)
        host_rows, disk_rows = placement.plan_rows(plan)
        host_row = " ".join(next(ln for ln in lines if re.match(rf"^\s*{r}\s+host RAM", ln)).split())
        assert host_row.startswith(f"{r} host RAM {format_bytes(budget)} {format_bytes(host_rows['used'])} {host_rows['layers']} ")
        disk_row = " ".join(next(ln for ln in lines if re.match(rf"^\s*{r}\s+disk \(mmap\)", ln)).split())
        assert disk_row.startswith(f"{r} disk (mmap) unbounded {format_bytes(disk_rows['used'])} {disk_rows['layers']} ")
    assert sum("in host RAM:" in ln for ln in lines) == tp
    assert re.search(r"^estimated decode: [0-9.e+]+ tokens/s \(", out, re.M), out
    fit = placement.smallest_tp(cfg, "float32", CLI_SEQ, 1, budget)
    assert f"smallest tp with every shard entirely in host RAM ({format_bytes(budget)} per rank): {fit}" in out
    assert "Chinchilla tokens" in out and f"{cfg.num_layers} layers, tp={tp}" in out


def test_plan_cli_budget_too_small(plan_model, capsys):
    folder, cfg = plan_model
    s = placement.shard_bytes(cfg, 2, 0, "float32", CLI_SEQ, 1)
    minimum = _fixed(s) + max(s.layers)
    rc = main(["plan", "--model", str(folder), "--tp", "2", "--device", "cpu", "--max-host-memory", str(minimum - 1), "--max-seq-len", str(CLI_SEQ), "--json"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out == ""
    assert err.startswith("tp-run: error: rank 0 of tp=2 needs at least")
    assert "--max-host-memory" in err and f"{format_bytes(1)} missing" in err
    assert "Traceback" not in err


def test_plan_cli_bad_size_flag(plan_model, capsys):
    folder, _ = plan_model
    with pytest.raises(SystemExit) as info:
        main(["plan", "--model", str(folder), "--device", "cpu", "--max-host-memory", "lots"])
    assert info.value.code == 2
    assert "cannot read size 'lots'" in capsys.readouterr().err


def test_plan_cli_gpu_without_memory(plan_model, capsys):
    folder, _ = plan_model
    if torch.cuda.is_available():
        pytest.skip("a visible GPU supplies the device budget")
    rc = main(["plan", "--model", str(folder), "--device", "cuda", "--max-host-memory", "1GiB"])
    assert rc == 1
    assert "--max-device-memory" in capsys.readouterr().err


def test_disk_tier_counts_the_bytes_its_files_hold():
    """A bfloat16 checkpoint run in float32: streamed layers read half the bytes they hold."""
    cfg = make_cfg(8, 2, layers=4)
    s = placement.shard_bytes(cfg, 1, 0, "float32", 16, 1)
    cap = _fixed(s) + max(s.layers) + s.layers[0]  # one layer resident, three streamed
    tiers = placement.make_tiers("cpu", None, cap, sol.HARDWARE["this-cpu"])
    same = placement.plan_rank(cfg, 1, 0, "float32", 16, 1, "cpu", tiers)
    half = placement.plan_rank(cfg, 1, 0, "float32", 16, 1, "cpu", tiers, disk_dtype="bfloat16")
    assert same.layer_tier == half.layer_tier and same.streamed == [1, 2, 3]
    assert same.disk_read_bytes == sum(s.layers[1:]) and half.disk_read_bytes == sum(s.layers[1:]) // 2
    assert half.used("disk") == half.disk_read_bytes
    assert half.decode_seconds(page_cache=False) < same.decode_seconds(page_cache=False)


def test_cgroup_limit_caps_the_default_host_budget(tmp_path):
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    usage.write_text("1000\n")
    limit.write_text("max\n")
    assert placement._cgroup_room(((str(limit), str(usage)),)) is None
    limit.write_text("5000\n")
    assert placement._cgroup_room(((str(limit), str(usage)),)) == 4000
    assert placement._cgroup_room(((str(tmp_path / "absent"), str(usage)),)) is None
