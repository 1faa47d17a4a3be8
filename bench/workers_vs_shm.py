"""Decode tokens/s over tp-workers on loopback against the local shared-memory transport.

    python bench/workers_vs_shm.py [--shape tinyllama] [--dtype bfloat16] [--repeats 5]
        [--new-tokens 64] [--prompt-len 16] [--security curve|secret] [--out bench/out/workers]

Two ranks (tp=2), one thread each, the same random checkpoint (tp_runtime.cli.sweep's dummy
shapes), rotating the order of the sides within each repeat so that machine drift hits all alike:
    shm      `python -m tp_runtime generate --tp 2 --threads 1`: both ranks local, the runtime's
             default transport between ranks of one host (shared memory)
    workers  the same command with `--workers 127.0.0.1:PORT`: rank 0 is the coordinator, rank 1
             a `tp-worker` daemon on loopback (started once, kept for every repeat), every
             collective over the pyzmq transport's TCP data links (the default data path);
             --security curve (default): CURVE keys on every zmq socket and AES-GCM on every TCP
             frame (what a keyed job runs); secret: the shared secret's MACs only
    workers-zmq  the same with `--data-path zmq`: every payload on the zmq sockets (the older path)
Placement: the local launcher pins its two ranks to two different cores; the workers sides are
pinned alike (the coordinator to the first core, the tp-worker to the second: two machines'
worth of cores), unless --no-pin leaves them to the scheduler (which at times runs both on one core, or moves
them: that measures the placement, not the transport).
The table shows, per side, the median decode tokens/s of the repeats [min-max], the ms per token
and the ratio to shm (the issue's goal for workers: >= 0.85). Writes OUT/workers_vs_shm.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (REPO, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from peers import run_ours  # noqa: E402
from tp_runtime.cli.sweep import DUMMY_SHAPES, dummy_checkpoint  # noqa: E402
from tp_runtime.launch.spawn import free_port  # noqa: E402

SECRET = "7b" * 32


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tinyllama", choices=sorted(DUMMY_SHAPES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--security", choices=("curve", "secret"), default="curve")
    p.add_argument("--out", type=Path, default=HERE / "out" / "workers")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="leave the coordinator and the tp-worker to the scheduler")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    model = dummy_checkpoint(DUMMY_SHAPES[a.shape], a.shape)
    prompt = [(7 * i + 3) % 1000 + 10 for i in range(a.prompt_len)]
    os.environ.update(TP_RUNTIME_SECRET=SECRET, OMP_NUM_THREADS="1")  # the worker's and every run's (peers.run_ours inherits it)
    tmp = Path(tempfile.mkdtemp(prefix="tp-wvs-"))
    port = free_port()
    wcmd = [sys.executable, "-m", "tp_runtime.launch.worker", "--listen", f"tcp://127.0.0.1:{port}", "--cache-dir", str(tmp / "cache"),
            "--threads", "1", "--model-dir", str(model)]
    extra = ["--workers", f"127.0.0.1:{port}"]
    if a.security == "curve":
        def keygen(d: Path) -> str:
            r = subprocess.run([sys.executable, "-m", "tp_runtime.launch.worker", "--keygen", str(d)], capture_output=True, text=True, cwd=REPO, check=True)
            return next(ln.split("public key:", 1)[1].strip() for ln in r.stdout.splitlines() if ln.startswith("public key:"))

        wkey, ckey = keygen(tmp / "worker"), keygen(tmp / "coord")
        (tmp / "authorized_keys").write_text(ckey + "\n")
        (tmp / "known_workers").write_text(f"127.0.0.1:{port} {wkey}\n")
        wcmd += ["--keys", str(tmp / "worker"), "--authorized-keys", str(tmp / "authorized_keys")]
        extra += ["--worker-keys", str(tmp / "coord"), "--known-workers", str(tmp / "known_workers")]
    log = tmp / "worker.log"
    cores = sorted(os.sched_getaffinity(0))
    pinned = a.pin and len(cores) >= 2
    worker = subprocess.Popen(wcmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                              preexec_fn=(lambda: os.sched_setaffinity(0, {cores[1]})) if pinned else None)
    flags = {"shm": [], "workers": extra, "workers-zmq": [*extra, "--data-path", "zmq"]}
    results: dict[str, list[dict]] = {side: [] for side in flags}
    loads = []
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in log.read_text():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tp-worker did not start: " + log.read_text()[-500:])
            time.sleep(0.1)

        def generate(flags: list[str]) -> dict:
            if not (pinned and "--workers" in flags):
                return run_ours(model, 2, 1, a.dtype, None, [prompt], a.new_tokens, flags)
            os.sched_setaffinity(0, {cores[0]})  # the coordinator inherits it (the shm run's launcher needs both cores)
            try:
                return run_ours(model, 2, 1, a.dtype, None, [prompt], a.new_tokens, flags)
            finally:
                os.sched_setaffinity(0, cores)

        generate(extra)  # warm-up: the worker loads (streams or maps) its slices once
        sides = list(flags)
        for rep in range(a.repeats):
            for side in sides[rep % len(sides):] + sides[:rep % len(sides)]:
                loads.append(os.getloadavg()[0])
                results[side].append(generate(flags[side]))
                print(f"  repeat {rep + 1}/{a.repeats} {side:>11}: {results[side][-1]['decode_tokens_per_s']:.2f} tokens/s", flush=True)
    finally:
        worker.kill()
        worker.wait()
    rows = []
    for side, rs in results.items():
        v = [r["decode_tokens_per_s"] for r in rs]
        rows.append({"side": side, "median_tokens_per_s": statistics.median(v), "min": min(v), "max": max(v),
                     "ms_per_token": 1000 / statistics.median(v), "runs": json.dumps(v)})
    shm = rows[0]
    print(f"\n{a.shape} {a.dtype} tp=2, 1 thread per rank, {a.new_tokens} new tokens, median of {a.repeats} (order rotated); "
          f"workers: tp-worker on loopback, {a.security}, {'coordinator and worker pinned to one core each' if pinned else 'not pinned'}")
    print(f"{'side':>11} | {'decode tok/s':>12} {'[min-max]':>16} | {'ms/token':>8} | {'/ shm':>6}")
    for r in rows:
        print(f"{r['side']:>11} | {r['median_tokens_per_s']:12.2f} [{r['min']:6.2f}-{r['max']:6.2f}] | {r['ms_per_token']:8.1f} | "
              f"{r['median_tokens_per_s'] / shm['median_tokens_per_s']:6.3f}")
    print(f"goal: workers / shm >= 0.85 (workers = the TCP data path, the default); "
          f"load average during the runs: {min(loads):.2f}-{max(loads):.2f}")
    with open(a.out / "workers_vs_shm.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["shape", "dtype", "security", "pinned", "side", "median_tokens_per_s", "min", "max", "ms_per_token", "ratio_to_shm", "runs"])
        w.writeheader()
        for r in rows:
            w.writerow({"shape": a.shape, "dtype": a.dtype, "security": a.security, "pinned": pinned, **r, "ratio_to_shm": r["median_tokens_per_s"] / rows[0]["median_tokens_per_s"]})
    print(f"wrote {a.out / 'workers_vs_shm.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
