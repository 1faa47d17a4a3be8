"""`tp-bench sweep` and `tp-bench calibrate --ranks`: measured tokens/s versus tp and link latency
on local ranks, beside the speed-of-light model's prediction.

The ranks are started once per tp (launch/spawn.py) and loop over the parallel modes (a MoE
model: `--moe-modes tp,ep,dp`, loaded once per mode), the latencies and the batch sizes
themselves, changing the communicator's injected latency between points, so a sweep pays
process start once per tp and weight loading once per (tp, mode), not once per point.

Prediction for p local ranks, a parallel mode, a batch of b sequences and an injected latency L
(sol.predict, plus one host term):

    seconds/step  = max(memory_s, compute_s)                 sol, with the bandwidth one rank
                                                             reaches while p ranks read at once
                  + collectives x (alpha(p) + L + bytes/beta(p))   sol, one-shot (1 step); an
                                                             all-to-all at its own alpha(p)
                  + host_step(p, mode, b) + layers x host_layer(p, mode, b)
    tokens/s      = b / seconds/step

alpha(p) (all-reduce, and all-to-all for a MoE model), beta(p) and the per-rank bandwidth come
from `tp-bench calibrate --ranks` (saved as a preset): speed of light is the limit, the
calibrated host term is what a Python runtime on this CPU adds to it (a residual: the step
the calibration models took less what sol charges for them, negative where sol's bandwidth,
a 256 MB GEMV's, undercounts a small model's partly cached layers). The host costs are
measured per mode and batch on two models of the swept model's width that differ only in depth
(for a MoE model: Mixtral-shaped ones with its experts, top-k and expert width), with the
calibration (preset) or, by default for a MoE model, run beside the sweep's own points in the
same minutes (`--host-calibration inline`: on a machine others use too, load that comes and
goes then falls on both alike). So at latency 0 a prediction is the depth extrapolated, and
what it tests is the latency dependence: the collective counts of each mode (measured and
predicted counts are in every row) times alpha + L, and the bytes they move. What each mode
reads and multiplies is sol's too, but the fit per (p, mode, batch) absorbs whatever of it is
linear in depth. Ranks beyond the core count share cores; calibration at that p measures the
sharing rather than modelling it.

Measured decode tokens/s is the group's: b x decode steps / decode seconds (under --attention dp
a rank's own stats count only its own sequences; they all finish together, ignore_eos). On a
machine others use too, `--threads 1` (no rank's GEMV pool waiting on a core another process
holds), `--inject sleep` (no rank spinning out an injected latency on such a core) and
`--statistic best` (the fastest of the repeats, of the points and of the calibration models
alike: the uncontended machine the prediction describes) keep that use out of the comparison;
repeats run outermost, so a burst of it falls on one run of many points.

A MoE sweep also writes the routed-token load of one run (the largest tp, the largest batch) per
layer and expert: experts.csv and experts.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tp_runtime import optional, sol, units
from tp_runtime.config import CommConfig, ModelConfig, RuntimeConfig
from tp_runtime.errors import ConfigError

DUMMY_SHAPES: dict[str, dict[str, Any]] = {
    # comm-visible at once: small and shallow
    "tiny": dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=704, vocab_size=8000),
    # ../shared/MEASURED.md's SMALL
    "small": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048, vocab_size=32000),
    # TinyLlama-1.1B's shape
    "tinyllama": dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632, vocab_size=32000),
    # Mixtral-8x7B's shape scaled to this machine: 8 experts, top-2, every layer sparse, GQA 2:1,
    # experts 3x the hidden size (Mixtral 3.5x); 75 MB of experts read per token at batch 1 in
    # float32, all 301 MB of them from batch ~16 on
    "mixtral-mini": dict(architecture="MixtralForCausalLM", hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=1536,
                         vocab_size=8000, num_local_experts=8, num_experts_per_tok=2),
    # the tests' MoE model: as small as a sweep gets
    "moe-tiny": dict(architecture="MixtralForCausalLM", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                     vocab_size=1000, num_local_experts=4, num_experts_per_tok=2),
}
# sol.PARALLEL -> the RuntimeConfig fields that run it (--moe, --attention)
MOE_MODES: dict[str, dict[str, str]] = {"tp": {"moe": "tp"}, "ep": {"moe": "ep"}, "dp": {"moe": "ep", "attention": "dp"}}
# host cost: two models of the swept model's width and vocabulary that differ only in depth
# (1 and 3 layers); their decode steps, less what the speed-of-light model charges for them
# (weight reads, collectives at the calibrated alpha/beta), give the host cost per layer and
# per step. Only the depth is extrapolated; the latency dependence is pure prediction.
CALIBRATION_DEPTHS = (1, 3)
GENERIC_WIDTH = dict(hidden_size=256, num_heads=8, num_kv_heads=4, intermediate_size=704, vocab_size=8000)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def git_sha() -> str:
    """The checkout's HEAD commit, read from .git (no git process), or "unknown"."""
    for root in Path(__file__).resolve().parents:
        git = root / ".git"
        if (git / "HEAD").is_file():
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref: "):
                return head[:10]
            ref = head[5:]
            if (git / ref).is_file():
                return (git / ref).read_text().strip()[:10]
            packed = git / "packed-refs"
            for line in packed.read_text().splitlines() if packed.is_file() else []:
                if line.endswith(" " + ref):
                    return line[:10]
            return "unknown"
    return "unknown"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tp-runtime"


def dummy_checkpoint(shape: dict[str, int], name: str) -> Path:
    """A random checkpoint of `shape` in the cache (written once)."""
    from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint

    path = cache_root() / "dummy" / name
    if not (path / "config.json").is_file():
        print(f"writing a random {name} checkpoint to {path} ...", file=sys.stderr, flush=True)
        write_checkpoint(path, llama_config_dict(**shape), seed=0)
    return path


# ---------------------------------------------------------------------------------------------
# rank side: `python -m tp_runtime.cli.sweep SPEC` under launch.spawn


def _communicator(spec: dict[str, Any], parallel):
    import torch

    from tp_runtime.comm import create
    from tp_runtime.comm.timing import wrap

    if spec["transport"] != "zmq" or parallel.world_size == 1:
        return create(parallel, torch.device("cpu"), CommConfig(transport=spec["transport"]))
    from tp_runtime.comm.zmq_transport import ZmqCommunicator

    return wrap(ZmqCommunicator.on_loopback(parallel.rank, spec["ports"]), CommConfig(), torch.device("cpu"))


def _set_latency(comm, seconds: float, world_size: int, inject: str = "auto") -> None:
    """inject: "spin" (the last millisecond spun), "sleep", or "auto": spin while the ranks fit
    the cores."""
    from tp_runtime.comm.timing import LatencyInjector

    spin = inject == "spin" or (inject == "auto" and world_size <= (os.cpu_count() or 1))
    if hasattr(comm, "injector"):
        comm.injector = LatencyInjector(seconds, None, spin=spin) if seconds > 0 else None


def _prompts(vocab: int, count: int, length: int) -> list[list[int]]:
    """`count` random prompts (the same for every rank and run; the first is the single-stream one)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (count, length), generator=gen).tolist()


def _decode_tokens_per_s(batch: int, st) -> float:
    """The group's decode tokens/s: every sequence gets a token per step (ignore_eos: they finish
    together). Under --attention dp a rank's own stats count only its own sequences."""
    return batch * st.decode_steps / st.decode_seconds if st.decode_seconds else 0.0


def _sweep_rank(spec: dict[str, Any], parallel) -> dict[str, Any]:
    from tp_runtime.engine.llm import LLM
    from tp_runtime.engine.sampling import SamplingParams

    comm = _communicator(spec, parallel)
    modes, batches = spec.get("modes", ["tp"]), spec.get("batches", [1])
    host_models = spec.get("host_models") or {}  # --host-calibration inline: the calibration models, run beside
    params = SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True)
    points, experts = [], {}
    runs_total = len(modes) * (len(spec["latencies"]) + len(host_models)) * len(batches) * spec["repeats"]
    bar = _bar(runs_total, f"tp={parallel.world_size}") if parallel.rank == 0 else None
    for mode in modes:
        runtime = RuntimeConfig(dtype=spec["dtype"], max_seq_len=spec["prompt_len"] + spec["new_tokens"] + 8, max_batch_size=max(batches),
                                show_progress=False, **MOE_MODES[mode])
        llm = LLM.load(spec["model"], parallel, runtime, comm=comm)
        side = {int(layers): LLM.load(path, parallel, runtime, comm=comm) for layers, path in host_models.items()}
        prompts = _prompts(llm.cfg.vocab_size, max(batches), spec["prompt_len"])
        for m in (llm, *side.values()):
            list(m.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True)))  # warm-up, at the largest batch
        # repeats outermost: a burst of other work on the machine hits one run of many points
        # rather than every run of one point (and the calibration models' runs beside them)
        runs: dict[tuple[float, int], list[dict[str, Any]]] = {(lat, b): [] for lat in spec["latencies"] for b in batches}
        host_steps: dict[int, dict[int, list[float]]] = {b: {layers: [] for layers in side} for b in batches}
        for _ in range(spec["repeats"]):
            for lat in spec["latencies"]:
                _set_latency(comm, lat, parallel.world_size, spec.get("inject", "auto"))
                for b in batches:
                    list(llm.generate(prompts[:b], params))
                    st = llm.engine.last_stats
                    c = comm.stats.summary(st.decode_seconds, st.decode_steps)
                    runs[(lat, b)].append({
                        "decode_tokens_per_s": _decode_tokens_per_s(b, st), "prefill_tokens_per_s": st.prefill_tokens_per_s,
                        "comm_share": c["comm_share_of_decode"], "collectives_per_token": c["collectives_per_token"], "bytes_per_token": c["bytes_per_token"],
                    })
                    if bar:
                        bar.update()
            _set_latency(comm, 0.0, parallel.world_size)
            for b in batches:
                for layers, m in side.items():
                    list(m.generate(prompts[:b], params))
                    st = m.engine.last_stats
                    host_steps[b][layers].append(st.decode_seconds / max(st.decode_steps, 1))  # (dp: rank 0's counts)
                    if bar:
                        bar.update()
        fused = llm.engine.fused_decode is not None
        points += [{"mode": mode, "latency_s": lat, "batch": b, "runs": r, "fused": fused, "host_steps": host_steps[b]} for (lat, b), r in runs.items()]
        _set_latency(comm, 0.0, parallel.world_size)
        if spec.get("expert_load") and llm.cfg.moe is not None:
            # one run's routed-token counts, at the largest batch (every rank takes part: dp sums them)
            llm.engine.model.init_buffers()
            list(llm.generate(prompts, params))
            experts[mode] = llm.expert_load()
        for m in (llm, *side.values()):
            m.close()
    if bar:
        bar.close()
    comm.close()
    return {"points": points, "experts": experts}


def _gemv_bandwidth(comm, spec: dict[str, Any], repeats: int) -> float:
    """Per-rank GEMV read rate with every rank reading its share at once, through the GEMV decode
    uses (the C kernel where it builds, with decode's thread handover)."""
    import torch

    from tp_runtime.kernels import cpu_gemv

    rows = spec["gemv_bytes"] // 4 // comm.world_size // 4096
    w = torch.full((rows, 4096), 0.5)  # (the values do not change a float GEMV's speed; filling is ~10x faster than randn)
    x = torch.full((1, 4096), 0.25)
    times = []
    cpu_gemv.load()
    with cpu_gemv.decode_threads():
        for _ in range(repeats + 1):
            comm.barrier(site="calibrate")
            t0 = time.perf_counter()
            for _ in range(4):
                cpu_gemv.cpu_linear(x, w)
            times.append(time.perf_counter() - t0)
    return 4 * w.numel() * 4 / statistics.median(times[1:])


def _all_reduce_seconds(comm, numel: int, n: int) -> float:
    import torch

    t = torch.zeros(numel)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        comm.all_reduce(t, site="calibrate")
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples[n // 5:])


def _probe_rank(spec: dict[str, Any], parallel) -> dict[str, Any]:
    """The quick check of a cached calibration: bandwidth and one small all-reduce's latency."""
    comm = _communicator(spec, parallel)
    out = {"mem_bandwidth_Bps": _gemv_bandwidth(comm, spec, 3)}
    if parallel.world_size > 1:
        out["alpha_s"] = _all_reduce_seconds(comm, spec["hidden"], 200)
    comm.close()
    return out


def _all_to_all_seconds(comm, numel: int, n: int) -> float:
    """Median latency of an all-to-all of one row of `numel` floats to every rank (a decode
    step's dispatch at batch 1, about)."""
    import torch

    world = comm.world_size
    t = torch.zeros(world, numel)
    ones = [1] * world
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        comm.all_to_all(t, ones, ones, site="calibrate")
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples[n // 5:])


def _calibrate_rank(spec: dict[str, Any], parallel) -> dict[str, Any]:
    """Per-rank GEMV bandwidth with every rank reading at once, collective alpha/beta, host overhead
    per (mode, batch)."""
    from tp_runtime.engine.llm import LLM
    from tp_runtime.engine.sampling import SamplingParams

    comm = _communicator(spec, parallel)
    out: dict[str, Any] = {"mem_bandwidth_Bps": _gemv_bandwidth(comm, spec, spec["repeats"])}
    if parallel.world_size > 1:
        small = _all_reduce_seconds(comm, spec["hidden"], 300)
        big = _all_reduce_seconds(comm, 1 << 18, 30)  # 1 MiB
        out["alpha_s"] = small
        out["beta_Bps"] = (1 << 20) / max(big - small, 1e-9)
        if spec.get("all_to_all"):
            out["a2a_alpha_s"] = _all_to_all_seconds(comm, spec["hidden"], 300)
    # host cost: whole decode steps of the two calibration models (collectives included: with
    # more ranks than cores, waiting in a collective is where time-sharing shows up)
    modes, batches = spec.get("modes", ["tp"]), spec.get("batches", [1])
    tokens, samples_n = spec.get("calibration_tokens", 40), spec.get("calibration_samples", 5)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    host: dict[str, dict[str, dict[int, float]]] = {}
    for mode in modes:
        runtime = RuntimeConfig(dtype=spec["dtype"], max_seq_len=64, max_batch_size=max(batches), show_progress=False, **MOE_MODES[mode])
        # both depths loaded at once and their runs alternated: a burst of other work on the
        # machine falls on both, not on one depth's every sample
        llms = {int(layers): LLM.load(path, parallel, runtime, comm=comm) for layers, path in spec["calibration_models"].items()}
        out.setdefault("fused", {})[mode] = all(llm.engine.fused_decode is not None for llm in llms.values())
        for b in batches:
            # batch 1: the fixed prompt of the dense calibration; more: distinct prompts (routing differs)
            prompts = [[1, 2, 3, 4]] if b == 1 else _prompts(next(iter(llms.values())).cfg.vocab_size, b, 4)
            samples: dict[int, list[float]] = {layers: [] for layers in llms}
            if spec.get("warm_up"):
                for llm in llms.values():
                    list(llm.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True)))
            for _ in range(samples_n):
                for layers, llm in llms.items():
                    list(llm.generate(prompts, params))
                    st = llm.engine.last_stats
                    samples[layers].append(st.decode_seconds / max(st.decode_steps, 1))  # (dp: a rank may have no sequence; rank 0's counts)
            for layers, values in samples.items():
                host.setdefault(mode, {}).setdefault(str(b), {})[layers] = min(values) if spec.get("statistic") == "best" else statistics.median(values)
        for llm in llms.values():
            llm.close()
    out["steps"] = {}
    for mode, by_batch in host.items():
        for b, by_depth in by_batch.items():
            out["steps"].setdefault(mode, {})[b] = depth_fit(by_depth)
    if "1" in out["steps"].get("tp", {}):  # the dense single-stream figures, where every reader looks for them
        out.update(out["steps"]["tp"]["1"])
    comm.close()
    return out


RANK_MODES = {"sweep": _sweep_rank, "calibrate": _calibrate_rank, "probe": _probe_rank}


def rank_main(spec_json: str) -> None:
    from tp_runtime.launch.env import parallel_from_env
    from tp_runtime.launch.spawn import record_failure, write_result

    spec = json.loads(spec_json)
    parallel = parallel_from_env()
    try:
        result = RANK_MODES[spec["mode"]](spec, parallel)
        if parallel.rank == 0:
            write_result(result)
    except BaseException as e:
        record_failure(parallel.rank, e)
        raise


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, leave=False)


# ---------------------------------------------------------------------------------------------
# parent side


def _spawn(spec: dict[str, Any], tp: int) -> dict[str, Any]:
    from tp_runtime.launch.spawn import free_port, spawn, threads_per_rank

    spec = dict(spec, ports=[free_port() for _ in range(tp)])
    return spawn([json.dumps(spec)], tp, threads=spec.get("threads") or threads_per_rank(tp), program=[sys.executable, "-m", "tp_runtime.cli.sweep"])


def _width_tag(width: dict[str, Any]) -> str:
    tag = f"h{width['hidden_size']}-i{width['intermediate_size']}-a{width['num_heads']}x{width['num_kv_heads']}-v{width['vocab_size']}"
    if width.get("num_local_experts"):
        tag += f"-e{width['num_local_experts']}k{width['num_experts_per_tok']}"
    return tag


def calibration_name(transport: str, width: dict[str, Any], dtype: str, threads: int | None = None, statistic: str = "median") -> str:
    """The preset a calibration is saved as; `threads` per rank where not the launcher's default,
    and the statistic of its host-cost runs where not the median."""
    return f"this-cpu-{transport}-{_width_tag(width)}-{dtype}" + (f"-t{threads}" if threads else "") + ("" if statistic == "median" else f"-{statistic}")


def calibration_width(cfg: ModelConfig) -> dict[str, Any]:
    """The shape of the calibration models for `cfg`: its width and vocabulary; for a MoE model a
    Mixtral of its experts, top-k and expert width (a shared expert or dense layers are not
    copied: the host cost they add is extrapolated as a sparse layer's)."""
    width: dict[str, Any] = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_heads=cfg.num_heads,
                                 num_kv_heads=cfg.num_kv_heads, vocab_size=cfg.vocab_size)
    if cfg.moe is not None:
        width.update(architecture="MixtralForCausalLM", intermediate_size=cfg.moe.intermediate_size, num_local_experts=cfg.moe.num_experts,
                     num_experts_per_tok=cfg.moe.top_k)
    return width


def _calibration_shape(width: dict[str, Any], layers: int, dtype: str) -> sol.ModelShape:
    from tp_runtime.checkpoint.synthetic import llama_config_dict

    cfg = ModelConfig.from_dict(llama_config_dict(**width, num_layers=layers))
    return sol.ModelShape.from_config(cfg, bytes_per_param=DTYPE_BYTES[dtype], name="calibration")


# how the host cost is measured: decode tokens per run and runs per (mode, batch, depth). A MoE
# calibration covers every mode and batch of the sweep, so it takes shorter runs (and a warm-up
# per batch: routing at a new batch size touches experts the last one did not)
DENSE_HOST_RUNS = dict(calibration_tokens=40, calibration_samples=5, warm_up=False)
MOE_HOST_RUNS = dict(calibration_tokens=16, calibration_samples=5, warm_up=True)


def calibrate_local(transport: str, ranks: list[int], width: dict[str, Any] = GENERIC_WIDTH, dtype: str = "float32", repeats: int = 7,
                    modes: list[str] | None = None, batches: list[int] | None = None, threads: int | None = None, statistic: str = "median",
                    host: bool = True) -> Path:
    """Measure every p in `ranks` for models of `width` (host cost per mode in `modes`, p > 1, or
    the first alone at p = 1, and per batch) with `threads` per rank (default: the launcher's,
    cores / p), each host-cost figure the median of its runs or the best (statistic="best");
    saves a preset with a "local_ranks" table. host=False: bandwidth and collectives only (the
    sweep measures the host cost beside its points, --host-calibration inline)."""
    modes, batches = (modes or ["tp"]) if host else [], batches or [1]
    moe = bool(width.get("num_local_experts"))
    name = calibration_name(transport, width, dtype, threads, statistic)
    models = {}
    for layers in CALIBRATION_DEPTHS:
        models[layers] = str(dummy_checkpoint(dict(width, num_layers=layers), f"calibration-{_width_tag(width)}-{layers}l"))
    runs = MOE_HOST_RUNS if moe else DENSE_HOST_RUNS
    context = 4 + runs["calibration_tokens"] // 2
    table = {}
    for p in ranks:
        here = modes if p > 1 else modes[:1]
        what = f"host cost of {', '.join(here)} x batch {','.join(map(str, batches))}" if here else "bandwidth and collectives"
        print(f"calibrating {p} local rank(s) over {transport} ({what}) ...", file=sys.stderr, flush=True)
        spec = {"mode": "calibrate", "transport": transport, "hidden": width["hidden_size"], "repeats": repeats, "gemv_bytes": 256 << 20,
                "calibration_models": models, "dtype": dtype, "modes": here, "batches": batches, "all_to_all": moe, "threads": threads, "statistic": statistic, **runs}
        row = _spawn(spec, p)
        row["host"] = {}
        for mode, by_batch in row.get("steps", {}).items():
            for b, st in by_batch.items():
                row["host"].setdefault(mode, {})[b] = host_cost(width, row, p, mode, int(b), st, context, dtype, row["fused"][mode])
        if "1" in row["host"].get("tp", {}):  # the dense single-stream figures, where every reader looks for them
            row.update(row["host"]["tp"]["1"])
        table[str(p)] = row
    one = table[str(min(ranks))]
    hw = sol.Hardware(name, one["mem_bandwidth_Bps"], 1e11, float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
                      source=f"tp-bench calibrate --ranks on {platform.node()} {time.strftime('%Y-%m-%d')}: GEMV read rate of one rank")
    two = table.get("2")
    link = sol.Link(name, two["alpha_s"], two["beta_Bps"], source=f"{transport} all-reduce between 2 local ranks, measured") if two else None
    provenance = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_sha": git_sha(), "host": platform.node()}
    path = sol.save_preset(name, hardware=hw, link=link, extra={"transport": transport, "cores": os.cpu_count(), "width": width, "dtype": dtype,
                                                                 "local_ranks": table, **provenance})
    for p, row in table.items():
        a2a = f", all-to-all {row['a2a_alpha_s'] * 1e6:7.1f} us" if "a2a_alpha_s" in row else ""
        print(f"  p={p}: {row['mem_bandwidth_Bps'] / 1e9:5.1f} GB/s per rank, alpha {row.get('alpha_s', 0) * 1e6:7.1f} us{a2a}, "
              f"beta {row.get('beta_Bps', float('inf')) / 1e9:6.2f} GB/s", file=sys.stderr)
        for mode, by_batch in row["host"].items():
            for b, h in by_batch.items():
                print(f"      host {mode} batch {b}: {h['overhead_s_per_step'] * 1e6:6.0f} us/step + {h['overhead_s_per_layer'] * 1e6:5.0f} us/layer", file=sys.stderr)
    return path


def host_cost(width: dict[str, Any], row: dict[str, Any], p: int, mode: str, batch: int, steps: dict[str, float], context: int, dtype: str,
              fused: bool | None) -> dict[str, float]:
    """The host cost of a decode step: the calibration models' measured step (steps: its
    "step_s_per_layer" and "step_s_fixed" from the 1- and 3-layer models) less what the
    speed-of-light model already charges for them (weight reads, collectives) at p ranks of `row`.
    A residual, not clamped: negative where sol charges more than the step took (its bandwidth
    is a 256 MB GEMV's; a small model's layers partly stay in the cache), so that at the
    calibration's latency the prediction is the two models' depth extrapolated, exactly."""
    one, three = (predict_local(_calibration_shape(width, n, dtype), {str(p): row}, p, 0.0, context, dtype, mode=mode, batch=batch, host=False, fused=fused)
                  for n in CALIBRATION_DEPTHS)
    sol_per_layer = (three.seconds_per_token - one.seconds_per_token) / (CALIBRATION_DEPTHS[1] - CALIBRATION_DEPTHS[0])
    return {
        "overhead_s_per_layer": steps["step_s_per_layer"] - sol_per_layer,
        "overhead_s_per_step": steps["step_s_fixed"] - (one.seconds_per_token - CALIBRATION_DEPTHS[0] * sol_per_layer),
    }


def depth_fit(by_depth: dict[int, float]) -> dict[str, float]:
    """Seconds per step of the calibration models by depth -> per layer and fixed."""
    (l0, t0), (l1, t1) = sorted(by_depth.items())
    per_layer = (t1 - t0) / (l1 - l0)  # host + weight reads + collectives of one layer
    return {"step_s_per_layer": per_layer, "step_s_fixed": t0 - l0 * per_layer}


def calibration_covers(saved: dict[str, Any], tps: list[int], modes: list[str], batches: list[int], host: bool = True) -> bool:
    """Whether a saved calibration has every tp, and the host cost of every (mode, batch) there
    (a calibration from before per-mode host costs counts as tp at batch 1)."""
    for t in tps:
        row = saved["local_ranks"].get(str(t))
        if row is None:
            return False
        if not host:
            continue
        host = row.get("host") or {"tp": {"1": {}}}
        if any(str(b) not in host.get(m, {}) for m in (modes if t > 1 else modes[:1]) for b in batches):
            return False
    return True


def host_overhead(row: dict[str, Any], mode: str, batch: int) -> tuple[float, float]:
    """(seconds per step, seconds per layer) of host cost for `mode` at `batch` from a calibration row."""
    h = (row.get("host") or {}).get(mode, {}).get(str(batch))
    if h is None:
        if (mode, batch) != ("tp", 1) or "overhead_s_per_step" not in row:
            raise ConfigError(f"the calibration has no host cost for mode {mode} at batch {batch}; measure it again (drop --cached-calibration)")
        h = row
    return h["overhead_s_per_step"], h["overhead_s_per_layer"]


def load_local_calibration(name: str) -> dict[str, Any] | None:
    """The saved calibration's "measured" record (its "local_ranks" table and when, where and at
    which commit it was measured), or None."""
    path = sol.preset_dir() / f"{name}.json"
    if not path.is_file():
        return None
    try:
        measured = json.loads(path.read_text()).get("measured", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # unreadable: measured afresh, like a missing one
    return measured if isinstance(measured.get("local_ranks"), dict) else None


# A cached calibration is used only while a quick probe agrees with it: the per-rank GEMV
# bandwidth and one small all-reduce within this relative tolerance (the all-reduce with a floor
# of ALPHA_FLOOR_S, below which loopback latencies jitter by more than their size).
DEFAULT_CALIBRATION_TOLERANCE = 0.25
ALPHA_FLOOR_S = 20e-6


def calibration_drift(cached: dict[str, Any], probe: dict[str, Any]) -> dict[str, float]:
    """Relative differences of the probe from the cached row: {"mem_bandwidth_Bps": ..., "alpha_s": ...}."""
    drift = {"mem_bandwidth_Bps": abs(probe["mem_bandwidth_Bps"] / cached["mem_bandwidth_Bps"] - 1)}
    if "alpha_s" in probe and "alpha_s" in cached:
        drift["alpha_s"] = abs(probe["alpha_s"] - cached["alpha_s"]) / max(cached["alpha_s"], ALPHA_FLOOR_S)
    return drift


def sweep_calibration(transport: str, tps: list[int], width: dict[str, Any], dtype: str, *, cached: bool, tolerance: float,
                      modes: list[str] | None = None, batches: list[int] | None = None, threads: int | None = None,
                      statistic: str = "median", host: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the local_ranks table, where it came from). Measured in this run unless `cached`; a cached
    one must cover every tp, mode and batch and pass the probe at the largest tp, else it is
    measured again."""
    modes, batches = modes or ["tp"], batches or [1]
    name = calibration_name(transport, width, dtype, threads, statistic)
    saved = load_local_calibration(name) if cached else None
    info: dict[str, Any] = {"preset": name}
    if saved is not None and calibration_covers(saved, tps, modes, batches, host):
        p = max(tps)
        spec = {"mode": "probe", "transport": transport, "hidden": width["hidden_size"], "gemv_bytes": 256 << 20, "threads": threads}
        probe = _spawn(spec, p)
        drift = calibration_drift(saved["local_ranks"][str(p)], probe)
        worst = max(drift, key=drift.get)
        info.update(probe_tp=p, probe=probe, drift={k: round(v, 4) for k, v in drift.items()}, tolerance=tolerance)
        if drift[worst] <= tolerance:
            print(f"using the cached calibration {name} (measured {saved.get('measured_at', 'at an unknown time')}): the probe at p={p} "
                  f"is within {drift[worst]:.0%} of it (tolerance {tolerance:.0%})", file=sys.stderr)
            info.update(source="cached", measured_at=saved.get("measured_at", "unknown"), git_sha=saved.get("git_sha", "unknown"))
            return saved["local_ranks"], info
        print(f"the cached calibration {name} has drifted: {worst} at p={p} is {drift[worst]:.0%} off the probe "
              f"(tolerance {tolerance:.0%}); measuring it again", file=sys.stderr)
        info["source"] = "measured (cached one drifted)"
    elif cached:
        info["source"] = "measured (no cached one for every tp, mode and batch)"
    else:
        info["source"] = "measured"
    calibrate_local(transport, sorted(set(tps)), width, dtype, modes=modes, batches=batches, threads=threads, statistic=statistic, host=host)
    fresh = load_local_calibration(name)
    if fresh is None:
        raise ConfigError(f"the calibration {name} was measured but cannot be read back from {sol.preset_dir()}")
    info.update(measured_at=fresh["measured_at"], git_sha=fresh["git_sha"])
    return fresh["local_ranks"], info


def fused_decode_applies(dtype: str) -> bool:
    """Whether local CPU ranks decode through the fused step (model/fused_decode.py), which looks
    embedding rows up without a collective: the C kernel builds and the dtype is one it takes."""
    from tp_runtime.kernels import cpu_gemv

    return cpu_gemv.available() and dtype in ("float32", "bfloat16")


def predict_local(shape: sol.ModelShape, calib: dict[str, Any], p: int, latency_s: float, context_len: int, dtype: str, *, mode: str = "tp",
                  batch: int = 1, host: bool = True, fused: bool | None = None) -> sol.Prediction:
    """sol.predict for p local ranks of the calibration `calib` (its "local_ranks" table), one-shot
    collectives at the measured alpha + the injected latency (an all-to-all at its own measured
    alpha where there is one), plus the host cost of `mode` at `batch` unless host=False.
    fused: whether the ranks decoded through the fused step (which looks embedding rows up
    without the "embed" all-reduce), as they reported it; None: where it would apply."""
    if fused is None:
        fused = fused_decode_applies(dtype) and mode != "dp"
    row = calib[str(p)]
    hw = sol.Hardware(f"local-{p}", row["mem_bandwidth_Bps"], 1e11, float("inf"))
    link = sol.Link(f"local-{p}", row.get("alpha_s", 0.0), row.get("beta_Bps", float("inf")))
    links = {"all_to_all": sol.Link(f"local-{p} all-to-all", row["a2a_alpha_s"] + latency_s, link.bandwidth_Bps)} if "a2a_alpha_s" in row else None
    pred = sol.predict(shape, hw, link, p, algorithm="oneshot", context_len=context_len, batch=batch, parallel=mode, alpha_s=link.alpha_s + latency_s,
                       act_bytes=DTYPE_BYTES[dtype], logit_bytes=4.0, embedding_all_reduce=not fused, links=links)
    if not host:
        return pred
    per_step, per_layer = host_overhead(row, mode, batch)
    seconds = max(pred.seconds_per_token + per_step + shape.layers * per_layer, 1e-9)  # (a residual: may be negative, the sum never is in practice)
    return dataclasses.replace(pred, seconds_per_token=seconds, tokens_per_s=batch / seconds)


def _add_sweep(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hugging Face model folder")
    src.add_argument("--dummy", choices=sorted(DUMMY_SHAPES) + ["custom"], help="a random model of a named shape, or 'custom' with the shape flags below")
    for flag, default in (("hidden", 512), ("layers", 8), ("heads", 8), ("kv-heads", 4), ("intermediate", 1408), ("vocab", 32000)):
        p.add_argument(f"--{flag}", type=int, default=default, help=f"--dummy custom: {flag.replace('-', ' ')} (default {default})")
    p.add_argument("--tp", default="1,2", help="comma list (default 1,2)")
    p.add_argument("--latency", default="0,50us,200us,1ms,5ms", help="injected latencies, comma list")
    p.add_argument("--moe-modes", default=None,
                   help="a MoE model's parallel modes, comma list of tp (--moe tp), ep (--moe ep), dp (--moe ep --attention dp); "
                        "default all three (a dense model: tp). At tp=1 they are one and the same: only the first runs")
    p.add_argument("--batch", default="1", help="sequences decoded together, comma list (default 1: a single stream)")
    p.add_argument("--inject", choices=("auto", "spin", "sleep"), default="auto",
                   help="how a rank waits out the injected latency: spin its last millisecond, or sleep; auto (default): spin while the "
                        "ranks fit the cores. On a machine others use too, a spinning rank pinned to a core another process wants is "
                        "preempted mid-wait: sleep is the steadier there")
    p.add_argument("--host-calibration", choices=("auto", "preset", "inline"), default="auto",
                   help="where the host cost comes from: the calibration (preset, saved and reusable) or the 1- and 3-layer "
                        "calibration models run beside every point's runs, in the same minutes (inline: steadier on a machine others "
                        "use too, as slow as the preset's every time); auto (default): inline for a MoE model, else preset")
    p.add_argument("--statistic", choices=("median", "best"), default="median",
                   help="what a point's (and a calibration figure's) runs are summed up by: their median (default) or the fastest run "
                        "(on a machine others use too, the estimate of the uncontended machine the prediction describes)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per rank (default: cores / ranks). 1 keeps every rank on one core: on a machine others use too, "
                        "a rank whose GEMV pool spans cores another process takes waits for it at every GEMV")
    p.add_argument("--transport", choices=("shm", "gloo", "zmq"), default="shm", help="how the local ranks talk (default shm, the runtime's choice for one host)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float32")
    p.add_argument("--cached-calibration", action="store_true",
                   help="reuse the calibration saved by an earlier run, if a quick probe (bandwidth, one all-reduce) agrees with it "
                        "(default: measure it in this run, a few seconds per tp)")
    p.add_argument("--calibration-tolerance", type=float, default=DEFAULT_CALIBRATION_TOLERANCE,
                   help=f"--cached-calibration: the largest relative drift of the probe accepted (default {DEFAULT_CALIBRATION_TOLERANCE:g})")
    p.add_argument("--out", default="bench/out/sweep")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        vals = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ConfigError(f"{flag} takes a comma list of integers, got {text!r}") from None
    if not vals or vals[0] < 1:
        raise ConfigError(f"{flag} needs at least one value, each >= 1 (got {text!r})")
    return vals


def _modes(text: str | None, cfg: ModelConfig) -> list[str]:
    if text is None:
        return list(sol.PARALLEL) if cfg.moe is not None else ["tp"]
    modes = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [m for m in modes if m not in sol.PARALLEL]
    if not modes or bad:
        raise ConfigError(f"--moe-modes {text!r}: choose from {', '.join(sol.PARALLEL)}")
    if cfg.moe is None and modes != ["tp"]:
        raise ConfigError(f"--moe-modes {text}: {cfg.architecture} has no experts; a dense model runs tp only")
    return modes


def run_sweep(args: argparse.Namespace) -> int:
    tps = _int_list(args.tp, "--tp")
    lats = [units.parse_duration(t) for t in args.latency.split(",") if t.strip()]
    if not lats:
        raise ConfigError("--latency needs at least one value")
    batches = _int_list(args.batch, "--batch")
    load_before = _load_average()  # before this sweep's own ranks run: what else the machine is doing
    if args.dummy == "custom":
        shape = dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab)
        args.dummy = "h{hidden_size}-l{num_layers}-a{num_heads}x{num_kv_heads}-i{intermediate_size}-v{vocab_size}".format(**shape)
        model_dir = dummy_checkpoint(shape, args.dummy)
    else:
        model_dir = Path(args.model) if args.model else dummy_checkpoint(DUMMY_SHAPES[args.dummy], args.dummy)
    cfg = ModelConfig.from_model_dir(model_dir)
    modes = _modes(args.moe_modes, cfg)
    moe = cfg.moe is not None
    shape = sol.ModelShape.from_config(cfg, bytes_per_param=DTYPE_BYTES[args.dtype], name=args.dummy or model_dir.name)
    width = calibration_width(cfg)
    if args.calibration_tolerance <= 0:
        raise ConfigError(f"--calibration-tolerance {args.calibration_tolerance:g}: give a positive fraction (0.25 = 25%)")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: give at least 1")
    inline = args.host_calibration == "inline" or (args.host_calibration == "auto" and moe)
    calib, calib_info = sweep_calibration(args.transport, tps, width, args.dtype, cached=args.cached_calibration, tolerance=args.calibration_tolerance,
                                          modes=modes, batches=batches, threads=args.threads, statistic=args.statistic, host=not inline)
    host_models = {layers: str(dummy_checkpoint(dict(width, num_layers=layers), f"calibration-{_width_tag(width)}-{layers}l"))
                   for layers in CALIBRATION_DEPTHS} if inline else {}
    pick = min if args.statistic == "best" else statistics.median  # of a calibration model's seconds per step
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    context = args.prompt_len + args.new_tokens // 2
    meta = {"git_sha": git_sha(), "host": platform.node(), "torch": _torch_version(), "transport": args.transport, "model": shape.name,
            "dtype": args.dtype, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "calibration": calib_info["source"], "calibration_measured_at": calib_info["measured_at"],
            "calibration_git_sha": calib_info["git_sha"], "calibration_drift": calib_info.get("drift"),
            "moe": moe, "cores": os.cpu_count(), "load_average_before": load_before,
            "host_calibration": "inline (beside the points)" if inline else "preset (with the calibration)"}
    rows = []
    experts: dict[str, Any] = {}
    t_start = time.perf_counter()
    for i, tp in enumerate(tps):
        here = modes if tp > 1 else modes[:1]
        spec = {"mode": "sweep", "transport": args.transport, "model": str(model_dir), "dtype": args.dtype, "latencies": lats,
                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats, "modes": here, "batches": batches,
                "expert_load": moe and tp == tps[-1], "threads": args.threads, "inject": args.inject, "host_models": host_models}
        print(f"[{i + 1}/{len(tps)}] tp={tp}: {'/'.join(here)} x {len(lats)} latencies x batch {','.join(map(str, batches))} x {args.repeats} repeats "
              f"({time.perf_counter() - t_start:.0f} s so far)", file=sys.stderr, flush=True)
        result = _spawn(spec, tp)
        if result.get("experts"):
            experts = {"tp": tp, "batch": batches[-1], "modes": result["experts"]}
        for point in result["points"]:
            decode = [r["decode_tokens_per_s"] for r in point["runs"]]
            mode, b = point.get("mode", "tp"), point.get("batch", 1)
            side_steps = {int(layers): pick(v) for layers, v in (point.get("host_steps") or {}).items()}
            if inline:  # this (tp, mode, batch)'s host cost, from the calibration models run beside its points
                steps = depth_fit(side_steps)
                calib[str(tp)].setdefault("host", {}).setdefault(mode, {})[str(b)] = host_cost(width, calib[str(tp)], tp, mode, b, steps, context,
                                                                                               args.dtype, point.get("fused"))
            pred = predict_local(shape, calib, tp, point["latency_s"], context, args.dtype, mode=mode, batch=b, fused=point.get("fused"))
            per_step, per_layer = host_overhead(calib[str(tp)], mode, b)
            med = max(decode) if args.statistic == "best" else statistics.median(decode)
            rows.append({
                **meta, "tp": tp, "moe_mode": mode if moe else "tp", "modes_alike": tp == 1, "batch": b, "latency_us": point["latency_s"] * 1e6,
                "prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in point["runs"]),
                "decode_tokens_per_s": med, "decode_min": min(decode), "decode_max": max(decode), "decode_median": statistics.median(decode),
                "predicted_decode_tokens_per_s": pred.tokens_per_s, "error": pred.tokens_per_s / med - 1,
                "error_vs_median": pred.tokens_per_s / statistics.median(decode) - 1,
                "comm_share": statistics.median(r["comm_share"] for r in point["runs"]),
                "collectives_per_token": point["runs"][0]["collectives_per_token"], "bytes_per_token": point["runs"][0]["bytes_per_token"],
                "predicted_collectives_per_token": pred.collectives_per_token,
                "predicted_memory_s": pred.memory_s, "predicted_comm_s": pred.comm_s, "predicted_host_s": per_step + shape.layers * per_layer,
                "predicted_dominant_collective": pred.dominant_collective, "fused_decode": point.get("fused"), "threads_per_rank": args.threads, "inject": args.inject, "statistic": args.statistic,
                **{f"calibration_model_{layers}l_step_s": t for layers, t in side_steps.items()},
            })
    write_outputs(rows, out, calib_info)
    if experts:
        write_expert_load(experts, out, shape.name)
    return 0


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _torch_version() -> str:
    import torch

    return torch.__version__


def write_outputs(rows: list[dict[str, Any]], out: Path, calib_info: dict[str, Any]) -> None:
    with open(out / "sweep.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = validation_table(rows) + "\n" + calibration_line(calib_info)
    (out / "validation.txt").write_text(table + "\n")
    print(table)
    written = [out / "sweep.jsonl", out / "sweep.csv", out / "validation.txt"]
    if plot(rows, out / "sweep.png"):
        written.append(out / "sweep.png")
    print(f"wrote {', '.join(map(str, written))}")


def calibration_line(info: dict[str, Any]) -> str:
    line = f"calibration: {info['source']}, preset {info['preset']}, measured {info['measured_at']} at commit {info['git_sha']}"
    if "drift" in info:
        drift = ", ".join(f"{k} {v:.0%}" for k, v in info["drift"].items())
        line += f"; probe at p={info['probe_tp']}: {drift} off (tolerance {info['tolerance']:.0%})"
    return line


def _error_line(label: str, rows: list[dict[str, Any]]) -> str:
    errs = sorted(abs(r["error"]) for r in rows)
    return f"{label}: median {statistics.median(errs) * 100:.1f}%, max {errs[-1] * 100:.1f}% over {len(rows)} points"


def validation_table(rows: list[dict[str, Any]]) -> str:
    moe = any(r.get("moe") for r in rows)
    head = (f"{'model':<12} {'mode':>4} {'tp':>3} {'batch':>5} {'latency':>9} {'measured tok/s':>15} {'(min-max)':>15} {'predicted':>10} {'error':>7} "
            f"{'comm':>6} {'colls/step':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        colls = f"{r['collectives_per_token']:.2f}/{r.get('predicted_collectives_per_token', 0)}"
        lines.append(
            f"{r['model']:<12} {r.get('moe_mode', 'tp'):>4} {r['tp']:>3} {r.get('batch', 1):>5} {units.format_duration(r['latency_us'] / 1e6):>9} "
            f"{r['decode_tokens_per_s']:>15.1f} {r['decode_min']:>7.1f}-{r['decode_max']:<7.1f} {r['predicted_decode_tokens_per_s']:>10.1f} "
            f"{r['error'] * 100:>6.1f}% {r['comm_share'] * 100:>5.0f}% {colls:>11}"
        )
    lines.append("-" * len(head))
    lines.append(_error_line("prediction error", rows))
    if moe:
        multi = [r for r in rows if r["tp"] > 1]
        for mode in dict.fromkeys(r["moe_mode"] for r in multi):
            mine = [r for r in multi if r["moe_mode"] == mode]
            lines.append(_error_line(f"  mode {mode} (tp >= 2)", mine))
            for b in sorted({r["batch"] for r in mine}):
                lines.append(_error_line(f"    batch {b}", [r for r in mine if r["batch"] == b]))
        single = [r for r in rows if r["tp"] == 1]
        if single:
            lines.append(_error_line("  tp = 1 (every mode runs alike)", single))
    if rows[0].get("statistic") == "best":
        lines.append(_error_line("against the median run instead of the best", [dict(r, error=r["error_vs_median"]) for r in rows]))
    runs = f"{rows[0]['repeats']} runs" if "repeats" in rows[0] else "the runs"
    lines.append(f"measured: the {'fastest' if rows[0].get('statistic') == 'best' else 'median'} of {runs} per point (min-max beside it); "
                 "colls/step: collectives per decode step measured (rank 0) / predicted by sol.predict")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    plt = optional.pyplot(path.name)
    if plt is None:
        return False

    # one panel per (model, mode, batch): rows of panels by mode, columns by batch
    panels = list(dict.fromkeys((r["model"], r.get("moe_mode", "tp")) for r in rows if not r.get("modes_alike") or not r.get("moe")))
    if not panels:  # only tp = 1 rows
        panels = list(dict.fromkeys((r["model"], r.get("moe_mode", "tp")) for r in rows))
    batches = sorted({r.get("batch", 1) for r in rows})
    nrow, ncol = len(panels), len(batches)
    if nrow == 1 and ncol == 1:
        fig, axes = plt.subplots(1, 1, figsize=(6.5, 4.8), squeeze=False)
    else:
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.9 * nrow), squeeze=False)
    for (model, mode), axrow in zip(panels, axes):
        for b, ax in zip(batches, axrow):
            mine = [r for r in rows if r["model"] == model and r.get("batch", 1) == b
                    and (r.get("moe_mode", "tp") == mode or (r.get("moe") and r.get("modes_alike")))]
            lats = sorted({r["latency_us"] for r in mine})
            colors = plt.cm.viridis([i / max(len(lats) - 1, 1) for i in range(len(lats))])
            for lat, color in zip(lats, colors):
                pts = sorted((r for r in mine if r["latency_us"] == lat), key=lambda r: r["tp"])
                tps = [r["tp"] for r in pts]
                label = f"+{units.format_duration(lat / 1e6)}" if lat else "no injection"
                ax.errorbar(tps, [r["decode_tokens_per_s"] for r in pts],
                            yerr=[[r["decode_tokens_per_s"] - r["decode_min"] for r in pts], [r["decode_max"] - r["decode_tokens_per_s"] for r in pts]],
                            fmt="o", color=color, capsize=3, label=f"{label} measured")
                ax.plot(tps, [r["predicted_decode_tokens_per_s"] for r in pts], "-", color=color, alpha=0.8)
            ax.set_yscale("log")
            ax.set_xticks(sorted({r["tp"] for r in mine}))
            moe = any(r.get("moe") for r in mine)
            ax.set_xlabel("ranks (tp)" if not moe else "ranks (world)")
            ax.set_ylabel("decode tokens/s" + (" (single stream)" if b == 1 else f" (batch {b})"))
            if moe:
                what = {"tp": "--moe tp", "ep": "--moe ep", "dp": "--moe ep --attention dp"}.get(mode, mode)
                ax.set_title(f"{model} {what}, batch {b}", fontsize=9)
            else:
                ax.set_title(f"{model}: measured (markers) vs model (lines)" + (f", batch {b}" if len(batches) > 1 else ""))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6 if moe else 7, loc="best")
    if any(r.get("moe") for r in rows):
        stat = "fastest run" if rows[0].get("statistic") == "best" else "median"
        fig.suptitle(f"measured (markers: {stat} of {rows[0].get('repeats', '?')}, bars: min-max) vs speed-of-light + calibrated host cost (lines)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110 if nrow * ncol > 1 else 120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# the experts' load (LLM.expert_load, `tp-run generate --json`'s "experts")


def expert_load_rows(table: dict[str, Any], world: int, mode: str = "") -> list[dict[str, Any]]:
    """One row per (MoE layer, expert) of an LLM.expert_load() table: tokens routed in prefill and
    decode, and the rank holding the expert under --moe ep (whole experts: sharding.expert_range's
    split; every rank holds a slice of each under --moe tp)."""
    from tp_runtime.sharding import split_sizes

    rows = []
    for layer in table["layers"]:
        experts = len(layer["prefill"])
        owner = [r for r, n in enumerate(split_sizes(experts, world)) for _ in range(n)]
        for e, (pre, dec) in enumerate(zip(layer["prefill"], layer["decode"])):
            rows.append({"mode": mode, "world": world, "layer": layer["layer"], "expert": e, "rank": owner[e] if table.get("parallel") == "ep" else "all",
                         "prefill_tokens": pre, "decode_tokens": dec, "tokens": pre + dec, "layer_imbalance": round(layer["imbalance"], 4)})
    return rows


def write_expert_load(experts: dict[str, Any], out: Path, model: str) -> None:
    """experts.csv (every mode of the run) and experts.png (one mode's heatmap: ep where it ran)."""
    world, modes = experts["tp"], experts["modes"]
    rows = [row for mode, table in modes.items() for row in expert_load_rows(table, world, mode)]
    with open(out / "experts.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    mode = "ep" if "ep" in modes else next(iter(modes))
    drawn = plot_expert_load(modes[mode], world, out / "experts.png", f"{model}, world {world}, {mode}, batch {experts['batch']}")
    print(f"wrote {out / 'experts.csv'}" + (f" and {out / 'experts.png'}" if drawn else ""))


def plot_expert_load(table: dict[str, Any], world: int, path: Path, title: str) -> bool:
    """Heatmaps of tokens routed per layer and expert, prefill and decode, with the ranks' expert
    ranges marked under --moe ep."""
    plt = optional.pyplot(path.name)
    if plt is None:
        return False
    from tp_runtime.sharding import split_sizes

    layers = table["layers"]
    experts = len(layers[0]["prefill"])
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.55 * experts * 2, 1.6 + 0.45 * len(layers)), squeeze=False)
    for ax, phase in zip(axes[0], ("prefill", "decode")):
        grid = [row[phase] for row in layers]
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        for i, row in enumerate(grid):
            for e, n in enumerate(row):
                ax.text(e, i, str(n), ha="center", va="center", fontsize=7, color="white" if n < 0.6 * max(max(r) for r in grid) else "black")
        ax.set_xticks(range(experts))
        if table.get("parallel") == "ep":  # whole experts per rank: mark whose they are
            owner = [r for r, n in enumerate(split_sizes(experts, world)) for _ in range(n)]
            for e in range(1, experts):
                if owner[e] != owner[e - 1]:
                    ax.axvline(e - 0.5, color="red", lw=1.5)
            ax.set_xticklabels([f"{e}\nr{owner[e]}" for e in range(experts)], fontsize=7)
            ax.set_xlabel("expert, and the rank holding it (red: rank boundaries)", fontsize=8)
        else:
            ax.set_xlabel("expert (every rank holds a slice of each)", fontsize=8)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([f"layer {row['layer']} (x{row['imbalance']:.2f})" for row in layers], fontsize=7)
        ax.set_title(f"{phase}: tokens routed", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(f"expert load: {title} (x: busiest rank / mean)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def measured_a2a_link(name: str | None = None) -> sol.Link:
    """This machine's all-to-all as a sol.Link, from a sweep calibration (the newest saved one
    with 2 ranks measured, or the preset `name`): alpha from its all-to-all at 2 ranks where it
    measured one (a MoE sweep's), else its all-reduce; bandwidth from its 1 MiB all-reduce."""
    folder = sol.preset_dir()
    paths = [folder / f"{name}.json"] if name else sorted(folder.glob("this-cpu-*.json"), key=lambda q: q.stat().st_mtime, reverse=True)
    for path in paths:
        measured = load_local_calibration(path.stem)
        two = (measured or {}).get("local_ranks", {}).get("2")
        if two and "alpha_s" in two:
            alpha = two.get("a2a_alpha_s", two["alpha_s"])
            what = "all-to-all" if "a2a_alpha_s" in two else "all-reduce (no all-to-all measured)"
            return sol.Link(f"{path.stem} (2 ranks)", alpha, two["beta_Bps"],
                            source=f"{measured.get('transport', '?')} {what} between 2 local ranks, measured {measured.get('measured_at', '?')}")
    where = f"preset {name}" if name else f"no sweep calibration in {folder}"
    raise ConfigError(f"--a2a-link measured: {where} with 2 ranks measured; run `tp-bench calibrate --ranks 1,2` or a sweep at tp 2 first")


if __name__ == "__main__":
    rank_main(sys.argv[1])
