"""Fuzzing, bounded: the protocol decoder under thousands of random and mutated frames
(hypothesis), and a live tp-worker's port under garbage at every layer, after which it serves
the next real job with its resident memory within a stated bound.

The decoder's contract: whatever the bytes, `decode` returns a Message or raises ProtocolError
(nothing else escapes, so a receiver drops the frame with one log line); under a shared secret
no change to a real frame survives; a Message it returns is self-consistent (a tensor holds
exactly the payload's bytes, in the header's shape).
"""

import hashlib
import hmac
import math
import os
import random
import socket
import struct
import threading
import time

import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import last_json
from tp_runtime.comm.protocol import _FIXED, MAGIC, PROTOCOL_VERSION, TENSOR_KINDS, DType, Kind, Message, ProtocolError, decode, encode
from wire import frame, greeting, ready, rss_bytes

SECRET = b"\x5e" * 32
LIMIT = 1 << 16  # max_payload for the fuzzed decodes: sizes beyond it are lies too
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

U16, U64 = st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


def _outcome(frames, secret):
    """decode's result, None for a ProtocolError; any other exception fails the test."""
    try:
        msg = decode(frames, secret=secret, max_payload=LIMIT)
    except ProtocolError:
        return None
    assert isinstance(msg, Message) and isinstance(msg.kind, Kind)
    if msg.tensor is not None:  # self-consistent: the tensor is exactly the payload
        assert msg.kind in TENSOR_KINDS and msg.tensor.numel() * msg.tensor.element_size() == len(bytes(frames[1]))
    return msg


@st.composite
def messages(draw):
    """A real message's arguments: any kind, its fields anywhere in their ranges, a tensor or JSON."""
    kind = draw(st.sampled_from(list(Kind)))
    fields = dict(src=draw(U16), seq=draw(U64), flags=draw(U16), job=draw(U64), counter=draw(U64))
    if kind in TENSOR_KINDS:
        shape = draw(st.lists(st.integers(0, 5), max_size=4))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        return kind, fields, torch.randint(0, 200, shape, generator=gen).to(draw(st.sampled_from(DTYPES))), None
    if kind is Kind.OBJECT:
        return kind, fields, None, draw(JSON.filter(lambda v: v is not None))
    return kind, fields, None, draw(st.dictionaries(st.text(max_size=8), JSON, max_size=4))


@settings(FUZZ, max_examples=200)
@given(messages())
def test_every_message_round_trips(m):
    kind, fields, tensor, obj = m
    got = decode(encode(kind, secret=SECRET, tensor=tensor, obj=obj, **fields), secret=SECRET, job=fields["job"])
    assert (got.kind, got.src, got.seq, got.flags, got.job, got.counter) == (kind, *fields.values())
    if tensor is None:
        assert got.tensor is None and got.obj == obj
    else:
        assert got.tensor.dtype == tensor.dtype and torch.equal(got.tensor, tensor)


@settings(FUZZ, max_examples=1000)
@given(st.lists(st.binary(max_size=300), max_size=5))
def test_random_frames_are_refused_cleanly(frames):
    assert _outcome(frames, SECRET) is None  # nothing random carries a valid MAC
    _outcome(frames, None)


_ITEMSIZE = {DType.F32: 4, DType.F16: 2, DType.BF16: 2, DType.F64: 8, DType.I64: 8, DType.I32: 4, DType.U8: 1}


@st.composite
def lying_headers(draw):
    """A header built field by field, each field mostly true and sometimes a lie, so that most
    frames get deep into the checks: the sizes (payload length, ndim, the dimensions, a huge
    dimension beside a zero one) disagree with each other and with the payload actually sent."""
    def true(p=0.85):
        return draw(st.integers(0, 99)) < p * 100

    if true(0.5):
        kind = draw(st.sampled_from([int(Kind.TENSOR), int(Kind.WEIGHTS)]))
    else:
        kind = draw(st.sampled_from([int(k) for k in Kind])) if true(0.95) else draw(U16)
    tensor_kind = kind in (int(Kind.TENSOR), int(Kind.WEIGHTS))
    if tensor_kind == true(0.9):
        code = draw(st.sampled_from([int(d) for d in DType if d is not DType.NONE]))
    else:
        code = int(DType.NONE) if true(0.8) else draw(st.integers(0, 255))
    # the shape: small and honest, some dimensions huge, or huge ones beside a zero (then the sizes
    # agree, 0 bytes, and only the shape's extent is a lie: the case that once reached torch)
    style = draw(st.sampled_from(["small", "huge", "zero"])) if code else "none"
    dims = draw(st.lists(st.integers(0, 6), min_size=0 if style in ("small", "none") else 2, max_size=0 if style == "none" else 4))
    if style != "small":
        for i in range(len(dims)):
            if draw(st.booleans()):
                dims[i] = draw(st.one_of(U64, st.integers(1 << 20, 1 << 50)))
    if style == "zero":
        i = draw(st.integers(0, len(dims) - 1))
        dims[i], dims[i - 1] = 0, draw(st.one_of(U64, st.integers(1 << 24, 1 << 50)))
    ndim = len(dims) if true(0.9) else draw(st.sampled_from([0, 1, 3, 8, 9, 255]))
    honest = _ITEMSIZE.get(code, 1) * math.prod(dims)  # a zero dimension: 0, whatever the others say
    if honest > 4096:
        honest = draw(st.integers(0, 64))
    n = honest if true(0.7) else draw(st.integers(0, 2 * honest + 8))
    payload = draw(st.binary(min_size=n, max_size=n)) if code else (b"{}" if true(0.5) else draw(st.binary(max_size=40)))
    header = _FIXED.pack(
        MAGIC if true(0.97) else b"TPRX",
        PROTOCOL_VERSION if true(0.97) else draw(st.sampled_from([2, 0xFFFF])),
        kind, draw(U16), draw(U16), draw(U64), code, ndim, draw(U16), draw(U64), draw(U64),
        len(payload) if true(0.8) else draw(st.one_of(st.integers(0, 2 * len(payload) + 8), U64)),
    ) + struct.pack(f"<{len(dims)}Q", *dims)
    return header, payload


@settings(FUZZ, max_examples=1500)
@given(lying_headers())
def test_headers_with_lying_sizes_are_refused_or_consistent(hp):
    header, payload = hp
    _outcome([header, payload, b""], None)
    mac = hmac.new(SECRET, header + payload, hashlib.sha256).digest()
    _outcome([header, payload, mac], SECRET)  # authenticated lies (a buggy coordinator) are still refused


@st.composite
def mutations(draw):
    """Changes to a real message's frames: byte flips, truncations, extensions, swapped or dropped frames."""
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        ops.append((draw(st.sampled_from(["flip", "cut", "grow", "swap", "drop", "dup"])), draw(st.integers(0, 2)),
                    draw(st.integers(0, 1 << 16)), draw(st.integers(1, 255))))
    return ops


def _mutate(frames, ops):
    frames = [bytearray(bytes(f)) for f in frames]
    for op, i, pos, val in ops:
        i = i % len(frames) if frames else 0
        if not frames:
            break
        f = frames[i]
        if op == "flip" and f:
            f[pos % len(f)] ^= val
        elif op == "cut":
            del f[pos % (len(f) + 1):]
        elif op == "grow":
            f += bytes([val]) * (1 + pos % 64)
        elif op == "swap":
            j = (i + 1) % len(frames)
            frames[i], frames[j] = frames[j], frames[i]
        elif op == "drop":
            del frames[i]
        elif op == "dup":
            frames.insert(i, bytearray(f))
    return [bytes(f) for f in frames]


@settings(FUZZ, max_examples=800)
@given(messages(), mutations())
def test_mutated_real_frames_never_pass_the_mac_and_never_crash(m, ops):
    kind, fields, tensor, obj = m
    signed = [bytes(f) for f in encode(kind, secret=SECRET, tensor=tensor, obj=obj, **fields)]
    mutated = _mutate(signed, ops)
    if mutated != signed:
        assert _outcome(mutated, SECRET) is None
    plain = [bytes(f) for f in encode(kind, secret=None, tensor=tensor, obj=obj, **fields)]
    _outcome(_mutate(plain, ops), None)


# -- a live worker's port --

RSS_BOUND = 64 << 20  # what the fuzz below may add to an idle worker's resident memory


def _zmtp(port, socket_type=b"DEALER"):
    """A raw connection that has done ZeroMQ's NULL handshake: from here on it may send any frame."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(greeting())
    time.sleep(0.02)  # libzmq 4.3 wants the greeting in a segment of its own (see wire.replay)
    s.sendall(ready(socket_type))
    return s


def _signed(header, payload):
    return [header, payload, hmac.new(SECRET, header + payload, hashlib.sha256).digest()]


def test_live_fuzz_leaves_the_worker_serving_within_its_memory_bound(small_model, tmp_path):
    """Against a tp-worker (loopback, shared secret, no CURVE: every layer reachable):
    random bytes; ZMTP frames announcing 10 MiB to 1 TiB and sending 256 KiB; real frames with
    lying sizes, signed and not; 600 mutations of real frames; 48 whole 4 MiB messages under a
    wrong MAC; 100 valid HELLOs from as many
    connections and JOBs with stale nonces; 120 half-open connections; slow-loris clients (a
    greeting a byte at a time, a huge frame's body a trickle). The worker's RSS after all that
    (the half-open and slow connections still open) is within RSS_BOUND of its idle RSS although
    some 200 MiB went in, and it
    then runs a real job (the slow clients still trickling)."""
    from test_workers import SECRET as SECRET_HEX
    from test_workers import WorkerProc, _generate

    assert bytes.fromhex(SECRET_HEX) == SECRET
    w = WorkerProc(tmp_path, "fz")
    rng = random.Random(17)
    held, threads, stop = [], [], threading.Event()
    ctx = zmq.Context()
    try:
        time.sleep(0.5)
        rss0 = rss_bytes(w.proc.pid)
        sent = 0

        for _ in range(60):  # 1. random bytes
            with socket.create_connection(("127.0.0.1", w.port)) as s:
                data = rng.randbytes(rng.choice([1, 9, 64, 1000, 65536]))
                try:
                    s.sendall(data)
                    sent += len(data)
                except OSError:
                    pass

        for announced in (10 << 20, 1 << 31, 4 << 30, 1 << 40):  # 2. a ZMTP frame far larger than what follows
            s = _zmtp(w.port)
            try:
                s.sendall(frame(rng.randbytes(256 << 10), more=True, size=announced))
                sent += 256 << 10
            except OSError:
                pass
            held.append(s)

        d = ctx.socket(zmq.DEALER)  # 3. real frames with lying sizes, and mutations of real frames
        d.setsockopt(zmq.LINGER, 0)
        d.connect(f"tcp://{w.addr}")
        h, p, _ = encode(Kind.WEIGHTS, secret=None, tensor=torch.ones(16), seq=0, job=5, counter=2)
        for field, value in ((_FIXED.size - 8, 1 << 30), (_FIXED.size, 1 << 40), (_FIXED.size - 8, 0)):
            lie = bytearray(h)
            struct.pack_into("<Q", lie, field, value)  # payload_len, the first dimension
            d.send_multipart(_signed(bytes(lie), p))
            d.send_multipart([bytes(lie), p, b""])
        real = [encode(Kind.HELLO, secret=SECRET, obj={"role": "coordinator"}, job=7, counter=1),
                encode(Kind.JOB, secret=SECRET, obj={"rank": 1, "tp": 2}, job=8, counter=2),
                encode(Kind.WEIGHTS, secret=SECRET, tensor=torch.arange(64.0), job=8, counter=3)]
        for _ in range(600):
            base = [bytes(f) for f in rng.choice(real)]
            i = rng.randrange(3)
            b = bytearray(base[i])
            for _ in range(rng.randint(1, 4)):
                if b:
                    b[rng.randrange(len(b))] = rng.randrange(256)
            base[i] = bytes(b)
            d.send_multipart(base)
            sent += sum(map(len, base))

        big = rng.randbytes(4 << 20)
        for i in range(48):  # 192 MiB of whole messages under a wrong key: read, refused, freed
            d.send_multipart([encode(Kind.WEIGHTS, secret=None, tensor=torch.zeros(1))[0], big, bytes(32)])
            sent += len(big)

        hellos = []  # valid HELLOs open sessions (bounded); JOBs with a made-up nonce are dropped
        for i in range(100):
            c = ctx.socket(zmq.DEALER)
            c.setsockopt(zmq.LINGER, 0)
            c.connect(f"tcp://{w.addr}")
            c.send_multipart(encode(Kind.HELLO, secret=SECRET, obj={}, job=i + 1, counter=1))
            c.send_multipart(encode(Kind.JOB, secret=SECRET, obj={"rank": 1}, job=12345, counter=2))
            hellos.append(c)

        for i in range(120):  # 4. half-open: connect and say nothing, or half a greeting
            s = socket.create_connection(("127.0.0.1", w.port))
            if i % 6 == 0:
                s.sendall(greeting()[:5])
            held.append(s)

        def trickle(sock, data, step, interval):  # 5. slow loris
            for k in range(0, len(data), step):
                if stop.wait(interval):
                    return
                try:
                    sock.sendall(data[k:k + step])
                except OSError:
                    return

        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", w.port))
            held.append(s)
            threads.append(threading.Thread(target=trickle, args=(s, greeting(), 1, 0.1), daemon=True))
        s = _zmtp(w.port)
        held.append(s)
        s.sendall(frame(b"", size=64 << 20)[:9])  # a long frame's flags and size: 64 MiB to come
        threads.append(threading.Thread(target=trickle, args=(s, os.urandom(1 << 20), 4096, 0.05), daemon=True))
        for t in threads:
            t.start()

        time.sleep(1.5)  # the worker drains what arrived
        rss1 = rss_bytes(w.proc.pid)
        assert w.proc.poll() is None
        print(f"worker RSS: idle {rss0 / 2**20:.1f} MiB, after the fuzz {rss1 / 2**20:.1f} MiB ({sent / 2**20:.1f} MiB sent)")
        assert rss1 - rss0 < RSS_BOUND, f"idle RSS {rss0 >> 20} MiB, after the fuzz {rss1 >> 20} MiB ({sent >> 20} MiB sent)"
        log = w.log.read_text()
        assert log.count("dropped a message") >= 600 and "replayed or stale" in log and "payload of" in log

        r = _generate(small_model, "--workers", w.addr)  # the slow clients still at it
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(last_json(r.stdout)["output_ids"]) == 12
        assert w.proc.poll() is None
    finally:
        stop.set()
        for s in held:
            s.close()
        w.stop()
        ctx.destroy(linger=0)
