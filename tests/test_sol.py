"""The speed-of-light model (tp_runtime.sol) and `tp-bench sol` / `tp-bench calibrate`.

The model is closed-form arithmetic, so most checks are exact (rel 1e-12: float rounding of
the same sums in a different order); the limits are checked against their closed forms with
the tolerance stated at each assertion.
"""

from __future__ import annotations

import csv
import json
import math

import pytest

from tp_runtime import sol
from tp_runtime.cli.bench import main, parse_chips, parse_duration
from tp_runtime.config import ModelConfig
from tp_runtime.errors import ConfigError

H100 = sol.HARDWARE["h100"]
NVLINK = sol.LINKS["nvlink4"]
L8B = sol.MODELS["llama-3-8b"]
L70B = sol.MODELS["llama-3-70b"]
L405B = sol.MODELS["llama-3.1-405b"]
KIMI = sol.MODELS["kimi-k2.5"]
EXACT = 1e-12
IDEAL = sol.Link("ideal", 0.0, math.inf)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Presets are read from and written to a temporary cache, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------
# algebra


@pytest.mark.parametrize("p", [1, 2, 4, 8])  # p <= kv_heads: every term splits evenly
@pytest.mark.parametrize("context", [0, 8192])
def test_alpha_zero_is_the_roofline(p, context):
    q = sol.predict(L8B, H100, IDEAL, p, algorithm="ring", context_len=context)
    mem = L8B.decode_bytes(context) / (p * H100.mem_bandwidth_Bps)
    flops = L8B.decode_flops(context) / (p * H100.peak_flops)
    assert q.comm_s == 0.0
    assert q.seconds_per_token == pytest.approx(max(mem, flops), rel=EXACT)
    assert q.tokens_per_s == pytest.approx(1.0 / max(mem, flops), rel=EXACT)
    assert q.bound == "memory"
    # the same with a chip so slow at arithmetic that compute bounds it
    slow = sol.Hardware("slow", H100.mem_bandwidth_Bps, 1e9, H100.memory_bytes)
    q = sol.predict(L8B, slow, IDEAL, p, context_len=context)
    assert q.bound == "compute"
    assert q.seconds_per_token == pytest.approx(L8B.decode_flops(context) / (p * 1e9), rel=EXACT)


def test_alpha_zero_finite_link_adds_only_the_bytes_term():
    p, link = 4, sol.Link("bw only", 0.0, 10e9)
    q = sol.predict(L8B, H100, link, p)
    vec = L8B.hidden * 2
    expected = ((2 * L8B.layers + 1) * vec + L8B.vocab * 4) / 10e9  # all-reduces + float32 logits
    assert q.comm_s == pytest.approx(expected, rel=EXACT)
    assert q.comm_bytes_per_token == (2 * L8B.layers + 1) * vec + L8B.vocab * 4
    assert q.seconds_per_token == pytest.approx(q.memory_s + expected, rel=EXACT)


def test_moe_tensor_parallel_reads_active_weights_over_p():
    # parallel="tp": every expert split over all chips; MLA's latent cache cannot split, so no KV
    for p in (1, 8, 64):
        q = sol.predict(KIMI, H100, IDEAL, p, parallel="tp", context_len=0)
        assert q.memory_s == pytest.approx(KIMI.decode_bytes(0) / (p * H100.mem_bandwidth_Bps), rel=EXACT)
    # the latent cache is read whole on every chip
    q0, q1 = (sol.predict(KIMI, H100, IDEAL, 64, parallel="tp", context_len=c) for c in (0, 4096))
    kv = KIMI.layers * (512 + 64) * 2 * 4096
    assert KIMI.kv_bytes_total(4096) == kv
    assert q1.bytes_per_chip - q0.bytes_per_chip == pytest.approx(kv, rel=EXACT)


def test_expert_parallel_reads_the_experts_a_chip_holds():
    e, k = KIMI.experts, KIMI.active_experts
    one = KIMI.moe_layers * KIMI.expert_params * KIMI.expert_bpp  # one expert in every MoE layer
    nonrouted = KIMI.nonrouted_read_bytes(1)
    for p, experts_read in [(2, k / 2), (8, 1), (64, 1), (384, 1), (768, e / 768), (2048, e / 2048)]:
        q = sol.predict(KIMI, H100, IDEAL, p, parallel="ep", context_len=0)
        assert q.bytes_per_chip == pytest.approx(nonrouted / p + experts_read * one, rel=EXACT), p
    # and never less than the even split of tp
    for p in (2, 64, 2048):
        ep = sol.predict(KIMI, H100, IDEAL, p, parallel="ep").bytes_per_chip
        tp = sol.predict(KIMI, H100, IDEAL, p, parallel="tp").bytes_per_chip
        assert ep >= tp * (1 - EXACT)


@pytest.mark.parametrize(
    "kind, algorithm, p, expected",
    [
        ("all_reduce", "ring", 1, 0), ("all_reduce", "ring", 2, 2), ("all_reduce", "ring", 8, 14),
        ("all_reduce", "tree", 8, 6), ("all_reduce", "tree", 6, 6), ("all_reduce", "tree", 1024, 20),
        ("all_reduce", "oneshot", 2048, 1), ("all_reduce", "oneshot", 1, 0),
        ("all_gather", "ring", 8, 7), ("all_gather", "tree", 8, 3), ("all_gather", "oneshot", 8, 1),
        ("all_to_all", "ring", 8, 7), ("all_to_all", "tree", 8, 3), ("all_to_all", "oneshot", 8, 1),
    ],
)
def test_step_counts(kind, algorithm, p, expected):
    assert sol.steps(kind, algorithm, p) == expected


def test_collectives_per_step_match_the_runtime():
    q = sol.predict(L8B, H100, NVLINK, 4, algorithm="ring")
    got = {c.site: (c.kind, c.count) for c in q.collectives}
    assert got == {
        "embed": ("all_reduce", 1), "attn_out": ("all_reduce", 32), "mlp_out": ("all_reduce", 32), "lm_head": ("all_gather", 1),
    }
    assert q.collectives_per_token == 2 * 32 + 2
    # every chip looking the token's embedding row up itself (the fused CPU decode step)
    local = sol.predict(L8B, H100, NVLINK, 4, algorithm="ring", embedding_all_reduce=False)
    assert {c.site for c in local.collectives} == {"attn_out", "mlp_out", "lm_head"} and local.collectives_per_token == 2 * 32 + 1
    assert local.comm_s < q.comm_s
    assert q.steps_per_token == (2 * 32 + 1) * 6 + 3  # ring at p=4: all-reduce 6 steps, all-gather 3
    assert sol.predict(L8B, H100, NVLINK, 1).collectives == ()


def _per_kind(q: sol.Prediction) -> dict[str, int]:
    out = dict.fromkeys(sol.KINDS, 0)
    for c in q.collectives:
        out[c.kind] += c.count
    return out


# a Mixtral-like shape with a dense layer in front (Qwen2-MoE's mlp_only_layers / DeepSeek's first_k_dense_replace)
MIXTRAL_LIKE = sol.ModelShape("mixtral-like", layers=5, hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=1536, vocab=8000,
                              bytes_per_param=4.0, experts=8, active_experts=2, expert_intermediate=1536, dense_layers=1)


@pytest.mark.parametrize("model", [KIMI, MIXTRAL_LIKE], ids=["kimi", "mixtral-like"])
@pytest.mark.parametrize("p", [2, 3, 4, 16])
def test_moe_collectives_per_step_match_the_runtime(model, p):
    """Per decode step, the runtime's rules (tests/test_moe.py asserts them on real ranks):
    --moe tp and --moe ep: 2 all-reduces per layer + 1 for the embedding (the eager step; none
    where the fused step looks rows up itself), 1 all-gather of logits, no all-to-all; --moe ep
    --attention dp: 1 all-gather (the step's tokens) and 3 all-to-alls per MoE layer, nothing
    else (no embedding collective either way)."""
    layers, sparse = model.layers, model.moe_layers
    want = {
        "tp": {"all_reduce": 2 * layers + 1, "all_gather": 1, "all_to_all": 0},
        "ep": {"all_reduce": 2 * layers + 1, "all_gather": 1, "all_to_all": 0},
        "dp": {"all_reduce": 0, "all_gather": 1, "all_to_all": 3 * sparse},
    }
    sites = {
        "tp": {"embed": ("all_reduce", 1), "attn_out": ("all_reduce", layers), "mlp_out": ("all_reduce", layers), "lm_head": ("all_gather", 1)},
        "dp": {"dp.step": ("all_gather", 1), "moe_counts": ("all_to_all", sparse), "moe_dispatch": ("all_to_all", sparse),
               "moe_combine": ("all_to_all", sparse)},
    }
    sites["ep"] = sites["tp"]
    for mode in sol.PARALLEL:
        for batch in (1, 4, 16):  # the counts do not depend on the batch (an idle dp chip still takes part)
            q = sol.predict(model, H100, NVLINK, p, algorithm="oneshot", parallel=mode, batch=batch)
            assert q.parallel == mode
            assert _per_kind(q) == want[mode], (mode, batch)
            assert {c.site: (c.kind, c.count) for c in q.collectives} == sites[mode], (mode, batch)
            assert q.collectives_per_token == sum(want[mode].values()) == q.steps_per_token  # oneshot: 1 step each
        assert sol.predict(model, H100, NVLINK, 1, parallel=mode).collectives == ()
        fused = sol.predict(model, H100, NVLINK, p, algorithm="oneshot", parallel=mode, embedding_all_reduce=False)
        assert _per_kind(fused) == dict(want[mode], all_reduce=max(want[mode]["all_reduce"] - 1, 0)), mode
    # "auto" is ep for a MoE model
    assert sol.predict(model, H100, NVLINK, p).parallel == "ep"


def test_dp_bytes_of_the_exchange():
    m, p, act = MIXTRAL_LIKE, 4, 4.0
    for batch, local in ((1, 1), (4, 1), (5, 2), (16, 4)):
        q = sol.predict(m, H100, IDEAL, p, parallel="dp", batch=batch, act_bytes=act)
        by_site = {c.site: c.bytes for c in q.collectives}
        rows = local * m.active_experts * m.hidden * act * (p - 1) / p  # the busiest chip's routed rows that leave it
        assert by_site == {"dp.step": 8 * batch * p, "moe_counts": 8 * m.experts * (p - 1) / p, "moe_dispatch": rows, "moe_combine": rows}
        assert q.comm_bytes_per_token == pytest.approx(8 * batch * p + m.moe_layers * (8 * m.experts * (p - 1) / p + 2 * rows), rel=EXACT)


def test_dp_reads_the_nonrouted_weights_whole_for_its_own_sequences():
    m = MIXTRAL_LIKE
    one = m.moe_layers * m.expert_params * m.expert_bpp
    for p, batch, context in ((2, 1, 0), (4, 4, 100), (4, 16, 100), (3, 16, 0)):
        local = -(-batch // p)
        dp = sol.predict(m, H100, IDEAL, p, parallel="dp", batch=batch, context_len=context)
        ep = sol.predict(m, H100, IDEAL, p, parallel="ep", batch=batch, context_len=context)
        a = m.distinct_experts(batch)
        routed = one * max(a / p, min(1, m.experts / p))  # as ep: the group's tokens at whole experts
        kv = m.kv_bytes_total(context, local)  # every head of its own sequences' cache
        assert dp.bytes_per_chip == pytest.approx(m.nonrouted_read_bytes(local) + routed + kv, rel=EXACT), (p, batch)
        assert ep.bytes_per_chip == pytest.approx(m.nonrouted_read_bytes(batch) / p + routed + m.kv_bytes_total(context, batch) / min(p, m.kv_heads), rel=EXACT)
        routed_w = m.routed_params * m.expert_bpp
        assert dp.shard_bytes == pytest.approx(m.weight_bytes - routed_w + routed_w / p + kv, rel=EXACT)
        flops = 2 * local * m.nonrouted_matmul_params() + 2 * m.moe_layers * m.expert_params * batch * m.active_experts * max(1 / p, min(1, m.experts / p) / a)
        assert dp.flops_per_chip == pytest.approx(flops + m.attention_flops(context, local), rel=EXACT)
    # at p = 1 every mode is the same chip
    qs = [sol.predict(m, H100, NVLINK, 1, parallel=mode, batch=4, context_len=64) for mode in sol.PARALLEL]
    assert len({(q.bytes_per_chip, q.flops_per_chip, q.shard_bytes, q.seconds_per_token) for q in qs}) == 1


def test_links_per_kind_and_the_dominant_collective():
    a2a = sol.Link("measured a2a", 50e-6, 2e9)
    q = sol.predict(KIMI, H100, NVLINK, 64, algorithm="tree", parallel="dp", alpha_s=1e-6, links={"all_to_all": a2a})
    for c in q.collectives:
        alpha, bw = (50e-6, 2e9) if c.kind == "all_to_all" else (1e-6, NVLINK.bandwidth_Bps)
        assert c.seconds == pytest.approx(c.steps * alpha + c.bytes / bw, rel=EXACT), c.site
    by_kind = q.comm_by_kind()
    assert sum(by_kind.values()) == pytest.approx(q.comm_s, rel=EXACT)
    assert q.dominant_collective == f"all_to_all {by_kind['all_to_all'] / q.comm_s:.0%}" and by_kind["all_to_all"] > 0.99 * q.comm_s
    # tp/ep issue no all-to-all: the override changes nothing there
    assert sol.predict(KIMI, H100, NVLINK, 64, parallel="ep", links={"all_to_all": a2a}) == sol.predict(KIMI, H100, NVLINK, 64, parallel="ep")
    assert sol.predict(L8B, H100, NVLINK, 8).dominant_collective.startswith("all_reduce ")
    assert sol.predict(L8B, H100, NVLINK, 1).dominant_collective == ""
    with pytest.raises(ConfigError, match="not a kind of collective"):
        sol.predict(KIMI, H100, NVLINK, 2, links={"broadcast": a2a})


@pytest.mark.parametrize("algorithm", sol.ALGORITHMS)
def test_large_p_approaches_one_over_steps_times_alpha(algorithm):
    alpha = 10e-6
    link = sol.Link("latency only", alpha, math.inf)
    shares = []
    for p in (2**k for k in range(1, 17)):
        q = sol.predict(L70B, H100, link, p, algorithm=algorithm)
        assert q.comm_s == pytest.approx(q.steps_per_token * alpha, rel=EXACT)
        shares.append(q.tokens_per_s * q.steps_per_token * alpha)  # -> 1 as comm dominates
    assert all(a <= b + EXACT for a, b in zip(shares, shares[1:])), shares
    assert shares[-1] == pytest.approx(1.0, abs=1e-3)  # p = 65536: memory is < 0.1% of the step
    if algorithm == "oneshot":
        # the form: 1 / (layers x collectives per layer x alpha), + the 2 per-token ones
        q = sol.predict(L70B, H100, link, 2**16, algorithm="oneshot")
        assert q.steps_per_token == 2 * L70B.layers + 2
        assert q.tokens_per_s == pytest.approx(1 / (L70B.layers * 2 * alpha), rel=0.03)  # 2/(2L+2) = 2.5%


@pytest.mark.parametrize("algorithm", sol.ALGORITHMS)
@pytest.mark.parametrize("model", [L8B, KIMI], ids=["dense", "moe"])
def test_more_alpha_fewer_tokens(model, algorithm):
    for p in (1, 2, 16, 512):
        tps = [sol.predict(model, H100, NVLINK, p, algorithm=algorithm, alpha_s=a).tokens_per_s for a in (0, 1e-7, 1e-6, 1e-5, 1e-4)]
        if p == 1:
            assert len(set(tps)) == 1  # nothing to communicate
        else:
            assert all(a > b for a, b in zip(tps, tps[1:])), (p, tps)


def test_capacity_405b():
    assert L405B.weight_bytes == pytest.approx(811.7e9, rel=1e-3)  # 405.9B params x 2 bytes
    one = sol.predict(L405B, H100, NVLINK, 1, context_len=4096)
    assert not one.fits and one.shard_bytes > H100.memory_bytes
    fits = [p for p in (1, 2, 4, 8, 16, 32) if sol.predict(L405B, H100, NVLINK, p, context_len=4096).fits]
    assert fits[0] == 16 and fits == [16, 32]  # 811.7/8 = 101 GB > 80; /16 = 51 GB
    q = sol.predict(L405B, H100, NVLINK, 16, context_len=4096)
    assert q.shard_bytes == pytest.approx(L405B.weight_bytes / 16 + L405B.kv_bytes_total(4096) / 8, rel=EXACT)
    assert sol.best([one]) is None and sol.best([one, q]) is q


def test_tenfold_lower_latency_gives_tenfold_tokens_when_comm_dominates():
    # one-shot collectives, large p, comm-dominated at both alphas: ratio within 10% of 10
    # (Kimi under ep: 124 collectives a step, against ~0.16 ms of reads at 2048 chips and context 4096)
    cases = [(KIMI, 1e-3, 100e-6, dict(context_len=4096)), (L8B, 10e-6, 1e-6, dict(context_len=0))]
    for model, hi, lo, kw in cases:
        curves = sol.sweep(model, H100, NVLINK, [256, 2048], [hi, lo], algorithm="oneshot", **kw)
        (row,) = sol.latency_scaling(curves)
        assert row.p_fixed == 2048 and row.alpha_ratio == pytest.approx(10)
        assert row.comm_share_fixed_lo > 0.85, row
        assert row.ratio_fixed == pytest.approx(10, rel=0.10), row
        assert row.holds(row.ratio_fixed)
    # where memory is a large part of the step at the lower alpha, the claim fails, and the
    # ratio is never above the latency ratio (the fixed terms do not shrink)
    curves = sol.sweep(KIMI, H100, NVLINK, parse_chips("8..2048"), [10e-6, 1e-6, 1e-7], algorithm="tree", context_len=4096)
    rows = sol.latency_scaling(curves)
    assert [(r.alpha_hi, r.alpha_lo) for r in rows] == [(10e-6, 1e-6), (1e-6, 1e-7)]
    for r in rows:
        assert 1 < r.ratio_fixed <= r.alpha_ratio and 1 < r.ratio_reoptimised
        assert r.p_best_lo >= r.p_best_hi  # lower latency pays for more chips
    assert not rows[-1].holds(rows[-1].ratio_fixed)


# ---------------------------------------------------------------------------------------------
# shapes and presets


def test_from_config_counts_what_modelconfig_counts():
    from tp_runtime.checkpoint.synthetic import llama_config_dict

    for tied, dtype in ((False, "float32"), (True, "bfloat16")):
        raw = llama_config_dict(hidden_size=128, num_layers=3, num_heads=8, num_kv_heads=2, intermediate_size=352,
                                vocab_size=300, tie_word_embeddings=tied, dtype=dtype)
        cfg = ModelConfig.from_dict(raw)
        shape = sol.ModelShape.from_config(cfg)
        assert shape.params_total == cfg.num_params == shape.params_active
        assert shape.bytes_per_param == (4.0 if dtype == "float32" else 2.0)
        assert shape.weight_bytes == cfg.num_params * shape.bytes_per_param


def test_from_config_of_moe_models():
    from tp_runtime.checkpoint.synthetic import llama_config_dict

    raw = llama_config_dict(hidden_size=128, num_layers=3, num_heads=8, num_kv_heads=2, intermediate_size=352, vocab_size=300,
                            architecture="MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2)
    cfg = ModelConfig.from_dict(raw)
    shape = sol.ModelShape.from_config(cfg, bytes_per_param=4)
    assert (shape.experts, shape.active_experts, shape.expert_intermediate, shape.moe_layers, shape.shared_experts) == (8, 2, 352, 3, 0)
    assert shape.params_total == cfg.num_params  # Mixtral: no gate vector, no router bias
    assert shape.params_active == cfg.num_params - 3 * 6 * 3 * 128 * 352
    # Qwen2-MoE: a shared expert of two routed experts' size (its gate vector, 64 values a layer, not counted); layer 1 dense
    raw = llama_config_dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=96, vocab_size=300,
                            architecture="Qwen2MoeForCausalLM", moe_intermediate_size=32, shared_expert_intermediate_size=64,
                            num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1])
    cfg = ModelConfig.from_dict(raw)
    shape = sol.ModelShape.from_config(cfg)
    assert (shape.shared_experts, shape.moe_layers, shape.dense_layers) == (2, 2, 1)
    assert shape.params_total == cfg.num_params - 2 * 64
    # a shared expert that is no multiple of a routed one counts as the fraction it is
    odd = sol.ModelShape.from_config(ModelConfig.from_dict({**raw, "shared_expert_intermediate_size": 48}))
    assert odd.shared_experts == pytest.approx(48 / odd.expert_intermediate)


def test_load_model_from_a_model_folder(tmp_path):
    from tp_runtime.checkpoint.synthetic import llama_config_dict

    raw = llama_config_dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=100)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(raw))
    shape = sol.load_model(str(tmp_path / "tiny"))
    assert shape.name == "tiny" and shape.params_total == ModelConfig.from_dict(raw).num_params


def test_preset_numbers():
    # the counts the presets are checked against (model cards: 8B, 70B, 405B; Kimi ~1T / 32B active)
    assert L8B.params_total == pytest.approx(8.03e9, rel=0.005)
    assert L70B.params_total == pytest.approx(70.6e9, rel=0.005)
    assert L405B.params_total == pytest.approx(405.9e9, rel=0.005)
    assert 1.0e12 < KIMI.params_total < 1.05e12 and 32e9 < KIMI.params_active < 34e9
    assert KIMI.moe_layers == 60 and KIMI.kv_values_per_token == 576 and KIMI.distinct_experts(1) == 8
    for table in (sol.HARDWARE, sol.LINKS, sol.MODELS):
        for name, obj in table.items():
            assert obj.source, f"preset {name} has no source"


def test_presets_by_name_and_errors(tmp_path):
    assert sol.load_hardware("H100") is H100 and sol.load_link("nvlink") is NVLINK and sol.load_model("kimi") is KIMI
    with pytest.raises(ConfigError, match="unknown hardware 'tpu-v9'.*h100"):
        sol.load_hardware("tpu-v9")
    hw = sol.Hardware("box", 10e9, 1e11, 8e9, "test")
    path = sol.save_preset("box", hardware=hw)
    assert path == tmp_path / "cache" / "tp-runtime" / "presets" / "box.json"
    assert sol.load_hardware("box") == hw
    with pytest.raises(ConfigError, match="no 'link' section.*--alpha-us"):
        sol.load_link("box")
    # a saved preset wins over the built-in of the same name
    sol.save_preset("h100", hardware=hw)
    assert sol.load_hardware("h100") == hw
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="box.json: cannot read preset"):
        sol.load_hardware("box")


@pytest.mark.parametrize("bad", [dict(p=0), dict(algorithm="butterfly"), dict(parallel="pp"), dict(batch=0)])
def test_bad_arguments(bad):
    args = dict(p=2) | bad
    p = args.pop("p")
    with pytest.raises(ConfigError):
        sol.predict(L8B, H100, NVLINK, p, **args)
    for mode in ("ep", "dp"):
        with pytest.raises(ConfigError, match="no experts"):
            sol.predict(L8B, H100, NVLINK, 2, parallel=mode)


# ---------------------------------------------------------------------------------------------
# the command line


def test_parse_flags():
    assert parse_duration("10us") == 1e-5 and parse_duration("0.1us") == 1e-7 and parse_duration("0.1µs") == 1e-7
    assert parse_duration("5ms") == 5e-3 and parse_duration("100ns") == 1e-7 and parse_duration("2") == 2.0
    assert parse_chips("1..2048") == [2**i for i in range(12)]
    assert parse_chips("3..20") == [4, 8, 16]
    assert parse_chips("8,1,2") == [1, 2, 8]
    for bad in ("3..3", "0,1", "a,b"):
        with pytest.raises(Exception):
            parse_chips(bad)
    with pytest.raises(Exception):
        parse_duration("10 parsecs")


def test_cli_sol_writes_csv_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sol", "--model", "kimi-k2.5", "--hardware", "h100", "--chips", "1,8,64,2048", "--alpha", "10us,1us,0.1us", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    with (out / "sol.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == sol.CSV_COLUMNS
    for col in ("p", "alpha_s", "tokens_per_s", "seconds_per_token", "memory_s", "compute_s", "comm_s", "fits", "bound", "shard_bytes"):
        assert col in reader.fieldnames
    assert len(rows) == 4 * 3
    assert {float(r["alpha_s"]) for r in rows} == {1e-5, 1e-6, 1e-7}
    assert [r["fits"] for r in rows if r["p"] == "1"] == ["False"] * 3  # 531 GB on one 80 GB chip
    png = (out / "sol.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert "Best point of each curve" in text and "re-optimised" in text and "10us -> 1us" in text


def test_cli_calibrate_saves_a_preset_sol_loads(tmp_path, capsys):
    rc = main(["calibrate", "--name", "testbox", "--size-mib", "32", "--matmul-n", "256", "--repeats", "2", "--alpha-us", "50", "--beta-gbps", "1.5"])
    assert rc == 0, capsys.readouterr().err
    hw, link = sol.load_hardware("testbox"), sol.load_link("testbox")
    assert hw.mem_bandwidth_Bps > 1e8 and hw.peak_flops > 1e8 and hw.memory_bytes > 2**30
    assert link.alpha_s == pytest.approx(50e-6) and link.bandwidth_Bps == pytest.approx(1.5e9)
    saved = json.loads((tmp_path / "cache" / "tp-runtime" / "presets" / "testbox.json").read_text())
    assert saved["measured"]["matmul_n"] == 256
    rc = main(["sol", "--model", "llama-3-8b", "--hardware", "testbox", "--link", "testbox", "--chips", "1,2", "--algorithm", "ring"])
    assert rc == 0 and "Best point" in capsys.readouterr().out


def test_cli_errors_are_one_line(capsys):
    assert main(["sol", "--hardware", "tpu-v9", "--chips", "1,2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tp-bench: error: unknown hardware 'tpu-v9'") and "Traceback" not in err
    assert main(["calibrate", "--alpha-us", "5"]) == 1
    assert "both --alpha-us and --beta-gbps" in capsys.readouterr().err
