"""Wire protocol of the pyzmq transport and the worker control channel. No pickle on the wire.

A message is three ZeroMQ frames: [header, payload, mac], or the same three byte strings
concatenated into one frame (`encode_frame`): the data plane's small messages (a decode step's
hidden vector, a heartbeat) go as one frame, which saves libzmq a message, and under CURVE an
encryption, per part. The header says where the payload ends, and the rest is the mac, so the
one-frame form carries exactly the bytes of the three-frame form (`decode` takes three
frames, `decode_frame` one).

    header = MAGIC "TPRT" | version u16 | kind u16 | src u16 | flags u16 | seq u64 |
             dtype u8 | ndim u8 | reserved u16 | job u64 | counter u64 | payload_len u64 |
             shape u64 x ndim
    payload: raw tensor bytes (kind TENSOR, WEIGHTS) or UTF-8 JSON (the other kinds; an object
             for every kind but OBJECT)
    mac: HMAC-SHA256(secret, header + payload) when a shared secret is set, else empty

Message kinds and dtypes are IntEnums with pinned numbers: a number never changes meaning;
new kinds get new numbers and a protocol version bump where old peers would misread them.
`decode` checks everything (frame count, magic, version, kind, sizes against the header, the
MAC, the job) and raises ProtocolError, so that a receiver can drop a bad message with one log
line; nothing else escapes it, whatever the bytes (tests/test_fuzz.py).

Replay protection (since version 3). `job` is a fresh 64-bit nonce and `counter` a number that
strictly increases along each stream of frames (one sender's socket to one receiver); a
receiver keeps the last counter per stream (`ReplayGuard`) and drops a frame of another job, or
one whose counter is not above the last (repeated or reordered). Under the MAC (or inside
CURVE) neither can be forged, so a captured frame cannot be played again: not in its own job
(its counter is spent) nor in a later one (another nonce). On the data plane the job is the
coordinator's per-job draw; on the control channel each side draws one per session (HELLO
carries the coordinator's, WELCOME the worker's) and every later frame carries the receiver's,
so a recorded session replayed to a worker gets a new nonce and its JOB is dropped.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import secrets
import struct
from dataclasses import dataclass
from typing import Any, Hashable

import torch

from tp_runtime.errors import TPRuntimeError

MAGIC = b"TPRT"
PROTOCOL_VERSION = 5  # 2: the epoch field; 3: a 64-bit job nonce and the per-stream counter; 4: one-frame messages;
# 5: the TCP data path (tcp_data.py: its ports and keys offered over the data channel at job start)
# (a v3 rank would drop them all and call a v4 peer dead: the version makes it a clear refusal at the handshake)
_FIXED = struct.Struct("<4sHHHHQBBHQQQ")
MAX_NDIM = 8
DEFAULT_MAX_PAYLOAD = 4 << 30  # 4 GiB: the largest weight slice we expect in one frame
NO_RANK = 0xFFFF
MAX_ELEMENTS = 1 << 48  # a shape's extent, zero dimensions counted as 1: beyond it a lie, and one that overflows torch


class ProtocolError(TPRuntimeError):
    """A message that is malformed, from another protocol version, or not authenticated."""


class Kind(enum.IntEnum):
    HELLO = 1  # coordinator -> worker: {"version", "role"}; job = the coordinator's session nonce
    WELCOME = 2  # worker -> coordinator: {"version", "host", "models", "nonce": the worker's session nonce}
    REJECT = 3  # worker -> coordinator: {"reason"}
    JOB = 4  # coordinator -> worker: the job spec (JSON; "job": the data plane's nonce, "keys": every rank's public key when keyed)
    NEED_WEIGHTS = 5  # worker -> coordinator: stream my slices
    WEIGHTS_BEGIN = 6  # coordinator -> worker: {"names": [...], "bytes": n}, then one WEIGHTS per name
    WEIGHTS = 7  # coordinator -> worker: one tensor slice; seq = its index in WEIGHTS_BEGIN's names
    READY = 8  # worker -> coordinator: {"data_port"}
    START = 9  # coordinator -> worker: {"peers": [endpoints by rank]}
    DONE = 10  # worker -> coordinator: {}
    ERROR = 11  # either way: {"message"}
    BYE = 12  # coordinator -> worker: job over
    TENSOR = 13  # rank -> rank: one collective's payload; seq = collective number
    HEARTBEAT = 14  # rank -> rank: I am alive
    OBJECT = 15  # rank -> rank: a JSON object (broadcast of small objects)


# pinned numbers, as llama.cpp's rpc does with static_assert: changing one breaks old peers
assert (Kind.HELLO, Kind.TENSOR, Kind.HEARTBEAT) == (1, 13, 14)
TENSOR_KINDS = frozenset({Kind.TENSOR, Kind.WEIGHTS})  # the kinds whose payload is a tensor; the rest carry JSON


class DType(enum.IntEnum):
    NONE = 0
    F32 = 1
    F16 = 2
    BF16 = 3
    F64 = 4
    I64 = 5
    I32 = 6
    U8 = 7


_TORCH = {
    DType.F32: torch.float32, DType.F16: torch.float16, DType.BF16: torch.bfloat16, DType.F64: torch.float64,
    DType.I64: torch.int64, DType.I32: torch.int32, DType.U8: torch.uint8,
}
_CODE = {v: k for k, v in _TORCH.items()}


@dataclass
class Message:
    kind: Kind
    src: int = NO_RANK
    seq: int = 0
    flags: int = 0
    job: int = 0
    counter: int = 0
    tensor: torch.Tensor | None = None
    obj: Any = None


def new_nonce() -> int:
    """A job's or a session's nonce: 64 random bits, never 0 (0 is "no job")."""
    return secrets.randbits(64) or 1


def _mac(secret: bytes | None, header: bytes, payload: bytes | memoryview) -> bytes:
    if not secret:
        return b""
    m = hmac.new(secret, header, hashlib.sha256)
    m.update(payload)
    return m.digest()


_KINDS = {int(k): k for k in Kind}
_DTYPES = {int(d): d for d in DType}
_ITEMSIZE = {code: torch.empty((), dtype=dt).element_size() for code, dt in _TORCH.items()}
_SHAPES = [struct.Struct(f"<{n}Q") for n in range(MAX_NDIM + 1)]
_NDIM_AT, _LENGTH_AT = 21, 40  # offsets of ndim and payload_len in _FIXED
assert _FIXED.size == _LENGTH_AT + 8 and struct.calcsize("<4sHHHHQB") == _NDIM_AT


# numpy has no bfloat16: its bytes are viewed as the integer type of the same size (any shape, 0-dim included)
_AS_NUMPY = {torch.bfloat16: torch.int16}


def tensor_bytes(tensor: torch.Tensor) -> tuple[DType, tuple[int, ...], bytes | memoryview]:
    """(dtype code, shape, a buffer over the tensor's bytes in C order: no copy when it is contiguous on the CPU)."""
    t = tensor.detach()
    if not (t.is_cpu and t.is_contiguous()):
        t = t.contiguous().cpu()
    code = _CODE.get(t.dtype)
    if code is None:
        raise ProtocolError(f"dtype {t.dtype} cannot be sent")
    same = _AS_NUMPY.get(t.dtype)
    payload = (t.view(same) if same is not None else t).numpy().data.cast("B") if t.numel() else b""  # flat bytes
    return code, tuple(t.shape), payload


def torch_dtype(code: int) -> torch.dtype | None:
    """The torch dtype of a wire dtype code (None: not a tensor's code)."""
    return _TORCH.get(code)


def encode_frame(kind: Kind, *, secret: bytes | None, src: int = NO_RANK, seq: int = 0, flags: int = 0,
                 tensor: torch.Tensor | None = None, obj: Any = None, version: int = PROTOCOL_VERSION, job: int = 0, counter: int = 0) -> bytes:
    """The message of `encode`, as one frame: header + payload + mac (for small payloads: it copies the payload once)."""
    if tensor is not None:
        code, shape, payload = tensor_bytes(tensor)
    else:
        code, shape = DType.NONE, ()
        payload = json.dumps(obj if obj is not None else {}, separators=(",", ":")).encode()
    body = b"".join((_FIXED.pack(MAGIC, version, kind, src, flags, seq, code, len(shape), 0, job, counter, len(payload)),
                     _SHAPES[len(shape)].pack(*shape) if len(shape) <= MAX_NDIM else struct.pack(f"<{len(shape)}Q", *shape), payload))
    return body + hmac.digest(secret, body, "sha256") if secret else body


def encode(kind: Kind, *, secret: bytes | None, src: int = NO_RANK, seq: int = 0, flags: int = 0,
           tensor: torch.Tensor | None = None, obj: Any = None, version: int = PROTOCOL_VERSION, job: int = 0, counter: int = 0) -> list[bytes | memoryview]:
    if tensor is not None:
        code, shape, payload = tensor_bytes(tensor)
    else:
        code, shape = DType.NONE, ()
        payload = json.dumps(obj if obj is not None else {}, separators=(",", ":")).encode()
    header = _FIXED.pack(MAGIC, version, int(kind), src, flags, seq, int(code), len(shape), 0, job, counter, len(payload)) + struct.pack(f"<{len(shape)}Q", *shape)
    return [header, payload, _mac(secret, header, payload)]


def _split(frame: Any) -> tuple[memoryview, memoryview, memoryview, memoryview]:
    """A one-frame message's (header, payload, mac, header + payload), cut where its header says
    (bounds checked; the MAC covers the header, so a forged boundary fails it)."""
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    if len(buf) < _FIXED.size:
        raise ProtocolError(f"header of {len(buf)} bytes is truncated")
    ndim, length = buf[_NDIM_AT], int.from_bytes(buf[_LENGTH_AT:_FIXED.size], "little")
    end = _FIXED.size + 8 * min(ndim, MAX_NDIM + 1)
    if length > len(buf) - end:
        raise ProtocolError(f"payload of {max(len(buf) - end, 0)} bytes, header says {length}")
    return buf[:end], buf[end:end + length], buf[end + length:], buf[:end + length]


def decode(frames: list[Any], *, secret: bytes | None, max_payload: int = DEFAULT_MAX_PAYLOAD, job: int | None = None) -> Message:
    """frames: the three frames of a message (bytes, buffers or zmq.Frames). job: the nonce the
    frame must carry; a frame of another job is refused (None: not checked). Counters are the
    receiver's to check, per stream (ReplayGuard)."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}")
    header, payload, mac = (f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames)
    return _decode(header, payload, mac, None, secret, max_payload, job)


def decode_frame(frame: Any, *, secret: bytes | None, max_payload: int = DEFAULT_MAX_PAYLOAD, job: int | None = None) -> Message:
    """The one frame of `encode_frame` (bytes, a buffer or a zmq.Frame), checked as `decode` checks three."""
    header, payload, mac, signed = _split(frame)
    return _decode(header, payload, mac, signed, secret, max_payload, job)


def _decode(header: memoryview, payload: memoryview, mac: memoryview, signed: memoryview | None, secret: bytes | None,
            max_payload: int, job: int | None) -> Message:
    """signed: header + payload as one buffer (the one-frame form), else None."""
    if len(header) < _FIXED.size:
        raise ProtocolError(f"header of {len(header)} bytes is truncated")
    magic, version, kind, src, flags, seq, code, ndim, _, frame_job, counter, length = _FIXED.unpack_from(header)
    if magic != MAGIC:
        raise ProtocolError("bad magic: not a tp-runtime message")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {PROTOCOL_VERSION}; upgrade the older side")
    if secret:
        # one frame: header and payload are one run of bytes, hashed in one call
        expected = hmac.digest(secret, signed, "sha256") if signed is not None else _mac(secret, bytes(header), payload)
        if not hmac.compare_digest(bytes(mac), expected):
            raise ProtocolError("message not authenticated: missing or wrong MAC (the peer uses another secret, or none)")
    elif len(mac):
        raise ProtocolError("message carries a MAC but this side has no secret configured")
    if job is not None and frame_job != job:
        raise ProtocolError(f"a frame of job {frame_job:#x}, expected job {job:#x} (left over from another job or session, or replayed)")
    kind_, code_ = _KINDS.get(kind), _DTYPES.get(code)
    if kind_ is None or code_ is None:
        raise ProtocolError(f"unknown message kind {kind} or dtype {code}")
    kind, code = kind_, code_
    if ndim > MAX_NDIM or len(header) != _FIXED.size + 8 * ndim:
        raise ProtocolError(f"header length {len(header)} does not match {ndim} dimensions")
    if length != len(payload) or length > max_payload:
        raise ProtocolError(f"payload of {len(payload)} bytes, header says {length} (limit {max_payload})")
    if (code is not DType.NONE) != (kind in TENSOR_KINDS):
        raise ProtocolError(f"a {kind.name} frame must carry {'a tensor' if kind in TENSOR_KINDS else 'JSON'}, this one has dtype {code.name}")
    shape = _SHAPES[ndim].unpack_from(header, _FIXED.size)
    msg = Message(kind, src, seq, flags, frame_job, counter)
    if code is DType.NONE:
        if ndim:
            raise ProtocolError(f"a JSON payload with a shape of {ndim} dimensions")
        try:
            msg.obj = json.loads(bytes(payload).decode()) if length else None
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, too many digits, nested too deep
            raise ProtocolError(f"control payload is not JSON ({str(e)[:100]})") from None
        if kind is not Kind.OBJECT and not isinstance(msg.obj, (dict, type(None))):
            raise ProtocolError(f"a {kind.name} payload must be a JSON object, got {type(msg.obj).__name__}")
        return msg
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:  # (2**48, 2**48, 0) holds no bytes, and breaks reshape
        raise ProtocolError(f"shape {list(shape)} is larger than any tensor")
    dtype = _TORCH[code]
    if math.prod(shape) * _ITEMSIZE[code] != length:
        raise ProtocolError(f"payload of {length} bytes does not hold a {dtype} tensor of shape {list(shape)}")
    # a writable copy of the payload (the receive buffer is zmq's, and read-only)
    msg.tensor = torch.frombuffer(bytearray(payload), dtype=dtype).reshape(shape) if length else torch.empty(shape, dtype=dtype)
    return msg


class ReplayGuard:
    """The last counter seen on each stream (named by the receiver: a peer and its channel).
    A frame must carry a larger one: a repeated, reordered or replayed frame is refused. Gaps
    are allowed (a reconnecting socket may lose frames; it never reorders them)."""

    def __init__(self) -> None:
        self.last: dict[Hashable, int] = {}

    def check(self, stream: Hashable, msg: Message) -> None:
        """Call only on an authenticated, decoded message: a forged one must not move the counter."""
        last = self.last.get(stream, 0)
        if msg.counter <= last:
            raise ProtocolError(f"{msg.kind.name} frame #{msg.counter} after #{last}: repeated or out of sequence (a replay?)")
        self.last[stream] = msg.counter
