"""Mixture-of-experts models under a short memory budget: the routed experts stream first (every
layer's attention, norms, router, shared expert and dense MLP stay resident), then whole layers;
a forward reads only the experts its tokens chose. Same logits (bitwise) and tokens as the
resident run at tp=1 and tp=2 under --moe ep, tp (and dp), exact bytes read, bounded peak RSS.
"""

import json
import sys

import pytest
import torch

import hf_models
from tp_runtime import placement
from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint
from tp_runtime.config import ModelConfig, ParallelConfig, RuntimeConfig
from tp_runtime.engine.llm import LLM
from tp_runtime.engine.sampling import SamplingParams
from tp_runtime.launch.spawn import spawn

MiB = 2**20
RSS_SLACK = 48 * MiB  # as tests/test_offload.py: what a rank touches beyond the plan's counts
SEQ, BATCH = 128, 2  # moe_stream_rank.py's
PROMPTS = [[1, 17, 42, 7, 99], [1, *range(3, 12)]]
NEW_TOKENS = 8
SPLITS = {"tp": {"moe": "tp"}, "ep": {"moe": "ep"}, "dp": {"moe": "ep", "attention": "dp"}}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """Mixtral (every layer MoE) and Qwen2-MoE (a shared expert, layer 1 dense) from transformers."""
    root = tmp_path_factory.mktemp("moe_stream")
    return {name: hf_models.build(name, root)[0] for name in ("mixtral", "qwen2_moe")}


def split_cfg(path, mode: str) -> ModelConfig:
    return RuntimeConfig(**SPLITS[mode]).split_config(ModelConfig.from_model_dir(path))


def budgets(cfg: ModelConfig, tp: int) -> dict[str, int]:
    """--max-host-memory values (the largest over the ranks) with which the planner streams the
    routed experts of every MoE layer but the first ("experts"), of every MoE layer ("all
    experts"), or those and whole layers too ("whole")."""
    kinds = placement.layer_kinds(cfg)
    out = {"experts": 0, "all experts": 0, "whole": 0}
    for r in range(tp):
        s = placement.shard_bytes(cfg, tp, r, "float32", SEQ, BATCH)
        fixed = s.kv_cache + s.activations + s.embedding + s.lm_head + s.norm
        stage = min(cfg.moe.top_k, s.local_experts) * s.one_expert  # the staging experts
        cores = [s.core(i) for i in range(cfg.num_layers)]
        staging = sum(max(c for c, k in zip(cores, kinds) if k == kind) for kind in set(kinds))  # a staging layer per kind
        out["experts"] = max(out["experts"], fixed + stage + sum(cores) + s.experts[kinds.index("moe")] + 1)
        out["all experts"] = max(out["all experts"], fixed + stage + sum(cores) + 1)
        out["whole"] = max(out["whole"], fixed + stage + staging + 1)
    return out


def _load(path, budget=None, offload_dir=None) -> LLM:
    runtime = RuntimeConfig(max_seq_len=SEQ, max_batch_size=BATCH, max_host_memory=budget, offload_dir=offload_dir, show_progress=False)
    return LLM.load(path, ParallelConfig(), runtime)


def _tokens(llm: LLM, prompts) -> list[list[int]]:
    out = [[] for _ in prompts]
    for ev in llm.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)):
        out[ev.seq].append(ev.token_id)
    return out


def expected_expert_reads(load: dict, layers: list[int], top_k: int, decode_steps: int) -> int:
    """Experts a generation of one sequence reads per streamed layer: each one its prompt's
    tokens chose, once (the prefill), then top-k per decode step (batch 1)."""
    rows = {r["layer"]: r for r in load["layers"]}
    for i in layers:  # every decode step chose top-k distinct experts in each layer
        assert sum(rows[i]["decode"]) == top_k * decode_steps
    return sum(sum(1 for n in rows[i]["prefill"] if n) + top_k * decode_steps for i in layers)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_streamed_experts_give_the_resident_logits_and_tokens(moe_models, name, tmp_path):
    path = moe_models[name]
    cfg = split_cfg(path, "tp")
    moe_layers = [i for i, sparse in enumerate(cfg.moe.sparse_layers) if sparse]
    resident = _load(path)
    want_logits, want_tokens = resident.prompt_logits(PROMPTS), _tokens(resident, PROMPTS[:1])
    resident.close()
    b = budgets(cfg, 1)
    off = str(tmp_path / "off")  # each model streams from the checkpoint in one case, from an offload folder in the other
    for label, offload in (("experts", None), ("whole", off)) if name == "mixtral" else (("experts", off), ("whole", None)):
        llm = _load(path, b[label], offload)
        plan = llm.plan
        if label == "experts":  # the last MoE layers' experts leave first; every layer stays
            assert plan.streamed == [] and plan.experts_streamed == moe_layers[1:] and plan.staging_kinds == ()
        else:  # every layer's experts out, then whole layers, each kind through its own staging layer
            assert plan.streamed and plan.experts_streamed == moe_layers
            assert set(plan.staging_kinds) == {placement.layer_kinds(cfg)[i] for i in plan.streamed}
        where = (name, label, offload)
        assert llm.engine.fused_decode is None, where  # a layer reading its experts per forward runs eagerly
        for a, c in zip(want_logits, llm.prompt_logits(PROMPTS)):
            assert torch.equal(a, c), where
        # batch 1: a decode step reads its top-k experts of each streamed layer, nothing more
        llm.engine.model.init_buffers()  # the routed-token counts of this generation alone
        stats = llm.streamer.experts.stats
        before = stats.bytes
        assert _tokens(llm, PROMPTS[:1]) == want_tokens, where
        steps = llm.engine.last_stats.decode_steps
        reads = expected_expert_reads(llm.expert_load(), plan.experts_streamed, cfg.moe.top_k, steps)
        assert stats.bytes - before == reads * plan.sizes.one_expert, where
        # the memory report: the experts' bytes where they live, the staging the plan counted
        mem = llm.memory()
        assert mem["weights_experts_streamed"] == sum(plan.sizes.experts[i] for i in plan.experts_streamed) > 0
        assert mem["staging"] == plan.fixed["staging"] and mem["weights_disk"] == plan.disk_read_bytes
        assert mem["expert_bytes"] == stats.bytes and mem["stream_bytes"] == stats.bytes + llm.streamer.stats.bytes
        llm.close()
        if offload:  # the offload folder: each streamed layer's core, and each expert-streamed layer's experts
            (folder,) = (tmp_path / "off").iterdir()
            assert sorted(f.name for f in folder.glob("experts*.safetensors")) == [f"experts{i:04d}.safetensors" for i in plan.experts_streamed]
            assert sorted(f.name for f in folder.glob("layer*.safetensors")) == [f"layer{i:04d}.safetensors" for i in plan.streamed]


@pytest.fixture(scope="module")
def big_moe(tmp_path_factory):
    """~300 MB of float32 routed experts in 4 Mixtral layers (cores ~1 MB each): large against
    the RSS slack (measured: 13 MiB per rank at tp=2), quick to write."""
    raw = llama_config_dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=1536, vocab_size=1000,
                            architecture="MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2)
    return write_checkpoint(tmp_path_factory.mktemp("big_moe") / "mixtral", raw, seed=4)


def test_streamed_experts_at_tp2_match_resident_and_stay_under_budget(moe_models, big_moe, tmp_path):
    """Two ranks (real processes): --moe ep and tp, experts and whole layers streamed, and a
    --attention dp run with one prompt (the other rank meets the streamed layers' all-to-alls
    with no token); first, a larger model whose experts all stream, for the peak RSS."""
    big_budget = budgets(split_cfg(big_moe, "ep"), 2)["all experts"]
    runs = [dict(model=str(big_moe), mode="ep", budget=big_budget, prompts=PROMPTS[:1]), dict(model=str(big_moe), mode="ep", budget=None, prompts=PROMPTS[:1])]
    for name, mode in (("mixtral", "ep"), ("qwen2_moe", "ep"), ("qwen2_moe", "tp")):
        b = budgets(split_cfg(moe_models[name], mode), 2)
        runs += [dict(model=str(moe_models[name]), mode=mode, budget=budget, prompts=PROMPTS[:1]) for budget in (None, b["experts"], b["whole"])]
    runs += [dict(model=str(moe_models["qwen2_moe"]), mode="dp", budget=budget, prompts=PROMPTS[:1]) for budget in (None, budgets(split_cfg(moe_models["qwen2_moe"], "dp"), 2)["whole"])]
    out = tmp_path / "runs.pt"
    spawn([str(out), json.dumps({"runs": runs, "new_tokens": NEW_TOKENS})], 2, threads=1,
          program=[sys.executable, str(hf_models.__file__).replace("hf_models.py", "moe_stream_rank.py")])
    results = torch.load(out)
    reference = None
    for run, got in zip(runs, results):
        where = (run["model"].rsplit("/", 1)[-1], run["mode"], run["budget"])
        if run["budget"] is None:
            reference = got
            assert got["streamed"] == got["experts_streamed"] == [], where
            continue
        # resident runs follow their streamed ones for the big model, precede them for the rest
        ref = results[runs.index(run) + 1] if run["model"] == str(big_moe) else reference
        assert got["experts_streamed"], where
        for a, c in zip(ref["logits"], got["logits"]):
            assert torch.equal(a, c), where
        assert got["tokens"] == ref["tokens"], where
        assert got["experts"]["layers"] == ref["experts"]["layers"], where  # the streamed layers' counts too
        cfg = split_cfg(run["model"], run["mode"])
        if run["mode"] != "dp":
            # every rank reads its part of each chosen expert: a whole expert under ep (the ranks
            # together read top-k per decode step and layer), a slice of every one under tp
            reads = expected_expert_reads(got["experts"], got["experts_streamed"], cfg.moe.top_k, got["decode_steps"])
            one = [placement.shard_bytes(cfg, 2, r, "float32", SEQ, BATCH).one_expert for r in range(2)]
            if run["mode"] == "ep":
                assert sum(got["expert_bytes_read"]) == reads * one[0] == reads * one[1], where
            else:
                assert got["expert_bytes_read"] == [reads * one[0], reads * one[1]], where
        for rank, m in enumerate(got["memory"]):
            assert m["expert_layers_streamed"] == len(got["experts_streamed"]) and m["weights_experts_streamed"] > 0, (where, rank)
    # the big model's streamed run was each rank's first: its peak RSS is under the budget + slack,
    # which a run holding its experts (150 MB a rank) would pass by far
    for rank, m in enumerate(results[0]["memory"]):
        over = m["peak_rss"] - m["rss_at_start"]
        assert over <= big_budget + RSS_SLACK, f"rank {rank}: peak RSS {over / MiB:.0f} MiB over start, budget {big_budget / MiB:.0f} MiB + {RSS_SLACK / MiB:.0f} MiB slack"
        resident = placement.shard_bytes(split_cfg(big_moe, "ep"), 2, rank, "float32", SEQ, BATCH)
        assert resident.weights > big_budget + RSS_SLACK + 32 * MiB


def test_cuda_streamer_keeps_a_staging_pair_per_layer_kind(monkeypatch):
    """The GPU streamer's bookkeeping with two kinds of layers (dense, MoE), on CPU with stand-in
    streams and events: each layer runs in a staging layer of its own kind, with its own weights,
    the kinds' pairs alternating on their own."""
    import contextlib

    from torch import nn
    from test_offload import _FakeEvent, _FakeStream

    from tp_runtime.model import offload

    compute = _FakeStream("compute")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream("copy"))
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)

    class Layer(nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind, self.layer = kind, None
            self.w = nn.Parameter(torch.zeros(1), requires_grad=False)

        def retarget(self, i):
            self.layer = i

        def forward(self, h):
            return (self.kind, self.layer, self.w.item())

    class Source:
        def fill(self, i, module):
            module.w.data.fill_(float(i))
            return 4

        def prefetch(self, i):
            pass

    kinds = {0: "dense", 1: "moe", 2: "moe", 3: "dense", 5: "moe"}
    staging = [Layer("dense"), Layer("dense"), Layer("moe"), Layer("moe")]
    streamer = offload.CudaLayerStreamer(staging, Source(), sorted(kinds), torch.device("cpu"), [m.kind for m in staging], kinds)
    seen = []
    for _token in range(3):
        for i in sorted(kinds):
            kind, layer, w = streamer.run(i, torch.zeros(1))
            assert (kind, layer, w) == (kinds[i], i, float(i))
            seen.append(id(streamer.staging[streamer._current]))
    assert len(set(seen)) == 4  # both buffers of both kinds in use
