"""Wire protocol of the pyzmq transport and the worker control channel. No pickle on the wire.

A message is three ZeroMQ frames: [header, payload, mac].

    header = MAGIC "TPRT" | version u16 | kind u16 | src u16 | flags u16 | seq u64 |
             dtype u8 | ndim u8 | reserved u16 | epoch u32 | payload_len u64 | shape u64 x ndim
    payload: raw tensor bytes (kind TENSOR, WEIGHTS) or UTF-8 JSON (control kinds)
    mac: HMAC-SHA256(secret, header + payload) when a shared secret is set, else empty

Message kinds and dtypes are IntEnums with pinned numbers: a number never changes meaning;
new kinds get new numbers and a protocol version bump where old peers would misread them.
`decode` checks everything (frame count, magic, version, kind, sizes against the header, the
MAC) and raises ProtocolError, so that a receiver can drop a bad message with one log line.

The epoch (version 2) names the job a data-plane frame belongs to: the coordinator draws one per
job, and a rank drops a frame of another epoch (a late frame of an earlier job, or of a group
that has re-formed since). Control messages carry epoch 0 and are not checked.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from tp_runtime.errors import TPRuntimeError

MAGIC = b"TPRT"
PROTOCOL_VERSION = 2  # 2: the epoch field
_FIXED = struct.Struct("<4sHHHHQBBHIQ")
MAX_NDIM = 8
DEFAULT_MAX_PAYLOAD = 4 << 30  # 4 GiB: the largest weight slice we expect in one frame
NO_RANK = 0xFFFF


class ProtocolError(TPRuntimeError):
    """A message that is malformed, from another protocol version, or not authenticated."""


class Kind(enum.IntEnum):
    HELLO = 1  # coordinator -> worker: {"version", "role"}
    WELCOME = 2  # worker -> coordinator: {"version", "host", "models", "cached"}
    REJECT = 3  # worker -> coordinator: {"reason"}
    JOB = 4  # coordinator -> worker: the job spec (JSON)
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
    epoch: int = 0
    tensor: torch.Tensor | None = None
    obj: Any = None


def _mac(secret: bytes | None, header: bytes, payload: bytes | memoryview) -> bytes:
    if not secret:
        return b""
    m = hmac.new(secret, header, hashlib.sha256)
    m.update(payload)
    return m.digest()


def encode(kind: Kind, *, secret: bytes | None, src: int = NO_RANK, seq: int = 0, flags: int = 0,
           tensor: torch.Tensor | None = None, obj: Any = None, version: int = PROTOCOL_VERSION, epoch: int = 0) -> list[bytes | memoryview]:
    if tensor is not None:
        t = tensor.detach().contiguous().cpu()
        code = _CODE.get(t.dtype)
        if code is None:
            raise ProtocolError(f"dtype {t.dtype} cannot be sent")
        payload = t.view(torch.uint8).reshape(-1).numpy().data if t.numel() else b""
        shape = tuple(t.shape)
    else:
        code, shape = DType.NONE, ()
        payload = json.dumps(obj if obj is not None else {}, separators=(",", ":")).encode()
    header = _FIXED.pack(MAGIC, version, int(kind), src, flags, seq, int(code), len(shape), 0, epoch, len(payload)) + struct.pack(f"<{len(shape)}Q", *shape)
    return [header, payload, _mac(secret, header, payload)]


def decode(frames: list[Any], *, secret: bytes | None, max_payload: int = DEFAULT_MAX_PAYLOAD, epoch: int | None = None) -> Message:
    """epoch: the job's; a frame of another one is refused (None: not checked, the control channel)."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}")
    header, payload, mac = (f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames)
    header = bytes(header)
    if len(header) < _FIXED.size:
        raise ProtocolError(f"header of {len(header)} bytes is truncated")
    magic, version, kind, src, flags, seq, code, ndim, _, frame_epoch, length = _FIXED.unpack_from(header)
    if magic != MAGIC:
        raise ProtocolError("bad magic: not a tp-runtime message")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {PROTOCOL_VERSION}; upgrade the older side")
    if secret:
        if not hmac.compare_digest(bytes(mac), _mac(secret, header, payload)):
            raise ProtocolError("message not authenticated: missing or wrong MAC (the peer uses another secret, or none)")
    elif len(mac):
        raise ProtocolError("message carries a MAC but this side has no secret configured")
    if epoch is not None and frame_epoch != epoch:
        raise ProtocolError(f"a frame of epoch {frame_epoch}, this job is epoch {epoch} (left over from another job)")
    try:
        kind = Kind(kind)
        code = DType(code)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind} or dtype {code}") from None
    if ndim > MAX_NDIM or len(header) != _FIXED.size + 8 * ndim:
        raise ProtocolError(f"header length {len(header)} does not match {ndim} dimensions")
    if length != len(payload) or length > max_payload:
        raise ProtocolError(f"payload of {len(payload)} bytes, header says {length} (limit {max_payload})")
    shape = struct.unpack_from(f"<{ndim}Q", header, _FIXED.size)
    msg = Message(kind, src, seq, flags, frame_epoch)
    if code is DType.NONE:
        try:
            msg.obj = json.loads(bytes(payload).decode()) if length else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolError(f"control payload is not JSON ({e})") from None
        return msg
    dtype = _TORCH[code]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if math.prod(shape) * itemsize != length:
        raise ProtocolError(f"payload of {length} bytes does not hold a {dtype} tensor of shape {list(shape)}")
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if length else torch.empty(0, dtype=torch.uint8)
    msg.tensor = raw.view(dtype).reshape(shape)
    return msg
