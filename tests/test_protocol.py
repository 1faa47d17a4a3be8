"""The wire protocol: round trips, and every kind of bad message rejected with a reason."""

import struct

import pytest
import torch

from tp_runtime.comm.protocol import Kind, ProtocolError, decode, encode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_tensor_round_trip(dtype):
    t = (torch.randn(3, 5) * 10).to(dtype)
    msg = decode(encode(Kind.TENSOR, secret=b"k", src=2, seq=9, flags=3, tensor=t), secret=b"k")
    assert (msg.kind, msg.src, msg.seq, msg.flags) == (Kind.TENSOR, 2, 9, 3)
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
    struct.pack_into("<Q", lying, 32, 8)
    with pytest.raises(ProtocolError, match="does not hold"):
        decode([bytes(lying), payload, mac], secret=None)
    with pytest.raises(ProtocolError, match="limit"):
        decode([header, payload, mac], secret=None, max_payload=8)


def test_unknown_kind_and_garbage_json():
    header, payload, mac = encode(Kind.HELLO, secret=None, obj={})
    bad = bytearray(header)
    struct.pack_into("<H", bad, 6, 999)
    with pytest.raises(ProtocolError, match="unknown message kind"):
        decode([bytes(bad), payload, mac], secret=None)
    header, _, _ = encode(Kind.HELLO, secret=None, obj={"x": 1})
    with pytest.raises(ProtocolError, match="not JSON"):
        decode([header, b"{nojson", b""], secret=None)  # same length as {"x":1}
