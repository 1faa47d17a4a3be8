"""The worker control channel: a coordinator's DEALER per worker, a worker's ROUTER.

Carries the handshake, the job, streamed weights and the end-of-job messages (protocol.py).
Bad messages are dropped with one log line: a worker on a network must survive anything.

Sessions: HELLO opens one and carries the coordinator's fresh nonce, WELCOME the worker's; every
later frame carries the receiver's nonce and the sender's next counter, and each side drops a
frame that does not (protocol.ReplayGuard). A recorded session played back to a worker opens a
new session whose nonce the recording cannot know, so its JOB is dropped. A worker keeps at most
MAX_SESSIONS sessions (the least recently heard goes first, never the running job's), so a flood
of HELLOs costs it bounded memory.

Keys: in a keyed network the ROUTER is a CURVE server admitting the authorized keys (the
context's keys.Gate, CONTROL_DOMAIN) and each DEALER a CURVE client pinned to its worker's key.
A failed handshake is named from the DEALER's monitor events: the worker refused our key, it
holds another key than the pinned one, or one side has keys and the other none.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from tp_runtime.comm.keys import CONTROL_DOMAIN, CurveClient, CurveServer, JobKeys, Keypair
from tp_runtime.comm.protocol import DEFAULT_MAX_PAYLOAD, Kind, Message, ProtocolError, ReplayGuard, decode, encode, new_nonce
from tp_runtime.comm.sockets import make_socket
from tp_runtime.comm.zmq_transport import bind_inbox
from tp_runtime.errors import WorkerError

log = logging.getLogger("tp_runtime.control")

MAX_SESSIONS = 64
# unread messages a worker holds per connection: what one client (a fuzzer, a coordinator streaming
# weights ahead) can make it buffer is this many messages, not zmq's default thousand
RECV_QUEUE = 4
_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class ControlClient:
    """Coordinator side of one worker's control channel.

    curve: the DEALER's keys and the worker's pinned key (None: plain); pinned_at: where that pin
    was read (file:line), named when the worker turns out to hold another key."""

    def __init__(self, ctx: zmq.Context, endpoint: str, secret: bytes | None, name: str,
                 curve: CurveClient | None = None, pinned_at: str = "") -> None:
        self.endpoint, self.secret, self.name, self.curve, self.pinned_at = endpoint, secret, name, curve, pinned_at
        self.sock = make_socket(ctx, zmq.DEALER, curve=curve)
        self.monitor = self.sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        self.sock.connect(endpoint)
        self.nonce, self.peer_nonce = new_nonce(), None
        self.sent = 0
        self.guard = ReplayGuard()
        self.trouble: str | None = None  # the last dropped message or failed handshake, for the timeout's message

    def send(self, kind: Kind, obj: Any = None, tensor: torch.Tensor | None = None, seq: int = 0) -> None:
        if kind is Kind.HELLO:
            job = self.nonce  # the challenge: the worker's answers must carry it
        elif self.peer_nonce is None:
            raise WorkerError(f"{kind.name} to worker {self.name} before its WELCOME")
        else:
            job = self.peer_nonce
        self.sent += 1
        self.sock.send_multipart(encode(kind, secret=self.secret, seq=seq, obj=obj, tensor=tensor, job=job, counter=self.sent), copy=False)

    def recv(self, timeout_s: float, waiting_for: str) -> Message:
        deadline = time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                why = f" ({self.trouble})" if self.trouble else ""
                raise WorkerError(f"worker {self.name} did not answer within {timeout_s:.0f} s ({waiting_for}){why}; "
                                  f"is it running and reachable, with the same secret?")
            ready = dict(poller.poll(max(1, int(left * 1000))))
            if self.monitor in ready:
                self._handshake_events()
            if self.sock in ready:
                msg = self._take()
                if msg is not None:
                    return msg

    def check(self) -> None:
        """Non-blocking: raise if the worker reported an error."""
        while self.sock.poll(0):
            self._take()

    def _take(self) -> Message | None:
        """The next message, or None when it was dropped (logged); REJECT and ERROR raise."""
        try:
            msg = decode(self.sock.recv_multipart(), secret=self.secret, job=self.nonce)
            self.guard.check("worker", msg)
            if msg.kind is Kind.WELCOME:
                nonce = (msg.obj or {}).get("nonce")
                if not isinstance(nonce, int) or not 0 < nonce < 1 << 64:
                    raise ProtocolError("WELCOME without a session nonce (a worker of an older version?)")
                self.peer_nonce = nonce
        except ProtocolError as e:
            log.warning("dropped a message from worker %s: %s", self.name, e)
            self.trouble = f"it sent only bad messages, the last: {e}"
            return None
        if msg.kind is Kind.REJECT:
            raise WorkerError(f"worker {self.name} refused: {(msg.obj or {}).get('reason', 'no reason given')}")
        if msg.kind is Kind.ERROR:
            raise WorkerError(f"worker {self.name} failed: {(msg.obj or {}).get('message', 'no message')}")
        return msg

    def _handshake_events(self) -> None:
        """Turn a failed ZeroMQ handshake into the reason, at once (libzmq only retries, silently)."""
        while self.monitor.poll(0):
            ev = recv_monitor_message(self.monitor)
            event, value = ev["event"], ev["value"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                continue
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise WorkerError(f"worker {self.name} refused this coordinator's key {self.curve.keys.public_text if self.curve else ''}: "
                                  f"add it to the worker's authorized-keys file (one key a line; the worker re-reads the file)")
            if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                if self.curve:
                    raise WorkerError(f"worker {self.name} runs without keys while this coordinator has --worker-keys: "
                                      f"start the worker with --keys DIR (or run both without keys on loopback)")
                raise WorkerError(f"worker {self.name} requires keys (CURVE) and this coordinator has none: pass --worker-keys DIR "
                                  f"and pin the worker's public key in the known-workers file")
            if self.curve:  # the worker could not open our HELLO: it is not the key we hold for it
                raise WorkerError(
                    f"worker {self.name} does not hold the key pinned for it in {self.pinned_at or 'the known-workers file'} "
                    f"(the CURVE handshake failed). If its keys were made anew on purpose, put its new public key on that line "
                    f"(`tp-worker --keys DIR --show-key` on that machine prints it); otherwise something else answers at {self.name}")
            if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # a keyed worker may drop a plain client before saying why (seen under load)
                self.trouble = (f"the ZeroMQ handshake failed ({zmq.Event(event).name}, {value}): the worker probably requires keys (CURVE) and this "
                                f"coordinator has none: pass --worker-keys DIR (or it is not a tp-worker of this version)")
            else:
                self.trouble = f"the ZeroMQ handshake failed ({zmq.Event(event).name}, {value}): is a tp-worker of this version listening there?"

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


@dataclass
class _Session:
    nonce: int  # ours: every frame from the coordinator must carry it
    peer_nonce: int  # the coordinator's, from its HELLO: every frame we send carries it
    sent: int = 0
    guard: ReplayGuard = field(default_factory=ReplayGuard)


class ControlServer:
    """Worker side: one ROUTER socket that any coordinator may talk to (if it knows the secret,
    and in a keyed network if its key is authorized)."""

    def __init__(self, ctx: zmq.Context, listen: str, secret: bytes | None, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 keys: Keypair | None = None) -> None:
        self.ctx, self.secret, self.max_payload, self.keys = ctx, secret, max_payload, keys
        self.sock = make_socket(ctx, zmq.ROUTER, max_message_bytes=max_payload + (1 << 20), recv_queue=RECV_QUEUE,
                                curve=CurveServer(keys, CONTROL_DOMAIN) if keys else None)
        self.sock.bind(listen)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sessions: OrderedDict[bytes, _Session] = OrderedDict()
        self.held: bytes | None = None  # the running job's coordinator: its session is never evicted

    def recv(self, timeout_s: float) -> tuple[bytes, Message] | None:
        """The next valid message and its sender, or None on timeout. Bad ones are logged and dropped."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(max(1, int(left * 1000))):
                return None
            frames = self.sock.recv_multipart(copy=False)
            peer, body = frames[0].bytes, frames[1:]
            try:
                msg = decode(body, secret=self.secret, max_payload=self.max_payload)
                self._admit(peer, msg)
                return peer, msg
            except ProtocolError as e:
                log.warning("dropped a message from %s: %s", peer.hex()[:8], e)

    def _admit(self, peer: bytes, msg: Message) -> None:
        if msg.kind is Kind.HELLO:
            if not msg.job:
                raise ProtocolError("a HELLO without a session nonce")
            session = _Session(new_nonce(), msg.job)
            session.guard.check("coordinator", msg)
            self.sessions.pop(peer, None)
            self.sessions[peer] = session
            while len(self.sessions) > MAX_SESSIONS:
                del self.sessions[next(p for p in self.sessions if p != self.held)]
            return
        session = self.sessions.get(peer)
        if session is None:
            raise ProtocolError(f"a {msg.kind.name} before any HELLO on its connection")
        if msg.job != session.nonce:
            raise ProtocolError(f"a {msg.kind.name} for session {msg.job:#x}, not this connection's: replayed or stale")
        session.guard.check("coordinator", msg)
        self.sessions.move_to_end(peer)

    def welcome(self, peer: bytes, info: dict[str, Any]) -> None:
        """Answer a HELLO; the reply carries this session's nonce, which the coordinator echoes from now on."""
        self.send(peer, Kind.WELCOME, {**info, "nonce": self.sessions[peer].nonce})

    def send(self, peer: bytes, kind: Kind, obj: Any = None, tensor: torch.Tensor | None = None, seq: int = 0) -> None:
        session = self.sessions.get(peer)
        if session is None:
            raise WorkerError("no session with that coordinator (it never said HELLO, or was forgotten)")
        session.sent += 1
        frames = encode(kind, secret=self.secret, seq=seq, obj=obj, tensor=tensor, job=session.peer_nonce, counter=session.sent)
        self.sock.send_multipart([peer, *frames], copy=False)

    def bind_data(self, host: str, keys: JobKeys | None = None) -> tuple[Any, int]:
        return bind_inbox(self.ctx, host, keys=keys)

    def close(self) -> None:
        self.sock.close(0)
