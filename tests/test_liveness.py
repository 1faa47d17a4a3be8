"""Liveness that covers hangs (zmq transport): heartbeats carry each rank's progress through the
collectives, so a rank whose main loop is stuck while its heartbeat thread lives is named as
hung within seconds, and a rank that is merely slower on a long stretch of work is not: its
deadline follows what that stretch took the waiting rank. Two ranks on loopback, one per thread
(the stuck one's heartbeat thread goes on, as in a stuck worker process)."""

import threading
import time

import pytest
import torch

from tp_runtime.comm.zmq_transport import Progress, ZmqCommunicator
from tp_runtime.errors import WorkerError
from tp_runtime.launch.spawn import free_port

FLOOR = 1.0  # hang_after_s in these tests: a fixed deadline of this size would kill the slow rank below


def _pair(**kw):
    ports = [free_port(), free_port()]
    out = [None, None]

    def make(r):
        out[r] = ZmqCommunicator.on_loopback(r, ports, names=["rank-0-host", "rank-1-host"], hang_after_s=FLOOR, **kw)

    threads = [threading.Thread(target=make, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _run_rank1(comm, body):
    """Rank 1's main loop in a thread; returns (thread, its result or error)."""
    box = {}

    def run():
        try:
            box["out"] = body(comm)
        except Exception as e:  # noqa: BLE001 (reported to the test)
            box["err"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, box


def test_a_stuck_main_loop_is_named_hung_within_seconds():
    c0, c1 = _pair()
    release = threading.Event()

    def rank1(c):
        c.all_reduce(torch.ones(4), site="warm")
        release.wait(60)  # stuck between two collectives; its heartbeat thread lives

    t, _ = _run_rank1(c1, rank1)
    try:
        c0.all_reduce(torch.ones(4), site="warm")
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"rank-1-host \(rank 1\) hung: its main loop has not reached collective #2") as e:
            c0.all_reduce(torch.ones(4), site="next")
        took = time.monotonic() - t0
        assert took < FLOOR + 1.5, took  # the floor (this rank's stretch took ~0) plus a heartbeat or two
        assert "heartbeat still arrives" in str(e.value)
    finally:
        release.set()
        t.join()
        c0.close()
        c1.close()


def test_a_slow_rank_on_a_long_stretch_is_not_killed():
    """Rank 0 computes a long stretch (a prefill) in 1 s, rank 1 the same stretch in 3 s: rank 0
    waits 2 s for it, twice the floor, and the rank is not named: its allowance is floor + 10x
    rank 0's own 1 s."""
    c0, c1 = _pair()

    def rank1(c):
        c.all_reduce(torch.ones(4), site="warm")
        time.sleep(3.0)
        return c.all_reduce(torch.full((4,), 2.0), site="prefill")

    t, box = _run_rank1(c1, rank1)
    try:
        c0.all_reduce(torch.ones(4), site="warm")
        time.sleep(1.0)
        got = c0.all_reduce(torch.full((4,), 1.0), site="prefill")
        t.join()
        assert "err" not in box, box
        assert got.tolist() == [3.0] * 4 and box["out"].tolist() == [3.0] * 4
    finally:
        t.join()
        c0.close()
        c1.close()


def test_the_rule_reads_reports_not_clocks():
    """Progress alone: a peer inside a collective, loading (before its first), silent, or within
    its allowance is not hung; one past it is."""
    p = Progress(floor_s=1.0, slack=10.0)
    p.enter(); p.leave()  # collective 1
    p.compute_s[2] = 0.5  # this rank computed 0.5 s before entering #2
    now = time.monotonic()
    seen = {1: now, 2: now, 3: now, 4: now - 10}
    p.heard(1, 1, False, 5.9)  # computing toward #2 for 5.9 s: allowance 1 + 10 * 0.5 = 6 s
    p.heard(2, 1, True, 0.0)  # waiting inside #1 for someone else
    p.heard(3, 0, False, 100.0)  # still loading
    p.heard(4, 1, False, 100.0)  # silent for 10 s: the death check's
    assert p.hung(2, seen, fresh_s=1.5) is None
    p.heard(1, 1, False, 6.5)
    rank, busy, own, allowed = p.hung(2, seen, fresh_s=1.5)
    assert (rank, own, allowed) == (1, 0.5, 6.0) and busy >= 6.5
    p.heard(1, 2, True, 0.0)  # its data for #2 arrived: no longer behind
    assert p.hung(2, seen, fresh_s=1.5) is None
