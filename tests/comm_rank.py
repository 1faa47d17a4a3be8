"""One rank of the transport tests (test_collectives.py), started by launch.spawn.

argv: TRANSPORT SCENARIO OUT_DIR ZMQ_PORTS   (writes OUT_DIR/rank<r>.json: what it saw)
TRANSPORT: gloo, shm, zmq (the pyzmq transport, payloads over its zmq sockets) or tcp (the same
transport, payloads over its TCP data links)

Every rank builds its inputs from its rank and the scenario, so each one knows what it must
receive; the parent compares.
"""

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from tp_runtime.comm.shm import ShmCommunicator
from tp_runtime.comm.torch_dist import TorchDistCommunicator
from tp_runtime.comm.zmq_transport import ZmqCommunicator
from tp_runtime.config import CommConfig
from tp_runtime.launch.env import parallel_from_env


ZMQ = {"zmq": "zmq", "tcp": "tcp"}  # the pyzmq transport's names here -> its data path


def rows_for(src: int, dst: int, world: int) -> int:
    """Rows rank `src` sends rank `dst`: uneven, and zero for some pairs."""
    return (src * 3 + dst * 2 + 1) % (world + 2)


def payload(src: int, dst: int, world: int, width: int) -> torch.Tensor:
    n = rows_for(src, dst, world)
    base = torch.arange(n * width, dtype=torch.float32).view(n, width)
    return base + 1000 * src + 100 * dst


def make(transport: str, parallel, ports: list[int], out: Path | None = None, **kw):
    if transport in ZMQ:
        if out is not None:  # every rank up before the heartbeats' clocks start (ranks start seconds apart)
            (out / f"up{parallel.rank}").touch()
            while not all((out / f"up{r}").exists() for r in range(parallel.world_size)):
                time.sleep(0.01)
        return ZmqCommunicator.on_loopback(parallel.rank, ports, data_path=ZMQ[transport], **kw)
    group = TorchDistCommunicator.init(parallel, torch.device("cpu"), CommConfig(transport="gloo"))
    return ShmCommunicator(group, **kw) if transport == "shm" else group


def all_to_all(comm, world: int, rank: int, width: int) -> dict:
    send = [rows_for(rank, d, world) for d in range(world)]
    recv = [rows_for(s, rank, world) for s in range(world)]
    t = torch.cat([payload(rank, d, world, width) for d in range(world)])
    got = comm.all_to_all(t, send, recv, site="test")
    want = torch.cat([payload(s, rank, world, width) for s in range(world)])
    return {"ok": bool(torch.equal(got, want)), "shape": list(got.shape), "send": send, "recv": recv}


class CountingFallback:
    """The shm transport's gloo group, counting the broadcasts handed to it."""

    def __init__(self, inner) -> None:
        self.inner, self.broadcasts = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def broadcast(self, obj, src=0, *, site):
        self.broadcasts += 1
        return self.inner.broadcast(obj, src, site=site)


BROADCAST_CASES = [  # (dtype, shape); 300_000 float32 (1.2 MB) exceeds the default 1 MiB slot
    (torch.float32, (5,)), (torch.bfloat16, (3, 7)), (torch.int64, ()), (torch.uint8, (138,)),
    (torch.bool, (2, 3, 4)), (torch.float16, (0,)), (torch.float64, (4, 0, 2)), (torch.int32, (64, 16)),
    (torch.float32, (300_000,)),
]


def broadcast_value(src: int, case: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    n = math.prod(shape)
    v = torch.arange(n, dtype=torch.float64) * (src + 2) + 10 * case + src
    return (v.remainder(2) if dtype == torch.bool else v.remainder(251 if dtype == torch.uint8 else 1 << 20)).to(dtype).view(shape)


def broadcasts(comm, shm, small, world: int, rank: int) -> dict:
    """Tensor broadcasts over shm (slots, or gloo when too large) against gloo's and the values
    every rank can compute; interleaved with all-reduces; step messages (plan_wire) both ways."""
    from tp_runtime.engine.sampling import SamplingParams
    from tp_runtime.engine.scheduler import Admission, StepChanges
    from tp_runtime.serve import plan_wire

    failures: list[str] = []
    cases = 0

    def check(what: str, ok: bool) -> None:
        nonlocal cases
        cases += 1
        if not ok:
            failures.append(what)

    for src in range(world):
        for i, (dtype, shape) in enumerate(BROADCAST_CASES):
            want = broadcast_value(src, i, dtype, shape)
            mine = want.clone() if rank == src else torch.full(shape, 7, dtype=dtype)  # a receiver's own bytes must go
            via_gloo = want.clone() if rank == src else torch.zeros(shape, dtype=dtype)
            got = shm.broadcast(mine, src, site="test")
            comm.broadcast(via_gloo, src, site="test")
            check(f"src {src} {dtype} {shape}", got is mine and got.dtype == dtype and got.shape == shape and torch.equal(got, want) and torch.equal(got, via_gloo))
            if i % 3 == 2:  # an all-reduce between some of them: the slots' double buffer stays in step
                check(f"all_reduce after case {i} from {src}", torch.equal(shm.all_reduce(torch.full((3,), float(rank + 1)), site="test"), torch.full((3,), world * (world + 1) / 2)))
        # a non-contiguous tensor on every rank (gloo refuses those): filled in place
        want = broadcast_value(src, 99, torch.float32, (4, 3)).t()
        mine = want.clone().t().contiguous().t() if rank == src else torch.full((4, 3), -1.0).t()
        check(f"src {src} non-contiguous", shm.broadcast(mine, src, site="test") is mine and torch.equal(mine, want))
        check(f"src {src} object", shm.broadcast({"from": src} if rank == src else None, src, site="test") == {"from": src})
    # back to back from every source in turn, an all-reduce now and then, then exactly a slot
    # (the slots' path) and a byte more (gloo) on 4 KiB slots
    for i in range(200):
        src = i % world
        t = torch.tensor([i, src, 3 * i], dtype=torch.int64) if rank == src else torch.zeros(3, dtype=torch.int64)
        check(f"round {i}", shm.broadcast(t, src, site="test").tolist() == [i, src, 3 * i])
        if i % 7 == 0:
            check(f"round {i} all_reduce", shm.all_reduce(torch.ones(2), site="test").tolist() == [world, world])
    for n in (4096, 4097):
        want = torch.arange(n).remainder(256).to(torch.uint8)
        t = want.clone() if rank == world - 1 else torch.zeros(n, dtype=torch.uint8)
        check(f"{n} bytes on 4 KiB slots", torch.equal(small.broadcast(t, world - 1, site="test"), want))
    # step messages: a decode step (~140 bytes: the slots) and one admitting a long prompt (gloo)
    params = SamplingParams(max_new_tokens=9, temperature=0.5, top_k=4, stop_token_ids=(2, 3))
    messages = [(plan_wire.STEP, StepChanges([], [], [], list(range(17, 37))), 1234),
                (plan_wire.STEP, StepChanges([Admission(5, 1, 0, list(range(1000, 3000)), params, 77)], [4], [(5, 0)], [1, 2]), 99),
                (plan_wire.IDLE, None, None), (plan_wire.STEP, StepChanges([], [3], [], [1]), 5), (plan_wire.STOP, None, None)]
    sizes = []
    for op, changes, digest in messages:
        if rank == 0:
            sizes.append(plan_wire.send(small, op, changes, digest))
        else:
            got = plan_wire.receive(small)
            check(f"plan {op} {digest}", got == (op, changes, digest))
    return {"cases": cases, "failures": failures, "fallback": shm.fallback.broadcasts, "small_fallback": small.fallback.broadcasts, "plan_bytes": sizes}


def main() -> None:
    transport, scenario, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    ports = [int(p) for p in sys.argv[4].split(",")]
    parallel = parallel_from_env()
    rank, world = parallel.rank, parallel.world_size
    result: dict = {}
    try:
        if scenario == "all_to_all":
            # slots big enough for every rank (shm), then small enough that only some ranks' rows
            # fit: every rank must still take the same path (the gloo fallback)
            comm = make(transport, parallel, ports)
            result["wide"] = all_to_all(comm, world, rank, 4)
            result["equal"] = bool(torch.equal(comm.all_to_all(torch.full((world * 2, 3), float(rank)), site="test"),
                                               torch.arange(world).repeat_interleave(2).float()[:, None].expand(-1, 3)))
            if transport == "shm":  # a second segment over the same gloo group, with small slots
                small = ShmCommunicator(comm.fallback, slot_bytes=4096)
                result["mixed"] = all_to_all(small, world, rank, 60)  # 240 B rows: some ranks exceed 4 KiB
            comm.close()
        elif scenario in ("dead_peer", "slow_peer"):
            signal.alarm(30)  # a peer never named must fail the test, not hang it
            kw = {"timeout_s": float(os.environ.get("TEST_TIMEOUT_S", "120"))} if transport == "shm" else {"heartbeat_s": 0.01}
            comm = make(transport, parallel, ports, out, **kw)
            comm.all_reduce(torch.ones(4), site="warm-up")
            if transport in ZMQ:
                comm.dead_after_s = 1.0
            if rank == world - 1:
                if scenario == "dead_peer":
                    time.sleep(0.5)  # its warm-up frames leave first (LINGER 0 drops queued ones at exit)
                    os._exit(0)  # gone without a word, as a killed process is
                time.sleep(float(os.environ.get("TEST_SLEEP_S", "3")))
            t0 = time.monotonic()
            try:
                comm.all_reduce(torch.ones(4), site="after")
                result["outcome"] = "done"
            except Exception as e:
                result["outcome"] = f"{type(e).__name__}: {e}"
            result["seconds"] = time.monotonic() - t0
            if rank != world - 1 or scenario == "slow_peer":
                if result["outcome"] != "done":
                    (out / f"rank{rank}.json").write_text(json.dumps(result))
                    os._exit(0)  # the peer is gone or stuck: no orderly close
            comm.close()
        elif scenario == "a2a_mismatch":
            # rank 0 sends 2 rows each way and expects 2 back; rank 1 sends 1 to rank 0 and 3 to
            # itself and expects as it sends: both disagree with the other's splits
            signal.alarm(20)  # a mismatch must be named, never hang
            comm = make(transport, parallel, ports, out)
            send = [2, 2] if rank == 0 else [1, 3]
            t0 = time.monotonic()
            try:
                comm.all_to_all(torch.ones(4, 3), send, send, site="test")
                result["outcome"] = "done"
            except Exception as e:
                result["outcome"] = f"{type(e).__name__}: {e}"
            result["seconds"] = time.monotonic() - t0
            (out / f"rank{rank}.json").write_text(json.dumps(result))
            time.sleep(1.0)  # the peer reads this rank's frames before they go (LINGER 0 drops queued ones at exit)
            os._exit(0)  # the peers disagree: no orderly close
        elif scenario == "broadcast":
            comm = make("gloo", parallel, ports)
            shm, small = ShmCommunicator(comm), ShmCommunicator(comm, slot_bytes=4096)
            shm.fallback, small.fallback = CountingFallback(comm), CountingFallback(comm)
            result.update(broadcasts(comm, shm, small, world, rank))
            shm.close()
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
