"""`tp-bench sweep` and `tp-bench calibrate --ranks`: measured tokens/s versus tp and link latency
on local ranks, beside the speed-of-light model's prediction.

The ranks are started once per tp (launch/spawn.py) and loop over the latencies themselves,
changing the communicator's injected latency between points, so a sweep pays process start
and weight loading once per tp, not once per point.

Prediction for p local ranks and an injected latency L (sol.predict, plus one host term):

    seconds/token = max(memory_s, compute_s)                 sol, with the bandwidth one rank
                                                             reaches while p ranks read at once
                  + collectives x (alpha(p) + L + bytes/beta(p))   sol, one-shot (1 step)
                  + host_step(p) + layers x host_layer(p)    host cost of a decode step

alpha(p), beta(p), the per-rank bandwidth and the host costs come from `tp-bench calibrate --ranks`
(saved as a preset): speed of light is the limit, the calibrated host term is what a Python
runtime on this CPU adds to it. Ranks beyond the core count share cores; calibration at that p
measures the sharing rather than modelling it.
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

DUMMY_SHAPES = {
    # comm-visible at once: small and shallow
    "tiny": dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=704, vocab_size=8000),
    # ../shared/MEASURED.md's SMALL
    "small": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048, vocab_size=32000),
    # TinyLlama-1.1B's shape
    "tinyllama": dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632, vocab_size=32000),
}
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


def _set_latency(comm, seconds: float, world_size: int) -> None:
    from tp_runtime.comm.timing import LatencyInjector

    if hasattr(comm, "injector"):
        comm.injector = LatencyInjector(seconds, None, spin=world_size <= (os.cpu_count() or 1)) if seconds > 0 else None


def _sweep_rank(spec: dict[str, Any], parallel) -> dict[str, Any]:
    import torch

    from tp_runtime.engine.llm import LLM
    from tp_runtime.engine.sampling import SamplingParams

    comm = _communicator(spec, parallel)
    runtime = RuntimeConfig(dtype=spec["dtype"], max_seq_len=spec["prompt_len"] + spec["new_tokens"] + 8, max_batch_size=1, show_progress=False)
    llm = LLM.load(spec["model"], parallel, runtime, comm=comm)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, llm.cfg.vocab_size, (spec["prompt_len"],), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True)
    list(llm.generate([prompt], SamplingParams(max_new_tokens=4, ignore_eos=True)))  # warm-up
    points = []
    bar = _bar(len(spec["latencies"]) * spec["repeats"], f"tp={parallel.world_size}") if parallel.rank == 0 else None
    for lat in spec["latencies"]:
        _set_latency(comm, lat, parallel.world_size)
        runs = []
        for _ in range(spec["repeats"]):
            list(llm.generate([prompt], params))
            st = llm.engine.last_stats
            c = comm.stats.summary(st.decode_seconds, st.decode_steps)
            runs.append({
                "decode_tokens_per_s": st.decode_tokens_per_s, "prefill_tokens_per_s": st.prefill_tokens_per_s,
                "comm_share": c["comm_share_of_decode"], "collectives_per_token": c["collectives_per_token"], "bytes_per_token": c["bytes_per_token"],
            })
            if bar:
                bar.update()
        points.append({"latency_s": lat, "runs": runs})
    if bar:
        bar.close()
    llm.close()
    comm.close()
    return {"points": points}


def _gemv_bandwidth(comm, spec: dict[str, Any], repeats: int) -> float:
    """Per-rank GEMV read rate with every rank reading its share at once, through the GEMV decode
    uses (the C kernel where it builds, with decode's thread handover)."""
    import torch

    from tp_runtime.kernels import cpu_gemv

    rows = spec["gemv_bytes"] // 4 // comm.world_size // 4096
    w = torch.randn(rows, 4096)
    x = torch.randn(1, 4096)
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


def _calibrate_rank(spec: dict[str, Any], parallel) -> dict[str, Any]:
    """Per-rank GEMV bandwidth with every rank reading at once, collective alpha/beta, host overhead."""
    from tp_runtime.engine.llm import LLM
    from tp_runtime.engine.sampling import SamplingParams

    comm = _communicator(spec, parallel)
    out: dict[str, Any] = {"mem_bandwidth_Bps": _gemv_bandwidth(comm, spec, spec["repeats"])}
    if parallel.world_size > 1:
        small = _all_reduce_seconds(comm, spec["hidden"], 300)
        big = _all_reduce_seconds(comm, 1 << 18, 30)  # 1 MiB
        out["alpha_s"] = small
        out["beta_Bps"] = (1 << 20) / max(big - small, 1e-9)
    # host cost: whole decode steps of the two calibration models (collectives included: with
    # more ranks than cores, waiting in a collective is where time-sharing shows up)
    runtime = RuntimeConfig(dtype=spec["dtype"], max_seq_len=64, max_batch_size=1, show_progress=False)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    host = {}
    for layers, path in spec["calibration_models"].items():
        llm = LLM.load(path, parallel, runtime, comm=comm)
        samples = []
        for _ in range(5):
            list(llm.generate([[1, 2, 3, 4]], params))
            st = llm.engine.last_stats
            samples.append(st.decode_seconds / st.decode_steps)
        host[int(layers)] = statistics.median(samples)
        llm.close()
    (l0, t0), (l1, t1) = sorted(host.items())
    out["step_s_per_layer"] = (t1 - t0) / (l1 - l0)  # host + weight reads + collectives of one layer
    out["step_s_fixed"] = t0 - l0 * out["step_s_per_layer"]
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
    return spawn([json.dumps(spec)], tp, threads=threads_per_rank(tp), program=[sys.executable, "-m", "tp_runtime.cli.sweep"])


def _width_tag(width: dict[str, int]) -> str:
    return f"h{width['hidden_size']}-i{width['intermediate_size']}-a{width['num_heads']}x{width['num_kv_heads']}-v{width['vocab_size']}"


def calibration_name(transport: str, width: dict[str, int], dtype: str) -> str:
    return f"this-cpu-{transport}-{_width_tag(width)}-{dtype}"


def _calibration_shape(width: dict[str, int], layers: int, dtype: str) -> sol.ModelShape:
    return sol.ModelShape.dense("calibration", layers=layers, hidden=width["hidden_size"], heads=width["num_heads"], kv_heads=width["num_kv_heads"],
                                intermediate=width["intermediate_size"], vocab=width["vocab_size"], bytes_per_param=DTYPE_BYTES[dtype])


def calibrate_local(transport: str, ranks: list[int], width: dict[str, int] = GENERIC_WIDTH, dtype: str = "float32", repeats: int = 7) -> Path:
    """Measure every p in `ranks` for models of `width`; saves a preset with a "local_ranks" table."""
    name = calibration_name(transport, width, dtype)
    models = {}
    for layers in CALIBRATION_DEPTHS:
        models[layers] = str(dummy_checkpoint(dict(width, num_layers=layers), f"calibration-{_width_tag(width)}-{layers}l"))
    table = {}
    for p in ranks:
        print(f"calibrating {p} local rank(s) over {transport} ...", file=sys.stderr, flush=True)
        spec = {"mode": "calibrate", "transport": transport, "hidden": width["hidden_size"], "repeats": repeats, "gemv_bytes": 256 << 20,
                "calibration_models": models, "dtype": dtype}
        row = _spawn(spec, p)
        row["overhead_s_per_layer"] = row["overhead_s_per_step"] = 0.0
        # what the speed-of-light model already charges (weight reads, collectives) is not host cost
        one, three = (predict_local(_calibration_shape(width, n, dtype), {str(p): row}, p, 0.0, 40, dtype) for n in (1, 3))
        sol_per_layer = (three.seconds_per_token - one.seconds_per_token) / 2
        row["overhead_s_per_layer"] = max(row["step_s_per_layer"] - sol_per_layer, 0.0)
        row["overhead_s_per_step"] = max(row["step_s_fixed"] - (one.seconds_per_token - sol_per_layer), 0.0)
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
        print(f"  p={p}: {row['mem_bandwidth_Bps'] / 1e9:5.1f} GB/s per rank, alpha {row.get('alpha_s', 0) * 1e6:7.1f} us, "
              f"beta {row.get('beta_Bps', float('inf')) / 1e9:6.2f} GB/s, host {row['overhead_s_per_step'] * 1e6:6.0f} us/step + "
              f"{row['overhead_s_per_layer'] * 1e6:5.0f} us/layer", file=sys.stderr)
    return path


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


def sweep_calibration(transport: str, tps: list[int], width: dict[str, int], dtype: str, *, cached: bool, tolerance: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the local_ranks table, where it came from). Measured in this run unless `cached`; a cached
    one must cover every tp and pass the probe at the largest tp, else it is measured again."""
    name = calibration_name(transport, width, dtype)
    saved = load_local_calibration(name) if cached else None
    info: dict[str, Any] = {"preset": name}
    if saved is not None and all(str(t) in saved["local_ranks"] for t in tps):
        p = max(tps)
        spec = {"mode": "probe", "transport": transport, "hidden": width["hidden_size"], "gemv_bytes": 256 << 20}
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
        info["source"] = "measured (no cached one for every tp)"
    else:
        info["source"] = "measured"
    calibrate_local(transport, sorted(set(tps)), width, dtype)
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


def predict_local(shape: sol.ModelShape, calib: dict[str, Any], p: int, latency_s: float, context_len: int, dtype: str) -> sol.Prediction:
    row = calib[str(p)]
    hw = sol.Hardware(f"local-{p}", row["mem_bandwidth_Bps"], 1e11, float("inf"))
    link = sol.Link(f"local-{p}", row.get("alpha_s", 0.0), row.get("beta_Bps", float("inf")))
    pred = sol.predict(shape, hw, link, p, algorithm="oneshot", context_len=context_len, alpha_s=link.alpha_s + latency_s, act_bytes=DTYPE_BYTES[dtype],
                       logit_bytes=4.0, embedding_all_reduce=not fused_decode_applies(dtype))
    host = row["overhead_s_per_step"] + shape.layers * row["overhead_s_per_layer"]
    seconds = pred.seconds_per_token + host
    return dataclasses.replace(pred, seconds_per_token=seconds, tokens_per_s=1.0 / seconds)


def _add_sweep(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hugging Face model folder")
    src.add_argument("--dummy", choices=sorted(DUMMY_SHAPES) + ["custom"], help="a random model of a named shape, or 'custom' with the shape flags below")
    for flag, default in (("hidden", 512), ("layers", 8), ("heads", 8), ("kv-heads", 4), ("intermediate", 1408), ("vocab", 32000)):
        p.add_argument(f"--{flag}", type=int, default=default, help=f"--dummy custom: {flag.replace('-', ' ')} (default {default})")
    p.add_argument("--tp", default="1,2", help="comma list (default 1,2)")
    p.add_argument("--latency", default="0,50us,200us,1ms,5ms", help="injected latencies, comma list")
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


def run_sweep(args: argparse.Namespace) -> int:
    tps = sorted({int(t) for t in args.tp.split(",") if t.strip()})
    lats = [units.parse_duration(t) for t in args.latency.split(",") if t.strip()]
    if not tps or not lats or min(tps) < 1:
        raise ConfigError("--tp and --latency need at least one value each (tp >= 1)")
    if args.dummy == "custom":
        shape = dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab)
        args.dummy = "h{hidden_size}-l{num_layers}-a{num_heads}x{num_kv_heads}-i{intermediate_size}-v{vocab_size}".format(**shape)
        model_dir = dummy_checkpoint(shape, args.dummy)
    else:
        model_dir = Path(args.model) if args.model else dummy_checkpoint(DUMMY_SHAPES[args.dummy], args.dummy)
    cfg = ModelConfig.from_model_dir(model_dir)
    shape = sol.ModelShape.from_config(cfg, bytes_per_param=DTYPE_BYTES[args.dtype], name=args.dummy or model_dir.name)
    width = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, vocab_size=cfg.vocab_size)
    if args.calibration_tolerance <= 0:
        raise ConfigError(f"--calibration-tolerance {args.calibration_tolerance:g}: give a positive fraction (0.25 = 25%)")
    calib, calib_info = sweep_calibration(args.transport, tps, width, args.dtype, cached=args.cached_calibration, tolerance=args.calibration_tolerance)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    context = args.prompt_len + args.new_tokens // 2
    meta = {"git_sha": git_sha(), "host": platform.node(), "torch": _torch_version(), "transport": args.transport, "model": shape.name,
            "dtype": args.dtype, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "calibration": calib_info["source"], "calibration_measured_at": calib_info["measured_at"],
            "calibration_git_sha": calib_info["git_sha"], "calibration_drift": calib_info.get("drift")}
    rows = []
    t_start = time.perf_counter()
    for i, tp in enumerate(tps):
        spec = {"mode": "sweep", "transport": args.transport, "model": str(model_dir), "dtype": args.dtype, "latencies": lats,
                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats}
        print(f"[{i + 1}/{len(tps)}] tp={tp}: {len(lats)} latencies x {args.repeats} repeats "
              f"({time.perf_counter() - t_start:.0f} s so far)", file=sys.stderr, flush=True)
        result = _spawn(spec, tp)
        for point in result["points"]:
            decode = [r["decode_tokens_per_s"] for r in point["runs"]]
            pred = predict_local(shape, calib, tp, point["latency_s"], context, args.dtype)
            med = statistics.median(decode)
            rows.append({
                **meta, "tp": tp, "latency_us": point["latency_s"] * 1e6,
                "prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in point["runs"]),
                "decode_tokens_per_s": med, "decode_min": min(decode), "decode_max": max(decode),
                "predicted_decode_tokens_per_s": pred.tokens_per_s, "error": pred.tokens_per_s / med - 1,
                "comm_share": statistics.median(r["comm_share"] for r in point["runs"]),
                "collectives_per_token": point["runs"][0]["collectives_per_token"], "bytes_per_token": point["runs"][0]["bytes_per_token"],
                "predicted_collectives_per_token": pred.collectives_per_token,
            })
    write_outputs(rows, out, calib_info)
    return 0


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


def validation_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'model':<10} {'tp':>3} {'latency':>9} {'measured tok/s':>15} {'(min-max)':>15} {'predicted':>10} {'error':>7} {'comm':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<10} {r['tp']:>3} {units.format_duration(r['latency_us'] / 1e6):>9} {r['decode_tokens_per_s']:>15.1f} "
            f"{r['decode_min']:>7.1f}-{r['decode_max']:<7.1f} {r['predicted_decode_tokens_per_s']:>10.1f} {r['error'] * 100:>6.1f}% {r['comm_share'] * 100:>5.0f}%"
        )
    errs = sorted(abs(r["error"]) for r in rows)
    lines.append("-" * len(head))
    lines.append(f"prediction error: median {statistics.median(errs) * 100:.1f}%, max {errs[-1] * 100:.1f}% over {len(rows)} points")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    plt = optional.pyplot(path.name)
    if plt is None:
        return False

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
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
        ax.set_xlabel("tensor-parallel ranks (tp)")
        ax.set_ylabel("decode tokens/s (single stream)")
        ax.set_title(f"{model}: measured (markers) vs model (lines)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    rank_main(sys.argv[1])
