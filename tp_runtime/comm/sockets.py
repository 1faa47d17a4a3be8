"""Every pyzmq socket of the worker network is made here: data inboxes and outboxes, heartbeats,
the control channel. One place sets what all of them need: no linger at close, a message-size
limit a peer cannot exceed, a bounded send queue where asked, a short handshake deadline, and
CURVE keys when the network is keyed (keys.py), so no socket of a keyed job is left in the clear.
"""

from __future__ import annotations

import zmq

from tp_runtime.comm.keys import CurveClient, CurveServer, apply
from tp_runtime.comm.protocol import DEFAULT_MAX_PAYLOAD

# a frame bigger than the largest weight slice plus its header is an attack or a bug: zmq drops
# the peer that sends one
MAX_MESSAGE_BYTES = DEFAULT_MAX_PAYLOAD + (1 << 20)
# a connection that has not finished the ZMTP (and CURVE) handshake by then is dropped: half-open
# and slow-loris clients cost a worker a file descriptor for this long, not forever
HANDSHAKE_MS = 10_000


def new_context() -> zmq.Context:
    return zmq.Context()


def make_socket(ctx: zmq.Context, kind: int, *, send_queue: int | None = None, recv_queue: int | None = None,
                max_message_bytes: int = MAX_MESSAGE_BYTES, curve: CurveServer | CurveClient | None = None) -> zmq.Socket:
    """A socket of `kind` (zmq.PULL, PUSH, DEALER, ROUTER) with the network's common options;
    send_queue: at most this many messages queued for a slow or dead peer (heartbeats);
    recv_queue: at most this many unread messages per connection (beyond: zmq stops reading it);
    curve: the socket's CURVE role in a keyed network (None: plain TCP)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    if send_queue is not None:
        sock.setsockopt(zmq.SNDHWM, send_queue)
    if recv_queue is not None:
        sock.setsockopt(zmq.RCVHWM, recv_queue)
    if curve is not None:
        apply(sock, curve)
    return sock
