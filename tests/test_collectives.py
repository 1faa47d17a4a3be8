"""The transports' collectives between real processes: all_to_all with uneven and zero split sizes
on gloo, shared memory and pyzmq (and the shm fallback decided alike on every rank), shm's tensor
broadcast through its slots (equal to gloo's; gloo past a slot), and a dead or late peer named
within seconds by shm (at the configured timeout), zmq (even while other peers keep its inbox
busy) and the zmq transport's TCP data path (at once, by its closed link). "zmq" is the pyzmq
transport with its payloads on the zmq sockets, "tcp" the same with its TCP data links."""

import json
import os
import sys
import time

import pytest
import torch

from conftest import TESTS
from tp_runtime.comm.local import LocalCommunicator
from tp_runtime.communicator import check_splits
from tp_runtime.launch.spawn import free_port, spawn
from tp_runtime.errors import LaunchError


def run_ranks(tmp_path, transport, scenario, world, env=None):
    ports = ",".join(str(free_port()) for _ in range(world))
    t0 = time.monotonic()
    spawn([transport, scenario, str(tmp_path), ports], world, threads=1, extra_env=env, program=[sys.executable, str(TESTS / "comm_rank.py")])
    files = [tmp_path / f"rank{r}.json" for r in range(world)]  # a rank that died wrote none
    return [json.loads(f.read_text()) if f.is_file() else None for f in files], time.monotonic() - t0


@pytest.mark.parametrize("transport", ["gloo", "shm", "zmq", "tcp"])
@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_with_uneven_and_zero_splits(tmp_path, transport, world):
    results, _ = run_ranks(tmp_path, transport, "all_to_all", world)
    assert any(0 in res["wide"]["send"] for res in results)  # some pair sends nothing
    assert len({sum(res["wide"]["send"]) for res in results}) > 1  # ranks send different amounts
    for r, res in enumerate(results):
        assert res["wide"]["ok"], (r, res)
        assert res["equal"], (r, res)
        if transport == "shm":
            assert res["mixed"]["ok"], (r, res)


@pytest.mark.parametrize("transport", ["shm", "zmq", "tcp", "gloo"])
def test_all_to_all_split_sizes_that_disagree_fail_within_seconds(tmp_path, transport):
    """Ranks whose split sizes disagree (a bug in a caller: the MoE dispatch derives its receive
    sizes from the counts exchange) get an error naming the peer, never a hang. gloo checks only
    that it does not receive more than expected: that rank aborts with gloo's message and the
    launcher names it; the shared-memory and pyzmq transports name the disagreement on both."""
    t0 = time.monotonic()
    if transport == "gloo":
        with pytest.raises(LaunchError, match="rank 1 failed"):
            run_ranks(tmp_path, transport, "a2a_mismatch", 2)
    else:
        results, _ = run_ranks(tmp_path, transport, "a2a_mismatch", 2)
        for r, res in enumerate(results):
            assert res["outcome"].startswith("WorkerError") and "expected" in res["outcome"], (r, res)
            assert res["seconds"] < 5, (r, res)
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("world", [2, 3])
def test_shm_broadcast_through_the_slots_equals_gloo(tmp_path, world):
    """Tensors of several dtypes and shapes (empty, 0-d, non-contiguous) from every source, each
    also broadcast over gloo; back to back and between all-reduces (the double buffer); larger
    than a slot and objects through the gloo group; plan_wire's step messages both ways."""
    results, _ = run_ranks(tmp_path, "shm", "broadcast", world)
    for r, res in enumerate(results):
        assert res is not None and not res["failures"], (r, res)
        assert res["cases"] > 250, (r, res)
        assert res["fallback"] == 2 * world, (r, res)  # per source: the 1.2 MB tensor and the object, nothing else
        assert res["small_fallback"] == 2, (r, res)  # 4097 bytes and the long step message (the payload, not its length)
    assert results[0]["plan_bytes"][0] < 4096 < results[0]["plan_bytes"][1], results[0]


def test_split_sizes_are_checked_before_anything_moves():
    t = torch.zeros(5, 2)
    assert check_splits(t, 2, [2, 3], [1, 0]) == ([2, 3], [1, 0])
    with pytest.raises(ValueError, match="sum to 4, but the tensor has 5 rows"):
        check_splits(t, 2, [1, 3], [0, 0])
    with pytest.raises(ValueError, match="3 send and 2 receive splits for a world of 2"):
        check_splits(t, 2, [1, 1, 3], [0, 0])
    with pytest.raises(ValueError, match="negative"):
        check_splits(t, 2, [6, -1], [0, 0])
    with pytest.raises(ValueError, match="divisible by the world size"):
        check_splits(torch.zeros(1, 2), 2, None, None)  # was an IndexError: fewer rows than ranks
    with pytest.raises(ValueError, match="both"):
        check_splits(t, 2, [2, 3], None)
    assert LocalCommunicator().all_to_all(t, [5], [5], site="x") is t


def test_shm_names_a_dead_peer_at_once_not_after_the_timeout(tmp_path):
    results, took = run_ranks(tmp_path, "shm", "dead_peer", 2, env={"TEST_TIMEOUT_S": "120"})
    assert "local rank 1" in results[0]["outcome"] and "died" in results[0]["outcome"], results[0]
    assert results[0]["seconds"] < 3, results[0]  # it used to wait 30 s before looking


def test_shm_waits_for_a_live_peer_as_configured(tmp_path):
    # a live peer 3 s late: within a 10 s timeout the collective completes ...
    results, _ = run_ranks(tmp_path, "shm", "slow_peer", 2, env={"TEST_TIMEOUT_S": "10", "TEST_SLEEP_S": "3"})
    assert results[0]["outcome"] == "done" and 2.5 < results[0]["seconds"] < 8, results[0]
    # ... and past a 1.5 s timeout it is named as hung (the old code ignored the setting: 30 s)
    results, _ = run_ranks(tmp_path, "shm", "slow_peer", 2, env={"TEST_TIMEOUT_S": "1.5", "TEST_SLEEP_S": "4"})
    assert "local rank 1" in results[0]["outcome"] and "made no progress" in results[0]["outcome"], results[0]
    assert "timeout is 1.5 s" in results[0]["outcome"] and results[0]["seconds"] < 3.5, results[0]


def test_zmq_names_a_dead_peer_while_live_peers_keep_the_inbox_busy(tmp_path):
    """Three ranks heartbeating every 10 ms: the inbox is never quiet for 100 ms, where the dead
    peer check used to live; the dead rank 2 must still be named within ~dead_after_s (1 s)."""
    results, took = run_ranks(tmp_path, "zmq", "dead_peer", 3)
    for r in (0, 1):
        assert "(rank 2) stopped responding" in results[r]["outcome"], results[r]
        assert results[r]["seconds"] < 4, results[r]


def test_tcp_names_a_dead_peer_by_its_closed_link_at_once(tmp_path):
    """The same death on the TCP data path: the kernel ends the dead rank's connections, and the
    ranks reading them name it at once, without waiting for its heartbeats to go silent."""
    results, took = run_ranks(tmp_path, "tcp", "dead_peer", 3)
    for r in (0, 1):
        assert "(rank 2)" in results[r]["outcome"] and "data link" in results[r]["outcome"], results[r]
        assert results[r]["seconds"] < 1, results[r]
