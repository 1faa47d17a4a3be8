"""Layers beyond the host-memory budget are streamed from the mmap'd checkpoint: same tokens
and logits as the resident run, bounded peak memory, clear errors."""

import pytest
import torch
from conftest import last_json, run_cli

from tp_runtime import placement
from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint
from tp_runtime.config import ModelConfig, ParallelConfig, RuntimeConfig
from tp_runtime.engine.llm import LLM
from tp_runtime.engine.sampling import SamplingParams

MiB = 2**20
# what the process touches beyond the plan's byte counts after `rss_at_start`: allocator slack,
# libraries' pages first touched by the first matmul, per-op buffers (measured 14 MiB at tp=1 and
# 26 MiB per rank at tp=2 on this machine for the model below)
RSS_SLACK = 48 * MiB
PROMPT = "5,17,3,99,42,7"


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """~150 MB of float32 weights in 12 layers: large against the slack, quick to write."""
    cfg = llama_config_dict(hidden_size=512, num_layers=12, num_heads=8, num_kv_heads=4, intermediate_size=1536, vocab_size=4000)
    return write_checkpoint(tmp_path_factory.mktemp("offload") / "llama", cfg, seed=11)


@pytest.fixture(scope="module")
def bf16_sharded_model(tmp_path_factory):
    """bfloat16 weights in 2 files: streaming must convert dtype and find each file's tensors."""
    cfg = llama_config_dict(hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=320, vocab_size=500)
    cfg["torch_dtype"] = "bfloat16"
    return write_checkpoint(tmp_path_factory.mktemp("offload_bf16") / "llama", cfg, seed=5, shards=2)


def budget_for(model_dir, resident_layers: int, tp: int = 1, dtype: str = "float32", max_seq_len: int = 128, batch: int = 1) -> int:
    """The --max-host-memory that keeps exactly `resident_layers` layers of rank 0 resident."""
    cfg = ModelConfig.from_model_dir(model_dir)
    s = placement.shard_bytes(cfg, tp, 0, dtype, max_seq_len, batch)
    fixed = s.kv_cache + s.activations + s.embedding + s.lm_head + s.norm + max(s.layers)
    return fixed + sum(s.layers[:resident_layers]) + 1


def _load(model_dir, budget=None, dtype="float32", offload_dir=None):
    runtime = RuntimeConfig(dtype=dtype, max_seq_len=128, max_batch_size=2, max_host_memory=budget, offload_dir=offload_dir, show_progress=False)
    return LLM.load(model_dir, ParallelConfig(), runtime)


def test_streamed_layers_give_the_resident_logits_and_tokens(bf16_sharded_model):
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    resident = _load(bf16_sharded_model)
    want_logits = resident.prompt_logits(prompts)
    want_tokens = [e.token_id for e in resident.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))]
    resident.close()
    cfg = ModelConfig.from_model_dir(bf16_sharded_model)
    s = placement.shard_bytes(cfg, 1, 0, "float32", 128, 2)
    budget = s.kv_cache + s.activations + s.embedding + s.lm_head + s.norm + max(s.layers) + s.layers[0] + 1
    streamed = _load(bf16_sharded_model, budget)
    assert streamed.plan.streamed == [1, 2, 3]
    got_logits = streamed.prompt_logits(prompts)
    got_tokens = [e.token_id for e in streamed.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))]
    # the same float32 ops on the same (converted) weights: bitwise equal
    for a, b in zip(want_logits, got_logits):
        assert torch.equal(a, b)
    assert got_tokens == want_tokens
    # every forward pass copies each streamed layer once, bytes as stored (bf16)
    steps = 1 + 11 + 1  # prompt_logits, prefill, 11 decode steps
    assert streamed.streamer.stats.copies == 3 * steps
    stored = sum(s.layers[1:]) // 2  # bf16 in the files, float32 in memory
    assert streamed.streamer.stats.bytes == stored * steps
    mem = streamed.memory()
    assert mem["weights_disk"] == stored  # what the files hold for the streamed layers
    assert mem["staging"] == max(s.layers)
    streamed.close()


def test_offload_dir_holds_converted_layers_written_once(bf16_sharded_model, tmp_path):
    prompts = [[3, 1, 4, 1, 5]]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    resident = _load(bf16_sharded_model)
    want = [e.token_id for e in resident.generate(prompts, params)]
    resident.close()
    budget = budget_for(bf16_sharded_model, resident_layers=2, max_seq_len=128, batch=2)
    offload_dir = tmp_path / "offload"
    first = _load(bf16_sharded_model, budget, offload_dir=str(offload_dir))
    assert first.plan.layers_on("disk") == [2, 3]
    assert [e.token_id for e in first.generate(prompts, params)] == want
    # the folder holds this rank's layers in the runtime's dtype: a copy streams float32 bytes
    files = sorted(offload_dir.glob("*/layer*.safetensors"))
    assert [f.name for f in files] == ["layer0002.safetensors", "layer0003.safetensors"]
    assert first.streamer.stats.bytes == first.plan.layer_bytes_on("disk") * 10  # prefill + 9 decode steps
    first.close()
    stamps = [f.stat().st_mtime_ns for f in files]
    # a smaller budget reuses the two layers and writes only the one it lacks
    second = _load(bf16_sharded_model, budget_for(bf16_sharded_model, resident_layers=1, max_seq_len=128, batch=2), offload_dir=str(offload_dir))
    assert second.plan.layers_on("disk") == [1, 2, 3]
    assert [e.token_id for e in second.generate(prompts, params)] == want
    second.close()
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert (files[0].parent / "layer0001.safetensors").is_file()


def test_offload_dir_is_rebuilt_when_the_checkpoint_is_rewritten(tmp_path):
    """Same shapes, new weights (the fingerprint cannot tell): the old layers must not be used."""
    cfg = llama_config_dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=200)
    model_dir = tmp_path / "m"
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    budget = None
    runs = []
    for seed in (1, 2):
        write_checkpoint(model_dir, cfg, seed=seed)
        budget = budget or budget_for(model_dir, resident_layers=1, max_seq_len=128, batch=2)
        resident = _load(model_dir)
        want = [e.token_id for e in resident.generate([[5, 6, 7]], params)]
        resident.close()
        streamed = _load(model_dir, budget, offload_dir=str(tmp_path / "off"))
        assert streamed.plan.layers_on("disk") == [1, 2]
        runs.append(([e.token_id for e in streamed.generate([[5, 6, 7]], params)], want))
        streamed.close()
    assert all(got == want for got, want in runs)
    assert runs[0][1] != runs[1][1]  # the two checkpoints really differ


@pytest.mark.parametrize("tp", [1, 2])
def test_streamed_run_matches_resident_and_stays_under_budget(big_model, tp):
    base = ["generate", "--model", str(big_model), "--tp", str(tp), "--prompt-ids", PROMPT, "--max-new-tokens", "8", "--ignore-eos", "--max-seq-len", "128", "--quiet", "--json"]
    resident = run_cli(base, timeout=300)
    assert resident.returncode == 0, resident.stderr
    budget = budget_for(big_model, resident_layers=2, tp=tp)
    streamed = run_cli(base + ["--max-host-memory", str(budget)], timeout=300)
    assert streamed.returncode == 0, streamed.stderr
    r, s = last_json(resident.stdout), last_json(streamed.stdout)
    assert s["output_ids"] == r["output_ids"]
    assert s["memory"]["streamed_layers"] == 10 and r["memory"]["streamed_layers"] == 0
    assert len(s["memory"]["ranks"]) == tp
    for rank, m in enumerate(s["memory"]["ranks"]):
        over = m["peak_rss"] - m["rss_at_start"]
        assert over <= budget + RSS_SLACK, f"rank {rank}: peak RSS {over / MiB:.0f} MiB over start, budget {budget / MiB:.0f} MiB + {RSS_SLACK / MiB:.0f} MiB slack"
        assert m["weights_disk"] > 0 and m["stream_bytes_per_step"] == m["weights_disk"]
    # the bound is tight enough to catch a run that loads everything
    for m in r["memory"]["ranks"]:
        assert m["peak_rss"] - m["rss_at_start"] > budget + RSS_SLACK, {k: v / MiB for k, v in m.items()}


def test_budget_below_the_minimum_fails_early_naming_the_flag(big_model):
    p = run_cli(["generate", "--model", str(big_model), "--prompt-ids", PROMPT, "--max-new-tokens", "2", "--max-seq-len", "128", "--max-host-memory", "8MiB"])
    assert p.returncode == 1
    assert "--max-host-memory" in p.stderr and "missing" in p.stderr and "rank 0" in p.stderr
    assert "Traceback" not in p.stderr


def test_int8_with_streamed_layers_at_tp2_matches_resident(bf16_sharded_model):
    """--quantize int8 on two ranks, each quantising its streamed slices (bf16 in the files) as
    it reads them."""
    base = ["generate", "--model", str(bf16_sharded_model), "--tp", "2", "--prompt-ids", PROMPT, "--max-new-tokens", "4", "--ignore-eos",
            "--max-seq-len", "128", "--dtype", "float32", "--quantize", "int8", "--quiet", "--json"]
    resident = run_cli(base, timeout=300)
    assert resident.returncode == 0, resident.stderr
    sizes = [placement.shard_bytes(ModelConfig.from_model_dir(bf16_sharded_model), 2, r, "float32", 128, 1, quantize="int8") for r in (0, 1)]
    budget = max(b.kv_cache + b.activations + b.embedding + b.lm_head + b.norm + 2 * max(b.layers) + 1 for b in sizes)  # one layer resident
    streamed = run_cli(base + ["--max-host-memory", str(budget)], timeout=300)
    assert streamed.returncode == 0, streamed.stderr
    r, s = last_json(resident.stdout), last_json(streamed.stdout)
    assert s["output_ids"] == r["output_ids"]
    assert s["memory"]["streamed_layers"] == 3
    for m, b in zip(s["memory"]["ranks"], sizes):  # bf16 values streamed: 2x what int8 holds, less the scales
        assert m["stream_bytes_per_step"] == m["weights_disk"] > 1.5 * sum(b.layers[1:])


def test_verbose_prints_every_ranks_plan_and_memory(big_model):
    budget = budget_for(big_model, resident_layers=4, tp=2)
    p = run_cli(["generate", "--model", str(big_model), "--tp", "2", "--prompt-ids", PROMPT, "--max-new-tokens", "2", "--max-seq-len", "128", "--quiet", "--verbose", "--max-host-memory", str(budget)], timeout=300)
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] placement:" in out and f"[rank {rank}] loaded:" in out
    assert "disk (mmap)" in out and "4-11" in out  # layers 0-3 resident, 4-11 streamed
    assert "streamed/step" in out


class _FakeEvent:
    log: list = []

    def record(self, stream=None):
        _FakeEvent.log.append(("record", id(self), getattr(stream, "name", None)))

    def synchronize(self):
        pass


class _FakeStream:
    def __init__(self, name="copy"):
        self.name = name
        self.waited = []

    def wait_event(self, ev):
        self.waited.append(id(ev))


def _fake_cuda_streamer(monkeypatch, streamed, fail_at=None):
    """A CudaLayerStreamer over stand-in streams and events, with layers whose output is
    their weight (the layer index a source copied in); fail_at: a layer that raises once."""
    import contextlib

    from torch import nn

    from tp_runtime.model import offload

    compute = _FakeStream("compute")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream("copy"))
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    failures = [fail_at]

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3), requires_grad=False)
            self.layer = None

        def retarget(self, i):
            self.layer = i

        def forward(self, h):
            if self.layer == failures[0]:
                failures[0] = None
                raise RuntimeError("a collective timed out")
            return h + self.w  # the weights this layer was given

    class Source:
        fills = []

        def fill(self, i, module):
            Source.fills.append(i)
            module.w.data.fill_(float(i))
            return 12

        def prefetch(self, i):
            pass

    _FakeEvent.log = []
    streamer = offload.CudaLayerStreamer([Layer(), Layer()], Source(), streamed, torch.device("cpu"))
    return streamer, Source, compute


def test_cuda_streamer_logic_with_fake_streams(monkeypatch):
    """The double-buffered GPU streamer's bookkeeping, on CPU with stand-in streams and events:
    every layer runs with its own weights, copies alternate buffers, a buffer is refilled only
    after waiting for the event its last user recorded."""
    streamer, Source, compute = _fake_cuda_streamer(monkeypatch, [1, 3, 4])
    out = []
    for _token in range(2):
        for i in (1, 3, 4):
            out.append(streamer.run(i, torch.zeros(3))[0].item())
    assert out == [1.0, 3.0, 4.0, 1.0, 3.0, 4.0]
    # one copy per use, issued one layer ahead (the last release issues the next token's first)
    assert Source.fills == [1, 3, 4, 1, 3, 4, 1]
    assert streamer.stats.copies == 7 and streamer.stats.bytes == 84
    # every refill of a buffer waited on an event recorded after that buffer's last use
    copy_stream = streamer.copy_stream
    assert len(copy_stream.waited) == 5  # the first two fills found fresh buffers
    assert all(w in {e for kind, e, s in _FakeEvent.log if s == "compute"} for w in copy_stream.waited)
    assert len(compute.waited) == 6  # compute waited for every copy it used


def test_cuda_streamer_after_a_failed_pass_runs_the_right_weights(monkeypatch):
    streamer, Source, _ = _fake_cuda_streamer(monkeypatch, [1, 3, 4], fail_at=3)
    assert streamer.run(1, torch.zeros(3))[0].item() == 1.0
    with pytest.raises(RuntimeError):
        streamer.run(3, torch.zeros(3))  # the pass is abandoned here
    out = [streamer.run(i, torch.zeros(3))[0].item() for i in (1, 3, 4)]
    assert out == [1.0, 3.0, 4.0]
