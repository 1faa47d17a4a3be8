"""The worker control channel: a coordinator's DEALER per worker, a worker's ROUTER.

Carries the handshake, the job, streamed weights and the end-of-job messages (protocol.py).
Bad messages are dropped with one log line: a worker on a network must survive anything.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import zmq

from tp_runtime.comm.protocol import DEFAULT_MAX_PAYLOAD, Kind, Message, ProtocolError, decode, encode
from tp_runtime.comm.sockets import make_socket
from tp_runtime.comm.zmq_transport import bind_inbox
from tp_runtime.errors import WorkerError

log = logging.getLogger("tp_runtime.control")


class ControlClient:
    """Coordinator side of one worker's control channel."""

    def __init__(self, ctx: zmq.Context, endpoint: str, secret: bytes | None, name: str) -> None:
        self.endpoint, self.secret, self.name = endpoint, secret, name
        self.sock = make_socket(ctx, zmq.DEALER)
        self.sock.connect(endpoint)

    def send(self, kind: Kind, obj: Any = None, tensor: torch.Tensor | None = None, seq: int = 0) -> None:
        self.sock.send_multipart(encode(kind, secret=self.secret, seq=seq, obj=obj, tensor=tensor), copy=False)

    def recv(self, timeout_s: float, waiting_for: str) -> Message:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise WorkerError(f"worker {self.name} did not answer within {timeout_s:.0f} s ({waiting_for}); is it running and reachable, with the same secret?")
            try:
                msg = decode(self.sock.recv_multipart(), secret=self.secret)
            except ProtocolError as e:
                raise WorkerError(f"worker {self.name} sent a bad message: {e}") from None
            if msg.kind is Kind.REJECT:
                raise WorkerError(f"worker {self.name} refused: {(msg.obj or {}).get('reason', 'no reason given')}")
            if msg.kind is Kind.ERROR:
                raise WorkerError(f"worker {self.name} failed: {(msg.obj or {}).get('message', 'no message')}")
            return msg

    def check(self) -> None:
        """Non-blocking: raise if the worker reported an error."""
        while self.sock.poll(0):
            try:
                msg = decode(self.sock.recv_multipart(), secret=self.secret)
            except ProtocolError as e:
                log.warning("dropped a bad message from worker %s: %s", self.name, e)
                continue
            if msg.kind in (Kind.ERROR, Kind.REJECT):
                raise WorkerError(f"worker {self.name} failed: {(msg.obj or {}).get('message') or (msg.obj or {}).get('reason')}")

    def close(self) -> None:
        self.sock.close(0)


class ControlServer:
    """Worker side: one ROUTER socket that any coordinator may talk to (if it knows the secret)."""

    def __init__(self, ctx: zmq.Context, listen: str, secret: bytes | None, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.ctx, self.secret, self.max_payload = ctx, secret, max_payload
        self.sock = make_socket(ctx, zmq.ROUTER, max_message_bytes=max_payload + (1 << 20))
        self.sock.bind(listen)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

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
                return peer, decode(body, secret=self.secret, max_payload=self.max_payload)
            except ProtocolError as e:
                log.warning("dropped a message from %s: %s", peer.hex()[:8], e)

    def send(self, peer: bytes, kind: Kind, obj: Any = None, tensor: torch.Tensor | None = None, seq: int = 0) -> None:
        self.sock.send_multipart([peer, *encode(kind, secret=self.secret, seq=seq, obj=obj, tensor=tensor)], copy=False)

    def bind_data(self, host: str) -> tuple[Any, int]:
        return bind_inbox(self.ctx, host)

    def close(self) -> None:
        self.sock.close(0)
