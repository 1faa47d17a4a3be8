"""The TCP data path of a worker job: one TCP connection per pair of ranks carries the
collectives' payloads, each frame sealed as the job's mode asks; zmq keeps what it does well
(the control channel, heartbeats, the set-up exchange: zmq_transport.py).

Why a second path: a zmq message crosses two libzmq I/O threads, each a thread hand-off, which
is most of a decode-sized collective's cost (a bare pyzmq round trip is ~1.9x a raw TCP one).
Here the rank's own thread writes the frame into the kernel and the waiting rank reads it
straight off the peer's socket.

Set-up (`build_mesh`). Every rank but the last binds a listener on its own data host (the host
its zmq inbox is bound to, a free port) and offers the port over the job's zmq path (already
authenticated, under CURVE encrypted), with, in a keyed job, a fresh random 32-byte key for each
pair it is the lower rank of. Rank j connects to every rank i < j and sends a HELLO frame sealed
with the pair's key; i accepts only a HELLO that opens with the key of the rank it names, which
has not joined yet, within HANDSHAKE_S of the connection, and answers with its own sealed HELLO.
Anything else (a stranger, garbage, silence) is dropped with a log line. Once every expected
peer is in, the listener is closed: no port stays open for the job's lifetime.

Frames: a fixed header (HEADER: magic, version, kind, dtype, src, dst, ndim, step, seq, job,
counter, payload length, 8 shape slots), the payload, and a 16-byte tag where the mode has one:
  keyed (CURVE job)  AES-GCM with the pair's key: the payload encrypted, the header authenticated
                     (per 8 KiB here 2.3 us to seal, 1.6 us to open; ChaCha20-Poly1305 3.0 / 3.2 us:
                     AES-NI); the header (sizes, counters) travels readable, as message sizes do anyway
  secret only        GMAC (AES-GCM over no plaintext, header + payload as associated data) with a
                     key derived from the secret, the job nonce and the pair: authenticated, not hidden
                     (1.2 us per 8 KiB, where HMAC-SHA256 takes 6.2 us)
  plain              no tag
The nonce is (src, dst, counter): each direction of a pair counts its own frames from 1 (0 is the
HELLO), so a key never sees a nonce twice. A receiver takes only the next counter, its own rank
as dst, the peer as src and the job's nonce: a frame that fails to open, repeats, comes out of
order or names another job means the TCP stream itself is compromised (a stream cannot lose or
reorder frames by accident), so it raises WorkerError naming the peer, never a silent drop.

Sending: sockets are non-blocking. Both ranks of an exchange send before they receive, and a
blocking send of a payload larger than the socket buffers would deadlock them both; so what the
kernel does not take at once waits in the link's backlog (a private copy: the collective may
overwrite the caller's tensor next), and moves whenever the rank waits (`wait` polls the
backlogged sockets for writing beside the one it reads). A collective returns with its backlog
flushed (zmq_transport), so a peer never waits on a rank that went back to computing.

Receiving: `wait(src, timeout)` polls the awaited peer's socket and reads what is there into the
link's preallocated buffer (frames larger than it into a buffer of their own), handing each
complete frame to the caller; the caller runs its liveness checks between waits. A peer's
EOF or reset is named at once (LinkClosed).

Limits: the listener is open from the communicator's construction to the end of the first
collective (weights load in between; connections wait in its backlog of 64 until the mesh is
built, so a flood during loading can delay or fail the set-up: a refusal of service, never a
join). A frame carries at most MAX_PAYLOAD bytes (a larger message is refused by name). In a
plain job a changed payload byte goes unseen, as on the zmq path; only order and job are checked.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import select
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tp_runtime.comm.protocol import MAX_ELEMENTS, MAX_NDIM, DType, Kind, tensor_bytes, torch_dtype
from tp_runtime.errors import WorkerError

log = logging.getLogger("tp_runtime.tcp_data")

MAGIC = b"TPDL"
VERSION = 1
# magic version kind dtype src dst ndim | step seq job counter length | shape, padded to 128 bytes so that a
# payload read into a frame's own buffer is aligned for any dtype (it backs the tensor)
HEADER = struct.Struct(f"<4sHBBHHB3xIQQQQ{MAX_NDIM}Q12x")
TAG = 16
assert HEADER.size % 16 == 0
KEY_BYTES = 32
HANDSHAKE_S = 5.0  # a connection to the listener must prove its key this soon, or it is dropped
CONNECT_S = 5.0
MAX_STRANGERS = 16  # connections to the listener still owing a HELLO; beyond it the oldest goes
BUFFER_BYTES = 256 << 10  # a link's receive buffer and send buffer; larger frames get their own
MAX_PAYLOAD = 1 << 30  # AES-GCM in `cryptography` takes at most 2**31 - 1 bytes a call
_NONCE = struct.Struct("<HHQ")


class LinkClosed(WorkerError):
    """A peer's data link ended (EOF or reset): the peer died or left the job."""


class PeerAborted(WorkerError):
    """A peer ended the job for a reason it sent first (`DataLinks.abort`): typically a third rank
    that died. Without it, a rank reading the aborting peer's closed link would name that peer,
    alive, instead of the dead one (the TCP path notices a death at once, so the cascade is fast)."""


# -- sealing, per mode --


class _Plain:
    """No key (a plain job): frames carry the counter check only, as the zmq path's do."""

    tag = 0
    hides = False  # the payload travels as it is: a frame's own buffer can back the tensor

    def seal(self, nonce: bytes, frame: memoryview, n: int, payload: Any) -> None:
        frame[HEADER.size:HEADER.size + n] = payload

    def open(self, nonce: bytes, frame: memoryview, n: int, out: bytearray | None) -> memoryview:
        return frame[HEADER.size:HEADER.size + n]


class _Keyed:
    """A sealed mode's AES-GCM with the pair's key and a 16-byte tag a frame."""

    tag = TAG

    def __init__(self, key: bytes) -> None:
        self.aes = AESGCM(key)


class _Mac(_Keyed):
    """The shared secret's mode: GMAC over header + payload (authenticated, readable, as the HMAC of the zmq path)."""

    hides = False

    def seal(self, nonce: bytes, frame: memoryview, n: int, payload: Any) -> None:
        end = HEADER.size + n
        frame[HEADER.size:end] = payload
        frame[end:end + TAG] = self.aes.encrypt(nonce, b"", frame[:end])

    def open(self, nonce: bytes, frame: memoryview, n: int, out: bytearray | None) -> memoryview:
        end = HEADER.size + n
        self.aes.decrypt(nonce, frame[end:end + TAG], frame[:end])  # raises InvalidTag
        return frame[HEADER.size:end]


class _Aead(_Keyed):
    """A keyed job's mode: the payload encrypted and the header authenticated (AES-GCM)."""

    hides = True

    def seal(self, nonce: bytes, frame: memoryview, n: int, payload: Any) -> None:
        self.aes.encrypt_into(nonce, payload, frame[:HEADER.size], frame[HEADER.size:HEADER.size + n + TAG])

    def open(self, nonce: bytes, frame: memoryview, n: int, out: bytearray | None) -> memoryview | bytearray:
        body = frame[HEADER.size:HEADER.size + n + TAG]
        if out is None:
            return memoryview(self.aes.decrypt(nonce, body, frame[:HEADER.size]))
        self.aes.decrypt_into(nonce, body, frame[:HEADER.size], out)
        return out


def new_key() -> bytes:
    """A pair's fresh key for one job (the lower rank draws it and offers it over CURVE)."""
    return os.urandom(KEY_BYTES)


def pair_seal(job: int, a: int, b: int, *, keyed: bool, secret: bytes | None, drawn: bytes | None) -> _Plain | _Mac | _Aead:
    """The seal of the link between ranks a and b. keyed: a CURVE job, `drawn` its random key;
    secret: the shared secret, mixed into the key in both sealed modes (a frame then needs both,
    as a zmq frame needs CURVE and the HMAC)."""
    if keyed and drawn is None:
        raise WorkerError(f"no data-link key for ranks {min(a, b)} and {max(a, b)} in a keyed job")
    if not keyed and not secret:
        return _Plain()
    key = drawn or b""
    if secret:
        key = hmac.digest(secret, b"tp-runtime data link" + struct.pack("<QHH", job, min(a, b), max(a, b)) + key, "sha256")
    return _Aead(key) if keyed else _Mac(key)


# -- frames --


@dataclass
class Header:
    kind: int
    dtype: int
    src: int
    dst: int
    step: int
    seq: int
    job: int
    counter: int
    length: int
    shape: tuple[int, ...]


def _parse(view: memoryview) -> Header:
    """The header at the front of `view`, checked for what must hold before its payload is read
    (the rest is checked once the seal is open)."""
    magic, version, kind, dtype, src, dst, ndim, step, seq, job, counter, length, *shape = HEADER.unpack_from(view)
    if magic != MAGIC or version != VERSION:
        raise _Broken(f"a frame without the data link's magic/version (got {bytes(magic)!r} v{version})")
    if ndim > MAX_NDIM or length > MAX_PAYLOAD or max(shape[:ndim], default=0) > MAX_ELEMENTS:
        raise _Broken(f"a frame header with {ndim} dimensions {shape[:ndim]} and {length} bytes")
    return Header(kind, dtype, src, dst, step, seq, job, counter, length, tuple(shape[:ndim]))


def _tensor_dtype(h: Header) -> torch.dtype | None:
    """The dtype of a TENSOR frame whose dtype, shape and length agree; None otherwise."""
    dtype = torch_dtype(h.dtype)
    if h.kind != Kind.TENSOR or dtype is None or math.prod(h.shape) * dtype.itemsize != h.length:
        return None
    return dtype


class _Broken(Exception):
    """What is wrong with a frame (the caller names the peer)."""


def _pack(frame: memoryview, kind: int, dtype: int, src: int, dst: int, step: int, seq: int, job: int, counter: int, length: int,
          shape: tuple[int, ...]) -> None:
    HEADER.pack_into(frame, 0, MAGIC, VERSION, kind, dtype, src, dst, len(shape), step, seq, job, counter, length,
                     *shape, *(0,) * (MAX_NDIM - len(shape)))


def hello_size(seal: Any) -> int:
    return HEADER.size + seal.tag


def hello_frame(seal: Any, job: int, src: int, dst: int) -> bytes:
    """The handshake: an empty frame sealed with the pair's key (counter 0)."""
    frame = memoryview(bytearray(hello_size(seal)))
    _pack(frame, Kind.HELLO, DType.NONE, src, dst, 0, 0, job, 0, 0, ())
    seal.seal(_NONCE.pack(src, dst, 0), frame, 0, b"")
    return bytes(frame)


def check_hello(frame: memoryview, seal: Any, job: int, src: int, dst: int) -> str | None:
    """Why `frame` is not src's HELLO to dst in this job, or None."""
    try:
        h = _parse(frame)
        seal.open(_NONCE.pack(src, dst, 0), frame, 0, None)
    except (_Broken, InvalidTag, struct.error) as e:
        return str(e) or "its seal does not open with the pair's key"
    if (h.kind, h.src, h.dst, h.job, h.counter, h.length) != (Kind.HELLO, src, dst, job, 0, 0):
        return f"a {h.kind} frame from rank {h.src} to rank {h.dst} of job {h.job:#x}, not rank {src}'s HELLO to rank {dst} of job {job:#x}"
    return None


# -- the links of one rank --


class _Link:
    """One peer's connection: its socket, seal, counters, receive buffer and send backlog."""

    def __init__(self, sock: socket.socket, peer: int, name: str, seal: Any) -> None:
        self.sock, self.peer, self.name, self.seal = sock, peer, name, seal
        self.fd = sock.fileno()
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)
        self.sent = self.received = 0  # frames each way (the HELLOs were 0)
        self.rbuf = bytearray(BUFFER_BYTES)
        self.rview = memoryview(self.rbuf)
        self.start = self.end = 0  # unread bytes of rbuf
        self.big: tuple[Header, memoryview, int] | None = None  # a frame larger than rbuf: header, its buffer, bytes filled
        self.sview = memoryview(bytearray(BUFFER_BYTES))
        self.backlog: deque[memoryview] = deque()


class DataLinks:
    """The TCP links of one rank to every peer of its job (made by build_mesh)."""

    def __init__(self, rank: int, job: int, socks: dict[int, socket.socket], seals: dict[int, Any], names: list[str]) -> None:
        """socks: a connected socket per peer (build_mesh's, or a test's socketpair), seals: each pair's."""
        self.rank, self.job = rank, job
        for sock in socks.values():
            _configure(sock)
        self.links = {peer: _Link(sock, peer, names[peer], seals[peer]) for peer, sock in socks.items()}
        self.backlogged: set[int] = set()  # peers with bytes the kernel has not taken yet

    # -- sending --
    def send(self, dst: int, kind: Kind, seq: int, step: int, tensor: torch.Tensor | None = None, obj: Any = None) -> None:
        link = self.links[dst]
        if tensor is not None:
            code, shape, payload = tensor_bytes(tensor)
        else:
            code, shape, payload = DType.NONE, (), json.dumps(obj, separators=(",", ":")).encode()
        n = len(payload)
        if n > MAX_PAYLOAD:
            raise WorkerError(f"a message of {n} bytes to {link.name} (rank {dst}): the data link takes at most {MAX_PAYLOAD} a frame")
        total = HEADER.size + n + link.seal.tag
        own = total > BUFFER_BYTES or bool(link.backlog)  # the link's buffer is reused at once: a frame that may wait gets its own
        frame = memoryview(bytearray(total)) if own else link.sview[:total]
        link.sent += 1
        _pack(frame, kind, code, self.rank, dst, step, seq, self.job, link.sent, n, shape)
        link.seal.seal(_NONCE.pack(self.rank, dst, link.sent), frame, n, payload)
        if link.backlog:
            link.backlog.append(frame)
            return
        done = self._write(link, frame)
        if done < total:
            link.backlog.append(frame[done:] if own else memoryview(bytes(frame[done:])))
            self.backlogged.add(dst)

    def _write(self, link: _Link, view: memoryview) -> int:
        try:
            return link.sock.send(view)
        except BlockingIOError:
            return 0
        except OSError as e:
            raise LinkClosed(f"{link.name} (rank {link.peer}) stopped responding: its data link broke while rank {self.rank} sent to it "
                             f"({e.strerror or e}); it died or left the job") from None

    def _drain_backlog(self, link: _Link) -> None:
        while link.backlog:
            head = link.backlog[0]
            done = self._write(link, head)
            if done < len(head):
                link.backlog[0] = head[done:]
                return
            link.backlog.popleft()
        self.backlogged.discard(link.peer)

    # -- receiving --
    def wait(self, src: int | None, timeout_s: float, sink: Callable[[Header, Any], None]) -> None:
        """Wait up to timeout_s for frames from src (None: from any peer) and hand each complete
        one to sink(header, tensor or object); backlogged sends move meanwhile."""
        ms = max(0, int(timeout_s * 1000 + 0.999))
        if not self.backlogged and src is not None:
            link = self.links[src]
            if link.poller.poll(ms):
                self._read(link, sink)
            return
        poller = select.poll()
        by_fd = {}
        for peer, link in self.links.items():
            mask = (select.POLLIN if src is None or peer == src else 0) | (select.POLLOUT if peer in self.backlogged else 0)
            if mask:
                poller.register(link.fd, mask)
                by_fd[link.fd] = link
        for fd, ev in poller.poll(ms):
            link = by_fd[fd]
            if ev & select.POLLOUT and link.backlog:
                self._drain_backlog(link)
            if ev & ~select.POLLOUT:
                self._read(link, sink)

    def _recv_into(self, link: _Link, view: memoryview) -> int:
        try:
            got = link.sock.recv_into(view)
        except BlockingIOError:
            return -1
        except OSError as e:
            raise LinkClosed(f"{link.name} (rank {link.peer}) stopped responding: its data link was reset ({e.strerror or e}) while "
                             f"rank {self.rank} read from it; it died or lost the network") from None
        if got == 0:
            raise LinkClosed(f"{link.name} (rank {link.peer}) stopped responding: it closed its data link (end of stream) while "
                             f"rank {self.rank} read from it; it died or left the job")
        return got

    def _read(self, link: _Link, sink: Callable[[Header, Any], None]) -> None:
        """Read what the socket holds, hand on every complete frame."""
        while True:
            if link.big is not None:
                if not self._read_big(link, sink):
                    return
                continue
            if link.start and (link.end == len(link.rbuf) or link.start == link.end):
                n = link.end - link.start  # room at the end: the partial frame moves to the front
                link.rbuf[:n] = link.rview[link.start:link.end]
                link.start, link.end = 0, n
            room = len(link.rbuf) - link.end
            got = self._recv_into(link, link.rview[link.end:])
            if got < 0:
                return
            link.end += got
            self._frames(link, sink)
            if got < room:
                return  # the socket is empty: no second call to find that out

    def _frames(self, link: _Link, sink: Callable[[Header, Any], None]) -> None:
        """Every complete frame in the buffer, opened and handed on; a too large one gets its own buffer."""
        while link.end - link.start >= HEADER.size:
            frame = link.rview[link.start:link.end]
            h = self._header(link, frame)
            total = HEADER.size + h.length + link.seal.tag
            if total > len(link.rbuf):
                own = memoryview(bytearray(total))
                have = link.end - link.start
                own[:have] = frame
                link.big, link.start, link.end = (h, own, have), 0, 0
                return
            if len(frame) < total:
                return
            link.start += total
            sink(h, self._open(link, h, frame[:total], private=False))
        if link.start == link.end:
            link.start = link.end = 0

    def _read_big(self, link: _Link, sink: Callable[[Header, Any], None]) -> bool:
        h, own, filled = link.big
        got = self._recv_into(link, own[filled:])
        if got < 0:
            return False
        filled += got
        if filled < len(own):
            link.big = (h, own, filled)
            return True
        link.big = None
        sink(h, self._open(link, h, own, private=True))
        return True

    def _header(self, link: _Link, frame: memoryview) -> Header:
        try:
            return _parse(frame)
        except _Broken as e:
            raise self._compromised(link, str(e)) from None

    def _open(self, link: _Link, h: Header, frame: memoryview, private: bool) -> Any:
        """The frame's tensor or object, after its seal, sender, receiver, job and counter check out.
        private: the frame is in a buffer of its own (a large one), which can back the tensor unless encrypted."""
        dtype = _tensor_dtype(h)
        # the tensor's memory: decrypted straight into it, or the payload copied out of the link's reused buffer
        out = bytearray(h.length) if dtype is not None and h.length and (link.seal.hides or not private) else None
        try:
            payload = link.seal.open(_NONCE.pack(h.src, h.dst, h.counter), frame, h.length, out)
        except (InvalidTag, ValueError):
            raise self._compromised(link, f"frame #{link.received + 1} does not open with the pair's key (tampered, forged, or sealed for another job)") from None
        if h.job != self.job:
            raise self._compromised(link, f"a frame of job {h.job:#x}, expected job {self.job:#x} (left over from another job, or replayed)")
        if (h.src, h.dst) != (link.peer, self.rank):
            raise self._compromised(link, f"a frame from rank {h.src} to rank {h.dst} on the link from rank {link.peer} to rank {self.rank}")
        if h.counter != link.received + 1:
            raise self._compromised(link, f"frame #{h.counter} after #{link.received}: repeated, reordered or dropped (a replay?)")
        link.received = h.counter
        if dtype is not None:
            if not h.length:
                return torch.empty(h.shape, dtype=dtype)
            if out is not None and payload is not out:
                out[:] = payload
            t = torch.frombuffer(payload if out is None else out, dtype=dtype)  # cheaper than torch.empty and a view of its bytes
            return t if len(h.shape) == 1 else t.reshape(h.shape)
        if h.kind in (Kind.OBJECT, Kind.ERROR) and h.dtype == DType.NONE and not h.shape:
            try:
                obj = json.loads(bytes(payload))
            except (ValueError, RecursionError) as e:
                raise self._compromised(link, f"an {h.kind.name} frame that is not JSON ({str(e)[:80]})") from None
            if h.kind == Kind.OBJECT:
                return obj
            why = obj.get("message") if isinstance(obj, dict) else None
            raise PeerAborted(f"{str(why)[:2000]} (as reported by {link.name} (rank {link.peer}), which ended its part of the job)")
        raise self._compromised(link, f"a frame of kind {h.kind}, dtype {h.dtype}, shape {list(h.shape)} and {h.length} bytes")

    def _compromised(self, link: _Link, why: str) -> WorkerError:
        msg = (f"the data link from {link.name} (rank {link.peer}) to rank {self.rank} is compromised: {why}; "
               f"a TCP stream does not do that by accident, so the job stops")
        log.error("%s", msg)
        return WorkerError(msg)

    # -- the end --
    def abort(self, reason: str) -> None:
        """Tell every peer why this rank ends the job (best effort, before `close` sends the
        backlog): an ERROR frame, which the peer raises as PeerAborted naming the real cause."""
        for peer in self.links:
            try:
                self.send(peer, Kind.ERROR, 0, 0, obj={"message": reason})
            except WorkerError:  # that peer's link is already gone
                pass

    def close(self, linger_s: float = 1.0) -> None:
        """Send what is still backlogged (a peer may wait for it) for up to linger_s, then close."""
        deadline = time.monotonic() + linger_s
        try:
            while self.backlogged and time.monotonic() < deadline:
                self.wait(None, min(0.05, max(0.0, deadline - time.monotonic())), lambda h, v: None)
        except WorkerError:
            pass
        for link in self.links.values():
            link.sock.close()


# -- set-up --


class Listener:
    """The rank's listening socket for the job's set-up, on its own data host and a free port."""

    def __init__(self, host: str) -> None:
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, 0), family=family, backlog=64)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def _configure(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a decode message must leave now, not with the next one
    sock.setblocking(False)


@dataclass
class _Pending:
    """A connection that still owes its HELLO: a stranger's to the listener (peer None until it
    proves a key), or the answer of a peer this rank connected to."""

    sock: socket.socket
    deadline: float
    buf: bytearray
    got: int = 0
    peer: int | None = None


def build_mesh(rank: int, job: int, names: list[str], listener: Listener | None, connect_to: dict[int, tuple[str, int]],
               seals: dict[int, Any], check: Callable[[int], None], poll_s: float, timeout_s: float | None = None) -> DataLinks:
    """This rank's links: connected to every rank in connect_to (lower ranks, at their offered
    host and port), accepted from every higher rank on `listener`. check(rank) runs every
    poll_s for each rank still missing and may raise: it is what names a dead peer (a peer still loading its
    weights may take minutes to reach its first collective, so no deadline by default). The
    listener is closed on return, whatever happens."""
    size = hello_size(next(iter(seals.values())))  # one mode a job: every HELLO is this long
    expected = {r for r in seals if r > rank}
    links: dict[int, socket.socket] = {}
    pending: list[_Pending] = []
    deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
    try:
        for peer, (host, port) in connect_to.items():
            sock = _connect(host, port, peer, names, rank)
            pending.append(_Pending(sock, deadline, bytearray(size), peer=peer))
            _send_hello(sock, seals[peer], job, rank, peer, names)
        next_check = time.monotonic() + poll_s
        while missing := (expected - links.keys()) | {p.peer for p in pending if p.peer is not None}:
            now = time.monotonic()
            if now > deadline:
                raise WorkerError(f"rank {rank}: no data link with {', '.join(f'{names[r]} (rank {r})' for r in sorted(missing))} "
                                  f"within {timeout_s:.0f} s of the job's start")
            if now >= next_check:
                next_check = now + poll_s
                for r in sorted(missing):  # every rank still missing: any of them may be the dead one
                    check(r)
            pending = _expire(pending, now, rank)
            accepting = listener if expected - links.keys() else None
            for p in _ready(accepting, pending, max(0.0, next_check - time.monotonic())):
                if p is None:
                    _accept(accepting, pending, size, rank)
                elif _read_hello(p, rank, names):
                    pending.remove(p)
                    _admit(p, rank, job, names, seals, links)
        return DataLinks(rank, job, links, seals, names)
    except BaseException:
        for sock in links.values():
            sock.close()
        raise
    finally:
        if listener is not None:
            listener.close()  # no lasting open port: set-up is the only time anyone may connect
        for p in pending:
            p.sock.close()


def _connect(host: str, port: int, peer: int, names: list[str], rank: int) -> socket.socket:
    try:
        sock = socket.create_connection((host.strip("[]"), port), timeout=CONNECT_S)
    except OSError as e:
        raise LinkClosed(f"rank {rank} cannot open its data link to {names[peer]} (rank {peer}) at {host}:{port}: {e.strerror or e}") from None
    _configure(sock)
    return sock


def _send_hello(sock: socket.socket, seal: Any, job: int, src: int, dst: int, names: list[str]) -> None:
    try:  # ~130 bytes into a fresh connection's empty buffer: taken whole
        sock.send(hello_frame(seal, job, src, dst))
    except OSError as e:
        raise LinkClosed(f"{names[dst]} (rank {dst}) closed its data link during the handshake: {e.strerror or e}") from None


def _expire(pending: list[_Pending], now: float, rank: int) -> list[_Pending]:
    """Strangers that did not prove a key in time are dropped (a connected peer's silence is the caller's deadline)."""
    keep = []
    for p in pending:
        if p.peer is None and now > p.deadline:
            log.warning("rank %d: dropped a connection to its data listener: no valid HELLO within %.0f s", rank, HANDSHAKE_S)
            p.sock.close()
        else:
            keep.append(p)
    return keep


def _ready(listener: Listener | None, pending: list[_Pending], timeout_s: float) -> list[_Pending | None]:
    """The connections with something to read (None: the listener has one to accept), after up to timeout_s."""
    poller = select.poll()
    if listener is not None:
        poller.register(listener.sock.fileno(), select.POLLIN)
    by_fd: dict[int, _Pending | None] = {p.sock.fileno(): p for p in pending}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    if listener is not None:
        by_fd[listener.sock.fileno()] = None
    return [by_fd[fd] for fd, _ in poller.poll(int(timeout_s * 1000))]


def _accept(listener: Listener, pending: list[_Pending], size: int, rank: int) -> None:
    try:
        sock, _ = listener.sock.accept()
    except (BlockingIOError, ConnectionAbortedError):
        return
    _configure(sock)
    strangers = [p for p in pending if p.peer is None]
    if len(strangers) >= MAX_STRANGERS:  # a flood of idle connections must not take every file descriptor
        strangers[0].sock.close()
        pending.remove(strangers[0])
        log.warning("rank %d: dropped a connection to its data listener: too many owing a HELLO", rank)
    pending.append(_Pending(sock, time.monotonic() + HANDSHAKE_S, bytearray(size)))


def _read_hello(p: _Pending, rank: int, names: list[str]) -> bool:
    """Whether p's HELLO is complete now. A stranger that hangs up is given a deadline of now
    (dropped next round); a peer this rank connected to that hangs up fails the set-up."""
    try:
        got = p.sock.recv_into(memoryview(p.buf)[p.got:])
    except BlockingIOError:
        return False
    except OSError:
        got = 0
    if got == 0:
        if p.peer is not None:
            raise LinkClosed(f"{names[p.peer]} (rank {p.peer}) closed the data link rank {rank} opened to it, before its HELLO: "
                             f"it died, or took this connection for a stranger's")
        p.deadline = 0.0
        return False
    p.got += got
    return p.got == len(p.buf)


def _admit(p: _Pending, rank: int, job: int, names: list[str], seals: dict[int, Any], links: dict[int, socket.socket]) -> None:
    """A complete HELLO: the link, or (a stranger's that does not check out) the connection
    dropped. The answer of a peer this rank connected to must be right, or the set-up fails."""
    frame = memoryview(p.buf)
    if p.peer is not None:
        why = check_hello(frame, seals[p.peer], job, p.peer, rank)
        if why is not None:
            raise WorkerError(f"the data link rank {rank} opened to {names[p.peer]} (rank {p.peer}) did not answer with its HELLO: {why}")
        links[p.peer] = p.sock
        return
    src = HEADER.unpack_from(frame)[4]
    why = ("not a peer still expected" if src not in seals or src <= rank or src in links
           else check_hello(frame, seals[src], job, src, rank))
    if why is not None:
        log.warning("rank %d: dropped a connection to its data listener claiming rank %d: %s", rank, src, why)
        p.sock.close()
        return
    _send_hello(p.sock, seals[src], job, rank, src, names)
    links[src] = p.sock
