"""Uneven machines on one host: decode at tp=2 with one rank's core shared by a CPU-bound
neighbour, at equal shares and at `--shares auto`.

    python bench/shares.py [--repeats 5] [--new-tokens 48] [--dtype bfloat16] [--out bench/out/shares]

The launcher pins rank r to core r; a busy loop pinned to core 1 leaves rank 1 about half of
it, as a slower machine would. Per repeat, alternated, in fresh processes: tp=2 with no
neighbour (the reference), then with the neighbour at equal shares and at auto. A Llama-shaped
random checkpoint (hidden 2048, 4 layers, 16 q / 4 kv heads, MLP 5632, vocab 32000; written
once under --out) decodes one prompt greedily.

Prediction (no fit to the runs it predicts): a decode step is the slowest rank's share of the
weights at its speed, plus the collectives. From the reference run, c = its collective seconds
per token and t0 - c the compute of an even split on two unloaded cores; auto's shares are
proportional to the rates the ranks measured, so rank i's slowness is max(shares) / share_i.
Then step(shares) = (t0 - c) x 2 x max_i(share_i x slowness_i) + c.

Writes OUT/shares.jsonl (a line per run) and OUT/shares.csv, and prints the table (median of
--repeats, [min-max], tokens/s).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (REPO, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from peers import run_ours  # noqa: E402

SHAPE = dict(hidden_size=2048, num_layers=4, num_heads=16, num_kv_heads=4, intermediate_size=5632, vocab_size=32000)
NEIGHBOUR = "import os; os.sched_setaffinity(0, {%d})\nwhile True: pass"


def checkpoint(out: Path, dtype: str) -> Path:
    from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint

    path = out / f"llama-2048-{dtype}"
    if not (path / "config.json").is_file():
        print(f"writing {path} (once) ...", flush=True)
        write_checkpoint(path, llama_config_dict(**SHAPE, dtype=dtype))
    return path


def run(model: Path, args, shares: str | None, neighbour_core: int | None) -> dict:
    hog = subprocess.Popen([sys.executable, "-c", NEIGHBOUR % neighbour_core]) if neighbour_core is not None else None
    try:
        extra = ["--shares", shares] if shares else []
        out = run_ours(model, 2, 1, args.dtype, None, [list(range(1, 33))], args.new_tokens, extra)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "shares")
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench/shares.py needs two cores (one rank each)")
    args.out.mkdir(parents=True, exist_ok=True)
    model = checkpoint(args.out, args.dtype)
    configs = (("no neighbour, equal", None, None), ("neighbour on core 1, equal", None, 1), ("neighbour on core 1, auto", "auto", 1))
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    with open(args.out / "shares.jsonl", "w") as log:
        for rep in range(args.repeats):
            for name, shares, core in configs:
                r = run(model, args, shares, core)
                r.update(config=name, repeat=rep)
                rows[name].append(r)
                log.write(json.dumps(r) + "\n")
                print(f"  repeat {rep + 1}/{args.repeats} {name}: {r['decode_tokens_per_s']:.1f} tok/s, shares {r.get('shares')}", flush=True)

    ref = rows[configs[0][0]]
    t0 = statistics.median(1 / r["decode_tokens_per_s"] for r in ref)
    comm = statistics.median(r["comm"]["comm_s_per_token"] for r in ref)
    auto_shares = [statistics.median(r["shares"][i] for r in rows[configs[2][0]]) for i in range(2)]
    slowness = [max(auto_shares) / s for s in auto_shares]

    def predicted(shares: list[float]) -> float:
        total = sum(shares)
        return 1 / ((t0 - comm) * 2 * max(s / total * w for s, w in zip(shares, slowness)) + comm)

    table = []
    for name, shares, core in configs:
        tps = sorted(r["decode_tokens_per_s"] for r in rows[name])
        used = [0.5, 0.5] if shares is None else auto_shares
        pred = 1 / t0 if core is None else predicted(used)
        table.append(dict(config=name, shares=",".join(f"{s:.3f}" for s in used), median=statistics.median(tps), lo=tps[0], hi=tps[-1], predicted=pred))
    with open(args.out / "shares.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    print(f"\nSOL: collectives {comm * 1e3:.2f} ms/token (reference run), rank slowness under the neighbour {slowness[0]:.2f} / {slowness[1]:.2f}")
    print(f"{'configuration':30} {'shares':>13} {'tok/s':>8} {'[min-max]':>15} {'predicted':>10} {'error':>7}")
    for row in table:
        err = row["median"] / row["predicted"] - 1
        spread = f"[{row['lo']:.1f}-{row['hi']:.1f}]"
        print(f"{row['config']:30} {row['shares']:>13} {row['median']:8.1f} {spread:>15} {row['predicted']:10.1f} {err:+7.0%}")
    eq, auto = table[1]["median"], table[2]["median"]
    print(f"\nauto / equal under the neighbour: {auto / eq:.2f}x; wrote {args.out / 'shares.csv'}, {args.out / 'shares.jsonl'}")


if __name__ == "__main__":
    main()
