"""Batch benchmark: batched decode throughput, ours (fused and eager decode step) against transformers.

    python bench/batch.py [--shapes small,tinyllama] [--dtypes float32,bfloat16] [--batch 1,2,4,8]
        [--tp 1] [--repeats 2] [--prompt-len 64] [--new-tokens 32] [--out bench/out/batch] [--quick]

For every (shape, dtype, batch size B), on bench/peers.py's random checkpoints, B different random
prompts of --prompt-len tokens (equal lengths: nobody pads; batch B takes the first B of one list)
are decoded, each configuration in a fresh process, alternating within a repeat (for repeat: for
B: for config), ours with --threads cores // tp per rank and transformers with every core:
    ours fused    `python -m tp_runtime generate --decode-step fused`, one --prompt-ids per prompt
                  (C kernels on preallocated buffers, each weight read once per step for all B)
    ours eager    the same with --decode-step eager (the torch model forward)
    transformers  bench/peers.py's worker: `generate` on the [B, prompt-len] batch,
                  greedy, "dynamic" and "static" cache (one that fails is recorded and skipped)
Measured: decode tokens/s summed over the batch, B x new-tokens / decode seconds; ours: the CLI's
rate (its decode steps' tokens / decode seconds) under --max-new-tokens new-tokens + 1, so that past
the prefill's token every sequence decodes new-tokens; transformers: as peers.py, B x new-tokens /
(time of generate(new-tokens + 1) - time of generate(1)), min_new_tokens set so EOS cannot stop it.
The table shows the median of the repeats with [min-max], per sequence (median / B), x tf (/ the
better transformers cache by median at the same B) and x B=1 (/ the same row at batch 1).

Writes OUT/batch.jsonl (one record per process run and one summary per row, with git sha, host,
versions and settings, as runs finish), OUT/batch.csv (one row per shape/dtype/who/B) and
OUT/batch.png (decode tokens/s vs B, one line per who, one panel per shape/dtype).
--quick: small, bfloat16, batch 1,4, prompt 32, 8 new tokens, 1 repeat.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (REPO, HERE):  # the package, and the sibling benchmark whose helpers are shared
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from peers import DUMMY_SHAPES, ELEMENT_BYTES, SHAPES, dummy_checkpoint, open_jsonl, print_aligned, run_ours, run_worker, summarise, transformers_missing, version  # noqa: E402

CONFIGS = (("ours fused", "fused"), ("ours eager", "eager"), ("transformers", None))
CACHES = ("dynamic", "static")


def run_fused_or_eager(model: Path, tp: int, threads: int, dtype: str, step: str, prompts: list[list[int]], new: int) -> dict[str, Any]:
    """Ours on the batch; new + 1 tokens, so that past the prefill's token each sequence decodes `new`."""
    out = run_ours(model, tp, threads, dtype, None, prompts, new + 1, extra=["--decode-step", step])
    if out["generated_tokens"] != len(prompts) * (new + 1):
        raise RuntimeError(f"generated {out['generated_tokens']} tokens, wanted {len(prompts) * (new + 1)}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="small,tinyllama", help="comma list of: " + ",".join(SHAPES))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", default="1,2,4,8", help="batch sizes, comma list")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of ours (local ranks, cores // tp threads each)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "batch"), help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke run: small, bfloat16, batch 1,4, prompt 32, 8 new tokens, 1 repeat")
    a = p.parse_args(argv)
    if a.quick:
        a.shapes, a.dtypes, a.batch, a.prompt_len, a.new_tokens, a.repeats = "small", "bfloat16", "1,4", 32, 8, 1
    a.shapes = [s for s in a.shapes.split(",") if s]
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    try:
        a.batch = sorted({int(b) for b in str(a.batch).split(",") if b.strip()})
    except ValueError as e:
        p.error(str(e))
    if bad := [s for s in a.shapes if s not in SHAPES] + [d for d in a.dtypes if d not in ELEMENT_BYTES]:
        p.error(f"unknown shape/dtype {bad} (shapes: {', '.join(SHAPES)}; dtypes: {', '.join(ELEMENT_BYTES)})")
    if not a.batch or min(a.batch) < 1 or a.tp < 1 or a.repeats < 1 or a.prompt_len < 8 or a.new_tokens < 1:
        p.error("--batch, --tp, --repeats and --new-tokens must be >= 1, --prompt-len >= 8")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if transformers_missing("bench/batch.py"):
        return 2
    from tqdm import tqdm

    out_dir = Path(a.out)
    cores = os.cpu_count() or 1
    per_rank = max(1, cores // a.tp)
    settings = {k: getattr(a, k) for k in ("shapes", "dtypes", "batch", "tp", "repeats", "prompt_len", "new_tokens", "quick")}
    emit = open_jsonl(out_dir, "batch", settings, transformers=version("transformers"))
    start = time.perf_counter()
    models = {s: dummy_checkpoint(DUMMY_SHAPES[s], s) for s in a.shapes}
    rng = random.Random(0)
    prompts = {s: [[rng.randrange(3, DUMMY_SHAPES[s]["vocab_size"]) for _ in range(a.prompt_len)] for _ in range(max(a.batch))]
               for s in a.shapes}

    points = [(s, d) for s in a.shapes for d in a.dtypes]
    bar = tqdm(total=len(points) * a.repeats * len(a.batch) * len(CONFIGS), desc="batch", unit="run", file=sys.stderr, dynamic_ncols=True)
    results: dict[tuple, list[float]] = {}  # (shape, dtype, who, B) -> decode tok/s per repeat; who: "transformers <cache>"
    for shape, dtype in points:
        for rep in range(a.repeats):
            for b in a.batch:
                for who, step in CONFIGS:
                    threads = per_rank if step else cores
                    label = f"{shape} {dtype} {who} B={b} x{threads}t rep {rep + 1}"
                    bar.set_postfix_str(label)
                    rec = {"kind": "run", "who": who, "shape": shape, "dtype": dtype, "batch": b, "tp": a.tp if step else 1,
                           "threads_per_rank": threads, "repeat": rep}
                    try:
                        if step:
                            r = run_fused_or_eager(models[shape], a.tp, threads, dtype, step, prompts[shape][:b], a.new_tokens)
                            results.setdefault((shape, dtype, who, b), []).append(r["decode_tokens_per_s"])
                        else:
                            spec = {"model": str(models[shape]), "dtype": dtype, "threads": threads,
                                    "prompts": prompts[shape][:b], "new_tokens": a.new_tokens}
                            r = run_worker("--hf-worker", spec, threads)  # peers.hf_worker, on the batch
                            for cache, c in r["caches"].items():
                                if "error" in c:
                                    if rep == 0:
                                        tqdm.write(f"{label}: {cache} cache failed: {c['error']}", file=sys.stderr)
                                    continue
                                results.setdefault((shape, dtype, f"{who} {cache}", b), []).append(c["decode_tokens_per_s"])
                        rec["result"] = r
                    except Exception as e:
                        rec["error"] = str(e)
                        tqdm.write(f"{label}: {e}", file=sys.stderr)
                    emit(rec)
                    bar.update(1)
    bar.close()

    rows = build_rows(a, results, points, per_rank, cores)
    for row in rows:
        emit({"kind": "summary", **row})
    print(f"\nbatched decode, prompt {a.prompt_len}, {a.new_tokens} new tokens per sequence, {a.repeats} repeat(s); "
          f"ours tp={a.tp} x {per_rank} thread(s), transformers {cores} thread(s)")
    print_table(rows)
    write_csv(rows, out_dir / "batch.csv")
    png = out_dir / "batch.png"
    try:
        if not plot(rows, png, a):
            png = None
    except Exception as e:  # the numbers are already written
        print(f"chart failed: {e}", file=sys.stderr)
        png = None
    print(f"\nwrote {out_dir / 'batch.jsonl'}, {out_dir / 'batch.csv'}" + (f" and {png}" if png else "") + f" in {time.perf_counter() - start:.0f} s")
    return 0 if rows and all(r["decode"] for r in rows) else 1


def build_rows(a, results, points, per_rank: int, cores: int) -> list[dict[str, Any]]:
    rows = []
    for shape, dtype in points:
        base: dict[str, float] = {}  # who -> median at the smallest B
        for b in a.batch:
            group = [dict(who=who, tp=a.tp, threads=f"{a.tp}x{per_rank}", cache=None,
                          decode=summarise(results.get((shape, dtype, who, b), []))) for who, step in CONFIGS if step]
            best = max(((c, summarise(results.get((shape, dtype, f"transformers {c}", b), []))) for c in CACHES),
                       key=lambda cd: cd[1]["median"] if cd[1] else -1.0)
            theirs = dict(who="transformers", tp=1, threads=f"1x{cores}", cache=best[0] if best[1] else None, decode=best[1])
            for row in group + [theirs]:
                d = row["decode"]
                if d and row["who"] not in base:
                    base[row["who"]] = (b, d["median"])
                ref = base.get(row["who"])
                rows.append({"shape": shape, "dtype": dtype, "batch": b, **row,
                             "per_sequence": d["median"] / b if d else None,
                             "ratio_transformers": d["median"] / theirs["decode"]["median"] if (d and theirs["decode"]) else None,
                             "ratio_batch1": d["median"] / ref[1] if (d and ref and ref[0] == 1) else None})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["shape", "dtype", "who", "B", "threads", "decode tok/s [min-max]", "per seq", "x tf", "x B=1"]
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    table = [head]
    for r in rows:
        d = r["decode"]
        table.append([r["shape"], r["dtype"], r["who"] + (f" ({r['cache']})" if r["cache"] else ""), str(r["batch"]), r["threads"],
                      f"{d['median']:.1f} [{d['min']:.1f}-{d['max']:.1f}]" if d else "failed",
                      f(r["per_sequence"], ".1f"), f(r["ratio_transformers"], ".2f"), f(r["ratio_batch1"], ".2f")])
    print_aligned(table, text_columns=3)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols = ["shape", "dtype", "who", "batch", "tp", "threads", "cache", "decode_median", "decode_min", "decode_max", "repeats",
            "per_sequence", "ratio_transformers", "ratio_batch1"]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            d = r["decode"] or {}
            w.writerow({**r, "decode_median": d.get("median"), "decode_min": d.get("min"), "decode_max": d.get("max"), "repeats": d.get("n", 0)})


def plot(rows: list[dict[str, Any]], path: Path, a: argparse.Namespace) -> bool:
    plt = optional.pyplot(path.name)
    if plt is None:
        return False

    panels = list(dict.fromkeys((r["shape"], r["dtype"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.5, 5 * len(panels)), 4.5), squeeze=False)
    for ax, (shape, dtype) in zip(axes[0], panels):
        for who, _ in CONFIGS:
            mine = [r for r in rows if (r["shape"], r["dtype"], r["who"]) == (shape, dtype, who) and r["decode"]]
            med = [r["decode"]["median"] for r in mine]
            ax.errorbar([r["batch"] for r in mine], med, fmt="o-", capsize=3, label=who,
                        yerr=[[m - r["decode"]["min"] for m, r in zip(med, mine)], [r["decode"]["max"] - m for m, r in zip(med, mine)]])
        ax.set_xscale("log", base=2)
        ax.set_xticks(a.batch, [str(b) for b in a.batch])
        ax.set_xlabel("batch size B")
        ax.set_ylabel("decode tokens/s, summed over the batch")
        ax.set_title(f"{shape} {dtype}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"batched decode (median, min-max)\nprompt {a.prompt_len}, {a.new_tokens} new tokens, ours tp={a.tp}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
