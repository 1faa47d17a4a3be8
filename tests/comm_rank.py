"""One rank of the transport tests (test_collectives.py), started by launch.spawn.

argv: TRANSPORT SCENARIO OUT_DIR ZMQ_PORTS   (writes OUT_DIR/rank<r>.json: what it saw)

Every rank builds its inputs from its rank and the scenario, so each one knows what it must
receive; the parent compares.
"""

import json
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


def rows_for(src: int, dst: int, world: int) -> int:
    """Rows rank `src` sends rank `dst`: uneven, and zero for some pairs."""
    return (src * 3 + dst * 2 + 1) % (world + 2)


def payload(src: int, dst: int, world: int, width: int) -> torch.Tensor:
    n = rows_for(src, dst, world)
    base = torch.arange(n * width, dtype=torch.float32).view(n, width)
    return base + 1000 * src + 100 * dst


def make(transport: str, parallel, ports: list[int], out: Path | None = None, **kw):
    if transport == "zmq":
        if out is not None:  # every rank up before the heartbeats' clocks start (ranks start seconds apart)
            (out / f"up{parallel.rank}").touch()
            while not all((out / f"up{r}").exists() for r in range(parallel.world_size)):
                time.sleep(0.01)
        return ZmqCommunicator.on_loopback(parallel.rank, ports, **kw)
    group = TorchDistCommunicator.init(parallel, torch.device("cpu"), CommConfig(transport="gloo"))
    return ShmCommunicator(group, **kw) if transport == "shm" else group


def all_to_all(comm, world: int, rank: int, width: int) -> dict:
    send = [rows_for(rank, d, world) for d in range(world)]
    recv = [rows_for(s, rank, world) for s in range(world)]
    t = torch.cat([payload(rank, d, world, width) for d in range(world)])
    got = comm.all_to_all(t, send, recv, site="test")
    want = torch.cat([payload(s, rank, world, width) for s in range(world)])
    return {"ok": bool(torch.equal(got, want)), "shape": list(got.shape), "send": send, "recv": recv}


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
            if transport == "zmq":
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
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
