"""The wire protocol: round trips, every kind of bad message rejected with a reason, the job
nonce and the per-stream counters (replays), on frames and between live ranks."""

import struct
import time

import pytest
import torch

from tp_runtime.comm.protocol import _FIXED, Kind, ProtocolError, ReplayGuard, decode, decode_frame, encode, encode_frame


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_tensor_round_trip(dtype):
    t = (torch.randn(3, 5) * 10).to(dtype)
    msg = decode(encode(Kind.TENSOR, secret=b"k", src=2, seq=9, flags=3, tensor=t, job=2**64 - 1, counter=7), secret=b"k")
    assert (msg.kind, msg.src, msg.seq, msg.flags, msg.job, msg.counter) == (Kind.TENSOR, 2, 9, 3, 2**64 - 1, 7)
    assert msg.tensor.dtype == dtype and torch.equal(msg.tensor, t)


def test_json_round_trip_and_empty_tensor():
    assert decode(encode(Kind.JOB, secret=None, obj={"a": [1, 2]}), secret=None).obj == {"a": [1, 2]}
    assert decode(encode(Kind.TENSOR, secret=None, tensor=torch.empty(0, 4)), secret=None).tensor.shape == (0, 4)


def _frames(**kw):
    return encode(Kind.TENSOR, secret=b"k", tensor=torch.ones(4), **kw)


@pytest.mark.parametrize(
    "mangle, reason",
    [
        (lambda f: f[:2], "expected 3 frames"),
        (lambda f: [f[0][:10], f[1], f[2]], "truncated"),
        (lambda f: [b"XXXX" + f[0][4:], f[1], f[2]], "bad magic"),
        (lambda f: [f[0], bytes(f[1])[:-4], f[2]], "not authenticated"),
        (lambda f: [f[0], f[1], b"\0" * 32], "not authenticated"),
        (lambda f: [f[0], f[1], b""], "not authenticated"),
    ],
)
def test_bad_frames_rejected(mangle, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(mangle(_frames()), secret=b"k")


def test_wrong_version_named():
    with pytest.raises(ProtocolError, match="protocol version 99"):
        decode(encode(Kind.HELLO, secret=b"k", obj={}, version=99), secret=b"k")


def test_wrong_secret_and_missing_secret():
    with pytest.raises(ProtocolError, match="not authenticated"):
        decode(_frames(), secret=b"other")
    with pytest.raises(ProtocolError, match="no secret configured"):
        decode(_frames(), secret=None)


def test_size_lies_rejected_without_a_secret():
    header, payload, mac = encode(Kind.TENSOR, secret=None, tensor=torch.ones(4))
    with pytest.raises(ProtocolError, match="payload of 12 bytes"):
        decode([header, bytes(payload)[:12], mac], secret=None)
    # shape says 8 floats, payload holds 4, and the length field is made consistent
    lying = bytearray(header)
    struct.pack_into("<Q", lying, _FIXED.size, 8)  # the first dimension
    with pytest.raises(ProtocolError, match="does not hold"):
        decode([bytes(lying), payload, mac], secret=None)
    with pytest.raises(ProtocolError, match="limit"):
        decode([header, payload, mac], secret=None, max_payload=8)


def test_a_huge_dimension_beside_a_zero_one_is_refused():
    """prod(shape) is 0, so the sizes agree, and torch's reshape would raise its own error (an overflow)."""
    header, payload, mac = encode(Kind.TENSOR, secret=None, tensor=torch.empty(0, 3))
    lying = bytearray(header)
    for dims in ((0, 2**64 - 1), (2**49, 0)):
        struct.pack_into("<QQ", lying, _FIXED.size, *dims)
        with pytest.raises(ProtocolError, match="is larger than any tensor"):
            decode([bytes(lying), payload, mac], secret=None)
    assert decode(encode(Kind.TENSOR, secret=None, tensor=torch.tensor(2.5)), secret=None).tensor.shape == ()  # 0-dim: also found by it


def test_unknown_kind_and_garbage_json():
    header, payload, mac = encode(Kind.HELLO, secret=None, obj={})
    bad = bytearray(header)
    struct.pack_into("<H", bad, 6, 999)
    with pytest.raises(ProtocolError, match="unknown message kind"):
        decode([bytes(bad), payload, mac], secret=None)
    header, _, _ = encode(Kind.HELLO, secret=None, obj={"x": 1})
    with pytest.raises(ProtocolError, match="not JSON"):
        decode([header, b"{nojson", b""], secret=None)  # same length as {"x":1}


@pytest.mark.parametrize("payload, reason", [
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),  # nested past the recursion limit
    (b"9" * 5000, "not JSON"),  # more digits than int() takes
    (b"[1,2]", "must be a JSON object"),  # a control kind's payload is an object
])
def test_hostile_json_is_a_protocol_error(payload, reason):
    header, _, _ = encode(Kind.JOB, secret=None, obj={})
    lying = bytearray(header)
    struct.pack_into("<Q", lying, _FIXED.size - 8, len(payload))  # payload_len, the last fixed field
    with pytest.raises(ProtocolError, match=reason):
        decode([bytes(lying), payload, b""], secret=None)


def test_kind_and_payload_type_must_agree():
    """A TENSOR frame without a tensor would reach a collective as None: refused at the door."""
    h, p, m = encode(Kind.HEARTBEAT, secret=None)
    bad = bytearray(h)
    struct.pack_into("<H", bad, 6, int(Kind.TENSOR))
    with pytest.raises(ProtocolError, match="TENSOR frame must carry a tensor"):
        decode([bytes(bad), p, m], secret=None)


def test_frame_of_another_job_is_refused():
    """A frame names its job's nonce; a late frame of an earlier job (or of a group that has
    re-formed) is refused, and a decode without a job (the control channel's first look) passes it."""
    frames = encode(Kind.TENSOR, secret=b"k", src=1, seq=4, tensor=torch.ones(3), job=77)
    assert decode(frames, secret=b"k", job=77).job == 77
    assert decode(frames, secret=b"k").job == 77
    with pytest.raises(ProtocolError, match="a frame of job 0x4d, expected job 0x4e"):
        decode(frames, secret=b"k", job=78)


def test_replay_guard_refuses_repeated_and_reordered_frames_per_stream():
    guard = ReplayGuard()
    frames = [decode(encode(Kind.TENSOR, secret=None, src=1, tensor=torch.ones(1), counter=c), secret=None) for c in range(1, 6)]
    guard.check(1, frames[0])
    guard.check(1, frames[2])  # a gap is fine (a reconnect may lose frames)
    with pytest.raises(ProtocolError, match="#3 after #3: repeated"):
        guard.check(1, frames[2])
    with pytest.raises(ProtocolError, match="#2 after #3"):
        guard.check(1, frames[1])
    guard.check(2, frames[1])  # another stream counts on its own
    with pytest.raises(ProtocolError, match="#0 after #0"):  # an uncounted frame never passes
        guard.check(3, decode(encode(Kind.HEARTBEAT, secret=None), secret=None))


def test_zmq_ranks_drop_frames_of_another_job():
    """A replayed frame of another job reaches a rank's inbox between two collectives: it is
    dropped with a log line, and the next collective sums only this job's tensors."""
    import zmq

    from tp_runtime.comm.zmq_transport import ZmqCommunicator
    from tp_runtime.launch.spawn import free_port

    ports = [free_port(), free_port()]
    comms = [ZmqCommunicator.on_loopback(r, ports, job=5, data_path="zmq") for r in range(2)]  # the zmq data path's frames
    try:
        ctx = zmq.Context()
        stale = ctx.socket(zmq.PUSH)
        stale.connect(f"tcp://127.0.0.1:{ports[0]}")
        stale.send_multipart(encode(Kind.TENSOR, secret=None, src=1, seq=1, tensor=torch.full((2,), 100.0), job=4, counter=1))
        import threading

        out = {}
        t = threading.Thread(target=lambda: out.setdefault(1, comms[1].all_reduce(torch.full((2,), 2.0), site="x")))
        t.start()
        time.sleep(0.2)  # the stale frame arrives first
        got = comms[0].all_reduce(torch.full((2,), 1.0), site="x")
        t.join(10)
        assert got.tolist() == [3.0, 3.0] and out[1].tolist() == [3.0, 3.0]
        stale.close(0)
        ctx.term()
    finally:
        for c in comms:
            c.close()


# -- the one-frame form (the data plane's small messages) --

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8]
SHAPES = [(), (0,), (0, 3), (3, 0, 2), (1,), (7,), (2, 3, 4), (1, 1, 1, 1, 1, 1, 1, 2)]


@pytest.mark.parametrize("secret", [None, b"k" * 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_frame_round_trips_every_dtype_and_shape(dtype, secret):
    """encode_frame is the three frames of encode, concatenated; decode_frame gives back the same
    message (0-dim, empty and 8-dimensional tensors included), a writable tensor of its own."""
    for shape in SHAPES:
        t = (torch.arange(torch.Size(shape).numel()) % 113).to(dtype).reshape(shape)
        fields = dict(src=3, seq=2**64 - 1, flags=7, job=2**63 + 5, counter=2**40)
        frame = encode_frame(Kind.TENSOR, secret=secret, tensor=t, **fields)
        assert frame == b"".join(bytes(f) for f in encode(Kind.TENSOR, secret=secret, tensor=t, **fields))
        msg = decode_frame(frame, secret=secret, job=fields["job"])
        assert (msg.kind, msg.src, msg.seq, msg.flags, msg.job, msg.counter) == (Kind.TENSOR, *fields.values())
        assert msg.tensor.dtype == dtype and msg.tensor.shape == t.shape and torch.equal(msg.tensor, t)
        msg.tensor.reshape(-1)[:1] = 1 if t.numel() else 0  # writable, and not the frame's bytes
        assert decode_frame(frame, secret=secret).tensor.shape == t.shape
    view = torch.arange(12).to(dtype).reshape(3, 4)[:, 1:3]  # not contiguous: sent as its values
    assert torch.equal(decode_frame(encode_frame(Kind.TENSOR, secret=secret, tensor=view), secret=secret).tensor, view)


def test_one_frame_json_kinds_round_trip():
    assert decode_frame(encode_frame(Kind.OBJECT, secret=None, obj=[1, "a", None]), secret=None).obj == [1, "a", None]
    hb = decode_frame(encode_frame(Kind.HEARTBEAT, secret=b"s", src=1, seq=4, flags=1, obj={"busy_ms": 3}), secret=b"s")
    assert (hb.kind, hb.seq, hb.flags, hb.obj) == (Kind.HEARTBEAT, 4, 1, {"busy_ms": 3})


def test_one_frame_tampered_truncated_or_lying_is_refused():
    """Under the secret every changed byte (header, payload or MAC), a cut or an extension fails;
    without one the sizes in the header must match the frame exactly."""
    secret = b"k" * 32
    frame = encode_frame(Kind.TENSOR, secret=secret, src=1, seq=9, tensor=torch.arange(6, dtype=torch.float32), job=4, counter=2)
    for i in range(len(frame)):
        bad = bytearray(frame)
        bad[i] ^= 0x41
        with pytest.raises(ProtocolError):
            decode_frame(bytes(bad), secret=secret)
    for cut in (0, 10, _FIXED.size, _FIXED.size + 8, len(frame) - 32, len(frame) - 1):
        with pytest.raises(ProtocolError):
            decode_frame(frame[:cut], secret=secret)
    with pytest.raises(ProtocolError, match="wrong MAC"):
        decode_frame(frame + b"x", secret=secret)
    with pytest.raises(ProtocolError, match="no secret configured"):
        decode_frame(frame, secret=None)  # the MAC is the rest of the frame: extra bytes
    plain = encode_frame(Kind.TENSOR, secret=None, tensor=torch.ones(4))
    with pytest.raises(ProtocolError, match="wrong MAC"):
        decode_frame(plain, secret=secret)
    with pytest.raises(ProtocolError, match="no secret configured"):
        decode_frame(plain + b"\0", secret=None)
    lying = bytearray(plain)
    struct.pack_into("<Q", lying, _FIXED.size - 8, 15)  # says 15 payload bytes: the last byte becomes a "MAC"
    with pytest.raises(ProtocolError):
        decode_frame(bytes(lying), secret=None)
    struct.pack_into("<Q", lying, _FIXED.size - 8, 2**64 - 1)
    with pytest.raises(ProtocolError, match="header says"):
        decode_frame(bytes(lying), secret=None)
    lying = bytearray(plain)
    lying[21] = 200  # ndim far beyond the frame
    with pytest.raises(ProtocolError):
        decode_frame(bytes(lying), secret=None)
    with pytest.raises(ProtocolError, match="expected job"):
        decode_frame(encode_frame(Kind.TENSOR, secret=secret, tensor=torch.ones(1), job=5), secret=secret, job=6)


def test_one_frame_random_bytes_never_crash():
    import random

    rng = random.Random(17)
    real = encode_frame(Kind.TENSOR, secret=None, src=0, seq=1, tensor=torch.ones(3, 2, dtype=torch.bfloat16), counter=1)
    for i in range(3000):
        if i % 2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
        else:
            data = bytearray(real)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data[: rng.randrange(len(data) + 1)] if rng.random() < 0.3 else data)
        for secret in (None, b"k"):
            try:
                msg = decode_frame(data, secret=secret, max_payload=1 << 16)
            except ProtocolError:
                continue
            assert secret is None  # nothing random carries a valid MAC
            if msg.tensor is not None:
                assert msg.tensor.numel() * msg.tensor.element_size() <= len(data)


def _live_pair(secret, job):
    from tp_runtime.comm.zmq_transport import ZmqCommunicator
    from tp_runtime.launch.spawn import free_port

    ports = [free_port(), free_port()]
    return ports, [ZmqCommunicator.on_loopback(r, ports, secret=secret, job=job, data_path="zmq") for r in range(2)]  # its one-frame messages


def _all_reduce_pair(comms, a, b):
    import threading

    out = {}
    t = threading.Thread(target=lambda: out.setdefault(1, comms[1].all_reduce(torch.full((3,), b), site="x")))
    t.start()
    got = comms[0].all_reduce(torch.full((3,), a), site="x")
    t.join(10)
    return got.tolist(), out[1].tolist()


def test_live_ranks_drop_tampered_and_replayed_single_frames(caplog):
    """A rank's inbox, fed one-frame messages by a stranger: a tampered copy of a real one (MAC
    fails), one replayed with a spent counter, and a forged one without the MAC, are each dropped
    with a log line; the all-reduces around them sum only the live tensors, on both ranks alike."""
    import logging

    import zmq

    caplog.set_level(logging.WARNING, logger="tp_runtime.zmq")
    secret = b"s" * 32
    ports, comms = _live_pair(secret, job=31)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{ports[0]}")
    try:
        assert _all_reduce_pair(comms, 1.0, 2.0) == ([3.0] * 3, [3.0] * 3)
        spent = encode_frame(Kind.TENSOR, secret=secret, src=1, seq=2, tensor=torch.full((3,), 100.0), job=31, counter=1)
        tampered = bytearray(encode_frame(Kind.TENSOR, secret=secret, src=1, seq=2, tensor=torch.full((3,), 100.0), job=31, counter=50))
        tampered[-40] ^= 1  # a payload byte
        forged = encode_frame(Kind.TENSOR, secret=None, src=1, seq=2, tensor=torch.full((3,), 100.0), job=31, counter=60)
        for frame in (spent, bytes(tampered), forged):
            push.send(frame)
        time.sleep(0.3)
        assert _all_reduce_pair(comms, 4.0, 5.0) == ([9.0] * 3, [9.0] * 3)
        assert "repeated or out of sequence" in caplog.text
        assert caplog.text.count("not authenticated") >= 2
        assert not comms[0].early and not comms[1].early
    finally:
        push.close(0)
        ctx.term()
        for c in comms:
            c.close()


@pytest.mark.parametrize("numel", [0, 1, 2048, (64 << 10) // 4 + 1, 1 << 18])
def test_live_ranks_all_reduce_across_the_one_frame_limit(numel):
    """Sizes on both sides of SINGLE_FRAME_BYTES (one frame below, three above), empty included,
    give the same sums on both ranks, bit for bit, in float32 and bfloat16."""
    import threading

    ports, comms = _live_pair(None, job=32)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            xs = [torch.randn(numel, generator=torch.Generator().manual_seed(r)).to(dtype) for r in range(2)]
            out = {}
            t = threading.Thread(target=lambda: out.setdefault(1, comms[1].all_reduce(xs[1].clone(), site="x")))
            t.start()
            got = comms[0].all_reduce(xs[0].clone(), site="x")
            t.join(20)
            assert torch.equal(got, xs[0] + xs[1]) and torch.equal(out[1], got)
    finally:
        for c in comms:
            c.close()
