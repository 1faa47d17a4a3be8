"""Communication benchmark: collective latency versus message size, against the socket floor.

    python bench/collectives.py [--out DIR] [--quick] [--ranks 2,4] [--transports gloo,zmq,curve]

Measures, on loopback, for every (transport, ranks, op, size):
    transports  gloo (torch.distributed), zmq-direct and zmq-ring (tp_runtime's pyzmq transport
                with its all-reduce forced to the direct exchange or to the ring; its all-gather is
                always a direct exchange, shown as "zmq"); curve: the cost of securing the worker
                network, 2 ranks, all-reduce only, the transport's default algorithm six ways,
                interleaved in blocks like direct and ring: its two data paths (zmq-*: payloads on
                the zmq sockets; tcp-*: on its raw TCP links, comm/tcp_data.py, the default) in
                three modes each: *-plain (no MAC, no encryption), *-hmac (the shared secret: HMAC-
                SHA256 per zmq message, GMAC per TCP frame) and *-curve (CURVE keys: every zmq socket
                encrypted, every TCP frame sealed with AES-GCM, what a keyed tp-worker job runs),
                each through ZmqCommunicator.on_loopback, with p50 / p99, bandwidth (bytes / p50) and
                both against the raw TCP round trip of the same size, side by side. The "zmq" job
                above measures the zmq data path
    ranks       2 and 4 local processes, one thread each (4 ranks on a 2-core machine are
                scheduling-bound: that sweep is kept short and says so)
    ops         all_reduce, all_gather of a float32 tensor, through the communicator's own method
                (what the runtime pays, the gloo all_gather's torch.cat and the zmq sum included)
    sizes       4 B to 16 MiB in powers of 4, plus 8 KiB (a 2048-wide hidden vector); the zmq
                all-reduce also at the powers of 2 in between from 16 KiB to 4 MiB, to place the
                direct-vs-ring crossover
the median (and p10/p90) of many repeats, after a warm-up, timed on rank 0. Back-to-back calls
need no barrier: each collective synchronises the ranks. zmq direct and ring are measured
interleaved, in blocks at the same size, so machine drift does not decide the crossover.

The floor: the one-way time of one message of the same size between 2 processes over the same
socket type, i.e. HALF the round trip of a ping-pong (a plain TCP socket with TCP_NODELAY for
gloo; a zmq PUSH/PULL pair, the sockets the zmq transport uses, for zmq). Every collective has
to move at least one such message, so p50 / floor >= ~1; the CSV also holds the full round trip.
The raw TCP round trip of every size is measured in every run (whatever --transports says), and
every table also shows "TCP RTT" and "p50/RTT": a collective against one raw TCP round trip of
the same size, the wire's floor the worker transport is held to (issue 17: <= 2x with CURVE on).

Placement: the ranks are left to the scheduler, as the runtime's launcher leaves them (--pin
puts rank r on core r mod cores, each rank's helper threads included; in our checks that made
gloo slower, its threads then sharing one core, and zmq not reliably faster). The floor's two
processes are always pinned to different cores, as two ranks busy computing are: unpinned, the
scheduler often puts a ping-ponging pair on one core (wake-affine), which cut a small TCP round
trip from ~45-80 us to ~16-20 us here and made the floor bimodal from run to run.
The point order is shuffled (the same order on every rank), so drift shows as noise, not as a
trend over size.

Also times the stats wrapper (tp_runtime.comm.timing.TimedCommunicator over a no-op transport
against the bare no-op) and prints "timing overhead: X us per collective (target < 5 us)".

Writes DIR/collectives.csv, DIR/collectives.png (log-log latency vs size, one panel per op)
and DIR/collectives.jsonl (one record per point with git sha, host, torch and zmq versions).
Ranks are started with tp_runtime.launch.spawn re-running this file with --rank-worker.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KiB, MiB = 1 << 10, 1 << 20

# --------------------------------------------------------------------------------------------
# plan: sizes and repeats


def fmt_bytes(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    if n >= KiB and n % KiB == 0:
        return f"{n // KiB} KiB"
    return f"{n} B"


def sizes_for(quick: bool) -> list[int]:
    if quick:
        return [4, 8 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB]
    return sorted({4 * 4**k for k in range(12)} | {8 * KiB})  # 4 B .. 16 MiB, + 8 KiB


def crossover_sizes(quick: bool) -> list[int]:
    """Extra sizes for the zmq all-reduce only (direct vs ring)."""
    if quick:
        return []
    return [1 << k for k in range(14, 23)]  # 16 KiB .. 4 MiB in powers of 2


def repeats_for(nbytes: int, ranks: int, quick: bool) -> int:
    if nbytes <= 64 * KiB:
        n = 2000
    elif nbytes <= 256 * KiB:
        n = 800
    elif nbytes <= 1 * MiB:
        n = 400
    elif nbytes <= 4 * MiB:
        n = 120
    else:
        n = 40
    if ranks > 2:
        n //= 10  # scheduling-bound on 2 cores: fewer, and they say little about a real link
    if quick:
        n //= 16
    return max(n, 6)


SECURED = ["zmq-plain", "zmq-hmac", "zmq-curve", "tcp-plain", "tcp-hmac", "tcp-curve"]  # the "curve" job's variants


def build_plan(transport: str, ranks: int, quick: bool) -> list[dict[str, Any]]:
    """The (op, size, variants) points one group of ranks runs, in order; identical on every rank."""
    plan = []
    base = sizes_for(quick)
    if transport == "curve":
        for nbytes in base:
            reps = repeats_for(nbytes, ranks, quick)
            plan.append({"op": "all_reduce", "bytes": nbytes, "variants": SECURED, "repeats": reps, "warmup": max(3, reps // 10)})
        random.Random(f"{transport}/{ranks}").shuffle(plan)
        return plan
    for op in ("all_reduce", "all_gather"):
        sizes = sorted(set(base) | (set(crossover_sizes(quick)) if transport == "zmq" and op == "all_reduce" else set()))
        for nbytes in sizes:
            if transport in ("gloo", "shm"):
                variants = [transport]
            elif op == "all_gather":
                variants = ["zmq"]
            else:
                # the ring needs a chunk per rank; below that the transport falls back to direct
                variants = ["zmq-direct", "zmq-ring"] if nbytes // 4 >= ranks else ["zmq-direct"]
            reps = repeats_for(nbytes, ranks, quick)
            plan.append({"op": op, "bytes": nbytes, "variants": variants, "repeats": reps, "warmup": max(3, reps // 10)})
    random.Random(f"{transport}/{ranks}").shuffle(plan)  # machine drift becomes noise, not a trend over size
    return plan


def floor_plan(quick: bool, sockets: list[str]) -> list[dict[str, Any]]:
    sizes = sorted(set(sizes_for(quick)) | set(crossover_sizes(quick)))
    plan = []
    for sock in sockets:
        for nbytes in sizes:
            reps = 2 * repeats_for(nbytes, 2, quick)  # cheap, and every ratio divides by it
            plan.append({"op": "pingpong", "socket": sock, "bytes": nbytes, "repeats": reps, "warmup": max(3, reps // 10)})
    random.Random("floor").shuffle(plan)
    return plan


def summarize(samples_s: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(samples_s) * 1e6
    p10, p50, p90, p99 = np.percentile(a, [10, 50, 90, 99])
    return {"p50_us": float(p50), "p10_us": float(p10), "p90_us": float(p90), "p99_us": float(p99), "min_us": float(a.min()),
            "mean_us": float(a.mean()), "n": int(a.size)}


# --------------------------------------------------------------------------------------------
# rank workers (run under tp_runtime.launch.spawn)


def _append_point(path: str, rec: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, leave=True, dynamic_ncols=True)


def pin(rank: int) -> None:
    """Rank r on core r mod cores (set before any thread starts, so gloo's and zmq's threads inherit it)."""
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})


def rank_worker(args: argparse.Namespace) -> None:
    if args.pin:
        pin(int(os.environ.get("RANK", "0")))
    import torch

    from tp_runtime.launch.env import parallel_from_env
    from tp_runtime.launch.spawn import record_failure

    torch.set_num_threads(1)
    par = parallel_from_env()
    try:
        plan = json.loads(Path(args.plan).read_text())
        if args.transport in ("gloo", "shm"):
            from tp_runtime.comm.shm import ShmCommunicator
            from tp_runtime.comm.torch_dist import TorchDistCommunicator
            from tp_runtime.config import CommConfig

            comm = TorchDistCommunicator.init(par, torch.device("cpu"), CommConfig(transport="gloo"))
            if args.transport == "shm":  # the runtime's default between ranks of one host
                comm = ShmCommunicator(comm)
            ctx = None
        elif args.transport == "curve":
            comms = secured_comms(par.rank, par.world_size, [int(p) for p in args.zmq_ports.split(",")], Path(args.keys_dir))
            comm, ctx = comms["zmq-plain"], None
        else:
            import zmq

            from tp_runtime.comm.zmq_transport import ZmqCommunicator

            ports = [int(p) for p in args.zmq_ports.split(",")]
            ctx = zmq.Context()
            inbox = ctx.socket(zmq.PULL)
            inbox.setsockopt(zmq.LINGER, 0)
            inbox.bind(f"tcp://127.0.0.1:{ports[par.rank]}")
            comm = ZmqCommunicator(ctx, par.rank, [f"tcp://127.0.0.1:{p}" for p in ports], inbox, data_path="zmq")
        if args.transport != "curve":
            comms = {v: comm for v in ("zmq-direct", "zmq-ring", "zmq", "gloo", "shm")}
        thresholds = {"zmq-direct": 1 << 62, "zmq-ring": 0, "zmq": 1 << 62, "gloo": None, "shm": None, **{v: None for v in SECURED}}
        blocks = 8  # interleave the variants of one size in this many blocks
        variant = [None]

        def run(op: str, t: torch.Tensor, n: int, out: list[float] | None) -> None:
            c = comms[variant[0]]
            fn = c.all_reduce if op == "all_reduce" else c.all_gather
            clock = time.perf_counter
            for _ in range(n):
                t0 = clock()
                fn(t, site="bench")
                if out is not None:
                    out.append(clock() - t0)

        for c in dict.fromkeys(comms.values()):  # the same order on every rank
            c.barrier(site="start")
        bar = _progress(len(plan), f"{args.transport} x{par.world_size} ranks", par.rank == 0)
        for pt in plan:
            bar.set_postfix_str(f"{pt['op']} {fmt_bytes(pt['bytes'])}")
            t = torch.zeros(pt["bytes"] // 4, dtype=torch.float32)  # zeros: sums stay finite
            samples: dict[str, list[float]] = {v: [] for v in pt["variants"]}
            for v in pt["variants"]:
                variant[0] = v
                if thresholds[v] is not None:
                    comm.ring_threshold = thresholds[v]
                run(pt["op"], t, pt["warmup"], None)
            per_block = [pt["repeats"] // blocks + (1 if b < pt["repeats"] % blocks else 0) for b in range(blocks)]
            for b in range(blocks):
                for v in (pt["variants"] if b % 2 == 0 else pt["variants"][::-1]):
                    variant[0] = v
                    if thresholds[v] is not None:
                        comm.ring_threshold = thresholds[v]
                    run(pt["op"], t, per_block[b], samples[v])
            if par.rank == 0:
                for v, s in samples.items():
                    _append_point(args.points, {"kind": "collective", "transport": v, "ranks": par.world_size, "op": pt["op"], "bytes": pt["bytes"], **summarize(s)})
            bar.update(1)
        bar.close()
        for c in dict.fromkeys(comms.values()):  # the same order on every rank
            c.barrier(site="end")
        # close() drops unsent messages (LINGER 0): give the peers time to take this rank's last barrier message
        time.sleep(0.5)
        for c in dict.fromkeys(comms.values()):
            c.close()
        if ctx is not None:
            ctx.destroy(linger=0)
    except BaseException as e:
        record_failure(par.rank, e)
        raise


def secured_comms(rank: int, world: int, ports: list[int], keys_dir: Path) -> dict[str, Any]:
    """The "curve" job's six communicators on one rank, each on its own ports (6 x world): per
    data path (zmq, tcp), plain, with the shared secret, with CURVE keys (the pairs written by the parent)."""
    import hashlib

    from tp_runtime.comm.keys import JobKeys, load_keypair
    from tp_runtime.comm.zmq_transport import ZmqCommunicator

    pairs = [load_keypair(keys_dir / f"rank{r}") for r in range(world)]
    modes = {"plain": {}, "hmac": {"secret": hashlib.sha256(b"bench").digest()}, "curve": {"keys": JobKeys(pairs[rank], tuple(p.public for p in pairs))}}
    comms = {}
    for i, name in enumerate(SECURED):
        path, mode = name.split("-")
        comms[name] = ZmqCommunicator.on_loopback(rank, ports[i * world:(i + 1) * world], job=0x5EC, data_path=path, **modes[mode])
    return comms


def floor_worker(args: argparse.Namespace) -> None:
    """Ping-pong between 2 processes: rank 0 sends n bytes, rank 1 echoes n bytes back."""
    pin(int(os.environ.get("RANK", "0")))  # 2 processes, 2 different cores (if there are 2)
    import zmq

    from tp_runtime.launch.env import parallel_from_env
    from tp_runtime.launch.spawn import record_failure

    par = parallel_from_env()
    me = par.rank
    try:
        plan = json.loads(Path(args.plan).read_text())
        tcp_port, zport0, zport1 = (int(p) for p in args.floor_ports.split(","))
        # TCP: rank 0 listens, rank 1 connects
        if me == 0:
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("127.0.0.1", tcp_port))
            srv.listen(1)
            srv.settimeout(60)
            conn, _ = srv.accept()
            srv.close()
        else:
            deadline = time.monotonic() + 60
            while True:
                try:
                    conn = socket.create_connection(("127.0.0.1", tcp_port), timeout=60)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # zmq: PULL inbox on my port, PUSH to the other's
        ctx = zmq.Context()
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVTIMEO, 60_000)  # a lost message fails the run instead of hanging it
        pull.bind(f"tcp://127.0.0.1:{(zport0, zport1)[me]}")
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 10_000)  # the last echo must leave before close() (LINGER 0 drops it)
        push.connect(f"tcp://127.0.0.1:{(zport0, zport1)[1 - me]}")

        def recv_exact(view: memoryview, n: int) -> None:
            got = 0
            while got < n:
                k = conn.recv_into(view[got:], n - got)
                if k == 0:
                    raise ConnectionError("peer closed the ping-pong socket")
                got += k

        def tcp_rt(buf: bytearray, view: memoryview, n: int) -> None:
            if me == 0:
                conn.sendall(view)
                recv_exact(view, n)
            else:
                recv_exact(view, n)
                conn.sendall(view)

        def zmq_rt(buf: bytearray, view: memoryview, n: int) -> None:
            if me == 0:
                push.send(buf, copy=n < 64 * KiB)
                pull.recv(copy=n < 64 * KiB)
            else:
                pull.recv(copy=n < 64 * KiB)
                push.send(buf, copy=n < 64 * KiB)

        bar = _progress(len(plan), "floor (2 procs ping-pong)", me == 0)
        for pt in plan:
            bar.set_postfix_str(f"{pt['socket']} {fmt_bytes(pt['bytes'])}")
            n = pt["bytes"]
            buf = bytearray(n)
            view = memoryview(buf)
            rt = tcp_rt if pt["socket"] == "tcp" else zmq_rt
            for _ in range(pt["warmup"]):
                rt(buf, view, n)
            samples = []
            clock = time.perf_counter
            for _ in range(pt["repeats"]):
                t0 = clock()
                rt(buf, view, n)
                samples.append(clock() - t0)
            if me == 0:
                _append_point(args.points, {"kind": "floor", "socket": pt["socket"], "bytes": n, **summarize(samples)})
            bar.update(1)
        bar.close()
        conn.close()
        push.close()  # lingers until the last message is out
        pull.close(0)
        ctx.term()
    except BaseException as e:
        record_failure(me, e)
        raise


# --------------------------------------------------------------------------------------------
# timing overhead of the stats wrapper (in this process)


def timing_overhead(quick: bool) -> dict[str, float]:
    import statistics

    import torch

    from tp_runtime.comm.local import LocalCommunicator
    from tp_runtime.comm.timing import CommStats, TimedCommunicator

    n = 50_000 if quick else 200_000
    rounds = 5 if quick else 9
    t = torch.zeros(2048)

    def per_call(fn) -> float:
        clock = time.perf_counter_ns
        t0 = clock()
        for _ in range(n):
            fn(t, site="layer.0.attn_out")
        return (clock() - t0) / n

    bare_ns, timed_ns = [], []
    for _ in range(rounds):  # alternate, so drift hits both alike
        bare_ns.append(per_call(LocalCommunicator().all_reduce))
        stats = CommStats()
        stats.phase = "decode"
        timed_ns.append(per_call(TimedCommunicator(LocalCommunicator(), stats).all_reduce))
    bare, timed = statistics.median(bare_ns), statistics.median(timed_ns)
    return {"bare_ns": bare, "timed_ns": timed, "overhead_us": (timed - bare) / 1e3, "calls": n, "rounds": rounds}


# --------------------------------------------------------------------------------------------
# analysis and output


def floor_socket(transport: str) -> str:
    """shm has no socket: the TCP round trip is shown as what it saves."""
    return "zmq" if transport.startswith("zmq") or transport == "curve" else "tcp"


def crossover(rows: list[dict[str, Any]], ranks: int) -> dict[str, Any]:
    """zmq all-reduce, direct vs ring at `ranks`: the first size from which ring stays faster."""
    d = {r["bytes"]: r["p50_us"] for r in rows if r["op"] == "all_reduce" and r["ranks"] == ranks and r["transport"] == "zmq-direct"}
    g = {r["bytes"]: r["p50_us"] for r in rows if r["op"] == "all_reduce" and r["ranks"] == ranks and r["transport"] == "zmq-ring"}
    both = sorted(set(d) & set(g))
    if not both:
        return {"ranks": ranks, "sizes": 0}
    ring_wins = [g[s] < d[s] for s in both]
    stays = None
    for i in range(len(both)):
        if all(ring_wins[i:]):
            stays = both[i]
            break
    first = next((s for s, w in zip(both, ring_wins) if w), None)
    return {"ranks": ranks, "sizes": len(both), "first_ring_faster": first, "ring_faster_from": stays,
            "ratio_ring_over_direct": {s: g[s] / d[s] for s in both}}


def recommend_threshold(rows: list[dict[str, Any]], ranks_list: list[int]) -> tuple[int | None, dict[int | None, float]]:
    """The threshold (a measured size, or None = never ring) with the least total log-excess over the
    faster algorithm at each measured size, summed over the rank counts."""
    import math as _m

    series = {}
    for p in ranks_list:
        d = {r["bytes"]: r["p50_us"] for r in rows if r["op"] == "all_reduce" and r["ranks"] == p and r["transport"] == "zmq-direct"}
        g = {r["bytes"]: r["p50_us"] for r in rows if r["op"] == "all_reduce" and r["ranks"] == p and r["transport"] == "zmq-ring"}
        series[p] = {s: (d[s], g[s]) for s in set(d) & set(g)}
    cands: list[int | None] = sorted({s for v in series.values() for s in v}) + [None]
    cost = {}
    for c in cands:
        total = 0.0
        for v in series.values():
            for s, (dd, gg) in v.items():
                chosen = gg if (c is not None and s >= c) else dd
                total += _m.log(chosen / min(dd, gg))
        cost[c] = total
    if not cost:
        return None, {}
    best = min(cost, key=lambda c: (cost[c], -(c or 1 << 62)))
    return best, cost


def secured_cost(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size and secured variant: p50, p99, bandwidth (bytes / p50) and both against the raw TCP round trip."""
    out = []
    for r in sorted((r for r in rows if r["transport"] in SECURED), key=lambda r: (r["bytes"], SECURED.index(r["transport"]))):
        c = {"bytes": r["bytes"], "variant": r["transport"], "p50_us": r["p50_us"], "p99_us": r["p99_us"], "gbps": r["bytes"] / r["p50_us"] / 1e3}
        if r.get("tcp_rtt_us"):
            c.update(tcp_rtt_us=r["tcp_rtt_us"], p50_over_tcp_rtt=r["p50_us"] / r["tcp_rtt_us"], p99_over_tcp_rtt=r["p99_us"] / r["tcp_rtt_us"])
        out.append(c)
    return out


def print_secured(secured: list[dict[str, Any]]) -> None:
    print("securing the worker network: all-reduce between 2 ranks on loopback (the transport's default algorithm), float32;")
    print("zmq-*: payloads on the zmq sockets, tcp-*: on the TCP data links (the default). TCP RTT = the raw TCP round trip of")
    print("that size in this run (floor ping-pong, 2 pinned processes); the goal: tcp-curve p50 <= 2 x TCP RTT")
    print(f"{'bytes':>9} {'variant':<10} | {'p50 us':>8} {'p99 us':>8} {'GB/s':>6} | {'TCP RTT':>7} {'p50/RTT':>7} {'p99/RTT':>7}")
    last = None
    for c in secured:
        if last is not None and c["bytes"] != last:
            print()
        last = c["bytes"]
        rtt = f"{c['tcp_rtt_us']:7.1f} {c['p50_over_tcp_rtt']:6.2f}x {c['p99_over_tcp_rtt']:6.2f}x" if c.get("tcp_rtt_us") else f"{'-':>7} {'-':>7} {'-':>7}"
        print(f"{fmt_bytes(c['bytes']):>9} {c['variant']:<10} | {c['p50_us']:8.1f} {c['p99_us']:8.1f} {c['gbps']:6.3f} | {rtt}")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = ["transport", "ranks", "op", "bytes", "n", "p50_us", "p10_us", "p90_us", "p99_us", "min_us", "mean_us", "floor_us", "floor_rtt_us", "ratio_to_floor",
            "tcp_rtt_us", "ratio_to_tcp_rtt"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.2f}" if isinstance(r.get(k), float) else r.get(k)) for k in cols})


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'transport':<11} {'ranks':>5} {'op':<10} {'bytes':>9} {'p50 us':>9} {'p10':>9} {'p90':>9} {'floor us':>9} {'ratio':>6} "
            f"{'TCP RTT':>8} {'p50/RTT':>7}")
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        key = (r["op"], r["transport"], r["ranks"])
        if last is not None and key != last:
            print()
        last = key
        floor = f"{r['floor_us']:9.1f}" if r.get("floor_us") else f"{'-':>9}"
        ratio = f"{r['ratio_to_floor']:6.1f}" if r.get("ratio_to_floor") else f"{'-':>6}"
        rtt = f"{r['tcp_rtt_us']:8.1f} {r['ratio_to_tcp_rtt']:7.2f}" if r.get("tcp_rtt_us") else f"{'-':>8} {'-':>7}"
        print(f"{r['transport']:<11} {r['ranks']:>5} {r['op']:<10} {fmt_bytes(r['bytes']):>9} {r['p50_us']:9.1f} {r['p10_us']:9.1f} {r['p90_us']:9.1f} {floor} {ratio} {rtt}")


COLORS = {"shm": "tab:red", "gloo": "tab:blue", "zmq-direct": "tab:orange", "zmq": "tab:orange", "zmq-ring": "tab:green",
          "zmq-plain": "tab:olive", "zmq-hmac": "tab:purple", "zmq-curve": "tab:brown", "tcp-plain": "tab:cyan", "tcp-hmac": "tab:pink",
          "tcp-curve": "tab:gray"}
FLOOR_COLORS = {"tcp": "tab:blue", "zmq": "tab:orange"}


def plot(path: Path, rows: list[dict[str, Any]], floors: dict[str, dict[int, dict[str, float]]], title: str) -> bool:
    from tp_runtime import optional

    plt = optional.pyplot(path.name)
    if plt is None:
        return False
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ops = [op for op in ("all_reduce", "all_gather") if any(r["op"] == op for r in rows)]
    fig, axes = plt.subplots(1, len(ops), figsize=(7.2 * len(ops), 6.6), sharey=True, squeeze=False)
    top = max(r["bytes"] for r in rows)
    ticks = [4 * 4**k for k in range(16) if 4 * 4**k <= top * 1.01]
    for ax, op in zip(axes[0], ops):
        keys = sorted({(r["transport"], r["ranks"]) for r in rows if r["op"] == op}, key=lambda k: (k[1], k[0]))
        for tr, p in keys:
            pts = sorted((r for r in rows if r["op"] == op and r["transport"] == tr and r["ranks"] == p), key=lambda r: r["bytes"])
            x = [r["bytes"] for r in pts]
            y = [r["p50_us"] for r in pts]
            style = dict(color=COLORS.get(tr, "tab:gray"), linestyle="-" if p == 2 else ":", marker="o" if p == 2 else "^", markersize=3.5, linewidth=1.6)
            label = f"{tr}, {p} ranks" + (" (2 cores: scheduling-bound)" if p > 2 else "")
            ax.plot(x, y, label=label, **style)
        used = {floor_socket(tr) for tr, _ in keys}
        for sock in sorted(used):
            f = floors.get(sock, {})
            xs = sorted(f)
            if xs:
                ax.plot(xs, [f[s]["p50_us"] / 2 for s in xs], color=FLOOR_COLORS[sock], linestyle="--", linewidth=1.2, alpha=0.8,
                        label=f"floor: {'TCP socket' if sock == 'tcp' else 'zmq PUSH/PULL'} one-way (RTT/2)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_bytes(int(round(v)))))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.tick_params(axis="x", labelrotation=45)
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", axis="y", alpha=0.12)
        ax.set_title(f"{op} (float32), loopback")
        ax.set_xlabel("message size per rank")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    axes[0][0].set_ylabel("latency per collective, µs (median of repeats; p10/p90 in the CSV)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def busy_cores(window_s: float = 0.5) -> float | None:
    """Cores' worth of CPU time used by everything on the machine over the next `window_s` (Linux /proc/stat);
    unlike the load average it does not remember the last minute (this benchmark's own previous run included)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals[:8]), idle

    try:
        t0, i0 = sample()
        time.sleep(window_s)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = t1 - t0
    ncpu = os.cpu_count() or 1
    return ncpu * (1 - (i1 - i0) / total) if total > 0 else None




def _read_points(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default bench/out)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (under ~60 s)")
    p.add_argument("--ranks", default="2,4", help="rank counts, comma-separated (default 2,4)")
    p.add_argument("--transports", default="shm,gloo,zmq,curve",
                   help="shm, gloo, zmq (zmq = its direct and ring all-reduce, zmq data path), curve (2 ranks: plain / HMAC / CURVE all-reduce over the zmq and TCP data paths)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--pin", action="store_true",
                   help="pin rank r to core r mod cores (default: ranks left to the scheduler, as the runtime runs them; the floor is always pinned, to 2 different cores)")
    # internal: one rank of a measurement
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--floor-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--transport", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--points", help=argparse.SUPPRESS)
    p.add_argument("--zmq-ports", help=argparse.SUPPRESS)
    p.add_argument("--floor-ports", help=argparse.SUPPRESS)
    p.add_argument("--keys-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rank_worker:
        rank_worker(args)
        return 0
    if args.floor_worker:
        floor_worker(args)
        return 0

    import torch
    import zmq

    from tp_runtime.comm.zmq_transport import DEFAULT_RING_THRESHOLD
    from tp_runtime.errors import LaunchError
    from tp_runtime.launch.spawn import free_port, spawn

    ranks_list = sorted({int(x) for x in args.ranks.split(",") if x.strip()})
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    for t in transports:
        if t not in ("shm", "gloo", "zmq", "curve"):
            raise SystemExit(f"unknown transport {t!r}: choose from shm, gloo, zmq, curve")
    if any(p < 2 for p in ranks_list):
        raise SystemExit("--ranks: every count must be at least 2")
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    from tp_runtime.cli.sweep import git_sha

    meta = {"git_sha": git_sha(), "host": socket.gethostname(), "cpu_cores": cores, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "quick": args.quick, "pinned": args.pin, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(f"collectives benchmark: {'quick' if args.quick else 'full'} run, ranks {ranks_list}, transports {transports}, "
          f"{cores} cores, torch {torch.__version__}, pyzmq {zmq.__version__}, git {meta['git_sha'] or '?'}, "
          f"{'ranks pinned to core rank mod ' + str(cores) if args.pin else 'ranks not pinned'}, floor pinned to 2 cores")
    if any(p > cores for p in ranks_list):
        print(f"note: {max(ranks_list)} ranks on {cores} cores are scheduling-bound (every small collective waits for the OS "
              f"to run a descheduled rank); that sweep is kept short and its numbers say little about a real link")

    busy0 = busy_cores()
    meta["busy_cores_at_start"] = busy0
    if busy0 is not None and busy0 > 0.3:
        print(f"warning: the machine is busy ({busy0:.1f} of {os.cpu_count()} cores in use before the start): other jobs will "
              f"inflate and scatter these numbers; rerun when it is idle")
    ov = timing_overhead(args.quick)
    print(f"timing overhead: {ov['overhead_us']:.2f} us per collective (target < 5 us)"
          f"  [TimedCommunicator {ov['timed_ns'] / 1e3:.2f} us vs bare no-op {ov['bare_ns'] / 1e3:.2f} us per call, median of {ov['rounds']} x {ov['calls']} calls]")

    failures: list[str] = []
    points: list[dict[str, Any]] = []
    program = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory(prefix="tp-collbench-") as tmp:
        tmpd = Path(tmp)
        # curve: the worker network's cost between two ranks, whatever --ranks says
        jobs: list[tuple[str, int | None]] = [("floor", None)] + [(t, p) for p in ranks_list for t in transports if t != "curve"]
        if "curve" in transports:
            from tp_runtime.comm.keys import keygen

            for r in range(2):
                keygen(tmpd / "keys" / f"rank{r}")
            jobs.append(("curve", 2))
        for i, (what, p) in enumerate(jobs, 1):
            # the raw TCP round trip always: every table divides by it (the wire's floor, whatever the socket type)
            plan = floor_plan(args.quick, sorted({floor_socket(t) for t in transports} | {"tcp"})) if what == "floor" else build_plan(what, p, args.quick)
            plan_file, pts_file = tmpd / f"plan-{i}.json", tmpd / f"points-{i}.jsonl"
            plan_file.write_text(json.dumps(plan))
            argv = ["--plan", str(plan_file), "--points", str(pts_file)] + (["--pin"] if args.pin else [])
            if what == "floor":
                argv += ["--floor-worker", "--floor-ports", ",".join(str(free_port()) for _ in range(3))]
                nprocs, label = 2, f"floor: {' and '.join(sorted({'zmq PUSH/PULL' if floor_socket(t) == 'zmq' else 'TCP' for t in transports} | {'TCP'}))} ping-pong, 2 processes"
            else:
                argv += ["--rank-worker", "--transport", what]
                if what == "zmq":
                    argv += ["--zmq-ports", ",".join(str(free_port()) for _ in range(p))]
                if what == "curve":
                    argv += ["--zmq-ports", ",".join(str(free_port()) for _ in range(len(SECURED) * p)), "--keys-dir", str(tmpd / "keys")]
                nprocs, label = p, f"{what}, {p} ranks"
            print(f"[{i}/{len(jobs)}] {label}: {len(plan)} points", flush=True)
            t0 = time.perf_counter()
            try:
                spawn(argv, nprocs, threads=1, program=program)
            except (LaunchError, OSError) as e:
                msg = str(e).splitlines()[0]
                failures.append(f"{label}: {msg}")
                print(f"  FAILED after {time.perf_counter() - t0:.1f} s: {msg} (keeping the points measured before it)", flush=True)
            got = _read_points(pts_file)
            points += got
            print(f"  {len(got)} points in {time.perf_counter() - t0:.1f} s", flush=True)

    floors: dict[str, dict[int, dict[str, float]]] = {}
    for pt in points:
        if pt["kind"] == "floor":
            floors.setdefault(pt["socket"], {})[pt["bytes"]] = pt
    rows = []
    for pt in points:
        if pt["kind"] != "collective":
            continue
        r = dict(pt)
        f = floors.get(floor_socket(r["transport"]), {}).get(r["bytes"])
        if f:
            r["floor_rtt_us"] = f["p50_us"]
            r["floor_us"] = f["p50_us"] / 2
            r["ratio_to_floor"] = r["p50_us"] / r["floor_us"]
        tcp = floors.get("tcp", {}).get(r["bytes"])
        if tcp:  # the yardstick: a collective against one raw TCP round trip of the same size
            r["tcp_rtt_us"] = tcp["p50_us"]
            r["ratio_to_tcp_rtt"] = r["p50_us"] / tcp["p50_us"]
        rows.append(r)
    order = {"gloo": 0, "zmq-direct": 1, "zmq": 1, "zmq-ring": 2, **{v: 3 + i for i, v in enumerate(SECURED)}}
    rows.sort(key=lambda r: (r["op"] != "all_reduce", r["ranks"], order.get(r["transport"], 9), r["bytes"]))

    print()
    print("latency per collective on loopback, float32, timed on rank 0 (us), median of repeats. floor = one-way time of one")
    print("message of that size between 2 processes (on different cores) over the same socket type = HALF the ping-pong")
    print("round trip (TCP for gloo, zmq PUSH/PULL for zmq); ratio = p50 / floor.")
    print_table(rows)
    print()
    for sock, name in (("tcp", "TCP socket"), ("zmq", "zmq PUSH/PULL")):
        f = floors.get(sock)
        if f:
            print(f"floor {name} round trip p50 (us): " + ", ".join(f"{fmt_bytes(s)} {f[s]['p50_us']:.0f}" for s in sorted(f)))

    xo = []
    if "zmq" in transports:
        print()
        print(f"zmq all-reduce, direct exchange vs ring (transport default ring_threshold_bytes = {fmt_bytes(DEFAULT_RING_THRESHOLD)}):")
        for p in ranks_list:
            c = crossover(rows, p)
            xo.append(c)
            if not c.get("sizes"):
                print(f"  {p} ranks: no paired points")
                continue
            ratios = "  ".join(f"{fmt_bytes(s)} {v:.2f}" for s, v in sorted(c["ratio_ring_over_direct"].items()))
            if c["ring_faster_from"]:
                verdict = f"ring faster from {fmt_bytes(c['ring_faster_from'])} on (first faster at {fmt_bytes(c['first_ring_faster'])})"
            elif c["first_ring_faster"]:
                verdict = f"ring faster at {fmt_bytes(c['first_ring_faster'])} but not at every larger size: no clean crossover"
            else:
                verdict = f"ring never faster up to {fmt_bytes(max(c['ratio_ring_over_direct']))}"
            print(f"  {p} ranks: {verdict}" + ("  [scheduling-bound]" if p > cores else ""))
            print(f"    ring p50 / direct p50: {ratios}")
        best, cost = recommend_threshold(rows, ranks_list)
        if cost:
            print(f"  recommended ring_threshold_bytes: {best} ({'never ring' if best is None else fmt_bytes(best)}); "
                  f"the measured size that minimises the summed log-excess over the faster algorithm across {ranks_list} ranks "
                  f"(current default {fmt_bytes(DEFAULT_RING_THRESHOLD)}: excess {cost.get(DEFAULT_RING_THRESHOLD, float('nan')):.2f}, "
                  f"recommended: {cost[best]:.2f})")
    secured = secured_cost(rows)
    if secured:
        print()
        print_secured(secured)
    if failures:
        print()
        print("FAILURES:")
        for f in failures:
            print(f"  {f}")

    busy1 = busy_cores()
    meta["busy_cores_at_end"] = busy1
    if busy0 is not None and busy1 is not None:
        print(f"\nother load on the machine: {busy0:.1f} cores busy before the start, {busy1:.1f} after the end"
              + ("  (busy: these numbers are inflated)" if max(busy0, busy1) > 0.3 else ""))

    csv_path, jsonl_path, png_path = args.out / "collectives.csv", args.out / "collectives.jsonl", args.out / "collectives.png"
    write_csv(csv_path, rows)
    with open(jsonl_path, "w") as f:
        f.write(json.dumps({"kind": "timing_overhead", **meta, **ov}) + "\n")
        for pt in points:
            if pt["kind"] == "floor":
                f.write(json.dumps({**meta, **pt, "one_way_us": pt["p50_us"] / 2}) + "\n")
        for r in rows:
            f.write(json.dumps({**meta, **r}) + "\n")
        for c in xo:
            f.write(json.dumps({"kind": "crossover", **meta, **{k: (v if k != "ratio_ring_over_direct" else {str(s): x for s, x in v.items()}) for k, v in c.items()}}) + "\n")
        for c in secured:
            f.write(json.dumps({"kind": "secured_cost", **meta, **c}) + "\n")
    written = [csv_path, jsonl_path]
    if not args.no_plot and rows:
        title = (f"collective latency vs size on loopback ({cores} cores, ranks {'pinned' if args.pin else 'not pinned'}; torch {torch.__version__}, "
                 f"pyzmq {zmq.__version__}, git {meta['git_sha']}{', quick run' if args.quick else ''})\n"
                 f"floor: one message one way between 2 processes on different cores = half a ping-pong round trip on the same socket type")
        if plot(png_path, rows, floors, title):
            written.append(png_path)
    print()
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - t_start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
