"""The wire protocol: round trips, every kind of bad message rejected with a reason, the job
nonce and the per-stream counters (replays), on frames and between live ranks."""

import struct
import time

import pytest
import torch

from tp_runtime.comm.protocol import _FIXED, Kind, ProtocolError, ReplayGuard, decode, encode


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
    comms = [ZmqCommunicator.on_loopback(r, ports, job=5) for r in range(2)]
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
