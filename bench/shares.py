"""Uneven machines on one host: decode at tp=2 with rank 1 made slower, at equal shares and
at `--shares auto`.

    python bench/shares.py [--slow gemv|quota|neighbour] [--passes 2] [--quota 0.5] [--period-us 2000]
        [--repeats 5] [--new-tokens 48] [--dtype bfloat16] [--out bench/out/shares]

The launcher pins rank r to core r. Rank 1 is slowed in one of three ways:
    gemv       (the default) every GEMV of rank 1 is computed --passes times
               (TP_EMULATE_SLOWER=1:PASSES, kernels/cpu_gemv.py): a machine with 1/PASSES of
               the memory bandwidth, which is what a decode step's speed follows
    quota      (where the cgroup v1 cpu controller is writable, as root) rank 1's
               process is moved, as soon as it starts, into a cgroup with a CFS quota of
               --quota of a core per --period-us (the kernel takes quotas of 1 ms and up, so
               half a core is 1 ms in every 2): a slower machine at the granularity of a few
               of a decode step's stretches between collectives
    neighbour  a busy loop pinned to core 1 shares rank 1's core by the scheduler's time slices
               (~3 ms): measured here, not a slower machine (auto 1.02x of equal: collectives
               0.3 ms apart wait for whole slices whatever the share)
Per repeat, alternated, in fresh processes: tp=2 unslowed (the reference), then slowed at
equal shares and at auto. A Llama-shaped
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
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (REPO, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from peers import run_ours  # noqa: E402

from tp_runtime.kernels.cpu_gemv import EMULATE_SLOWER_ENV  # noqa: E402

SHAPE = dict(hidden_size=2048, num_layers=4, num_heads=16, num_kv_heads=4, intermediate_size=5632, vocab_size=32000)
NEIGHBOUR = "import os; os.sched_setaffinity(0, {%d})\nwhile True: pass"
CGROUP = Path("/sys/fs/cgroup/cpu")  # cgroup v1's cpu controller (where this machine mounts it)
RUN_MARK = "TP_BENCH_SHARES_RUN"  # in the ranks' environment: finds this run's rank 1


class Quota:
    """A cgroup with a CFS quota, and a thread that moves rank 1 of the current run into it as
    soon as its process exists (before its --shares auto measurement, which follows torch's
    import: a second or more)."""

    def __init__(self, fraction: float, period_us: int) -> None:
        self.dir = CGROUP / f"tp-bench-shares-{os.getpid()}"
        if fraction * period_us < 1000:
            raise SystemExit(f"bench/shares.py: a quota of {fraction:g} x {period_us} us is under the kernel's 1000 us")
        self.dir.mkdir(exist_ok=True)
        (self.dir / "cpu.cfs_period_us").write_text(str(period_us))
        (self.dir / "cpu.cfs_quota_us").write_text(str(int(fraction * period_us)))
        self.moved: list[int] = []

    @staticmethod
    def available() -> str | None:
        """None, or why no quota can be set here."""
        if not (CGROUP / "cpu.cfs_quota_us").is_file():
            return f"no cgroup v1 cpu controller at {CGROUP}"
        if not os.access(CGROUP, os.W_OK):
            return f"{CGROUP} is not writable (not root?)"
        return None

    def watch(self, mark: str, stop: threading.Event) -> None:
        want = {f"{RUN_MARK}={mark}".encode(), b"RANK=1"}
        while not stop.is_set():
            for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
                if pid in self.moved:
                    continue
                try:
                    env = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
                except OSError:
                    continue
                if want <= env:
                    (self.dir / "cgroup.procs").write_text(str(pid))  # v1: the whole process, its threads included
                    self.moved.append(pid)
            stop.wait(0.01)

    def close(self) -> None:
        try:
            self.dir.rmdir()
        except OSError:  # a task still inside: the kernel keeps it until the task ends
            pass


def checkpoint(out: Path, dtype: str) -> Path:
    from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint

    path = out / f"llama-2048-{dtype}"
    if not (path / "config.json").is_file():
        print(f"writing {path} (once) ...", flush=True)
        write_checkpoint(path, llama_config_dict(**SHAPE, dtype=dtype))
    return path


def run(model: Path, args, shares: str | None, slowed: bool, quota: Quota | None) -> dict:
    hog = stop = watcher = None
    if slowed and args.slow == "gemv":
        os.environ[EMULATE_SLOWER_ENV] = f"1:{args.passes}"
    elif slowed and args.slow == "neighbour":
        hog = subprocess.Popen([sys.executable, "-c", NEIGHBOUR % 1])
    elif slowed:
        os.environ[RUN_MARK] = mark = os.urandom(4).hex()
        stop = threading.Event()
        watcher = threading.Thread(target=quota.watch, args=(mark, stop), daemon=True)
        watcher.start()
    try:
        extra = ["--shares", shares] if shares else []
        out = run_ours(model, 2, 1, args.dtype, None, [list(range(1, 33))], args.new_tokens, extra)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        os.environ.pop(EMULATE_SLOWER_ENV, None)
        if watcher is not None:
            stop.set()
            watcher.join()
            os.environ.pop(RUN_MARK, None)
    if quota is not None and slowed and not quota.moved:
        raise SystemExit("bench/shares.py: rank 1 was never found to move into the quota's cgroup")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "shares")
    ap.add_argument("--slow", choices=("gemv", "quota", "neighbour"), default="gemv", help="how rank 1 is slowed (module docstring)")
    ap.add_argument("--passes", type=int, default=2, help="with --slow gemv: rank 1 computes every GEMV this many times")
    ap.add_argument("--quota", type=float, default=0.5, help="with --slow quota: the fraction of a core rank 1 gets")
    ap.add_argument("--period-us", type=int, default=2000, help="with --slow quota: the CFS period (the quota within it must be 1000 us at least)")
    args = ap.parse_args()
    slow = args.slow
    if slow == "quota" and (why := Quota.available()):
        sys.exit(f"bench/shares.py --slow quota: {why}")
    quota = Quota(args.quota, args.period_us) if slow == "quota" else None
    label = {"gemv": f"rank 1 GEMVs x{args.passes}", "quota": f"rank 1 at {args.quota:g} of a core", "neighbour": "neighbour on core 1"}[slow]
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench/shares.py needs two cores (one rank each)")
    args.out.mkdir(parents=True, exist_ok=True)
    model = checkpoint(args.out, args.dtype)
    configs = (("unslowed, equal", None, False), (f"{label}, equal", None, True), (f"{label}, auto", "auto", True))
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    with open(args.out / "shares.jsonl", "w") as log:
        for rep in range(args.repeats):
            for name, shares, slowed in configs:
                r = run(model, args, shares, slowed, quota)
                r.update(config=name, repeat=rep, slow=slow, quota=args.quota if quota else None)
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
    for name, shares, slowed in configs:
        tps = sorted(r["decode_tokens_per_s"] for r in rows[name])
        used = [0.5, 0.5] if shares is None else auto_shares
        pred = predicted(used) if slowed else 1 / t0
        table.append(dict(config=name, shares=",".join(f"{s:.3f}" for s in used), median=statistics.median(tps), lo=tps[0], hi=tps[-1], predicted=pred))
    with open(args.out / "shares.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    if quota is not None:
        quota.close()
    print(f"\nSOL: collectives {comm * 1e3:.2f} ms/token (reference run), rank slowness when slowed {slowness[0]:.2f} / {slowness[1]:.2f}")
    print(f"{'configuration':30} {'shares':>13} {'tok/s':>8} {'[min-max]':>15} {'predicted':>10} {'error':>7}")
    for row in table:
        err = row["median"] / row["predicted"] - 1
        spread = f"[{row['lo']:.1f}-{row['hi']:.1f}]"
        print(f"{row['config']:30} {row['shares']:>13} {row['median']:8.1f} {spread:>15} {row['predicted']:10.1f} {err:+7.0%}")
    eq, auto = table[1]["median"], table[2]["median"]
    print(f"\nauto / equal with rank 1 slowed ({slow}): {auto / eq:.2f}x; wrote {args.out / 'shares.csv'}, {args.out / 'shares.jsonl'}")


if __name__ == "__main__":
    main()
