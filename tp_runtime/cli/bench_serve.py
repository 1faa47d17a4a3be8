"""`tp-bench serve`: a load generator for OpenAI-compatible servers, in the style of `vllm bench serve`.

    tp-bench serve --model MODEL [--tp 2] [--transformers] [--llama-server PATH]
        [--url NAME=http://host:port ...] [--request-rate 1,4,inf] [--num-prompts 32]
        [--input-len 64 --output-len 64 --range-ratio 0.5] [--max-concurrency N] [--seed 0]

Starts `tp-run serve` on MODEL (and, when asked, `transformers serve --continuous-batching` on
the same folder, llama.cpp's `llama-server` on the same GGUF file), or measures servers already
running (--url), one after the other under the same load: --num-prompts requests whose arrival
times are a Poisson process at each --request-rate (inf: all at once), prompts of random words
(lengths and output lengths drawn in [len * (1 - range_ratio), len * (1 + range_ratio)], seeded:
every server gets the same requests), streamed /v1/completions, greedy.

Per request, with vLLM's definitions: TTFT (send to first text), ITL (between text chunks), TPOT
((E2EL - TTFT) / (output tokens - 1)), E2EL (send to last chunk); output tokens from the usage
chunk. Per run: mean / median / p99 of each in ms, output tokens/s and requests/s over the run;
for our server also, from its /metrics, the host time per engine step outside the model and
the plan broadcast's bytes per step.
Writes OUT/serve.jsonl (every request and every summary), OUT/serve.csv (the summaries) and
OUT/serve.png (TTFT, TPOT and output tokens/s against the request rate, a line per server).
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from tp_runtime.errors import ConfigError
from tp_runtime.launch.servers import ServerProcess
from tp_runtime.launch.spawn import free_port

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an they you were her she there "
         "one all we their can has been if more when will would who so no time out up about into than them only other new some could these "
         "two may first then do any like my now over such our man me even most made after also did many off before must well back through").split()


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="start tp-run serve on this model (a Hugging Face folder or a GGUF file) and measure it")
    p.add_argument("--tp", type=int, default=1, help="ranks of our server (default 1)")
    p.add_argument("--serve-arg", action="append", default=[], help="one more flag for tp-run serve (repeat), e.g. --serve-arg=--max-num-seqs=16")
    p.add_argument("--transformers", action="store_true", help="also measure `transformers serve --continuous-batching` on --model (a folder)")
    p.add_argument("--llama-server", default=None, metavar="PATH", help="also measure llama.cpp's llama-server on --model (a GGUF file)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for the peers (default: every core)")
    p.add_argument("--url", action="append", default=[], metavar="NAME=URL", help="measure a server that is already running (repeat)")
    p.add_argument("--served-model", default=None, help="the model name to send to --url servers (default: their first /v1/models entry)")
    p.add_argument("--request-rate", default="inf", help="requests per second (Poisson arrivals), a comma list to sweep; inf: all at once")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64, help="prompt words (about a token each)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.5)
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/serve")


@dataclass
class Target:
    name: str
    url: str
    model: str
    ignore_eos: bool  # whether the server takes vLLM's ignore_eos (ours and llama-server do)
    server: ServerProcess | None = None  # started here: stopped at the end

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


@dataclass
class Result:
    ok: bool
    prompt_words: int
    max_tokens: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def _models(url: str) -> list[str]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/v1/models")
    return [m["id"] for m in json.loads(conn.getresponse().read())["data"]]


def _target_starters(args) -> list:
    """One function per server to measure, each starting it (or finding it) and returning its
    Target: servers are started one at a time, so that an idle one never shares the CPU with
    the one being measured."""
    starters = []
    for spec in args.url:
        name, _, url = spec.partition("=")
        if not url:
            raise ConfigError(f"--url {spec!r}: give NAME=URL")
        starters.append(lambda name=name, url=url: Target(name, url.rstrip("/"), args.served_model or _models(url)[0], ignore_eos=False))

    def start(name: str, cmd: list[str], model: str, ignore_eos: bool, port: int, env: dict | None = None) -> Target:
        server = ServerProcess(cmd, f"http://127.0.0.1:{port}", name, env)
        t = Target(name, server.url, model, ignore_eos, server)
        try:
            server.wait_healthy()
            t.model = t.model or _models(t.url)[0]
        except BaseException:
            t.close()
            raise
        return t

    if args.model:
        def ours(port=free_port()):
            return start(f"tp-runtime tp={args.tp}", [sys.executable, "-m", "tp_runtime", "serve", "--model", args.model, "--tp", str(args.tp), "--port", str(port),
                                                       "--quiet", *args.serve_arg], "", True, port)
        starters.append(ours)
    if args.transformers:
        if not args.model or not Path(args.model).is_dir():
            raise ConfigError("--transformers needs --model to be a Hugging Face folder")
        exe = Path(sys.executable).with_name("transformers")  # the CLI beside this interpreter (a venv's bin/)

        def peer(port=free_port()):
            return start("transformers serve", [str(exe) if exe.is_file() else "transformers", "serve", args.model, "--port", str(port), "--continuous-batching",
                                                "--device", "cpu"], args.model, False, port, {"OMP_NUM_THREADS": str(args.threads)})
        starters.append(peer)
    if args.llama_server:
        def llama(port=free_port()):
            return start("llama.cpp llama-server", [args.llama_server, "-m", args.model, "--port", str(port), "-t", str(args.threads), "-np", "8", "-c", "8192"],
                         Path(args.model).name, True, port)
        starters.append(llama)
    if not starters:
        raise ConfigError("nothing to measure: give --model (ours, and --transformers / --llama-server) or --url")
    return starters


def workload(args) -> list[tuple[str, int, int]]:
    """(prompt, its word count, max_tokens) per request, the same for every server."""
    rng = np.random.default_rng(args.seed)
    lo_in, hi_in = max(1, int(args.input_len * (1 - args.range_ratio))), max(1, int(args.input_len * (1 + args.range_ratio)))
    lo_out, hi_out = max(1, int(args.output_len * (1 - args.range_ratio))), max(1, int(args.output_len * (1 + args.range_ratio)))
    out = []
    for _ in range(args.num_prompts):
        n = int(rng.integers(lo_in, hi_in + 1))
        out.append((" ".join(rng.choice(WORDS, n)), n, int(rng.integers(lo_out, hi_out + 1))))
    return out


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start): a Poisson process at `rate`, or all at 0 for inf."""
    if rate == float("inf"):
        return [0.0] * n
    gaps = np.random.default_rng(seed + 1).exponential(1.0 / rate, n)
    return list(np.cumsum(gaps) - gaps[0])


def _one(t: Target, prompt: str, words: int, max_tokens: int) -> Result:
    r = Result(False, words, max_tokens)
    body = {"model": t.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if t.ignore_eos:
        body["ignore_eos"] = True
    u = urlparse(t.url)
    t0 = time.perf_counter()
    last = None
    chunks = 0
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            r.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return r
        for raw in resp:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                r.error = str(event["error"])[:300]
                return r
            if event.get("usage"):
                r.output_tokens = int(event["usage"].get("completion_tokens") or 0)
            if any(c.get("text") for c in event.get("choices") or []):
                now = time.perf_counter()
                chunks += 1
                if last is None:
                    r.ttft = now - t0
                else:
                    r.itl.append(now - last)
                last = now
        r.e2el = (last or time.perf_counter()) - t0
        r.output_tokens = r.output_tokens or chunks
        r.ok = last is not None
        if not r.ok:
            r.error = "no text came back"
    except (OSError, ValueError, http.client.HTTPException) as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


_OUR_COUNTERS = ("tp_runtime:engine_steps_total", "tp_runtime:step_host_seconds_total", "tp_runtime:schedule_bytes_total", "tp_runtime:schedule_seconds_total")


def engine_counters(url: str) -> dict[str, float]:
    """Our server's step counters from /metrics (empty for a server that has none)."""
    u = urlparse(url)
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode() if resp.status == 200 else ""
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in _OUR_COUNTERS:
            out[name] = float(value)
    return out


def run_load(t: Target, work, rate: float, seed: int, max_concurrency: int | None) -> tuple[list[Result], float]:
    times = arrivals(len(work), rate, seed)
    results: list[Result | None] = [None] * len(work)
    gate = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()

    def go(i):
        delay = start + times[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if gate:
            with gate:
                results[i] = _one(t, *work[i])
        else:
            results[i] = _one(t, *work[i])

    threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(len(work))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results, time.perf_counter() - start


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    return {"mean": statistics.fmean(values) * 1e3, "median": statistics.median(values) * 1e3, "p99": float(np.percentile(values, 99)) * 1e3}


def summarize(name: str, rate: float, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    row = {"server": name, "request_rate": rate, "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
           "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration, "output_tokens": out_tokens}
    for key, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpot), ("itl", [x for r in ok for x in r.itl]), ("e2el", [r.e2el for r in ok])):
        for stat, v in _stats(values).items():
            row[f"{stat}_{key}_ms"] = v
    return row


def _table(rows: list[dict]) -> str:
    head = (f"{'server':<24} {'rate':>6} {'ok':>4} {'fail':>4} {'out tok/s':>10} {'req/s':>7} {'TTFT med':>9} {'TTFT p99':>9} {'TPOT med':>9} {'ITL med':>8} "
            f"{'E2EL med':>9} {'host ms/step':>12} {'plan B/step':>11}")
    lines = [head]
    for r in rows:
        ours = f"{r['host_ms_per_step']:>12.3f} {r['plan_bytes_per_step']:>11.0f}" if "host_ms_per_step" in r else f"{'':>12} {'':>11}"
        lines.append(f"{r['server']:<24} {r['request_rate']:>6g} {r['completed']:>4} {r['failed']:>4} {r['output_throughput']:>10.1f} {r['request_throughput']:>7.2f} "
                     f"{r['median_ttft_ms']:>9.1f} {r['p99_ttft_ms']:>9.1f} {r['median_tpot_ms']:>9.1f} {r['median_itl_ms']:>8.1f} {r['median_e2el_ms']:>9.1f} {ours}")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    from tp_runtime import optional

    plt = optional.pyplot(path.name)
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    finite = [r["request_rate"] for r in rows if r["request_rate"] != float("inf")]
    inf_x = (max(finite) * 2 if finite else 1.0)
    for name in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == name]
        xs = [r["request_rate"] if r["request_rate"] != float("inf") else inf_x for r in mine]
        for ax, key, label in zip(axes, ("median_ttft_ms", "median_tpot_ms", "output_throughput"), ("TTFT median (ms)", "TPOT median (ms)", "output tokens/s")):
            ax.plot(xs, [r[key] for r in mine], marker="o", label=name)
            ax.set_xlabel("request rate (req/s; rightmost: all at once)")
            ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_serve_bench(args) -> int:
    rates = [float(x) for x in args.request_rate.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = workload(args)
    rows = []
    with open(out / "serve.jsonl", "a") as log:
        for starter in _target_starters(args):
            t = starter()
            try:
                _one(t, "warm up", 2, 4)  # first-request costs (lazy loads) out of the numbers
                for rate in rates:
                    before = engine_counters(t.url)
                    results, duration = run_load(t, work, rate, args.seed, args.max_concurrency)
                    row = summarize(t.name, rate, results, duration)
                    after = engine_counters(t.url)
                    if before and after:  # ours: what each engine step cost outside the model
                        steps = max(1.0, after[_OUR_COUNTERS[0]] - before[_OUR_COUNTERS[0]])
                        row["engine_steps"] = steps
                        row["host_ms_per_step"] = (after[_OUR_COUNTERS[1]] - before[_OUR_COUNTERS[1]]) / steps * 1e3
                        row["plan_bytes_per_step"] = (after[_OUR_COUNTERS[2]] - before[_OUR_COUNTERS[2]]) / steps
                        row["plan_ms_per_step"] = (after[_OUR_COUNTERS[3]] - before[_OUR_COUNTERS[3]]) / steps * 1e3
                    rows.append(row)
                    for r in results:
                        log.write(json.dumps({"server": t.name, "request_rate": rate, **asdict(r)}) + "\n")
                    log.write(json.dumps({"summary": row, "settings": {k: v for k, v in vars(args).items() if k != "func"}}) + "\n")
                    print(_table([row]).splitlines()[-1], flush=True)
                    errors = [r.error for r in results if not r.ok]
                    if errors:
                        print(f"  {len(errors)} failed, e.g. {errors[0]}", flush=True)
            finally:
                t.close()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "serve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    print("\n" + _table(rows))
    _plot(rows, out / "serve.png")
    print(f"wrote {out / 'serve.csv'}, {out / 'serve.jsonl'} and {out / 'serve.png'}")
    return 0
