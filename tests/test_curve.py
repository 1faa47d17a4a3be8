"""CURVE on the worker network: keypairs and trust files, keyed ranks, and a keyed tp-worker job
with every way a handshake can fail named (not a silent timeout)."""

import logging
import os
import socket
import threading
import time

import pytest
import torch
import zmq

from conftest import last_json, run_cli
from tp_runtime.comm.keys import (DATA_DOMAIN, AuthorizedKeys, CurveClient, Gate, JobKeys, KnownWorkers, is_loopback, keygen,
                                  load_keypair, read_authorized)
from tp_runtime.comm.protocol import Kind, encode
from tp_runtime.comm.sockets import make_socket
from tp_runtime.comm.zmq_transport import ZmqCommunicator, bind_inbox
from tp_runtime.errors import ConfigError
from tp_runtime.launch.coordinator import WorkerAccess, _check_access
from tp_runtime.launch.spawn import free_port
from tp_runtime.launch.worker import main as worker_main
from wire import TcpTap


def test_keygen_writes_a_private_pair_and_never_overwrites(tmp_path, capsys):
    d = tmp_path / "keys"
    assert worker_main(["--keygen", str(d)]) == 0
    printed = capsys.readouterr().out
    pair = load_keypair(d)
    assert f"public key: {pair.public_text}" in printed
    assert (d / "tp-runtime.key_secret").stat().st_mode & 0o777 == 0o600
    assert d.stat().st_mode & 0o777 == 0o700 and sorted(p.name for p in d.iterdir()) == ["tp-runtime.key", "tp-runtime.key_secret"]
    assert worker_main(["--keygen", str(d)]) == 1 and "already holds a keypair" in capsys.readouterr().err
    assert load_keypair(d) == pair
    assert worker_main(["--keys", str(d), "--show-key"]) == 0 and capsys.readouterr().out.strip() == pair.public_text
    os.chmod(d / "tp-runtime.key_secret", 0o644)  # as ssh does with an unprotected private key: refuse
    with pytest.raises(ConfigError, match="readable by other users.*chmod 600"):
        load_keypair(d)
    with pytest.raises(ConfigError, match="no keypair in .*--keygen"):
        load_keypair(tmp_path / "none")


def test_trust_files_parse_and_name_the_bad_line(tmp_path):
    a, b = keygen(tmp_path / "a"), keygen(tmp_path / "b")
    auth = tmp_path / "authorized_keys"
    auth.write_text(f"# coordinators\n\n{a.public_text} laptop\n  {b.public_text}\n")
    assert read_authorized(auth) == {a.public, b.public}
    auth.write_text(f"{a.public_text}\nnot-a-key\n")
    with pytest.raises(ConfigError, match=r"authorized_keys:2: 'not-a-key' is not a public key"):
        read_authorized(auth)
    known = tmp_path / "known_workers"
    known.write_text(f"10.0.0.2:7340 {a.public_text} gpu box\n10.0.0.3:7340 {b.public_text}\n")
    k = KnownWorkers(known)
    assert k.key_for("10.0.0.3:7340") == b.public and k.where("10.0.0.3:7340").endswith("known_workers:2")
    with pytest.raises(ConfigError, match="worker 10.0.0.9:7340 is not in .*known_workers: add the line `10.0.0.9:7340 KEY`"):
        k.key_for("10.0.0.9:7340")
    known.write_text(f"10.0.0.2:7340 {a.public_text}\n10.0.0.2:7340 {b.public_text}\n")
    with pytest.raises(ConfigError, match="pinned twice"):
        KnownWorkers(known)


def test_authorized_keys_are_reread_when_the_file_changes(tmp_path):
    a, b = keygen(tmp_path / "a"), keygen(tmp_path / "b")
    f = tmp_path / "authorized_keys"
    f.write_text(a.public_text + "\n")
    keys = AuthorizedKeys(f)
    assert keys.current() == {a.public}
    f.write_text(f"{a.public_text}\n{b.public_text}\n")
    assert keys.current() == {a.public, b.public}
    with pytest.raises(ConfigError, match="no authorized-keys file"):
        AuthorizedKeys(tmp_path / "missing")


def test_keys_are_required_beyond_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("[::1]") and is_loopback("127.8.9.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("*") and not is_loopback("10.0.0.2") and not is_loopback("gpu-box")
    remote = [("127.0.0.1", 7340), ("10.0.0.2", 7340)]
    with pytest.raises(ConfigError, match="refusing to send a job to 10.0.0.2:7340 without keys"):
        _check_access(WorkerAccess(), remote)
    assert _check_access(WorkerAccess(insecure=True), remote) is None
    assert _check_access(WorkerAccess(), remote[:1]) is None


def test_a_keyed_coordinator_refuses_an_unpinned_worker_before_contacting_it(tmp_path):
    (tmp_path / "known_workers").write_text("")
    access = WorkerAccess(keys=keygen(tmp_path / "c"), known=KnownWorkers(tmp_path / "known_workers"))
    with pytest.raises(ConfigError, match="worker 127.0.0.1:7340 is not in .*known_workers: add the line"):
        _check_access(access, [("127.0.0.1", 7340)])


def _keyed_ranks(tmp_path, n):
    pairs = [keygen(tmp_path / f"r{r}") for r in range(n)]
    return pairs, [JobKeys(p, tuple(q.public for q in pairs)) for p in pairs]


def test_keyed_ranks_all_reduce_encrypted_and_admit_no_stranger(tmp_path, caplog):
    """Two keyed ranks: the all-reduce is right, its bytes on the wire are not the tensor's; a
    client with an unknown key or no CURVE at all gets nothing into an inbox."""
    caplog.set_level(logging.WARNING, logger="tp_runtime.keys")
    pairs, keys = _keyed_ranks(tmp_path, 2)
    ports = [free_port(), free_port()]
    tap = TcpTap(ports[0])
    comms = [ZmqCommunicator.on_loopback(0, ports, keys=keys[0], job=9, data_path="zmq")]  # the zmq sockets' CURVE (TCP links: test_tcp_data.py)
    ctx = zmq.Context()
    in1, _ = bind_inbox(ctx, port=ports[1], keys=keys[1])
    gate = Gate(ctx)
    gate.admit(DATA_DOMAIN, keys[1].others(1))
    comms.append(ZmqCommunicator(ctx, 1, [f"tcp://127.0.0.1:{tap.port}", f"tcp://127.0.0.1:{ports[1]}"], in1, keys=keys[1], job=9, data_path="zmq"))
    try:
        marker = torch.full((64,), 1234.5678)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault(1, comms[1].all_reduce(marker.clone(), site="x")))
        t.start()
        got = comms[0].all_reduce(torch.ones(64), site="x")
        t.join(10)
        assert torch.equal(got, out[1]) and torch.equal(got, marker + 1)
        wire = b"".join(tap.streams)
        assert len(wire) > 256 and marker.numpy().tobytes()[:16] not in wire and b"TPRT" not in wire

        stranger = keygen(tmp_path / "stranger")
        for curve in (CurveClient(stranger, pairs[0].public), None):
            s = make_socket(ctx, zmq.PUSH, curve=curve)
            s.connect(f"tcp://127.0.0.1:{ports[0]}")
            s.send_multipart(encode(Kind.TENSOR, secret=None, src=1, seq=2, tensor=torch.ones(1), job=9, counter=99), flags=zmq.NOBLOCK)
            time.sleep(0.3)
            comms[0]._drain()
            assert not comms[0].early
            s.close(0)
        assert f"key {stranger.public_text} is not admitted" in caplog.text
    finally:
        for c in comms:
            c.close()
        gate.stop()
        ctx.term()
        tap.close()


def test_one_keyed_rank_cannot_speak_for_another(tmp_path, caplog):
    """A frame says which rank sent it; under CURVE it must come over that rank's own connection."""
    caplog.set_level(logging.WARNING, logger="tp_runtime.zmq")
    pairs, keys = _keyed_ranks(tmp_path, 3)
    ports = [free_port() for _ in range(3)]
    comm = ZmqCommunicator.on_loopback(0, ports, keys=keys[0], job=4, data_path="zmq")
    ctx = zmq.Context()
    try:
        def send_as(pair, src, counter):
            s = make_socket(ctx, zmq.PUSH, curve=CurveClient(pair, pairs[0].public))
            s.connect(f"tcp://127.0.0.1:{ports[0]}")
            s.send_multipart(encode(Kind.TENSOR, secret=None, src=src, seq=1, tensor=torch.ones(1), job=4, counter=counter))
            time.sleep(0.3)
            comm._drain()
            s.close(0)

        send_as(pairs[2], 1, 1)  # rank 2's key, claiming rank 1
        assert not comm.early and "claims to come from rank 1 arrived over another rank's connection" in caplog.text
        send_as(pairs[1], 1, 1)  # rank 1 itself
        assert (1, 0, 1) in comm.early
    finally:
        comm.close()
        ctx.term()


def test_a_keyed_inbox_without_its_gate_admits_nobody(tmp_path):
    """ZAP_ENFORCE_DOMAIN: with no ZAP handler in the context libzmq would admit every CURVE client."""
    pairs, keys = _keyed_ranks(tmp_path, 2)
    ctx = zmq.Context()
    inbox, port = bind_inbox(ctx, keys=keys[0])  # no Gate started in ctx
    s = make_socket(ctx, zmq.PUSH, curve=CurveClient(pairs[1], pairs[0].public))
    s.connect(f"tcp://127.0.0.1:{port}")
    s.send(b"x")  # queued until a handshake succeeds, which it never does
    assert not inbox.poll(500)
    s.close(0)
    inbox.close(0)
    ctx.term()


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_keyed_worker_job_and_every_refusal_named(small_model, tmp_path):
    """A tp-worker with --keys: a coordinator it has not authorized, one that pinned another key
    for it and one without keys are each told exactly that, from the handshake; the
    authorized, correctly pinned coordinator runs the job (control and data plane over CURVE), and
    garbage sent before does not disturb it."""
    from test_workers import ENV, WorkerProc, _generate

    wk, ck, other = (tmp_path / n for n in ("worker-keys", "coord-keys", "other-keys"))
    worker_pair, coord_pair, other_pair = keygen(wk), keygen(ck), keygen(other)
    _write(wk / "authorized_keys", coord_pair.public_text + " the coordinator\n")
    w = WorkerProc(tmp_path, "kw", ["--keys", str(wk)])
    try:
        assert f"CURVE, public key {worker_pair.public_text}" in w.log.read_text()
        pin = f"{w.addr} {worker_pair.public_text}\n"
        _write(ck / "known_workers", pin)
        _write(other / "known_workers", pin)
        wrong_pin = _write(tmp_path / "wrong_pin", f"# a stale line\n{w.addr} {other_pair.public_text}\n")
        base = ["generate", "--model", str(small_model), "--prompt-ids", "1,2", "--max-new-tokens", "2", "--workers", w.addr]
        for flags, expected in (  # each named from the handshake itself: none of them is the 5 s "did not answer"
            (["--worker-keys", str(other)], f"refused this coordinator's key {other_pair.public_text}: add it to the worker's authorized-keys"),
            (["--worker-keys", str(ck), "--known-workers", wrong_pin], f"does not hold the key pinned for it in {wrong_pin}:2"),
            ([], "requires keys (CURVE) and this coordinator has none: pass --worker-keys"),  # (under load libzmq may give no detail: "probably")
        ):
            r = run_cli([*base, *flags], timeout=60, env=ENV)
            assert r.returncode == 1 and expected in r.stderr, (flags, r.stderr[-2000:])
        assert f"key {other_pair.public_text} is not admitted" in w.log.read_text()

        ctx = zmq.Context()  # pre-handshake garbage: a plain client, random bytes
        d = make_socket(ctx, zmq.DEALER)
        d.connect(f"tcp://{w.addr}")
        d.send_multipart(encode(Kind.HELLO, secret=bytes.fromhex(ENV["TP_RUNTIME_SECRET"]), obj={}, job=1, counter=1))
        with socket.create_connection(("127.0.0.1", w.port)) as raw:
            raw.sendall(os.urandom(2048))
        assert not d.poll(300)
        d.close(0)
        ctx.term()

        r = _generate(small_model, "--workers", w.addr, "--worker-keys", str(ck))
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(last_json(r.stdout)["output_ids"]) == 12
        assert "job: rank 1 of 2 over CURVE" in w.log.read_text()
    finally:
        w.stop()
