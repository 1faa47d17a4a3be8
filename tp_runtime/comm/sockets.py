"""Every pyzmq socket of the worker network is made here: data inboxes and outboxes, heartbeats,
the control channel. One place sets what all of them need (no linger at close, a message-size
limit a peer cannot exceed, a bounded send queue where asked), so that what every socket must
carry (encryption keys, next) is added once.
"""

from __future__ import annotations

import zmq

from tp_runtime.comm.protocol import DEFAULT_MAX_PAYLOAD

# a frame bigger than the largest weight slice plus its header is an attack or a bug: zmq drops
# the peer that sends one
MAX_MESSAGE_BYTES = DEFAULT_MAX_PAYLOAD + (1 << 20)


def new_context() -> zmq.Context:
    return zmq.Context()


def make_socket(ctx: zmq.Context, kind: int, *, send_queue: int | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES) -> zmq.Socket:
    """A socket of `kind` (zmq.PULL, PUSH, DEALER, ROUTER) with the network's common options;
    send_queue: at most this many messages queued for a slow or dead peer (heartbeats)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if send_queue is not None:
        sock.setsockopt(zmq.SNDHWM, send_queue)
    return sock
