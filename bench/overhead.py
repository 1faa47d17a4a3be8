"""Where a decode token's time goes outside the GEMVs, per part, in one process (tp=1).

    python bench/overhead.py --model DIR [--dtype bfloat16] [--quantize int8] [--tokens 128]
        [--prompt-len 128] [--repeats 5] [--threads N] [--out bench/out/overhead]

Loads the model as `tp-run generate` does (LLM.load, the fused decode step), prefills one
prompt, then measures, alternating within each repeat:
    engine     llm.generate of --tokens new tokens (greedy, EOS ignored): the engine's own
               decode tokens/s (scheduler, Engine._decode, sampling, the fused step)
    step       the fused step alone, --tokens calls at advancing positions (ms per token): as
               it runs (its recorded program), and with its bound calls made from Python
    parts      the Python calls with every C kernel call timed by kind (GEMV by weight shape,
               RMSNorm, RoPE + cache write, attention, SiLU * up, ...) through a proxy of the
               kernel library; what is left of the step is Python (the bound closures, the
               embedding row, the logits copy, the world-1 collectives' calls)
    sampler    Sampler(logits) greedy, one row
    floor      the weight bytes of one token over the read rate of one large GEMV (the same
               kernel on a weight far larger than the caches, on huge pages as the step's are):
               what the GEMVs would cost at the machine's streaming rate
    chain      interleaved with the step, token by token (the host's bandwidth drifts by tens of
               percent within minutes, so only ratios taken side by side mean much): the step's
               recorded program, its GEMVs alone (the same ops, one C call), and one GEMV of the
               same bytes (a [n, 2048] weight): step / chain is what the rest of the step adds,
               chain / big what a hundred separate GEMVs lose against one stream
--drift N instead: N rounds of llm.generate (--tokens new tokens), each between two probes of the
read bandwidth (one GEMV over 256 MB, best of 3), and the spread of tokens/s, of the probe and of
tokens/s per probed GB/s: on a shared host the bandwidth the memory gives moves by tens of percent
within minutes, and decode follows it; what the runtime adds shows in the last spread.

Each repeat's numbers are medians over its tokens (a part's: the median of its per-token sums); the table shows the median over repeats
with [min-max]. Writes OUT/overhead.jsonl (one record per repeat, with git sha and settings).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tp_runtime.cli.sweep import git_sha  # noqa: E402
from tp_runtime.config import ParallelConfig, RuntimeConfig  # noqa: E402
from tp_runtime.engine.llm import LLM  # noqa: E402
from tp_runtime.engine.sampling import SamplingParams  # noqa: E402
from tp_runtime.kernels import cpu_decode, cpu_gemv  # noqa: E402
from tp_runtime.model import fused_decode  # noqa: E402


class TimedLib:
    """The kernel library with every function call timed into `acc[name]` (ns) and counted."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self.acc: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def __getattr__(self, name: str):
        fn = getattr(self._lib, name)
        if not callable(fn) or not name.startswith("tp_"):
            return fn
        acc, calls, clock = self.acc, self.calls, time.perf_counter_ns

        def timed(*args, _fn=fn, _name=name):
            key = _name
            if _name in ("tp_gemv", "tp_gemv_q8"):  # by weight shape: K, N
                k, n = (args[3], args[4]) if _name == "tp_gemv" else (args[5], args[6])
                key = f"gemv {k}x{n}"
            t = clock()
            r = _fn(*args)
            acc[key] += clock() - t
            calls[key] += 1
            return r

        return timed

    def reset(self) -> None:
        self.acc.clear()
        self.calls.clear()


def weight_bytes(step: fused_decode.FusedDecodeStep) -> int:
    """Bytes of the weights the step's GEMVs read per token (every bound weight of 2-D shape)."""
    seen, total = set(), 0
    for t in step.binder._bound:
        if t.dim() == 2 and t.data_ptr() not in seen and t is not step.binder.scratch and t.shape[0] > step.max_batch:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def stream_rate(dtype: torch.dtype, quantized: bool) -> float:
    """GB/s of the GEMV kernel on a weight far larger than the caches (256 MB)."""
    if quantized:
        k, n = 2048, 131072
        w = torch.randint(-127, 127, (n, k), dtype=torch.int8)
        sums = cpu_gemv.int8_block_sums(w)
        sc = torch.rand(n)
        x, y = torch.randn(1, k), torch.empty(1, n)
        run = lambda: cpu_decode.int8_gemv_(w, sums, sc, x, y)  # noqa: E731
    else:
        k = 2048
        n = (256 << 20) // (k * (4 if dtype == torch.float32 else 2))
        w = torch.randn(n, k).to(dtype)
        x = torch.randn(1, k).to(torch.bfloat16 if cpu_decode.gemv_kind(w) == 2 else torch.float32)
        y = torch.empty(1, n)
        run = lambda: cpu_decode.gemv_(w, x, y)  # noqa: E731
    cpu_gemv.onto_huge_pages([w])  # as the step's weights are
    run()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return w.numel() * w.element_size() / statistics.median(times) / 1e9


def ctypes_call_us() -> float:
    """Microseconds of one bound kernel call that returns at once (tp_gemv refusing K=0): the
    ctypes floor every bound call pays."""
    from functools import partial

    call = partial(cpu_decode.lib().tp_gemv, 0, 0, 0, 0, 1, 0, 0)
    for _ in range(1000):
        call(1)
    t = time.perf_counter()
    for _ in range(20000):
        call(1)
    return (time.perf_counter() - t) / 20000 * 1e6


def decode_steps(step, token: int, start: int, n: int, timed: TimedLib | None = None) -> tuple[list[float], list[dict[str, int]]]:
    """Seconds per call of n fused steps at positions start..start+n-1 (and with `timed`, each
    call's kernel times by kind, ns)."""
    out, parts = [], []
    for i in range(n):
        if timed is not None:
            timed.reset()
        t = time.perf_counter()
        step([token], [start + i])
        out.append(time.perf_counter() - t)
        if timed is not None:
            parts.append(dict(timed.acc))
    return out, parts


def engine_token_times(llm: LLM, prompt: list[int], params: SamplingParams) -> list[float]:
    """Seconds between consecutive decode tokens of one llm.generate (the first, after the
    prefill, left out)."""
    stamps = [time.perf_counter() for _ in llm.generate([prompt], params)]
    return [b - a for a, b in zip(stamps, stamps[1:])]


GEMV_OPS = ("tp_gemv", "tp_gemv_q8", "tp_qgemv")


def interleaved(step, token: int, start: int, n: int, big) -> dict[str, list[float]]:
    """Seconds of the step, its GEMVs alone and one big GEMV of the same bytes, each run once per
    token, side by side (the step's own program must be recorded already)."""
    prog = step.program(1)
    gemvs = [[(name, op) for name, op in item if name in GEMV_OPS] for item in prog.recorded if isinstance(item, list)]
    chain = fused_decode.Program(prog.raw, [[x for g in gemvs for x in g]])
    out: dict[str, list[float]] = {"step": [], "chain": [], "big": []}
    for i in range(n):
        for name, run in (("step", lambda: step([token], [start + i])), ("chain", chain), ("big", big)):
            t = time.perf_counter()
            run()
            out[name].append(time.perf_counter() - t)
    return out


def big_gemv(nbytes: int, dtype: torch.dtype, quantized: bool):
    """One GEMV over a [n, 2048] weight of ~nbytes, as the step's GEMVs are run (the kernel's pool)."""
    k = 2048
    if quantized:
        n = nbytes // k
        w = torch.randint(-127, 127, (n, k), dtype=torch.int8)
        sums, sc, x, y = cpu_gemv.int8_block_sums(w), torch.rand(n), torch.randn(1, k), torch.empty(1, n)
        cpu_gemv.onto_huge_pages([w])
        return lambda: cpu_decode.int8_gemv_(w, sums, sc, x, y)
    n = nbytes // (k * (4 if dtype == torch.float32 else 2))
    w = torch.randn(n, k).to(dtype)
    x = torch.randn(1, k).to(torch.bfloat16 if cpu_decode.gemv_kind(w) == 2 else torch.float32)
    y = torch.empty(1, n)
    cpu_gemv.onto_huge_pages([w])
    return lambda: cpu_decode.gemv_(w, x, y)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "overhead"))
    ap.add_argument("--drift", type=int, default=0, metavar="N", help="N rounds of decode between bandwidth probes instead (see above)")
    args = ap.parse_args(argv)

    runtime = RuntimeConfig(dtype=args.dtype, quantize=args.quantize, num_threads=args.threads, show_progress=False, max_batch_size=1,
                            max_seq_len=args.prompt_len + 2 * args.tokens + 8)
    llm = LLM.load(args.model, ParallelConfig(), runtime)
    engine, step = llm.engine, llm.engine.fused_decode
    if step is None:
        raise SystemExit("the fused decode step does not apply to this model here")
    prompt = [(7 * i + 3) % 1000 + 10 for i in range(args.prompt_len)]
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)

    if args.drift:
        return drift(llm, prompt, params, args)

    # a second step over the same model and cache, every kernel call timed
    timed = TimedLib(cpu_decode.lib())
    real_lib = cpu_decode.lib
    cpu_decode.lib = lambda: timed
    try:
        tstep = fused_decode.FusedDecodeStep(engine.model, engine.cache)
    finally:
        cpu_decode.lib = real_lib
    tstep.embedding_table, tstep.embedding_storage = step.embedding_table, step.embedding_storage
    tstep.record = False  # each kernel call timed from Python
    wbytes = weight_bytes(step)
    rate = stream_rate(step.dtype, bool(args.quantize))
    floor_ms = wbytes / rate / 1e6
    big = big_gemv(wbytes, step.dtype, bool(args.quantize)) if hasattr(step, "program") else None
    logits = torch.randn(1, llm.cfg.vocab_size)
    sampler_rows = [(params, 0, 0)]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for rep in range(args.repeats):
        gaps = engine_token_times(llm, prompt, params)
        eng = engine.last_stats
        engine_ms = statistics.median(gaps) * 1e3
        start = args.prompt_len + 1
        with cpu_gemv.decode_threads():
            plain, _ = decode_steps(step, prompt[0], start, args.tokens)
            step.record = False
            unrecorded, _ = decode_steps(step, prompt[0], start, args.tokens)
            step.record = True
            parted, per_token = decode_steps(tstep, prompt[0], start, args.tokens, timed)
            parts = {k: statistics.median(p.get(k, 0) for p in per_token) / 1e6 for k in per_token[-1]}
            calls = dict(timed.calls)  # the last token's: every token makes the same calls
            side = interleaved(step, prompt[0], start, args.tokens, big) if big is not None else None
            s_times = []
            for _ in range(200):
                t = time.perf_counter()
                engine.sampler(logits, sampler_rows)
                s_times.append(time.perf_counter() - t)
        step_ms = statistics.median(plain) * 1e3
        parted_ms = statistics.median(parted) * 1e3
        sampler_ms = statistics.median(s_times) * 1e3
        rec = {
            "git": git_sha(), "host": os.uname().nodename, "model": args.model, "dtype": llm.dtype, "quantize": args.quantize, "threads": torch.get_num_threads(),
            "repeat": rep, "tokens": args.tokens, "prompt_len": args.prompt_len, "engine_ms": engine_ms, "engine_min_ms": min(gaps) * 1e3,
            "engine_max_ms": max(gaps) * 1e3, "engine_tok_s": eng.decode_tokens_per_s,
            "step_ms": step_ms, "step_min_ms": min(plain) * 1e3, "step_max_ms": max(plain) * 1e3, "python_step_ms": statistics.median(unrecorded) * 1e3, "timed_step_ms": parted_ms, "parts_ms": parts,
            "calls_per_token": calls, "sampler_ms": sampler_ms, "ctypes_call_us": ctypes_call_us(), "weight_bytes": wbytes, "stream_GBps": rate, "floor_ms": floor_ms,
            "load": os.getloadavg()[0],
        }
        if side is not None:
            med = {k: statistics.median(v) * 1e3 for k, v in side.items()}
            rec.update(side_step_ms=med["step"], side_chain_ms=med["chain"], side_big_ms=med["big"],
                       step_over_chain=statistics.median(a / b for a, b in zip(side["step"], side["chain"])),
                       chain_over_big=statistics.median(a / b for a, b in zip(side["chain"], side["big"])))
        records.append(rec)
        with open(out / "overhead.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    print(table(records))
    llm.close()
    return 0


def drift(llm: LLM, prompt: list[int], params: SamplingParams, args: argparse.Namespace) -> int:
    """--drift: decode tokens/s against the read bandwidth probed just before and after, round by round."""
    k = 2048
    w = torch.randn((256 << 20) // (2 * k), k).to(torch.bfloat16)
    x = torch.randn(1, k).to(torch.bfloat16 if cpu_decode.gemv_kind(w) == 2 else torch.float32)
    y = torch.empty(1, w.shape[0])
    cpu_gemv.onto_huge_pages([w])  # as the step's weights are

    def probe() -> float:
        with cpu_gemv.decode_threads():
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                cpu_decode.gemv_(w, x, y)
                best = min(best, time.perf_counter() - t)
        return w.numel() * 2 / best / 1e9

    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in range(args.drift):
        before = probe()
        list(llm.generate([prompt], params))
        tok_s = llm.engine.last_stats.decode_tokens_per_s
        after = probe()
        gbs = (before + after) / 2
        rows.append((tok_s, gbs))
        rec = {"git": git_sha(), "model": args.model, "dtype": llm.dtype, "quantize": args.quantize, "round": r, "decode_tok_s": tok_s, "probe_GBps": [before, after], "load": os.getloadavg()[0]}
        with open(out / "drift.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"round {r}: {tok_s:6.1f} tok/s, probe {before:5.1f} / {after:5.1f} GB/s, {tok_s / gbs:.2f} tok/s per GB/s", flush=True)

    def spread(v: list[float]) -> str:
        return f"{statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}], spread {(max(v) - min(v)) / statistics.median(v) * 100:.0f}%"

    print(f"decode tok/s            {spread([t for t, _ in rows])}")
    print(f"probe GB/s              {spread([g for _, g in rows])}")
    print(f"tok/s per probed GB/s   {spread([t / g for t, g in rows])}")
    llm.close()
    return 0


def _mid(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def table(records: list[dict]) -> str:
    r0 = records[0]
    lines = [f"{r0['model']} {r0['dtype']}{' ' + r0['quantize'] if r0['quantize'] else ''}, {r0['threads']} threads, "
             f"{r0['tokens']} tokens after a {r0['prompt_len']}-token prompt, {len(records)} repeats (ms per token, median [min-max])"]
    lines.append(f"  {'engine decode, per token':34s} {_mid([r['engine_ms'] for r in records])}")
    lines.append(f"  {'  (mean: 1 / engine tokens/s)':34s} {_mid([1e3 / r['engine_tok_s'] for r in records])}")
    lines.append(f"  {'fused step alone (recorded)':34s} {_mid([r['step_ms'] for r in records])}")
    lines.append(f"  {'fused step, calls from Python':34s} {_mid([r['python_step_ms'] for r in records])}")
    lines.append(f"  {'  ... with every call timed':34s} {_mid([r['timed_step_ms'] for r in records])}")
    keys = sorted({k for r in records for k in r["parts_ms"]}, key=lambda k: (not k.startswith("gemv"), k))
    gemv = [sum(v for k, v in r["parts_ms"].items() if k.startswith("gemv")) for r in records]
    for k in keys:
        lines.append(f"  {'    ' + k + ' x' + format(r0['calls_per_token'].get(k, 0), 'g'):34s} {_mid([r['parts_ms'].get(k, 0.0) for r in records])}")
    lines.append(f"  {'  GEMVs together':34s} {_mid(gemv)}")
    lines.append(f"  {'  GEMV floor (bytes / stream rate)':34s} {_mid([r['floor_ms'] for r in records])}   ({r0['weight_bytes'] / 1e6:.1f} MB at {_mid([r['stream_GBps'] for r in records])} GB/s)")
    other = [r["timed_step_ms"] - sum(r["parts_ms"].values()) for r in records]
    lines.append(f"  {'  Python and the rest of the step':34s} {_mid(other)}")
    ncalls = sum(r0["calls_per_token"].values())
    lines.append(f"  {f'    ctypes floor ({ncalls:.0f} calls x us)':34s} {_mid([r['ctypes_call_us'] * ncalls / 1e3 for r in records])}")
    lines.append(f"  {'sampler (greedy, 1 row)':34s} {_mid([r['sampler_ms'] for r in records])}")
    loop = [r["engine_ms"] - r["step_ms"] - r["sampler_ms"] for r in records]
    lines.append(f"  {'engine loop (engine - step - sampler)':34s} {_mid(loop)}")
    if "side_step_ms" in r0:
        lines.append("  side by side, token by token:")
        lines.append(f"  {'  step':34s} {_mid([r['side_step_ms'] for r in records])}")
        lines.append(f"  {'  its GEMVs alone (one C call)':34s} {_mid([r['side_chain_ms'] for r in records])}")
        lines.append(f"  {'  one GEMV of the same bytes':34s} {_mid([r['side_big_ms'] for r in records])}   "
                     f"({r0['weight_bytes'] / 1e6:.1f} MB at {_mid([r0['weight_bytes'] / r['side_big_ms'] / 1e6 for r in records])} GB/s)")
        lines.append(f"  {'  step / its GEMVs':34s} {_mid([r['step_over_chain'] for r in records])}")
        lines.append(f"  {'  its GEMVs / one GEMV':34s} {_mid([r['chain_over_big'] for r in records])}")
    lines.append(f"  load average during: {_mid([r['load'] for r in records])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
