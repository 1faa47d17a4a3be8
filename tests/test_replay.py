"""Replay protection, by recording real traffic with a TCP tap and playing it back.

What an attacker on the network can do with a recording: replay the whole connection into a
fresh one (raw bytes), or replay its messages one by one, reordered, into the same job or a
later one. Under the shared secret (HMAC, no CURVE) every replayed frame reaches the protocol
and must be dropped there, with a log line; under CURVE the recording does not even get
through the handshake (its keys were for another session), and nothing of it is readable.
"""

import logging
import threading
import time

import pytest
import torch
import zmq

from tp_runtime.comm.control import ControlClient, ControlServer
from tp_runtime.comm.keys import CONTROL_DOMAIN, CurveClient, Gate, keygen
from tp_runtime.comm.protocol import Kind
from tp_runtime.comm.zmq_transport import ZmqCommunicator, bind_inbox
from tp_runtime.launch.spawn import free_port
from wire import TcpTap, messages, replay

SECRET = bytes(range(32))


def _ep(port):
    return f"tcp://127.0.0.1:{port}"


def _bind(ctx, port):
    """An inbox on `port`, once the last job's socket there is gone (zmq closes in the background)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return bind_inbox(ctx, port=port)[0]
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _pair(ctx, p0, p1, via, job):
    """Ranks 0 and 1 of a job with their payloads on the zmq sockets (the TCP data path's
    replays: test_tcp_data.py); rank 1 reaches rank 0 through `via` (the tap's port)."""
    in0, in1 = _bind(ctx, p0), _bind(ctx, p1)
    r0 = ZmqCommunicator(ctx, 0, [_ep(p0), _ep(p1)], in0, secret=SECRET, job=job, data_path="zmq")
    r1 = ZmqCommunicator(ctx, 1, [_ep(via), _ep(p1)], in1, secret=SECRET, job=job, data_path="zmq")
    return r0, r1


def _all_reduce(r0, r1, a, b):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault(1, r1.all_reduce(torch.full((4,), b), site="x")))
    t.start()
    got = r0.all_reduce(torch.full((4,), a), site="x")
    t.join(10)
    assert got.tolist() == out[1].tolist() == [a + b] * 4
    return got


def test_recorded_data_frames_replayed_are_dropped(caplog):
    """Rank 1's frames to rank 0, recorded on the wire: played back raw into the same job
    (counters spent), one by one in reverse (out of sequence), and raw into the next job on the
    same ports (another nonce), none is taken: each collective sums exactly the live tensors, and
    rank 0 holds no leftover frame."""
    caplog.set_level(logging.WARNING, logger="tp_runtime.zmq")
    p0, p1 = free_port(), free_port()
    tap = TcpTap(p0)
    ctx = zmq.Context()
    r0, r1 = _pair(ctx, p0, p1, tap.port, job=1001)
    try:
        for i in range(3):
            _all_reduce(r0, r1, 1.0, 10.0 * (i + 1))
        time.sleep(0.6)  # a heartbeat or two recorded as well
        recorded = [bytes(s) for s in tap.streams]
        assert len(recorded) == 2  # rank 1's data socket and its heartbeat socket
        data = max(recorded, key=len)
        assert len(messages(data)) == 3  # the three collectives' frames

        for stream in recorded:  # whole connections, replayed raw
            replay(p0, stream)
        r0._drain()
        assert "repeated or out of sequence" in caplog.text
        caplog.clear()

        push = ctx.socket(zmq.PUSH)  # message by message, last first
        push.connect(_ep(p0))
        for msg in reversed(messages(data)):
            push.send_multipart(msg)
        time.sleep(0.3)
        r0._drain()
        assert caplog.text.count("repeated or out of sequence") >= 3
        _all_reduce(r0, r1, 2.0, 5.0)  # live traffic unaffected
        assert not r0.early
    finally:
        for c in (r0, r1):
            c.close()
        tap.close()

    caplog.clear()
    r0, r1 = _pair(ctx, p0, p1, p0, job=1002)  # the next job on the same ports, no tap
    try:
        replay(p0, data)  # collective #1 of the old job: same seq, same src, the old nonce
        time.sleep(0.2)
        _all_reduce(r0, r1, 3.0, 4.0)
        assert "a frame of job 0x3e9, expected job 0x3ea" in caplog.text
        assert not r0.early
    finally:
        push.close(0)
        for c in (r0, r1):
            c.close()
        ctx.term()


def _session(server, client):
    """HELLO / WELCOME, then a JOB, as the coordinator and a worker exchange them."""
    client.send(Kind.HELLO, {"role": "coordinator"})
    peer, hello = server.recv(5)
    assert hello.kind is Kind.HELLO
    server.welcome(peer, {"version": 3})
    assert client.recv(5, "welcome").kind is Kind.WELCOME
    client.send(Kind.JOB, {"prompt": "attack at dawn"})
    _, job = server.recv(5)
    assert job.kind is Kind.JOB and job.obj == {"prompt": "attack at dawn"}


def test_recorded_control_session_replayed_to_a_worker_runs_nothing(caplog):
    """A coordinator's session recorded and played back: the worker answers the replayed HELLO
    with a new nonce, which the recording cannot know, so the replayed JOB is dropped."""
    caplog.set_level(logging.WARNING, logger="tp_runtime.control")
    ctx = zmq.Context()
    port = free_port()
    server = ControlServer(ctx, _ep(port), SECRET)
    tap = TcpTap(port)
    client = ControlClient(ctx, _ep(tap.port), SECRET, "w")
    try:
        _session(server, client)
        assert b"attack at dawn" in tap.streams[0]  # HMAC authenticates, it does not hide
        replay(port, bytes(tap.streams[0]), hold_s=0.1)
        _, again = server.recv(2)
        assert again.kind is Kind.HELLO  # harmless: a WELCOME goes to the replayer
        assert server.recv(1) is None  # the JOB is not
        assert "replayed or stale" in caplog.text
    finally:
        client.close()
        server.close()
        tap.close()
        ctx.term()


def test_under_curve_a_recording_is_unreadable_and_replays_nothing(tmp_path, caplog):
    ctx = zmq.Context()
    gate = Gate(ctx)
    worker, coordinator = keygen(tmp_path / "w"), keygen(tmp_path / "c")
    gate.admit(CONTROL_DOMAIN, {coordinator.public})
    port = free_port()
    server = ControlServer(ctx, _ep(port), None, keys=worker)
    tap = TcpTap(port)
    client = ControlClient(ctx, _ep(tap.port), None, "w", curve=CurveClient(coordinator, worker.public))
    try:
        _session(server, client)
        recorded = bytes(tap.streams[0])
        assert b"attack at dawn" not in recorded and b"TPRT" not in recorded  # encrypted, headers too
        replay(port, recorded, hold_s=0.3)
        assert server.recv(1) is None  # not even the HELLO: the handshake fails
    finally:
        client.close()
        server.close()
        tap.close()
        gate.stop()
        ctx.term()


@pytest.mark.parametrize("keyed", [False, True])
def test_replayed_hello_sessions_stay_bounded(keyed, tmp_path):
    """Every HELLO opens a session; a worker keeps at most MAX_SESSIONS, never evicting the one
    whose job runs."""
    from tp_runtime.comm.control import MAX_SESSIONS

    ctx = zmq.Context()
    gate = Gate(ctx) if keyed else None
    w, c = (keygen(tmp_path / "w"), keygen(tmp_path / "c")) if keyed else (None, None)
    if keyed:
        gate.admit(CONTROL_DOMAIN, {c.public})
    port = free_port()
    server = ControlServer(ctx, _ep(port), SECRET, keys=w)
    clients = []
    try:
        first = ControlClient(ctx, _ep(port), SECRET, "first", curve=CurveClient(c, w.public) if keyed else None)
        clients.append(first)
        first.send(Kind.HELLO, {})
        held, _ = server.recv(5)
        server.held = held
        for i in range(MAX_SESSIONS + 20):
            cl = ControlClient(ctx, _ep(port), SECRET, f"c{i}", curve=CurveClient(c, w.public) if keyed else None)
            clients.append(cl)
            cl.send(Kind.HELLO, {})
        for _ in range(MAX_SESSIONS + 20):
            assert server.recv(5) is not None
        assert server.recv(0.2) is None
        assert len(server.sessions) == MAX_SESSIONS and held in server.sessions
    finally:
        for cl in clients:
            cl.close()
        server.close()
        if gate:
            gate.stop()
        ctx.term()
