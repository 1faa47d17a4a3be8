"""The pyzmq transport's TCP data path (tp_runtime/comm/tcp_data.py) against its zmq path and
against an attacker on the link.

Collectives: the same calls, small and multi-MiB (the direct exchange of 8 MiB, where a
blocking send would deadlock both ranks, the ring, uneven all-to-alls), give the zmq path's
results bit for bit, in the three modes (plain, shared secret, CURVE keys). Frames: captured off
a link and fed back tampered, replayed, reordered or into another job's link, each stops the
job with an error naming the peer. Set-up: strangers at the listener do not join, the listener
is gone once the mesh stands; a peer killed mid-collective is named within seconds."""

import errno
import logging
import os
import signal
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import zmq

from conftest import REPO, last_json
from tp_runtime.comm.keys import JobKeys, keygen
from tp_runtime.comm.protocol import Kind
from tp_runtime.comm.tcp_data import HEADER, TAG, DataLinks, hello_frame, pair_seal
from tp_runtime.comm.zmq_transport import ZmqCommunicator
from tp_runtime.errors import WorkerError
from tp_runtime.launch.spawn import free_port

SECRET = bytes(range(32))
MODES = ["plain", "secret", "curve"]
MiB = 1 << 20


def _mode_kw(mode, tmp_path, world):
    """Per rank, the constructor's security arguments for `mode`."""
    if mode == "plain":
        return [{} for _ in range(world)]
    if mode == "secret":
        return [{"secret": SECRET} for _ in range(world)]
    pairs = [keygen(tmp_path / f"{mode}-{world}-r{r}") for r in range(world)]
    return [{"keys": JobKeys(p, tuple(q.public for q in pairs))} for p in pairs]


def _ranks(world, per_rank, body, **kw):
    """body(comm) on `world` loopback ranks, one thread each; every rank's result, in rank order.
    Once more on other ports if a rank's port was taken meanwhile (free_port's race: a data
    listener of this very job may take it, binding port 0)."""
    for _ in range(3):
        out = _ranks_on([free_port() for _ in range(world)], per_rank, body, **kw)
        if not any(isinstance(o, zmq.ZMQError) and o.errno == errno.EADDRINUSE for o in out):
            return out
    return out


def _ranks_on(ports, per_rank, body, **kw):
    world = len(ports)
    comms, out = [None] * world, [None] * world

    def run(r):
        try:
            comms[r] = ZmqCommunicator.on_loopback(r, ports, names=[f"host-{q}" for q in range(world)], job=0x7CD, **per_rank[r], **kw)
            out[r] = body(comms[r])
        except Exception as e:  # noqa: BLE001 (the test looks at it)
            out[r] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for c in comms:
        if c is not None:
            c.close()
    return out


def _rows(src, dst):
    return (3 * src + 2 * dst + 1) % 4  # uneven, some zero


def _collectives(comm):
    """Every collective, small and multi-MiB; returns what each gave this rank."""
    r, p = comm.rank, comm.world_size
    gen = torch.Generator().manual_seed(r)
    got = {}
    got["small"] = comm.all_reduce(torch.randn(2048, generator=gen), site="t").clone()
    got["bf16"] = comm.all_reduce(torch.randn(3, 5, generator=gen).to(torch.bfloat16), site="t").clone()
    got["ring"] = comm.all_reduce(torch.randn(2 * MiB, generator=gen), site="t").clone()  # 8 MiB: the ring
    comm.ring_threshold = 1 << 62
    got["direct"] = comm.all_reduce(torch.randn(2 * MiB, generator=gen), site="t").clone()  # 8 MiB each way at once
    comm.ring_threshold = 1 << 20
    got["gather"] = comm.all_gather(torch.randn(4, 3, generator=gen), dim=0, site="t")
    got["big_gather"] = comm.all_gather(torch.randn(MiB, generator=gen), site="t")
    got["i64"] = comm.all_gather(torch.arange(70_000, dtype=torch.int64) * (r + 1), site="t")  # 560 KB: a frame's own buffer backs it
    send = [_rows(r, d) * 64 * 1024 for d in range(p)]
    recv = [_rows(s, r) * 64 * 1024 for s in range(p)]
    got["a2a"] = comm.all_to_all(torch.randn(sum(send), 4, generator=gen), send, recv, site="t")
    got["bcast"] = comm.broadcast(torch.randn(MiB // 2, generator=gen) if r == p - 1 else torch.zeros(MiB // 2), p - 1, site="t").clone()
    got["object"] = comm.broadcast({"from": r, "text": "é" * 3} if r == 0 else None, 0, site="t")
    got["empty"] = comm.all_reduce(torch.zeros(0), site="t")
    comm.barrier(site="t")
    return got


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [2, 3])
def test_collectives_equal_the_zmq_path(tmp_path, mode, world):
    per_rank = _mode_kw(mode, tmp_path, world)
    tcp = _ranks(world, per_rank, _collectives, data_path="tcp")
    zmq_ = _ranks(world, per_rank, _collectives, data_path="zmq")
    for r in range(world):
        assert not isinstance(tcp[r], Exception), tcp[r]
        assert not isinstance(zmq_[r], Exception), zmq_[r]
        assert tcp[r].keys() == zmq_[r].keys()
        for name, value in tcp[r].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == zmq_[r][name].dtype and torch.equal(value, zmq_[r][name]), (r, name)
                assert torch.equal(value, tcp[0][name]) or name in ("a2a",), (r, name)  # the same bits on every rank
            else:
                assert value == zmq_[r][name] == {"from": 0, "text": "ééé"}, (r, name)
    want = sum(torch.randn(2048, generator=torch.Generator().manual_seed(r)) for r in range(world))
    assert torch.allclose(tcp[0]["small"], want, atol=1e-5)


# -- frames on a link: captured, then fed back altered --


def _pair_links(mode, job=0xAB):
    """Rank 0's and rank 1's DataLinks over a socketpair, sealed as `mode` seals."""
    seal = pair_seal(job, 0, 1, keyed=mode == "curve", secret=SECRET if mode != "plain" else None, drawn=b"k" * 32 if mode == "curve" else None)
    a, b = socket.socketpair()
    names = ["host-0", "host-1"]
    return DataLinks(0, job, {1: a}, {1: seal}, names), DataLinks(1, job, {0: b}, {0: seal}, names), b


def _capture(sender, sock, tensors):
    """The bytes of rank 0's frames of `tensors` (collective 1, 2, ...) as they reach rank 1's socket."""
    for i, t in enumerate(tensors, 1):
        sender.send(1, Kind.TENSOR, i, 0, tensor=t)
    time.sleep(0.05)
    data = b""
    while True:
        try:
            data += sock.recv(1 << 20)
        except BlockingIOError:
            return data


def _receiver(mode, job=0xAB):
    """Rank 1's links to a socket the test writes into as rank 0."""
    seal = pair_seal(job, 0, 1, keyed=mode == "curve", secret=SECRET if mode != "plain" else None, drawn=b"k" * 32 if mode == "curve" else None)
    ours, theirs = socket.socketpair()
    return DataLinks(1, job, {0: theirs}, {0: seal}, ["host-0", "host-1"]), ours


def _take(links, src=0, wait_s=1.0):
    got = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        links.wait(src, 0.05, lambda h, v: got.append((h.seq, v)))
    return got


def _frames(mode, n=3, numel=64):
    sender, _, sock = _pair_links(mode)
    tensors = [torch.full((numel,), float(i)) for i in range(1, n + 1)]
    data = _capture(sender, sock, tensors)
    size = HEADER.size + numel * 4 + (TAG if mode != "plain" else 0)
    assert len(data) == n * size
    return [data[i * size:(i + 1) * size] for i in range(n)], tensors


@pytest.mark.parametrize("mode", MODES)
def test_captured_frames_fed_back_in_order_are_taken(mode):
    frames, tensors = _frames(mode)
    links, ours = _receiver(mode)
    ours.sendall(b"".join(frames))
    got = _take(links, wait_s=0.3)
    assert [s for s, _ in got] == [1, 2, 3] and all(torch.equal(v, t) for (_, v), t in zip(got, tensors))


def _altered(frames, how):
    if how == "tampered":
        f = bytearray(frames[1])
        f[HEADER.size + 5] ^= 1  # a payload byte
        return frames[0] + bytes(f)
    if how == "replayed":
        return frames[0] + frames[1] + frames[1]
    if how == "reordered":
        return frames[0] + frames[2] + frames[1]
    if how == "dropped":
        return frames[0] + frames[2]
    raise ValueError(how)


# a plain job's frames carry no MAC: a changed payload byte is not seen there (as on the zmq path)
ALTERED = [(mode, how) for mode in MODES for how in ("tampered", "replayed", "reordered", "dropped") if (mode, how) != ("plain", "tampered")]


@pytest.mark.parametrize(("mode", "how"), ALTERED)
def test_an_altered_stream_stops_the_job_naming_the_peer(mode, how, caplog):
    caplog.set_level(logging.ERROR, logger="tp_runtime.tcp_data")
    frames, _ = _frames(mode)
    links, ours = _receiver(mode)
    ours.sendall(_altered(frames, how))
    with pytest.raises(WorkerError, match=r"the data link from host-0 \(rank 0\) to rank 1 is compromised") as e:
        _take(links)
    reason = "does not open" if how == "tampered" else "repeated, reordered or dropped"
    assert reason in str(e.value) and "compromised" in caplog.text


@pytest.mark.parametrize("mode", MODES)
def test_a_frame_of_another_job_stops_the_job(mode):
    frames, _ = _frames(mode)  # job 0xAB
    links, ours = _receiver(mode, job=0xAC)
    ours.sendall(frames[0])
    with pytest.raises(WorkerError, match=r"host-0 \(rank 0\).*compromised: (a frame of job 0xab, expected job 0xac|frame #1 does not open)"):
        _take(links)


def test_curve_frames_hide_the_tensor_and_secret_frames_authenticate_it():
    marker = torch.full((64,), 1234.5678)
    for mode, hidden in (("curve", True), ("secret", False), ("plain", False)):
        sender, _, sock = _pair_links(mode)
        data = _capture(sender, sock, [marker])
        assert (marker.numpy().tobytes()[:16] not in data) == hidden, mode
        assert data.startswith(b"TPDL")  # headers are authenticated in the sealed modes, never hidden
        assert len(data) == HEADER.size + 256 + (TAG if mode != "plain" else 0)


def test_a_closed_or_reset_link_is_named_at_once():
    links, ours = _receiver("curve")
    ours.close()
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"host-0 \(rank 0\) stopped responding: it closed its data link"):
        _take(links)
    assert time.monotonic() - t0 < 0.5


# -- set-up: strangers, the listener's lifetime --


@pytest.mark.parametrize("mode", ["secret", "curve"])
def test_strangers_at_the_listener_do_not_join_and_the_listener_closes(tmp_path, mode, caplog):
    """Before rank 1 connects: a client that sends garbage, one that sends nothing, one whose
    HELLO claims rank 1 but is sealed with another key. None joins; the real rank 1 does, the
    all-reduce is right, and afterwards nothing listens on the port."""
    caplog.set_level(logging.WARNING, logger="tp_runtime.tcp_data")
    per_rank = _mode_kw(mode, tmp_path, 2)
    ports = [free_port(), free_port()]
    c0 = ZmqCommunicator.on_loopback(0, ports, job=0x51, names=["host-0", "host-1"], **per_rank[0])
    port = c0.listener.port
    strangers = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    strangers[0].sendall(os.urandom(HEADER.size + TAG))
    forged = pair_seal(0x51, 0, 1, keyed=mode == "curve", secret=b"x" * 32, drawn=b"y" * 32 if mode == "curve" else None)
    strangers[2].sendall(hello_frame(forged, 0x51, 1, 0))
    out = {}
    t = threading.Thread(target=lambda: out.setdefault(0, c0.all_reduce(torch.ones(8), site="t")))
    t.start()
    time.sleep(0.5)  # rank 0 sees the strangers first
    c1 = ZmqCommunicator.on_loopback(1, ports, job=0x51, names=["host-0", "host-1"], **per_rank[1])
    try:
        assert c1.all_reduce(torch.full((8,), 2.0), site="t").tolist() == [3.0] * 8
        t.join(10)
        assert out[0].tolist() == [3.0] * 8
        for s in (strangers[0], strangers[2]):
            s.settimeout(2)
            assert s.recv(100) == b""  # dropped, no answer
        assert caplog.text.count("dropped a connection to its data listener") >= 2
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1)
        assert c0.links is not None and set(c0.links.links) == {1}
    finally:
        for s in strangers:
            s.close()
        c0.close()
        c1.close()


_RANK1 = """
import sys, time, torch
from tp_runtime.comm.zmq_transport import ZmqCommunicator
comm = ZmqCommunicator.on_loopback(1, [int(p) for p in sys.argv[1].split(",")], job=0x99)
comm.all_reduce(torch.ones(4), site="warm")
print("ready", flush=True)
comm.all_reduce(torch.ones(8 << 20), site="big")  # 32 MiB: killed while it moves
time.sleep(60)
"""


def test_a_peer_killed_mid_collective_is_named_within_seconds():
    ports = [free_port(), free_port()]
    proc = subprocess.Popen([sys.executable, "-c", _RANK1, ",".join(map(str, ports))], cwd=REPO, stdout=subprocess.PIPE, text=True)
    c0 = ZmqCommunicator.on_loopback(0, ports, job=0x99, names=["coordinator", "worker 10.0.0.2:7340"])
    try:
        c0.all_reduce(torch.ones(4), site="warm")
        assert proc.stdout.readline().strip() == "ready"
        threading.Timer(0.3, lambda: proc.send_signal(signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"worker 10.0.0.2:7340 \(rank 1\) stopped responding: .*data link"):
            for _ in range(200):  # until the kill lands mid-collective
                c0.all_reduce(torch.ones(8 << 20), site="big")
                c0.all_reduce(torch.ones(8 << 20), site="big")
        assert time.monotonic() - t0 < 5
    finally:
        proc.kill()
        proc.wait()
        c0.close()


def test_a_worker_job_gives_the_same_tokens_on_either_data_path(small_model, tmp_path):
    from test_workers import WorkerProc, _generate

    w = WorkerProc(tmp_path, "w")
    try:
        runs = {path: _generate(small_model, "--workers", w.addr, "--data-path", path) for path in ("tcp", "zmq")}
        for path, r in runs.items():
            assert r.returncode == 0, (path, r.stderr[-2000:])
        assert last_json(runs["tcp"].stdout)["output_ids"] == last_json(runs["zmq"].stdout)["output_ids"]
        assert "comm.data_path=zmq" in w.log.read_text()  # the job carried the choice to the worker
    finally:
        w.stop()


@pytest.mark.parametrize("mode", MODES)
def test_a_peer_ending_the_job_for_a_third_rank_names_that_rank_not_itself(mode):
    """The cascade of a death: rank 1 sees rank 2's link close and ends its job; rank 0, reading
    rank 1's link, must name rank 2 (what serve's re-form leaves out), not rank 1, which lives.
    Rank 1 sends the cause before closing (DataLinks.abort); rank 0 raises it as PeerAborted."""
    from tp_runtime.comm.tcp_data import PeerAborted

    zero, one, _ = _pair_links(mode)
    cause = "worker 10.0.0.3:7340 (rank 2) stopped responding: it closed its data link (end of stream)"
    one.abort(cause)
    one.close()
    with pytest.raises(PeerAborted) as e:
        _take(zero, src=1)
    text = str(e.value)
    assert text.startswith(cause) and "reported by host-1 (rank 1)" in text
    assert not re.search(r"host-1 \(rank 1\) stopped responding", text)
    zero.close()
