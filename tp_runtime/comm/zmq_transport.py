"""pyzmq transport: ranks on different machines exchange activations peer to peer.

Each rank binds one PULL socket (its inbox) and connects one PUSH socket to every peer's
inbox. A collective is numbered (seq); every rank issues the same collectives in the same
order, so messages are matched by (seq, src) and buffered if they arrive early.

All-reduce: for the small messages of decode (one hidden vector) a direct exchange (every
rank sends its tensor to every other and sums all p tensors in rank order) needs one network
step; a ring (reduce-scatter + all-gather, 2(p-1) steps) moves less data per rank and wins for
large tensors. `ring_threshold_bytes` picks between them (bench/collectives.py measures the
crossover). Both give bit-identical results on every rank, which keeps the ranks' sampling in
step.

Liveness: a background thread sends a HEARTBEAT to every peer every `heartbeat_s`. A rank that
waits for a peer whose last sign of life is older than `dead_after_s` raises WorkerError
naming it, so a dead or hung machine ends the job within seconds, never a hang.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

import torch
import zmq

from tp_runtime.comm.protocol import Kind, ProtocolError, decode, encode
from tp_runtime.comm.sockets import make_socket, new_context
from tp_runtime.communicator import check_splits
from tp_runtime.errors import WorkerError

log = logging.getLogger("tp_runtime.zmq")

DEFAULT_RING_THRESHOLD = 1 << 20  # bench/collectives.py: ring wins from 1 MiB (4 ranks) / 2 MiB (2 ranks)


def bind_inbox(ctx: zmq.Context, host: str = "127.0.0.1", port: int | None = None) -> tuple[zmq.Socket, int]:
    """A PULL socket on `port` (default: a free one) of `host` (0.0.0.0: every interface); returns (socket, port)."""
    sock = make_socket(ctx, zmq.PULL)
    if port is None:
        port = sock.bind_to_random_port(f"tcp://{host}")
    else:
        sock.bind(f"tcp://{host}:{port}")
    return sock, port


class _Heartbeat(threading.Thread):
    def __init__(self, ctx: zmq.Context, rank: int, peers: list[str], secret: bytes | None, interval: float, epoch: int) -> None:
        super().__init__(daemon=True, name=f"tp-heartbeat-{rank}")
        self.ctx, self.rank, self.peers, self.secret, self.interval, self.epoch = ctx, rank, peers, secret, interval, epoch
        self.stop_event = threading.Event()

    def run(self) -> None:
        socks = []
        for r, ep in enumerate(self.peers):
            if r == self.rank:
                continue
            s = make_socket(self.ctx, zmq.PUSH, send_queue=4)  # a dead peer must not pile up heartbeats
            s.connect(ep)
            socks.append(s)
        try:
            while not self.stop_event.is_set():
                frames = encode(Kind.HEARTBEAT, secret=self.secret, src=self.rank, epoch=self.epoch)
                for s in socks:
                    try:
                        s.send_multipart(frames, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                self.stop_event.wait(self.interval)
        finally:
            for s in socks:
                s.close(0)


class ZmqCommunicator:
    transport = "zmq"

    def __init__(
        self,
        ctx: zmq.Context,
        rank: int,
        peers: list[str],
        inbox: zmq.Socket,
        secret: bytes | None = None,
        names: list[str] | None = None,
        heartbeat_s: float = 0.5,
        dead_after_s: float = 4.0,
        ring_threshold_bytes: int = DEFAULT_RING_THRESHOLD,
        watch: Callable[[], None] | None = None,
        epoch: int = 0,
    ) -> None:
        """peers: every rank's inbox endpoint, by rank (this rank's own entry is unused).
        names: how to name each rank in errors (e.g. the worker's host:port).
        watch: called while waiting, may raise (the coordinator checks its control channel).
        epoch: the job's number (protocol.py); frames of another epoch are dropped."""
        self.ctx, self.rank, self.world_size = ctx, rank, len(peers)
        self.secret, self.inbox = secret, inbox
        self.names = names or [f"rank {r}" for r in range(self.world_size)]
        self.dead_after_s, self.ring_threshold, self.watch = dead_after_s, ring_threshold_bytes, watch
        self.seq, self.epoch = 0, epoch
        self.outbox: dict[int, zmq.Socket] = {}
        for r, ep in enumerate(peers):
            if r != rank:
                s = make_socket(ctx, zmq.PUSH)
                s.connect(ep)
                self.outbox[r] = s
        self.early: dict[tuple[int, int], Any] = {}
        now = time.monotonic()
        self.last_seen = {r: now for r in self.outbox}
        self.heartbeat = _Heartbeat(ctx, rank, peers, secret, heartbeat_s, epoch)
        self.heartbeat.start()
        self.poller = zmq.Poller()
        self.poller.register(inbox, zmq.POLLIN)

    @classmethod
    def on_loopback(cls, rank: int, ports: list[int], **kw: Any) -> ZmqCommunicator:
        """Rank `rank` of local ranks whose inboxes are 127.0.0.1:ports[r] (benchmarks, tests)."""
        ctx = new_context()
        inbox, _ = bind_inbox(ctx, "127.0.0.1", port=ports[rank])
        comm = cls(ctx, rank, [f"tcp://127.0.0.1:{p}" for p in ports], inbox, **kw)
        comm.owned_context = ctx
        return comm

    # -- point to point --
    def _send(self, dst: int, seq: int, step: int = 0, tensor: torch.Tensor | None = None, obj: Any = None) -> None:
        kind = Kind.TENSOR if tensor is not None else Kind.OBJECT
        frames = encode(kind, secret=self.secret, src=self.rank, seq=seq, flags=step, tensor=tensor, obj=obj, epoch=self.epoch)
        self.outbox[dst].send_multipart(frames, copy=False)

    def _recv(self, src: int, seq: int, step: int = 0) -> Any:
        """The message of collective `seq` (sub-step `step`, for multi-step algorithms) from `src`."""
        key = (seq, step, src)
        next_check = time.monotonic() + 0.1
        while key not in self.early:
            if dict(self.poller.poll(100)).get(self.inbox):
                self._drain()
                if key in self.early or time.monotonic() < next_check:
                    continue
            # on the clock, not only when the inbox is quiet: live peers' heartbeats keep it busy
            next_check = time.monotonic() + 0.1
            if self.watch is not None:
                self.watch()
            silent = time.monotonic() - self.last_seen[src]
            if silent > self.dead_after_s:
                raise WorkerError(
                    f"{self.names[src]} (rank {src}) stopped responding: no data or heartbeat for {silent:.1f} s "
                    f"while rank {self.rank} waited for collective #{seq}; it died, hung or lost the network"
                )
        return self.early.pop(key)

    def _drain(self) -> None:
        while True:
            try:
                frames = self.inbox.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = decode(frames, secret=self.secret, epoch=self.epoch)
            except ProtocolError as e:
                log.warning("rank %d: dropped a message: %s", self.rank, e)
                continue
            if msg.src not in self.last_seen:
                log.warning("rank %d: dropped a message from unknown rank %d", self.rank, msg.src)
                continue
            self.last_seen[msg.src] = time.monotonic()
            if msg.kind is Kind.TENSOR:
                self.early[(msg.seq, msg.flags, msg.src)] = msg.tensor
            elif msg.kind is Kind.OBJECT:
                self.early[(msg.seq, msg.flags, msg.src)] = msg.obj
            elif msg.kind is not Kind.HEARTBEAT:
                log.warning("rank %d: unexpected %s on the data channel", self.rank, msg.kind.name)

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # -- collectives --
    def _exchange(self, t: torch.Tensor, seq: int) -> list[torch.Tensor]:
        """Every rank's `t`, in rank order (one network step)."""
        for r in self.outbox:
            self._send(r, seq, tensor=t)
        return [t if r == self.rank else self._recv(r, seq).to(t.device) for r in range(self.world_size)]

    def all_reduce(self, t: torch.Tensor, *, site: str) -> torch.Tensor:
        seq = self._next_seq()
        if t.numel() * t.element_size() >= self.ring_threshold and t.numel() >= self.world_size:
            return self._ring_all_reduce(t, seq)
        parts = self._exchange(t.detach().contiguous(), seq)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p  # rank order on every rank: bit-identical results everywhere
        t.copy_(total)
        return t

    def _ring_all_reduce(self, t: torch.Tensor, seq: int) -> torch.Tensor:
        p, r = self.world_size, self.rank
        flat = t.detach().contiguous().view(-1)
        chunks = list(flat.chunk(p))
        right, left = (r + 1) % p, (r - 1) % p
        # reduce-scatter: after p-1 steps chunk (r+1) % p holds the full sum on rank r
        for step in range(p - 1):
            send_idx, recv_idx = (r - step) % p, (r - step - 1) % p
            self._send(right, seq, step, tensor=chunks[send_idx])
            chunks[recv_idx] += self._recv(left, seq, step).to(t.device)
        # all-gather of the reduced chunks
        for step in range(p - 1):
            send_idx, recv_idx = (r + 1 - step) % p, (r - step) % p
            self._send(right, seq, p + step, tensor=chunks[send_idx])
            chunks[recv_idx].copy_(self._recv(left, seq, p + step).to(t.device))
        if flat.data_ptr() != t.data_ptr():
            t.copy_(flat.view_as(t))
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1, *, site: str, out: torch.Tensor | None = None) -> torch.Tensor:
        parts = self._exchange(t.detach().contiguous(), self._next_seq())
        return torch.cat(parts, dim=dim) if out is None else torch.cat(parts, dim=dim, out=out)

    def all_to_all(self, t: torch.Tensor, send_splits: Sequence[int] | None = None, recv_splits: Sequence[int] | None = None, *, site: str) -> torch.Tensor:
        send, recv = check_splits(t, self.world_size, send_splits, recv_splits)
        seq = self._next_seq()
        chunks = t.contiguous().split(send, dim=0)
        for r in self.outbox:
            self._send(r, seq, tensor=chunks[r])  # empty chunks too: the peer waits for one message per rank
        parts = []
        for r in range(self.world_size):
            got = chunks[r] if r == self.rank else self._recv(r, seq).to(t.device).view(-1, *t.shape[1:])
            if got.shape[0] != recv[r]:
                raise WorkerError(f"all_to_all: {self.names[r]} (rank {r}) sent {got.shape[0]} rows where rank {self.rank} expected {recv[r]}")
            parts.append(got)
        return torch.cat(parts, dim=0)

    def broadcast(self, obj: Any, src: int = 0, *, site: str) -> Any:
        seq = self._next_seq()
        is_tensor = isinstance(obj, torch.Tensor)
        if self.rank == src:
            for r in self.outbox:
                self._send(r, seq, tensor=obj if is_tensor else None, obj=None if is_tensor else obj)
            return obj
        got = self._recv(src, seq)
        if is_tensor:
            obj.copy_(got)
            return obj
        return got

    def barrier(self, *, site: str) -> None:
        self.all_reduce(torch.zeros(1), site=site)

    def close(self) -> None:
        self.heartbeat.stop_event.set()
        self.heartbeat.join(timeout=2)
        for s in self.outbox.values():
            s.close(linger=1000)  # a peer may still wait for our last message: let it leave
        self.inbox.close(0)
        if getattr(self, "owned_context", None) is not None:
            self.owned_context.term()
