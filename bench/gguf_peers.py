"""GGUF decode speed: ours against llama.cpp's `llama-bench` on the same file, side by side.

    python bench/gguf_peers.py --llama-bench PATH/llama-bench [--models smollm2,tinyllama-q4_0,tinyllama-q8_0]
        [--tp 1,2] [--threads 2] [--new-tokens 64] [--repeats 3] [--out bench/out/gguf_peers]

Models: `smollm2` is the demo's SmolLM2-135M-Instruct Q4_1 file (fetched into the cache once);
`tinyllama-q4_0` / `tinyllama-q8_0` are random files of TinyLlama-1.1B's shape written here
with the gguf package (22 layers, hidden 2048, 32 heads over 4 kv heads, MLP 5632, vocab
32000), embedding in Q8_0 for q4_0 (no K-quant blocks: the shape is not a multiple of 256).

Each repeat runs, alternately, llama-bench (`-p 0 -n NEW -t THREADS -r 1`, decode tokens/s as it
reports) and ours (`python -m tp_runtime generate`, one prompt of 8 ids, NEW new tokens, at every
--tp, THREADS threads in all), each a fresh process. The table shows the median of the repeats
[min-max] and ours / llama.cpp; OUT/gguf_peers.csv holds every run, OUT/gguf_peers.png the bars.
Without --llama-bench only ours is measured (the ratio column is empty).

Pairs (a precision against llama.cpp's match, our model from its own folder):

    python bench/gguf_peers.py --llama-bench PATH --pairs bf16=HF_DIR:F16.gguf,int8=HF_DIR@int8:Q8_0.gguf
        [--baseline TREE] [--prompt-len 128] [--new-tokens 128] [--repeats 5] [--tp 1,2]
    python bench/gguf_peers.py --llama-bench PATH --pairs tinyllama,smollm2 ...

(a shape's name is a preset, `preset_pairs`: a random model of that shape written once under
OUT/models in every format, and every precision paired: fp32 <-> F32, bf16 <-> F16, our F16
GGUF path <-> F16, int8 <-> Q8_0, our Q4_0 GGUF path <-> Q4_0)

runs ours on OURS[@quantize] (a folder or GGUF, with --quantize when given) and llama-bench on
the GGUF beside it, both decoding NEW tokens after a PROMPT_LEN-token prompt (llama-bench
`-d PROMPT_LEN`), and the prompt's prefill tokens/s beside it (ours: generate's own figure;
llama-bench: its `-p PROMPT_LEN` test in the same run); --baseline TREE also runs ours from another source tree (e.g. `git archive`
of the last commit, with tp_runtime/kernels and tp_runtime/launch linked to its kernels/ and
launch/) as "before". Every run is a fresh process, the order rotates every repeat, and each
run records the CPU time other processes used meanwhile ("others %", from /proc/stat), so a
noisy run can be told from a slow one (--wait-quiet S: wait up to S seconds for idle CPUs before
each run). Spread = (max - min) / median.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tp_runtime import optional  # noqa: E402

TINYLLAMA = dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632, vocab_size=32000)
SHAPES = {"tinyllama": TINYLLAMA,
          "smollm2": dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)}
# what a shape's preset pairs: name -> (ours: a Hugging Face folder's dtype or a GGUF type, --quantize, llama.cpp's GGUF type)
PRESET = {"f32": ("float32", None, "F32"), "bf16": ("bfloat16", None, "F16"), "f16": ("F16", None, "F16"),
          "int8": ("bfloat16", "int8", "Q8_0"), "q4_0": ("Q4_0", None, "Q4_0")}


def preset_pairs(shape: str, cache: Path) -> list[tuple[str, Path, str | None, Path]]:
    """--pairs SHAPE (tinyllama, smollm2): one random model of that shape, written once under
    `cache` as Hugging Face folders (float32, bfloat16) and GGUF files (F32, F16, Q8_0, Q4_0) of
    the same weights (synthetic.random_state_dict, one seed), paired as PRESET says: every
    precision of ours against llama.cpp's match, our 16-bit and 4-bit GGUF paths on llama.cpp's
    own files."""
    from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint
    from tp_runtime.checkpoint.synthetic_gguf import write_gguf

    def model(kind: str) -> Path:
        if kind in ("float32", "bfloat16"):
            path = cache / f"{shape}-{kind}"
            if not (path / "config.json").is_file():
                print(f"writing {path} (random weights, {shape}'s shape) ...", flush=True)
                write_checkpoint(path, llama_config_dict(**SHAPES[shape], dtype=kind), seed=0)
            return path
        path = cache / f"{shape}-{kind}.gguf"
        if not path.is_file():
            print(f"writing {path} (random weights, {shape}'s shape) ...", flush=True)
            write_gguf(path, llama_config_dict(**SHAPES[shape]), kind, seed=0, embedding_type="Q8_0" if kind == "Q4_0" else None)
        return path

    return [(f"{shape}/{name}", model(ours), quantize, model(peer)) for name, (ours, quantize, peer) in PRESET.items()]


def model_path(name: str, cache: Path) -> Path:
    if name == "smollm2":
        from tp_runtime.launch.fetch import smollm2

        return smollm2()
    if name.startswith("tinyllama-"):
        qtype = name.split("-", 1)[1].upper()
        path = cache / f"tinyllama-shape-{qtype}.gguf"
        if not path.is_file():
            from tp_runtime.checkpoint.synthetic import llama_config_dict
            from tp_runtime.checkpoint.synthetic_gguf import write_gguf

            print(f"writing {path} (random weights, TinyLlama's shape, {qtype}) ...", flush=True)
            write_gguf(path, llama_config_dict(**TINYLLAMA), qtype, seed=0, embedding_type="Q8_0")
        return path
    raise SystemExit(f"unknown model {name!r}: smollm2, tinyllama-q4_0, tinyllama-q8_0")


def run_llama_bench(binary: str, model: Path, threads: int, new: int) -> float:
    """llama-bench's decode tokens/s for NEW tokens from an empty context."""
    return run_llama_bench_at(binary, model, threads, new, 0)[0]


def run_ours(model: Path, tp: int, threads: int, new: int, prompt_len: int = 8, quantize: str | None = None, tree: Path | None = None) -> float:
    """decode tokens/s of `python -m tp_runtime generate` (from `tree`, another source tree, if given)."""
    return run_ours_both(model, tp, threads, new, prompt_len, quantize, tree)[0]


def run_ours_both(model: Path, tp: int, threads: int, new: int, prompt_len: int = 8, quantize: str | None = None,
                  tree: Path | None = None) -> tuple[float, float]:
    """(decode, prefill) tokens/s of one `python -m tp_runtime generate` run."""
    prompt = ",".join(str(1 + i % 1000) for i in range(prompt_len))
    cmd = [sys.executable, "-m", "tp_runtime", "generate", "--model", str(model), "--tp", str(tp), "--threads", str(max(1, threads // tp)),
           "--prompt-ids", prompt, "--max-new-tokens", str(new), "--ignore-eos", "--json", "--quiet", "--max-seq-len", str(max(512, prompt_len + new + 8))]
    cmd += ["--quantize", quantize] if quantize else []
    env = dict(os.environ, PYTHONPATH=str(tree)) if tree else None
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tree.parent if tree else REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"ours failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(out["decode_tokens_per_s"]), float(out["prefill_tokens_per_s"])


def _busy_jiffies() -> int:
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v) - v[3] - v[4]


def wait_quiet(limit_s: float) -> float:
    """Wait up to limit_s until two 0.5 s windows in a row find the CPUs >= 95% idle (other
    people's jobs on a shared machine); returns the seconds waited."""
    t0, calm = time.perf_counter(), 0
    while calm < 2 and time.perf_counter() - t0 < limit_s:
        v0 = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        time.sleep(0.5)
        v1 = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        d = [b - a for a, b in zip(v0, v1)]
        calm = calm + 1 if (d[3] + d[4]) >= 0.95 * max(1, sum(d)) else 0
    return time.perf_counter() - t0


_probe_data = None


def probe_GBps(threads: int) -> float:
    """The host's read bandwidth now, GB/s: a torch sum over 256 MB with `threads` threads,
    best of 3 (0.1 s). Taken before each run: this KVM guest's bandwidth moves by up to 1.5x
    within minutes (32 -> 50 GB/s, bench/overhead.py --drift; docs/peers/drift2), and decode
    follows it, so spreads are also shown per probed GB/s."""
    global _probe_data
    import torch

    torch.set_num_threads(threads)
    if _probe_data is None:
        _probe_data = torch.ones(64 << 20)
        _probe_data.sum()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        _probe_data.sum()
        best = min(best, time.perf_counter() - t)
    return _probe_data.numel() * 4 / best / 1e9


def timed_run(fn, *args, **kwargs) -> tuple[float, float]:
    """(fn's result, % of one core that other processes used while it ran): /proc/stat's busy
    time less this process's children's."""
    hz = os.sysconf("SC_CLK_TCK")
    r0, b0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_jiffies(), time.perf_counter()
    out = fn(*args, **kwargs)
    r1, b1, t1 = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_jiffies(), time.perf_counter()
    ours = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return out, max(0.0, ((b1 - b0) / hz - ours) / (t1 - t0) * 100)


def run_llama_bench_at(binary: str, model: Path, threads: int, new: int, depth: int) -> tuple[float, float | None]:
    """llama-bench's (decode tokens/s for NEW tokens after DEPTH tokens of context, prefill
    tokens/s of a DEPTH-token prompt: both tests in one llama-bench run; None at depth 0)."""
    cmd = [binary, "-m", str(model), "-p", str(depth), "-n", str(new), "-t", str(threads), "-r", "1", "-o", "json"] + (["-d", str(depth)] if depth else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench failed: {proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout)
    decode = float(next(r for r in rows if r.get("n_gen", 0) > 0)["avg_ts"])
    prefill = next((float(r["avg_ts"]) for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0), None)
    return decode, prefill


def run_pairs(a: argparse.Namespace) -> int:
    """--pairs: each precision of ours (and of --baseline) against llama.cpp's match, alternated."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tps = [int(t) for t in a.tp.split(",")]
    pairs = []
    for item in a.pairs.split(","):
        if "=" not in item:
            if item not in SHAPES:
                raise SystemExit(f"--pairs {item!r}: NAME=OURS[@quantize]:GGUF, or a shape's preset ({', '.join(SHAPES)})")
            pairs += preset_pairs(item, out / "models")
            continue
        name, rest = item.split("=", 1)
        ours, gguf = rest.rsplit(":", 1)
        path, _, quantize = ours.partition("@")
        pairs.append((name, Path(path), quantize or None, Path(gguf)))
    whos = [("ours", t) for t in tps] + ([("before", t) for t in tps] if a.baseline else []) + ([("llama.cpp", 1)] if a.llama_bench else [])
    runs: list[dict] = []
    jsonl = out / "pairs.jsonl"
    if a.table_only:  # the table of the runs already in OUT/pairs.jsonl (several sessions' runs)
        runs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    for rep in range(0 if a.table_only else a.repeats):
        for name, path, quantize, gguf in pairs:
            k = rep % len(whos)
            for who, tp in whos[k:] + whos[:k]:  # the order rotates every repeat
                waited = wait_quiet(a.wait_quiet) if a.wait_quiet else 0.0
                probe = probe_GBps(a.threads)
                if who == "llama.cpp":
                    (tok_s, pre), others = timed_run(run_llama_bench_at, a.llama_bench, gguf, a.threads, a.new_tokens, a.prompt_len)
                else:
                    tree = Path(a.baseline) if who == "before" else None
                    (tok_s, pre), others = timed_run(run_ours_both, path, tp, a.threads, a.new_tokens, a.prompt_len, quantize, tree)
                rec = dict(pair=name, who=who, tp=tp, repeat=rep, decode_tok_s=tok_s, prefill_tok_s=pre, others_pct=round(others, 1),
                           waited_s=round(waited, 1), probe_GBps=round(probe, 2), time=time.time())
                runs.append(rec)
                with open(jsonl, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{name} repeat {rep}: {who} tp={tp} {tok_s:.1f} tok/s (others {others:.0f}%)", flush=True)
    lines = [f"bench/gguf_peers.py --pairs ... --tp {a.tp} --repeats {a.repeats} --threads {a.threads}: {a.new_tokens} new tokens after {a.prompt_len}, batch 1",
             f"{datetime.date.today()} {platform.node()} ({os.cpu_count()} CPUs); llama.cpp: {a.llama_bench or '-'}; before: {a.baseline or '-'}",
             "", f"{'pair':<14} {'runtime':<10} {'tp':>3} {'decode tok/s median [min-max]':>30} {'spread':>7} {'per GB/s':>9} {'runs':>5} {'others %':>9} {'vs llama.cpp':>13} {'prefill tok/s':>14} {'vs llama.cpp':>13}"]
    clean = [r for r in runs if r["others_pct"] <= a.max_others]  # runs other people's jobs did not share the CPUs with
    lines.insert(2, f"runs where other processes used at most {a.max_others:g}% of a core: {len(clean)} of {len(runs)} (the table; every run is in pairs.jsonl)")
    rows = []
    for name, *_ in pairs:
        peer = [r["decode_tok_s"] for r in clean if r["pair"] == name and r["who"] == "llama.cpp"]
        for who, tp in whos:
            rs = [r for r in clean if r["pair"] == name and r["who"] == who and r["tp"] == tp]
            vals = [r["decode_tok_s"] for r in rs]
            if not vals:
                lines.append(f"{name:<14} {who:<10} {tp:>3} {'(no quiet run)':>30}")
                continue
            med = statistics.median(vals)
            rows.append((name, who, tp, med, min(vals), max(vals)))
            ratio = f"{med / statistics.median(peer):.2f}x" if peer and who != "llama.cpp" else ""
            pre = [r["prefill_tok_s"] for r in rs if r.get("prefill_tok_s") is not None]  # (runs before prefill was recorded have none)
            peer_pre = [r["prefill_tok_s"] for r in clean if r["pair"] == name and r["who"] == "llama.cpp" and r.get("prefill_tok_s") is not None]
            pre_s = f"{statistics.median(pre):.0f}" if pre else "-"
            pre_ratio = f"{statistics.median(pre) / statistics.median(peer_pre):.2f}x" if pre and peer_pre and who != "llama.cpp" else ""
            lines.append(f"{name:<14} {who:<10} {tp:>3} {f'{med:.1f} [{min(vals):.1f}-{max(vals):.1f}]':>30} {(max(vals) - min(vals)) / med * 100:>6.0f}% {probed_spread(rs):>9} "
                         f"{len(vals):>5} {statistics.median(r['others_pct'] for r in rs):>9.0f} {ratio:>13} {pre_s:>14} {pre_ratio:>13}")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "pairs.txt").write_text(table + "\n")
    with open(out / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair", "runtime", "tp", "median_tok_s", "min_tok_s", "max_tok_s", "runs"])
        w.writerows([*r[:3], round(r[3], 2), round(r[4], 2), round(r[5], 2), len([x for x in clean if (x["pair"], x["who"], x["tp"]) == r[:3]])] for r in rows)
    bars(rows, out / "pairs.png", f"decode after {a.prompt_len} tokens, {a.threads} threads: each precision of ours vs llama.cpp's match")
    return 0


def probed_spread(rs: list[dict]) -> str:
    """The spread of decode tokens/s per probed GB/s (the host's bandwidth taken out), or "-"
    for runs recorded without a probe."""
    per = [r["decode_tok_s"] / r["probe_GBps"] for r in rs if r.get("probe_GBps")]
    return f"{(max(per) - min(per)) / statistics.median(per) * 100:.0f}%" if per else "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-bench", default=None, help="path to llama.cpp's llama-bench")
    p.add_argument("--models", default="smollm2,tinyllama-q4_0,tinyllama-q8_0")
    p.add_argument("--tp", default="1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "gguf_peers"))
    p.add_argument("--pairs", default=None, help="NAME=OURS[@quantize]:GGUF,...: ours on OURS against llama.cpp on GGUF (see the module docstring)")
    p.add_argument("--baseline", default=None, help="with --pairs: also run ours from this source tree (\"before\")")
    p.add_argument("--prompt-len", type=int, default=8, help="with --pairs: tokens of context before the NEW decoded ones")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S", help="with --pairs: before each run wait up to S seconds for idle CPUs (a shared machine)")
    p.add_argument("--table-only", action="store_true", help="with --pairs: no runs, the table of those in OUT/pairs.jsonl")
    p.add_argument("--max-others", type=float, default=100.0, metavar="PCT", help="with --pairs: the table keeps the runs where other processes used at most PCT%% of a core")
    a = p.parse_args(argv)
    if a.pairs:
        return run_pairs(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tps = [int(t) for t in a.tp.split(",")]
    runs: list[dict] = []
    for name in a.models.split(","):
        model = model_path(name, out)
        for rep in range(a.repeats):
            if a.llama_bench:
                runs.append(dict(model=name, who="llama.cpp", tp=1, repeat=rep, decode_tok_s=run_llama_bench(a.llama_bench, model, a.threads, a.new_tokens)))
                print(f"{name} repeat {rep}: llama.cpp {runs[-1]['decode_tok_s']:.1f} tok/s", flush=True)
            for tp in tps:
                runs.append(dict(model=name, who="ours", tp=tp, repeat=rep, decode_tok_s=run_ours(model, tp, a.threads, a.new_tokens)))
                print(f"{name} repeat {rep}: ours tp={tp} {runs[-1]['decode_tok_s']:.1f} tok/s", flush=True)
    with open(out / "gguf_peers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(runs[0]))
        w.writeheader()
        w.writerows(runs)
    rows = []
    for name in a.models.split(","):
        peer = [r["decode_tok_s"] for r in runs if r["model"] == name and r["who"] == "llama.cpp"]
        for who, tp in [("llama.cpp", 1)] * bool(peer) + [("ours", t) for t in tps]:
            vals = [r["decode_tok_s"] for r in runs if r["model"] == name and r["who"] == who and r["tp"] == tp]
            med = statistics.median(vals)
            ratio = f"{med / statistics.median(peer):.2f}x" if peer and who == "ours" else ""
            rows.append((name, who, tp, med, min(vals), max(vals), ratio))
    print(f"\n{'model':<16} {'runtime':<10} {'tp':>3} {'decode tok/s (median [min-max])':>34} {'vs llama.cpp':>13}")
    for name, who, tp, med, lo, hi, ratio in rows:
        print(f"{name:<16} {who:<10} {tp:>3} {f'{med:.1f} [{lo:.1f}-{hi:.1f}]':>34} {ratio:>13}")
    bars(rows, out / "gguf_peers.png", f"GGUF decode, {a.threads} threads: ours vs llama.cpp")
    return 0


def bars(rows: list[tuple], path: Path, title: str) -> None:
    """rows: (name, who, tp, median, min, max, ...): one bar each, min-max as the error bar."""
    plt = optional.pyplot(path.name)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(max(8, 0.95 * len(rows)), 4.2))
    labels = [f"{n}\n{w} tp={t}" for n, w, t, *_ in rows]
    ax.bar(range(len(rows)), [r[3] for r in rows], yerr=[[r[3] - r[4] for r in rows], [r[5] - r[3] for r in rows]],
           color=["#888" if r[1] == "llama.cpp" else "#3a7" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
