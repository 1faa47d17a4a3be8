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
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tp_runtime import optional  # noqa: E402

TINYLLAMA = dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632, vocab_size=32000)


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
    proc = subprocess.run([binary, "-m", str(model), "-p", "0", "-n", str(new), "-t", str(threads), "-r", "1", "-o", "json"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench failed: {proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout)
    return float(next(r for r in rows if r.get("n_gen", 0) > 0)["avg_ts"])


def run_ours(model: Path, tp: int, threads: int, new: int) -> float:
    cmd = [sys.executable, "-m", "tp_runtime", "generate", "--model", str(model), "--tp", str(tp), "--threads", str(max(1, threads // tp)),
           "--prompt-ids", "1,2,3,4,5,6,7,8", "--max-new-tokens", str(new), "--ignore-eos", "--json", "--quiet", "--max-seq-len", "512"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"ours failed: {proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["decode_tokens_per_s"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-bench", default=None, help="path to llama.cpp's llama-bench")
    p.add_argument("--models", default="smollm2,tinyllama-q4_0,tinyllama-q8_0")
    p.add_argument("--tp", default="1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "gguf_peers"))
    a = p.parse_args(argv)
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
    plt = optional.pyplot("gguf_peers.png")
    if plt is not None:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{n}\n{w} tp={t}" for n, w, t, *_ in rows]
        ax.bar(range(len(rows)), [r[3] for r in rows], yerr=[[r[3] - r[4] for r in rows], [r[5] - r[3] for r in rows]], color=["#888" if r[1] == "llama.cpp" else "#3a7" for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel("decode tokens/s (batch 1)")
        ax.set_title(f"GGUF decode, {a.threads} threads: ours vs llama.cpp")
        fig.tight_layout()
        fig.savefig(out / "gguf_peers.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
