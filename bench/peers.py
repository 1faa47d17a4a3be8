"""Peers benchmark: our `generate` against transformers' `generate` on the same random checkpoint.

    python bench/peers.py [--shapes small,tinyllama] [--dtypes float32,bfloat16] [--tp 1,2]
        [--threads N[,N...]] [--quantize int8] [--repeats 3] [--prompt-len 512]
        [--new-tokens 128] [--out bench/out/peers] [--quick]
        [--llama-bench PATH/llama-bench [--gguf-models smollm2,tinyllama-q4_0,tinyllama-q8_0]
                                        [--gguf-pairs bf16=DIR:F16.gguf,int8=DIR@int8:Q8_0.gguf [--baseline TREE]]]

The whole table, every precision against llama.cpp's on two shapes, in one command:

    python bench/peers.py --llama-bench PATH/llama-bench --gguf-pairs tinyllama,smollm2 --gguf-models smollm2

With --llama-bench, llama.cpp is a peer too: after the transformers table, the GGUF files of
--gguf-models run alternately through llama-bench and ours at every --tp, with the first
--threads budget and --repeats (bench/gguf_peers.py, which also runs on its own; its table,
CSV and PNG go to OUT/gguf); with --gguf-pairs, each precision of ours on its own model folder
against llama.cpp's matching GGUF file (OUT/pairs: bench/gguf_peers.py --pairs; a shape's name
there, tinyllama or smollm2, writes that shape's model in every format and pairs them all). --shapes ""
skips the transformers part.

For every (shape, dtype, thread budget) it runs, alternating A/B within each repeat,
    ours          `python -m tp_runtime generate` (a fresh process, ranks started by the CLI) at
                  every --tp, with threads // tp threads per rank; with --quantize int8 also the
                  same again with int8 weight-only linears;
    transformers  this script re-run as `--hf-worker` (a fresh process, torch.set_num_threads(threads)),
                  AutoModelForCausalLM.from_pretrained(DIR, dtype=...) and `generate` with the
                  "dynamic" and the "static" cache (static skipped, with the reason, if it fails);
so both sides pay process start and loading, and only the measured rates count. The thread
budget is the total per configuration (default: every core): with 2 cores, tp=2 runs one
thread per rank and tp=1 and transformers run 2 threads.

Measured:
    prefill tokens/s  ours: as reported by the CLI; transformers: prompt_len / time of
                      generate(max_new_tokens=1)
    decode tokens/s   ours: as reported; transformers: new_tokens / (time of
                      generate(max_new_tokens=new_tokens + 1) - time of the prefill generate),
                      min_new_tokens set so EOS never stops it early
    weight GB/s       bytes of weights one decode token reads (every parameter but the embedding
                      table, at the run's element size; int8: 1 byte for the linears' weights plus
                      their per-channel scales, the LM head and norms in float) x decode tokens/s
    % of bandwidth    weight GB/s / this machine's read bandwidth, measured in this run (sum of a
                      1 GiB float32 tensor, median of 5, same thread count, in a subprocess; at the
                      start and at the end, the higher of the two medians used)
The table shows the median of the repeats with [min-max]; the transformers row is its better
cache (by median decode rate), and the ratio columns are ours / that row (same shape, dtype and
thread budget).

Writes OUT/peers.jsonl (one record per process run, plus the bandwidth probes and one summary
per table row, each with git sha, host, torch and transformers versions and the settings;
written as runs finish, so a long run that dies keeps what it measured) and OUT/peers.png
(decode tokens/s grouped by shape/dtype, ours vs transformers, min-max whiskers, a tick at the
bandwidth limit). --quick: SMALL only, float32 only, 64-token prompt, 16 new tokens, 1 repeat.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tp_runtime import optional  # noqa: E402
from tp_runtime.errors import ConfigError  # noqa: E402
from tp_runtime.cli.sweep import DUMMY_SHAPES, dummy_checkpoint, git_sha  # noqa: E402

SHAPES = ("small", "tinyllama")
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUN_TIMEOUT_S = 3600
BANDWIDTH_GIB = 1


# ---------------------------------------------------------------------------------------------
# workers (each in its own process)


def hf_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Loads DIR with transformers and times prefill and decode with each cache implementation:
    spec["prompt_ids"] (one prompt), or spec["prompts"] (a batch of equal-length prompts, whose
    tokens/s are summed over the batch)."""
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, spec["dtype"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor(spec.get("prompts") or [spec["prompt_ids"]], dtype=torch.long)
    batch = ids.shape[0]
    mask = torch.ones_like(ids)
    new = spec["new_tokens"]
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos

    def gen(n: int, cache: str, prompt=ids, attn=mask) -> tuple[float, int]:
        t = time.perf_counter()
        out = model.generate(
            prompt,
            attention_mask=attn,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            cache_implementation=cache,
            pad_token_id=pad,
        )
        return time.perf_counter() - t, out.shape[1] - prompt.shape[1]

    result: dict[str, Any] = {
        "load_seconds": load_s,
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "batch": batch,
        "caches": {},
    }
    with torch.inference_mode():
        for cache in ("dynamic", "static"):
            try:
                gen(2, cache, ids[:, :8], mask[:, :8])  # warm-up: first-call allocations, dispatch
                prefill_s, n1 = gen(1, cache)
                total_s, n = gen(new + 1, cache)
                if n1 != 1 or n != new + 1:
                    raise RuntimeError(f"generated {n1} and {n} tokens, wanted 1 and {new + 1}")
                decode_s = max(total_s - prefill_s, 1e-9)
                result["caches"][cache] = {
                    "prefill_seconds": prefill_s,
                    "total_seconds": total_s,
                    "prefill_tokens_per_s": ids.numel() / prefill_s,
                    "decode_tokens_per_s": batch * new / decode_s,
                }
            except Exception as e:  # static cache unsupported in this version/config: say why
                result["caches"][cache] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return result


def bandwidth_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Read bandwidth: time x.sum() of a 1 GiB float32 tensor (median of 5 after one warm-up)."""
    import torch

    torch.set_num_threads(spec["threads"])
    n = BANDWIDTH_GIB * (1 << 30) // 4
    x = torch.ones(n, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"threads": torch.get_num_threads(), "bytes": x.numel() * 4, "seconds": times, "gb_per_s": x.numel() * 4 / med / 1e9}


def run_worker(mode: str, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), mode, json.dumps(spec)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env, cwd=REPO,
    )
    return _last_json(proc, mode)


def run_ours(model: Path, tp: int, threads: int, dtype: str, quantize: str | None, prompts: list[list[int]], new: int, extra: Sequence[str] = ()) -> dict[str, Any]:
    """`tp-run generate` on a batch of prompts (one --prompt-ids each), plus `extra` flags."""
    cmd = [
        sys.executable, "-m", "tp_runtime", "generate", "--model", str(model), "--tp", str(tp),
        "--max-new-tokens", str(new), "--ignore-eos", "--json", "--quiet", "--dtype", dtype, "--threads", str(threads),
        "--max-seq-len", str(max(map(len, prompts)) + new + 8), "--max-batch-size", str(len(prompts)), *extra,
    ]
    for prompt in prompts:
        cmd += ["--prompt-ids", ",".join(map(str, prompt))]
    if quantize:
        cmd += ["--quantize", quantize]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=REPO)
    out = _last_json(proc, "tp_runtime generate")
    out.pop("output_ids", None)
    out.pop("text", None)
    out.pop("outputs", None)
    return out


def _last_json(proc: subprocess.CompletedProcess, what: str) -> dict[str, Any]:
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise RuntimeError(f"{what} exited {proc.returncode}: " + " | ".join(tail))
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# accounting


def decode_weight_bytes(model_dir: Path, dtype: str, quantize: str | None) -> int:
    """Bytes of weights one decode token reads: all parameters but the embedding table."""
    from tp_runtime.config import ModelConfig

    cfg = ModelConfig.from_model_dir(model_dir)
    h, i, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    params = cfg.num_params - (0 if cfg.tie_word_embeddings else v * h)  # tied: the table is the head
    eb = ELEMENT_BYTES[dtype]
    if quantize != "int8":
        return params * eb
    linear = layers * (h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * i)
    scales = layers * ((cfg.q_size + 2 * cfg.kv_size) + h + 2 * i + h)  # one per output channel
    return linear * 1 + (scales + params - linear) * eb


def summarise(vals: list[float]) -> dict[str, float] | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


# ---------------------------------------------------------------------------------------------
# driver


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="small,tinyllama", help="comma list of: " + ",".join(SHAPES))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--tp", default="1,2", help="tensor-parallel sizes of ours (local ranks)")
    p.add_argument("--threads", default=None, help="thread budget per configuration, comma list (default: all cores); "
                   "ours gets budget // tp per rank, transformers the budget")
    p.add_argument("--quantize", choices=("int8",), default=None, help="adds ours with --quantize int8 at every tp")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "peers"), help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke run: small, float32, prompt 64, 16 new tokens, 1 repeat")
    p.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench: adds llama.cpp as a peer on GGUF files (bench/gguf_peers.py)")
    p.add_argument("--gguf-models", default="smollm2,tinyllama-q4_0,tinyllama-q8_0", help="GGUF files for the llama.cpp peer (see bench/gguf_peers.py)")
    p.add_argument("--gguf-pairs", default=None, metavar="NAME=OURS[@quantize]:GGUF,...|SHAPE,...",
                   help="with --llama-bench: each precision of ours against llama.cpp's match (bench/gguf_peers.py --pairs), after --prompt-len tokens")
    p.add_argument("--baseline", default=None, help="with --gguf-pairs: also run ours from this source tree (bench/gguf_peers.py --baseline)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S", help="with --gguf-pairs: wait up to S seconds for idle CPUs before each run")
    a = p.parse_args(argv)
    if a.quick:
        a.shapes, a.dtypes, a.prompt_len, a.new_tokens, a.repeats = "small", "float32", 64, 16, 1
    a.shapes = [s for s in a.shapes.split(",") if s]
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    a.tp = [int(t) for t in str(a.tp).split(",") if t]
    cores = os.cpu_count() or 1
    a.threads = [int(t) for t in a.threads.split(",")] if a.threads else [cores]
    for s in a.shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r} (choose from {', '.join(SHAPES)})")
    for d in a.dtypes:
        if d not in ELEMENT_BYTES:
            p.error(f"unknown dtype {d!r}")
    if a.repeats < 1 or a.prompt_len < 1 or a.new_tokens < 1:
        p.error("--repeats, --prompt-len and --new-tokens must be >= 1")
    return a


def host_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": platform.node(), "cpu": model or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version()}


def version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def open_jsonl(out_dir: Path, bench: str, settings: dict[str, Any], **extra: Any):
    """OUT/<bench>.jsonl, emptied; returns emit(record), which appends the record with the
    run's identity (bench, git sha, host, versions, settings), so a run that dies keeps its rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{bench}.jsonl"
    jsonl.write_text("")
    base = {"bench": bench, "git_sha": git_sha(), "host": host_info(), "torch": version("torch"), **extra, "settings": settings}

    def emit(rec: dict[str, Any]) -> None:
        with jsonl.open("a") as f:
            f.write(json.dumps({**base, **rec}) + "\n")

    return emit


def transformers_missing(bench: str) -> bool:
    """True, after one line on stderr, when transformers (the peer `bench` measures) cannot be
    imported: said before any work, not as a traceback from the first worker."""
    try:
        optional.require("transformers", f"{bench} (transformers is the peer it measures)")
    except ConfigError as e:
        print(f"{bench}: error: {e}", file=sys.stderr)
        return True
    return False


def main(argv=None) -> int:
    a = parse_args(argv)
    rc = transformers_peer(a) if a.shapes else 0
    if a.llama_bench:
        import gguf_peers

        if a.gguf_models:  # --gguf-models "": the pairs alone
            rc = max(rc, gguf_peers.main(["--llama-bench", a.llama_bench, "--models", a.gguf_models, "--tp", ",".join(map(str, a.tp)),
                                          "--threads", str(a.threads[0]), "--repeats", str(a.repeats), "--out", str(Path(a.out) / "gguf")]))
        if a.gguf_pairs:
            rc = max(rc, gguf_peers.main(["--llama-bench", a.llama_bench, "--pairs", a.gguf_pairs, "--tp", ",".join(map(str, a.tp)), "--threads", str(a.threads[0]),
                                          "--repeats", str(a.repeats), "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens),
                                          "--wait-quiet", str(a.wait_quiet), "--out", str(Path(a.out) / "pairs"), *(["--baseline", a.baseline] if a.baseline else [])]))
    return rc


def transformers_peer(a: argparse.Namespace) -> int:
    if transformers_missing("bench/peers.py"):
        return 2
    from tqdm import tqdm

    out_dir = Path(a.out)
    jsonl = out_dir / "peers.jsonl"
    settings = {k: getattr(a, k) for k in ("shapes", "dtypes", "tp", "threads", "quantize", "repeats", "prompt_len", "new_tokens", "quick")}
    emit = open_jsonl(out_dir, "peers", settings, transformers=version("transformers"))

    start = time.perf_counter()
    models = {s: dummy_checkpoint(DUMMY_SHAPES[s], s) for s in a.shapes}

    import random

    rng = random.Random(0)
    prompts = {s: [rng.randrange(3, DUMMY_SHAPES[s]["vocab_size"]) for _ in range(a.prompt_len)] for s in a.shapes}

    ours_cfgs = [(tp, q) for q in ([None] + ([a.quantize] if a.quantize else [])) for tp in a.tp]
    points = [(s, d, t) for s in a.shapes for d in a.dtypes for t in a.threads]
    total = 2 * len(a.threads) + len(points) * a.repeats * (len(ours_cfgs) + 1)
    bar = tqdm(total=total, desc="peers", unit="run", file=sys.stderr, dynamic_ncols=True)

    bandwidth: dict[int, list[float]] = {}

    def probe_bandwidth(when: str) -> None:
        for t in a.threads:
            bar.set_postfix_str(f"bandwidth {t} threads ({when})")
            try:
                r = run_worker("--bandwidth-worker", {"threads": t}, t)
                bandwidth.setdefault(t, []).append(r["gb_per_s"])
                emit({"kind": "bandwidth", "when": when, "threads": t, "result": r})
            except Exception as e:
                emit({"kind": "bandwidth", "when": when, "threads": t, "error": str(e)})
                tqdm.write(f"bandwidth probe failed: {e}", file=sys.stderr)
            bar.update(1)

    probe_bandwidth("start")
    # results[(shape, dtype, threads, who, tp, quantize)] -> list of per-repeat dicts
    results: dict[tuple, list[dict[str, Any]]] = {}
    for shape, dtype, threads in points:
        for rep in range(a.repeats):
            for tp, q in ours_cfgs:
                per_rank = max(1, threads // tp)
                label = f"{shape} {dtype} ours tp={tp}{' int8' if q else ''} x{per_rank}t rep {rep + 1}"
                bar.set_postfix_str(label)
                rec = {"kind": "run", "who": "ours", "shape": shape, "dtype": dtype, "tp": tp, "quantize": q,
                       "threads_per_rank": per_rank, "thread_budget": threads, "repeat": rep}
                try:
                    r = run_ours(models[shape], tp, per_rank, dtype, q, [prompts[shape]], a.new_tokens)
                    rec["result"] = r
                    results.setdefault((shape, dtype, threads, "ours", tp, q), []).append(
                        {"prefill": r["prefill_tokens_per_s"], "decode": r["decode_tokens_per_s"]})
                except Exception as e:
                    rec["error"] = str(e)
                    tqdm.write(f"{label}: {e}", file=sys.stderr)
                emit(rec)
                bar.update(1)
            label = f"{shape} {dtype} transformers x{threads}t rep {rep + 1}"
            bar.set_postfix_str(label)
            rec = {"kind": "run", "who": "transformers", "shape": shape, "dtype": dtype, "tp": 1, "quantize": None,
                   "threads_per_rank": threads, "thread_budget": threads, "repeat": rep}
            try:
                spec = {"model": str(models[shape]), "dtype": dtype, "threads": threads,
                        "prompt_ids": prompts[shape], "new_tokens": a.new_tokens}
                r = run_worker("--hf-worker", spec, threads)
                rec["result"] = r
                for cache, c in r["caches"].items():
                    if "error" in c:
                        if rep == 0:
                            tqdm.write(f"{label}: {cache} cache failed: {c['error']}", file=sys.stderr)
                        continue
                    results.setdefault((shape, dtype, threads, "transformers", 1, cache), []).append(
                        {"prefill": c["prefill_tokens_per_s"], "decode": c["decode_tokens_per_s"]})
            except Exception as e:
                rec["error"] = str(e)
                tqdm.write(f"{label}: {e}", file=sys.stderr)
            emit(rec)
            bar.update(1)
    probe_bandwidth("end")
    bar.close()

    rows = build_rows(a, results, models, bandwidth, ours_cfgs, points)
    for row in rows:
        emit({"kind": "summary", **row})
    print_table(rows, bandwidth)
    png = out_dir / "peers.png"
    try:
        if not plot(rows, png):
            png = None
    except Exception as e:  # the numbers are already written
        print(f"chart failed: {e}", file=sys.stderr)
        png = None
    wall = time.perf_counter() - start
    print(f"\nwrote {jsonl}" + (f" and {png}" if png else "") + f" in {wall:.0f} s")
    return 0 if rows and all(r["decode"] for r in rows) else 1


def build_rows(a, results, models, bandwidth, ours_cfgs, points) -> list[dict[str, Any]]:
    bw = {t: max(v) for t, v in bandwidth.items() if v}
    rows = []
    for shape, dtype, threads in points:
        # transformers: its better cache by median decode rate
        best = None
        for cache in ("dynamic", "static"):
            reps = results.get((shape, dtype, threads, "transformers", 1, cache))
            if not reps:
                continue
            dec = summarise([r["decode"] for r in reps])
            if best is None or dec["median"] > best[1]["median"]:
                best = (cache, dec, summarise([r["prefill"] for r in reps]))
        theirs = None
        group = []
        for tp, q in ours_cfgs:
            reps = results.get((shape, dtype, threads, "ours", tp, q), [])
            group.append(dict(who="ours" + (f" {q}" if q else ""), tp=tp, quantize=q, threads=f"{tp}x{max(1, threads // tp)}",
                              prefill=summarise([r["prefill"] for r in reps]), decode=summarise([r["decode"] for r in reps])))
        if best:
            theirs = dict(who=f"transformers ({best[0]})", tp=1, quantize=None, threads=f"1x{threads}", prefill=best[2], decode=best[1], cache=best[0])
            group.append(theirs)
        for row in group:
            wbytes = decode_weight_bytes(models[shape], dtype, row["quantize"])
            gbs = row["decode"]["median"] * wbytes / 1e9 if row["decode"] else None
            ratio = lambda k: (row[k]["median"] / theirs[k]["median"]) if (theirs and row[k] and theirs[k]) else None  # noqa: E731
            rows.append({
                "shape": shape, "dtype": dtype, "thread_budget": threads, **row,
                "ratio_prefill": ratio("prefill"), "ratio_decode": ratio("decode"),
                "weight_bytes_per_token": wbytes, "weight_gb_per_s": gbs,
                "bandwidth_gb_per_s": bw.get(threads),
                "bandwidth_share": (gbs / bw[threads]) if (gbs and bw.get(threads)) else None,
                "bandwidth_limit_tokens_per_s": (bw[threads] * 1e9 / wbytes) if bw.get(threads) else None,
            })
    return rows


def print_table(rows: list[dict[str, Any]], bandwidth: dict[int, list[float]]) -> None:
    for t, v in sorted(bandwidth.items()):
        print(f"read bandwidth, {t} thread(s): " + ", ".join(f"{x:.1f}" for x in v) + " GB/s (start, end medians)")
    head = ["shape", "dtype", "who", "tp", "threads", "prefill tok/s", "decode tok/s [min-max]", "x tf pre", "x tf dec", "weight GB/s", "% bw"]
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    table = [head]
    for r in rows:
        p, d = r["prefill"], r["decode"]
        table.append([
            r["shape"], r["dtype"], r["who"], str(r["tp"]), r["threads"],
            f(p and p["median"], ".1f"),
            f"{d['median']:.2f} [{d['min']:.2f}-{d['max']:.2f}]" if d else "failed",
            f(r["ratio_prefill"], ".2f"), f(r["ratio_decode"], ".2f"),
            f(r["weight_gb_per_s"], ".1f"),
            f(r["bandwidth_share"] and 100 * r["bandwidth_share"], ".0f"),
        ])
    print_aligned(table, text_columns=5)


def print_aligned(table: list[list[str]], text_columns: int) -> None:
    """Rows of cells (the first one the header, ruled under) in columns: the first
    `text_columns` left-aligned, the numbers after them right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print()
    for k, row in enumerate(table):
        print("  ".join(c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    plt = optional.pyplot(path.name)
    if plt is None:
        return False

    groups: list[tuple] = []
    series: list[str] = []
    for r in rows:
        g = (r["shape"], r["dtype"], r["thread_budget"])
        if g not in groups:
            groups.append(g)
        s = f"{r['who']} tp={r['tp']}" if r["who"].startswith("ours") else "transformers"
        if s not in series:
            series.append(s)
    multi_threads = len({g[2] for g in groups}) > 1
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(series)) / 2), 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, s in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for gi, g in enumerate(groups):
            for r in rows:
                rs = f"{r['who']} tp={r['tp']}" if r["who"].startswith("ours") else "transformers"
                if (r["shape"], r["dtype"], r["thread_budget"]) == g and rs == s and r["decode"]:
                    d = r["decode"]
                    xs.append(gi + (j - (len(series) - 1) / 2) * width)
                    ys.append(d["median"])
                    lo.append(d["median"] - d["min"])
                    hi.append(d["max"] - d["median"])
                    if r["bandwidth_limit_tokens_per_s"]:
                        ax.hlines(r["bandwidth_limit_tokens_per_s"], xs[-1] - width / 2, xs[-1] + width / 2, colors="k", linestyles=":", linewidth=1)
        bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=s, color=colors[j % len(colors)])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g[0]}\n{g[1]}" + (f"\n{g[2]} threads" if multi_threads else "") for g in groups])
    ax.set_ylabel("decode tokens/s (median, min-max)")
    ax.set_title("decode, batch 1: ours vs transformers\n(dotted: limit at the measured read bandwidth)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("--hf-worker", "--bandwidth-worker"):
        spec = json.loads(sys.argv[2])
        fn = hf_worker if sys.argv[1] == "--hf-worker" else bandwidth_worker
        print(json.dumps(fn(spec)), flush=True)
        sys.exit(0)
    sys.exit(main())
