"""Mixture-of-experts models: routers against transformers', parity at world 1-4 under --moe tp
and ep, rank-local expert loading by byte count, exact collective counts, routed-token counts,
clear refusals.

Tolerances: float32 logits within 1e-4 of transformers float32 (logits are O(1) by construction;
routers scaled so that no decision is a near tie, hf_models.ROUTER_SCALE); 32 greedy tokens equal.
"""

import json
import sys

import pytest
import torch

import hf_models
from tp_runtime import sharding
from tp_runtime.config import ModelConfig, MoeConfig, RuntimeConfig
from tp_runtime.errors import ShardingError
from tp_runtime.kernels import cpu_gemv
from tp_runtime.launch.spawn import spawn
from tp_runtime.model.moe import route

PROMPTS = [[1, 17, 42, 7, 99], [1, *range(3, 19)], [1, 250, 3, 8, 5, 77, 31, 64, 2, 11, 13]]
NEW_TOKENS = 32
FP32_ATOL = 1e-4
MODES = ("tp", "ep", "dp")  # --moe tp, --moe ep, --moe ep --attention dp


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    built = {name: hf_models.build(name, root) for name in hf_models.MOE_MODELS}
    return {name: (path, model, hf_models.reference(model, PROMPTS, NEW_TOKENS)) for name, (path, model) in built.items()}


def run_moe(tmp_path, dirs, world, modes):
    out = tmp_path / f"moe-{world}.pt"
    spec = {"models": [str(d) for d in dirs], "modes": list(modes), "prompts": PROMPTS, "new_tokens": NEW_TOKENS}
    spawn([str(out), json.dumps(spec)], world, threads=1, program=[sys.executable, str(hf_models.__file__).replace("hf_models.py", "moe_rank.py")])
    return torch.load(out)


# --- routers: the same experts and weights as transformers' own router modules -------------


def _tied_router_weight(experts: int, hidden: int, gen) -> torch.Tensor:
    w = torch.randn(experts, hidden, generator=gen)
    w[1] = w[0]  # two experts with equal logits for every token: ties that topk must break alike
    return w


def _hf_router(cls_name: str, module: str, cfg):
    import importlib

    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls_name)(cfg)


@pytest.mark.parametrize("norm", [False, True])
def test_softmax_routers_choose_and_weigh_as_transformers(norm):
    from transformers import MixtralConfig, Qwen2MoeConfig

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 32, generator=gen)
    weight = _tied_router_weight(16, 32, gen)
    hf_cfgs = [("Qwen2MoeTopKRouter", "qwen2_moe", Qwen2MoeConfig(hidden_size=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm))]
    if norm:  # Mixtral always renormalises
        hf_cfgs.append(("MixtralTopKRouter", "mixtral", MixtralConfig(hidden_size=32, num_local_experts=16, num_experts_per_tok=4)))
    moe = MoeConfig(num_experts=16, top_k=4, intermediate_size=8, sparse_layers=(True,), norm_topk_prob=norm)
    for cls_name, module, cfg in hf_cfgs:
        hf = _hf_router(cls_name, module, cfg)
        with torch.no_grad():
            hf.weight.copy_(weight)
            _, hf_w, hf_ids = hf(x)
        w, ids = route(x @ weight.T, moe)
        assert torch.equal(ids.sort(-1).values, hf_ids.sort(-1).values), cls_name
        order, hf_order = ids.argsort(-1), hf_ids.argsort(-1)
        assert torch.allclose(w.gather(1, order), hf_w.float().gather(1, hf_order), atol=1e-6), cls_name


@pytest.mark.parametrize("groups", [(1, 1), (4, 2), (8, 3)])
def test_grouped_sigmoid_router_chooses_with_the_bias_and_weighs_without_it(groups):
    from transformers import DeepseekV3Config

    n_group, topk_group = groups
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 32, generator=gen)
    weight = _tied_router_weight(32, 32, gen)
    bias = 0.5 * torch.randn(32, generator=gen)
    cfg = DeepseekV3Config(hidden_size=32, n_routed_experts=32, num_experts_per_tok=6, n_group=n_group, topk_group=topk_group,
                           norm_topk_prob=True, routed_scaling_factor=2.5)
    hf = _hf_router("DeepseekV3TopkRouter", "deepseek_v3", cfg)
    with torch.no_grad():
        hf.weight.copy_(weight)
        hf.e_score_correction_bias.copy_(bias)
        _, hf_w, hf_ids = hf(x)
    moe = MoeConfig(num_experts=32, top_k=6, intermediate_size=8, sparse_layers=(True,), scoring="sigmoid", n_group=n_group,
                    topk_group=topk_group, routed_scaling_factor=2.5, correction_bias=True)
    w, ids = route(x @ weight.T, moe, bias)
    assert torch.equal(ids.sort(-1).values, hf_ids.sort(-1).values)
    assert torch.allclose(w.gather(1, ids.argsort(-1)), hf_w.gather(1, hf_ids.argsort(-1)), atol=1e-6)
    # the bias decides: without it other experts win for some tokens, and weights never include it
    w0, ids0 = route(x @ weight.T, moe)
    assert not torch.equal(ids0.sort(-1).values, ids.sort(-1).values)


# --- the models at world 1-4, both modes ----------------------------------------------------


def _expert_bytes_per_rank(cfg: ModelConfig, world: int, mode: str) -> list[int]:
    """Float32 bytes of routed-expert weights rank r reads, from the config alone."""
    moe = cfg.moe
    per_value = 4 * 3 * cfg.hidden_size  # gate, up (rows) and down (columns): one feature of one expert
    sparse = sum(moe.sparse_layers)
    if mode == "ep":
        counts = sharding.split_sizes(moe.num_experts, world)
        return [sparse * n * moe.intermediate_size * per_value for n in counts]
    return [sparse * moe.num_experts * n * per_value for n in sharding.split_sizes(moe.intermediate_size, world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_moe_models_match_transformers_in_both_modes(world, moe_checkpoints, tmp_path):
    modes = MODES if world > 1 else ("tp",)
    dirs = {name: path for name, (path, _, _) in moe_checkpoints.items()}
    results = run_moe(tmp_path, dirs.values(), world, modes)
    for name, path in dirs.items():
        ref_logits, ref_tokens = moe_checkpoints[name][2]
        cfg = ModelConfig.from_model_dir(path)
        for mode in modes:
            got = results[(str(path), mode)]
            where = f"{name} world={world} --moe {mode}"
            for i, (mine, ref) in enumerate(zip(got["logits"], ref_logits)):
                err = (mine - ref).abs().max().item()
                assert err < FP32_ATOL, f"{where} prompt {i}: max |logit diff| {err:.2e} >= {FP32_ATOL}"
            assert got["tokens"] == ref_tokens, f"{where}: greedy tokens differ from transformers"
            steps, layers, sparse = got["decode_steps"], got["layers"], sum(cfg.moe.sparse_layers)
            # the fused CPU decode step takes MoE layers (not under dp, nor Qwen3's q/k norms or MLA)
            fusable = cpu_gemv.available() and mode != "dp" and not cfg.qk_norm and getattr(cfg, "mla", None) is None
            assert got["fused"] is fusable, where
            if world == 1:
                want = {"all_reduce": 0, "all_gather": 0, "all_to_all": 0}
            elif mode == "dp":
                # each rank its own sequences: per decode step one all-gather sharing the step's
                # tokens and, per MoE layer, the counts, dispatch and combine all-to-alls;
                # nothing else (dense parts are whole)
                want = {"all_reduce": 0, "all_gather": steps, "all_to_all": 3 * sparse * steps}
                assert {s.split(".")[-1] for s in got["decode_sites"] if s.startswith("layer.")} == {"moe_counts", "moe_dispatch", "moe_combine"}
                # bytes per (source, destination) over the run: what one layer's dispatch sends,
                # its combine brings back, in rows of hidden float32 values, one per routed choice
                hidden_row = 4 * cfg.hidden_size
                for i, is_sparse in enumerate(cfg.moe.sparse_layers):
                    if not is_sparse:
                        continue
                    out_, back = got["pairs"][f"layer.{i}.moe_dispatch"], got["pairs"][f"layer.{i}.moe_combine"]
                    assert [list(r) for r in zip(*out_)] == back, (where, i)  # combine = dispatch transposed
                    assert all(v % hidden_row == 0 for r in out_ for v in r)
                    total = sum(map(sum, out_)) // hidden_row  # rows = routed decode choices of every rank
                    load = next(r for r in got["experts"]["layers"] if r["layer"] == i)
                    assert total == sum(load["prefill"]) + sum(load["decode"]), (where, i)
            else:
                # 2 all-reduces per block (attention out; the MoE layer's one combine, like the
                # dense MLP's), 1 for the embedding (none where the fused step looks rows up
                # itself), 1 all-gather of logits; no all-to-all
                want = {"all_reduce": steps * (2 * layers + (0 if fusable else 1)), "all_gather": steps, "all_to_all": 0}
            assert {op: got["decode_counts"][op] for op in want} == want, f"{where}: {got['decode_counts']}"
            # dp: every rank holds every sequence's tokens as they come (no hand-over at the end)
            assert got["counts"]["broadcast"] == 0 and got["counts"]["barrier"] == 0
            # every routed choice counted once: tokens x top_k per MoE layer, prefill and decode apart
            prompt_tokens, decode_tokens = sum(map(len, PROMPTS)), steps * len(PROMPTS)
            for row in got["experts"]["layers"]:
                assert sum(row["prefill"]) == prompt_tokens * cfg.moe.top_k, where
                assert sum(row["decode"]) == decode_tokens * cfg.moe.top_k, where
                if mode != "tp":
                    assert sum(row["rank_tokens"]) == (prompt_tokens + decode_tokens) * cfg.moe.top_k
            assert [r["layer"] for r in got["experts"]["layers"]] == [i for i, s in enumerate(cfg.moe.sparse_layers) if s]
        if world > 1:
            # rank-local expert loading: the two modes read the same bytes but for the experts,
            # of which ep reads only its own, whole, and tp a slice of every one
            tp_read, ep_read = results[(str(path), "tp")]["bytes_read"], results[(str(path), "ep")]["bytes_read"]
            tp_x, ep_x = _expert_bytes_per_rank(cfg, world, "tp"), _expert_bytes_per_rank(cfg, world, "ep")
            for r in range(world):
                assert ep_read[r] - tp_read[r] == ep_x[r] - tp_x[r], f"{name} world={world} rank {r}: {ep_read} vs {tp_read}"
            assert sum(ep_x) == sum(tp_x)


# --- refusals -------------------------------------------------------------------------------


def test_ep_with_more_ranks_than_experts_is_refused_before_loading():
    raw = dict(architectures=["MixtralForCausalLM"], hidden_size=64, num_attention_heads=16, num_hidden_layers=2, intermediate_size=32,
               vocab_size=100, num_local_experts=4, num_experts_per_tok=2)
    cfg = RuntimeConfig(moe="ep").split_config(ModelConfig.from_dict(raw))
    with pytest.raises(ShardingError, match="4 experts for 6 ranks; use --moe tp or at most 4 ranks"):
        sharding.check_tp(cfg, 6)
    sharding.check_tp(RuntimeConfig(moe="tp").split_config(cfg), 6)  # sliced experts: fine
    assert [sharding.expert_range(cfg, 3, r) for r in range(3)] == [(0, 2), (2, 3), (3, 4)]  # uneven counts are fine


def test_bad_moe_configs_are_refused_naming_the_key(tmp_path):
    from tp_runtime.errors import ConfigError

    base = dict(architectures=["MixtralForCausalLM"], hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=32, vocab_size=100)
    with pytest.raises(ConfigError, match="num_experts_per_tok 3 must be between 1 and the number of experts \\(2\\)"):
        ModelConfig.from_dict({**base, "num_local_experts": 2, "num_experts_per_tok": 3})
    with pytest.raises(ConfigError, match="positive number of experts"):
        ModelConfig.from_dict({**base, "num_experts_per_tok": 2})
    with pytest.raises(ConfigError, match="--moe 'dp'"):
        RuntimeConfig(moe="dp")


def test_adversarial_routing_every_token_to_one_rank_at_batch_1(tmp_path):
    """A zero router ties every expert: every token's top-k lands on the same two experts (torch's
    topk breaks the tie alike here and in transformers), both on one rank under --moe ep; at
    batch 1 under --attention dp the other rank has no token at all and only meets the
    all-to-alls. Same logits and tokens as transformers, nothing hangs."""
    path, model = hf_models.build("mixtral", tmp_path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.zero_()
    model.save_pretrained(path)
    prompt = [PROMPTS[1]]
    ref_logits, ref_tokens = hf_models.reference(model, prompt, NEW_TOKENS)
    out = tmp_path / "adversarial.pt"
    spec = {"models": [str(path)], "modes": ["ep", "dp"], "prompts": prompt, "new_tokens": NEW_TOKENS}
    spawn([str(out), json.dumps(spec)], 2, threads=1, program=[sys.executable, str(hf_models.__file__).replace("hf_models.py", "moe_rank.py")])
    results = torch.load(out)
    cfg = RuntimeConfig(moe="ep").split_config(ModelConfig.from_model_dir(path))
    for mode in ("ep", "dp"):
        got = results[(str(path), mode)]
        assert (got["logits"][0] - ref_logits[0]).abs().max().item() < FP32_ATOL, mode
        assert got["tokens"] == ref_tokens, mode
        for row in got["experts"]["layers"]:
            hit = {e for e, n in enumerate(row["prefill"]) if n} | {e for e, n in enumerate(row["decode"]) if n}
            owners = {r for r in range(2) for e in hit if sharding.holds_expert(cfg, 2, r, e)}
            assert len(hit) == 2 and len(owners) == 1, (mode, hit)  # every choice on one rank's experts
            assert max(row["rank_tokens"]) == sum(row["rank_tokens"]) and row["imbalance"] == 2.0, (mode, row)
