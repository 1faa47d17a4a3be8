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

Security: every frame carries the job's nonce and, per sender and socket, a strictly increasing
counter (protocol.py); a rank drops a frame of another job, a repeated or reordered one, or one
from a rank not in the job, with a log line. In a keyed job (keys.JobKeys) every socket is
CURVE: the inbox admits exactly the other ranks' keys (the context's keys.Gate), each outbox
talks only to its peer's key, and a frame must come over the connection of the rank it claims
to be from (the ZAP User-Id is the sender's key), so one rank cannot speak for another.

Liveness: a background thread sends a HEARTBEAT to every peer every `heartbeat_s`. A rank that
waits for a peer whose last sign of life is older than `dead_after_s` raises WorkerError
naming it, so a dead machine or a lost link ends the job within seconds, never a hang.

Cost per message (the decode step's collectives are a few KiB, 45 of them per token on TinyLlama):
a payload up to SINGLE_FRAME_BYTES travels as one frame (protocol.encode_frame: header, payload
and MAC in one buffer, copied into zmq once; under CURVE one encryption instead of three), is
received as bytes by one blocking recv with a POLL_MS timeout (no poller, no receive that raises
on an empty inbox), and checked by protocol.decode_frame, which checks what decode checks. What is
left is libzmq's own: a message crosses two I/O threads (the sender's and the receiver's), each a
thread hand-off, which a raw TCP socket does not pay (bench/collectives.py shows both). Larger
payloads go as three frames, the payload handed to libzmq without a copy: from a private copy of
the tensor, since libzmq reads it after send returns and the collective writes into the caller's.

Data path: `data_path="tcp"` (the default) moves the collectives' payloads over one raw TCP
connection per pair of ranks (tcp_data.py: framed, sealed per the job's mode, read by the waiting
rank itself), set up at the first collective from ports and keys each rank offers its peers over
this transport's sockets at construction (an OBJECT of collective #0); the zmq sockets then carry
only heartbeats. `data_path="zmq"` keeps every payload on the zmq sockets, as described above.
Liveness is the same on both: a waiting rank runs the dead and hung checks below every POLL_MS; on
the TCP path a peer's closed or reset connection is named at once besides.

Hangs: a rank whose main loop is stuck (a deadlock, an endless wait) while its heartbeat thread
lives still looks alive. So a heartbeat also carries the rank's progress: how many collectives
it has entered, whether it is inside one, and for how long it has been computing since it left
the last one. A waiting rank names a peer as hung when that peer has been computing for longer
than the stretch of work it is in should take, measured by the waiting rank itself (see
`Progress.allowance`): every rank runs the same plan, so the stretch between collective k-1
and k is the same work on every rank (its share of it), and the waiting rank has just done it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any, Callable, Sequence

import torch
import zmq

from tp_runtime.comm.keys import DATA_DOMAIN, CurveClient, CurveServer, Gate, JobKeys
from tp_runtime.comm.protocol import Kind, ProtocolError, ReplayGuard, decode, decode_frame, encode, encode_frame
from tp_runtime.comm.sockets import make_socket, new_context
from tp_runtime.comm.tcp_data import DataLinks, Header, Listener, build_mesh, new_key, pair_seal
from tp_runtime.communicator import check_splits
from tp_runtime.errors import WorkerError

log = logging.getLogger("tp_runtime.zmq")

DEFAULT_RING_THRESHOLD = 1 << 20  # bench/collectives.py: ring wins from 1 MiB (4 ranks) / 2 MiB (2 ranks)
# a payload up to this size goes as one frame (header + payload + mac, copied once); larger ones as
# three, the payload sent without a copy (pyzmq copies frames below its copy threshold, 64 KiB, anyway)
SINGLE_FRAME_BYTES = 64 << 10
POLL_MS = 100  # a waiting rank checks its peers' liveness (and `watch`) this often
DATA_PATHS = ("tcp", "zmq")
OFFER_SEQ = 0  # the TCP data path's offers travel as collective #0 (the collectives count from 1)
_MISSING = object()


def bind_inbox(ctx: zmq.Context, host: str = "127.0.0.1", port: int | None = None, keys: JobKeys | None = None) -> tuple[zmq.Socket, int]:
    """A PULL socket on `port` (default: a free one) of `host` (0.0.0.0: every interface); returns (socket, port).
    keys: a keyed job's: the inbox is a CURVE server admitting what the context's Gate admits for DATA_DOMAIN."""
    sock = make_socket(ctx, zmq.PULL, curve=CurveServer(keys.own, DATA_DOMAIN) if keys else None)
    if port is None:
        port = sock.bind_to_random_port(f"tcp://{host}")
    else:
        sock.bind(f"tcp://{host}:{port}")
    return sock, port


def _host(endpoint: str) -> str:
    """The host of a tcp://HOST:PORT endpoint."""
    return endpoint.split("://", 1)[-1].rsplit(":", 1)[0]


def _sender_key(frame: zmq.Frame) -> str | None:
    """The public key the frame's connection authenticated with (the Gate makes it the ZAP User-Id)."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None


HANG_SLACK = 10.0  # a peer may take this many times as long as this rank took for the same stretch of work
SEGMENTS_KEPT = 4096  # own compute times remembered, by collective (peers are never that far behind)


class Progress:
    """This rank's progress through the job's collectives (written by the main thread, read by
    the heartbeat thread), and what the peers last reported of theirs.

    The hang rule. Between two collectives every rank computes the same stretch of the same
    plan (its share of it), so the time this rank spent computing from leaving collective k-1
    to entering k is a measure of what the stretch costs: a prefill's stretch of thousands of
    tokens takes seconds, a decode step's a millisecond. A peer that has entered k-1 but not
    k, and has computed for longer than `floor_s + slack * (this rank's time for it)`, is hung.
    The floor absorbs scheduling noise and the heartbeat period (a slow peer's hiccup, a page
    fault burst); the slack factor admits a peer up to `slack` times slower than this rank (an
    unequal machine: an equal split on a 3x slower peer is well inside 10x). Before its first
    collective a peer is loading, which differs legitimately between ranks (streamed slices, a
    slower disk): no hang is called there, only death (silence). Durations travel, never
    timestamps: the ranks' clocks are not compared. Not covered: a stretch that costs one rank
    far more than the others by design, beyond the floor (a layer that rank alone streams from a
    slow disk, its plan differing from the waiting rank's): it would be named as hung."""

    def __init__(self, floor_s: float, slack: float) -> None:
        self.floor_s, self.slack = floor_s, slack
        self.entered = 0  # collectives entered (the one in flight counts)
        self.inside = False  # in a collective now
        self.left_at = time.monotonic()  # when the last collective returned (or the job began)
        self.compute_s: dict[int, float] = {}  # collective k -> seconds this rank computed before entering it
        self.peers: dict[int, tuple[int, bool, float, float]] = {}  # rank -> (entered, inside, busy_s, local time of the report)

    # -- this rank (main thread) --
    def enter(self) -> None:
        now = time.monotonic()
        self.compute_s[self.entered + 1] = now - self.left_at
        self.compute_s.pop(self.entered + 1 - SEGMENTS_KEPT, None)
        self.inside = True
        self.entered += 1

    def leave(self) -> None:
        self.left_at = time.monotonic()
        self.inside = False

    def report(self) -> tuple[int, bool, float]:
        """(entered, inside, seconds computing since the last collective) for a heartbeat."""
        inside = self.inside
        return self.entered, inside, 0.0 if inside else time.monotonic() - self.left_at

    # -- the peers --
    def heard(self, src: int, entered: int, inside: bool, busy_s: float) -> None:
        """A peer's report (a heartbeat), or the sign that it entered collective `entered` (its
        data arrived: inside, busy 0). Heartbeats and data come over different sockets, so the
        furthest report wins; at equal progress the heartbeat, which also says it has left."""
        last = self.peers.get(src)
        if last is None or entered > last[0] or (entered == last[0] and (not inside or busy_s > 0)):
            self.peers[src] = (entered, inside, busy_s, time.monotonic())

    def allowance(self, k: int) -> float | None:
        """Seconds a peer may compute before entering collective k (None: no measure yet)."""
        own = self.compute_s.get(k)
        return None if own is None else self.floor_s + self.slack * own

    def hung(self, waiting_for: int, last_seen: dict[int, float], fresh_s: float) -> tuple[int, float, float, float] | None:
        """A peer behind collective `waiting_for` (which this rank waits in) that has computed
        past its allowance while still heard from within fresh_s (a silent one is the death
        check's: named as stopped responding): (rank, seconds computing, this rank's seconds for
        that stretch, allowance); None if every peer is within its own."""
        now = time.monotonic()
        for src, (entered, inside, busy_s, at) in self.peers.items():
            if inside or entered == 0 or entered >= waiting_for or now - last_seen[src] > fresh_s:
                continue  # in a collective (the peer it waits for is the one to blame), loading, there, or silent
            allowed = self.allowance(entered + 1)
            busy = busy_s + (now - at)
            if allowed is not None and busy > allowed:
                return src, busy, self.compute_s[entered + 1], allowed
        return None


class _Heartbeat(threading.Thread):
    def __init__(self, ctx: zmq.Context, rank: int, peers: list[str], secret: bytes | None, interval: float, job: int, keys: JobKeys | None,
                 progress: Progress) -> None:
        super().__init__(daemon=True, name=f"tp-heartbeat-{rank}")
        self.ctx, self.rank, self.peers, self.secret, self.interval, self.job, self.keys = ctx, rank, peers, secret, interval, job, keys
        self.progress = progress
        self.stop_event = threading.Event()

    def run(self) -> None:
        socks = []
        for r, ep in enumerate(self.peers):
            if r == self.rank:
                continue
            curve = CurveClient(self.keys.own, self.keys.ranks[r]) if self.keys else None
            s = make_socket(self.ctx, zmq.PUSH, send_queue=4, curve=curve)  # a dead peer must not pile up heartbeats
            s.connect(ep)
            socks.append(s)
        counter = 0  # one count for all peers: each still sees it increase
        try:
            while not self.stop_event.is_set():
                counter += 1
                # the main loop's progress: collectives entered (seq), inside one (flags), computing for how long
                entered, inside, busy_s = self.progress.report()
                frame = encode_frame(Kind.HEARTBEAT, secret=self.secret, src=self.rank, job=self.job, counter=counter, seq=entered,
                                     flags=int(inside), obj={"busy_ms": int(busy_s * 1000)})
                for s in socks:
                    try:
                        s.send(frame, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                self.stop_event.wait(self.interval)
        finally:
            for s in socks:
                s.close(0)


def _collective(fn: Callable) -> Callable:
    """A public collective: its entry and exit mark this rank's progress (heartbeats carry it)."""

    @functools.wraps(fn)
    def run(self: ZmqCommunicator, *args: Any, **kwargs: Any) -> Any:
        self.progress.enter()
        try:
            if self.data_path == "tcp" and self.links is None:
                self._mesh()
            out = fn(self, *args, **kwargs)
            if self.links is not None and self.links.backlogged:
                self._flush()  # a peer may still wait for the rest of this collective's messages
            return out
        except WorkerError as e:
            if self.links is not None:
                self.links.abort(str(e))  # the peers learn the cause before they see this rank's links close
            raise
        finally:
            self.progress.leave()

    return run


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
        job: int = 0,
        keys: JobKeys | None = None,
        hang_after_s: float | None = None,
        hang_slack: float = HANG_SLACK,
        data_path: str = "tcp",
    ) -> None:
        """peers: every rank's inbox endpoint, by rank (this rank's own entry is unused).
        names: how to name each rank in errors (e.g. the worker's host:port).
        watch: called while waiting, may raise (the coordinator checks its control channel).
        job: the job's nonce (protocol.py); frames of another job are dropped.
        keys: a keyed job's (the inbox must then come from bind_inbox with the same keys, and
        the context's Gate admit the other ranks' keys for DATA_DOMAIN).
        hang_after_s, hang_slack: a peer computing longer than hang_after_s (default dead_after_s)
        + hang_slack x what this rank took for the same stretch is named as hung (Progress).
        data_path: "tcp" (payloads over the job's TCP links, tcp_data.py) or "zmq" (over these sockets)."""
        if data_path not in DATA_PATHS:
            raise WorkerError(f"data path {data_path!r} is not one of {', '.join(DATA_PATHS)}")
        self.ctx, self.rank, self.world_size = ctx, rank, len(peers)
        self.secret, self.inbox, self.keys = secret, inbox, keys
        self.names = names or [f"rank {r}" for r in range(self.world_size)]
        if keys is not None and (len(keys.ranks) != self.world_size or not inbox.getsockopt(zmq.CURVE_SERVER)):
            raise WorkerError(f"a keyed job needs a key for each of its {self.world_size} ranks ({len(keys.ranks)} given) and a CURVE inbox")
        self.dead_after_s, self.ring_threshold, self.watch = dead_after_s, ring_threshold_bytes, watch
        self.seq, self.job = 0, job
        self.outbox: dict[int, zmq.Socket] = {}
        for r, ep in enumerate(peers):
            if r != rank:
                s = make_socket(ctx, zmq.PUSH, curve=CurveClient(keys.own, keys.ranks[r]) if keys else None)
                s.connect(ep)
                self.outbox[r] = s
        self.sent = {r: 0 for r in self.outbox}  # frames sent to each peer: the counter they check
        self.guard = ReplayGuard()
        self.early: dict[tuple[int, int], Any] = {}
        now = time.monotonic()
        self.last_seen = {r: now for r in self.outbox}
        self.fresh_s = 3 * heartbeat_s  # heard from within this: alive (hung, not dead)
        self.progress = Progress(dead_after_s if hang_after_s is None else hang_after_s, hang_slack)
        self.heartbeat = _Heartbeat(ctx, rank, peers, secret, heartbeat_s, job, keys, self.progress)
        self.heartbeat.start()
        # a blocking receive that returns at least every POLL_MS: one call into libzmq per
        # message (no poller, no NOBLOCK attempt that raises when the inbox is empty)
        inbox.setsockopt(zmq.RCVTIMEO, POLL_MS)
        self.sender_keys = {r: keys.ranks[r].decode() for r in self.outbox} if keys is not None else None
        self.data_path = data_path
        self.transport = "zmq+tcp" if data_path == "tcp" else "zmq"  # what --json reports
        self.links: DataLinks | None = None  # the TCP data path's, from the first collective on
        self.listener: Listener | None = None
        self._next_check = time.monotonic() + POLL_MS / 1000
        if data_path == "tcp":
            self._offer(peers)

    @classmethod
    def on_loopback(cls, rank: int, ports: list[int], keys: JobKeys | None = None, **kw: Any) -> ZmqCommunicator:
        """Rank `rank` of local ranks whose inboxes are 127.0.0.1:ports[r] (benchmarks, tests)."""
        ctx = new_context()
        gate = None
        if keys is not None:
            gate = Gate(ctx)
            gate.admit(DATA_DOMAIN, keys.others(rank))
        inbox, _ = bind_inbox(ctx, "127.0.0.1", port=ports[rank], keys=keys)
        comm = cls(ctx, rank, [f"tcp://127.0.0.1:{p}" for p in ports], inbox, keys=keys, **kw)
        comm.owned_context, comm.owned_gate = ctx, gate
        return comm

    # -- the TCP data path's set-up --
    def _offer(self, peers: list[str]) -> None:
        """Listen on this rank's own data host (its inbox's) for the higher ranks, and offer each
        peer the port and, in a keyed job, a fresh key for the pair when this rank is the lower
        one (over CURVE: nobody else reads it). The links are made at the first collective."""
        self.hosts = [_host(ep) for ep in peers]
        if self.rank < self.world_size - 1:
            self.listener = Listener(_host(self.inbox.getsockopt(zmq.LAST_ENDPOINT).decode()))
        self.drawn = {r: new_key() for r in self.outbox if r > self.rank} if self.keys is not None else {}
        for r in self.outbox:
            key = self.drawn.get(r)
            self._send_zmq(r, OFFER_SEQ, obj={"data_port": self.listener.port if self.listener else 0, "key": key.hex() if key else None})

    def _mesh(self) -> None:
        offers = {r: self._offered(r, self._recv_zmq(r, OFFER_SEQ)) for r in self.outbox}
        seals = {r: pair_seal(self.job, self.rank, r, keyed=self.keys is not None, secret=self.secret, drawn=self.drawn.get(r) or offers[r][1])
                 for r in self.outbox}
        connect_to = {r: (self.hosts[r], offers[r][0]) for r in self.outbox if r < self.rank}
        listener, self.listener = self.listener, None  # build_mesh closes it
        self.links = build_mesh(self.rank, self.job, self.names, listener, connect_to, seals, lambda r: self._checks(r, OFFER_SEQ), POLL_MS / 1000)

    def _offered(self, src: int, offer: Any) -> tuple[int, bytes | None]:
        """(port, key) of a peer's offer, checked: a lower rank offers a port, and in a keyed job a key."""
        port, key = (offer.get("data_port"), offer.get("key")) if isinstance(offer, dict) else (None, None)
        needs_key = self.keys is not None and src < self.rank
        try:
            key = bytes.fromhex(key) if needs_key else None
        except (TypeError, ValueError):
            key = b""
        if (src < self.rank and not (isinstance(port, int) and 0 < port < 65536)) or (needs_key and len(key) != 32):
            raise WorkerError(f"{self.names[src]} (rank {src}) offered no usable data link (port {port!r}{', no 32-byte key' if needs_key else ''}): "
                              f"a tp-runtime of another version?")
        return port, key

    # -- point to point --
    def _send(self, dst: int, seq: int, step: int = 0, tensor: torch.Tensor | None = None, obj: Any = None) -> None:
        if self.links is not None:
            self.links.send(dst, Kind.TENSOR if tensor is not None else Kind.OBJECT, seq, step, tensor=tensor, obj=obj)
        else:
            self._send_zmq(dst, seq, step, tensor, obj)

    def _send_zmq(self, dst: int, seq: int, step: int = 0, tensor: torch.Tensor | None = None, obj: Any = None) -> None:
        kind = Kind.TENSOR if tensor is not None else Kind.OBJECT
        self.sent[dst] += 1
        if tensor is None or tensor.numel() * tensor.element_size() <= SINGLE_FRAME_BYTES:
            # one frame, copied into zmq: a small frame costs less copied than pinned (and under
            # CURVE one message is one encryption)
            self.outbox[dst].send(encode_frame(kind, secret=self.secret, src=self.rank, seq=seq, flags=step, tensor=tensor, obj=obj,
                                               job=self.job, counter=self.sent[dst]))
            return
        # three frames, the payload handed to libzmq without a copy: its I/O thread reads it after
        # send returns, so it must be memory nobody writes to again. The caller's tensor is not:
        # the all-reduce writes its sum into it (and the ring its chunks) as soon as the peer's
        # part is in, which could reach the wire before this rank's own (a wrong sum on the peer)
        frames = encode(kind, secret=self.secret, src=self.rank, seq=seq, flags=step, tensor=tensor.detach().clone(memory_format=torch.contiguous_format),
                        job=self.job, counter=self.sent[dst])
        self.outbox[dst].send_multipart(frames, copy=False)

    def _recv(self, src: int, seq: int, step: int = 0) -> Any:
        """The message of collective `seq` (sub-step `step`, for multi-step algorithms) from `src`."""
        return self._recv_tcp(src, seq, step) if self.links is not None else self._recv_zmq(src, seq, step)

    def _recv_tcp(self, src: int, seq: int, step: int) -> Any:
        """Off src's TCP link (frames for later collectives wait in `early`)."""
        key = (seq, step, src)
        early = self.early
        while True:
            got = early.pop(key, _MISSING)
            if got is not _MISSING:
                return got
            self.links.wait(src, self._tick(src, seq), self._file)

    def _flush(self) -> None:
        """Until every backlogged send has left (reading whatever arrives meanwhile)."""
        while self.links.backlogged:
            self.links.wait(None, self._tick(min(self.links.backlogged), self.seq), self._file)

    def _tick(self, src: int, seq: int) -> float:
        """The liveness checks when their clock says so (also while data flows without a wait, so
        heartbeats never pile up unread); the seconds until the next."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + POLL_MS / 1000
            self._checks(src, seq)
        return self._next_check - now

    def _file(self, h: Header, value: Any) -> None:
        """A TCP frame, checked by DataLinks: kept by (seq, step, src); the peer is alive and has entered that collective."""
        self.last_seen[h.src] = time.monotonic()
        self.early[(h.seq, h.step, h.src)] = value
        self.progress.heard(h.src, h.seq, True, 0.0)

    def _recv_zmq(self, src: int, seq: int, step: int = 0) -> Any:
        key = (seq, step, src)
        early = self.early
        got = early.pop(key, _MISSING)
        if got is not _MISSING:
            return got
        next_check = time.monotonic() + POLL_MS / 1000
        while True:
            try:
                self._take(self._receive(0))
            except zmq.Again:  # nothing for POLL_MS
                pass
            else:
                self._drain()  # what else has arrived (the fair queue may have served a live peer before a stale frame)
                got = early.pop(key, _MISSING)
                if got is not _MISSING:
                    return got
                if time.monotonic() < next_check:
                    continue
            # on the clock, not only when the inbox is quiet: live peers' heartbeats keep it busy
            next_check = time.monotonic() + POLL_MS / 1000
            self._checks(src, seq)

    def _checks(self, src: int, seq: int) -> None:
        """While waiting for src in collective seq: the coordinator's watch, then src's death and any peer's hang."""
        if self.data_path == "tcp":
            self._drain()  # heartbeats: the inbox is not read otherwise on the TCP path
        if self.watch is not None:
            self.watch()
        silent = time.monotonic() - self.last_seen[src]
        if silent > self.dead_after_s:
            raise WorkerError(
                f"{self.names[src]} (rank {src}) stopped responding: no data or heartbeat for {silent:.1f} s "
                f"while rank {self.rank} waited for collective #{seq}; it died, hung or lost the network"
            )
        if (hung := self.progress.hung(seq, self.last_seen, self.fresh_s)) is not None:
            r, busy, own, allowed = hung
            raise WorkerError(
                f"{self.names[r]} (rank {r}) hung: its main loop has not reached collective "
                f"#{self.progress.peers[r][0] + 1} for {busy:.1f} s, where rank {self.rank} computed that stretch in "
                f"{own * 1e3:.1f} ms (allowed: {self.progress.floor_s:g} s + {self.progress.slack:g} x that = {allowed:.1f} s); "
                f"its heartbeat still arrives, so the process lives but its compute loop is stuck"
            )

    def _receive(self, flags: int) -> list[Any]:
        """One message's frames off the inbox (blocking up to POLL_MS, or zmq.NOBLOCK); raises zmq.Again.
        A one-frame message comes as bytes (cheaper than a zmq.Frame for a few KiB), except under
        CURVE, where the frame's metadata names the connection's key; the parts of a three-frame
        one (large payloads) as zmq.Frames, the payload not copied."""
        first = self.inbox.recv(flags, copy=self.keys is None)
        if self.inbox.getsockopt(zmq.RCVMORE):
            return [first, *self.inbox.recv_multipart(copy=False)]
        return [first]

    def _drain(self) -> None:
        """Take every message already in the inbox, without waiting (asks the socket first: a
        receive that finds nothing raises, which costs more)."""
        inbox = self.inbox
        while inbox.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = self._receive(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._take(frames)

    def _take(self, frames: list[Any]) -> None:
        """Check one message (job, MAC, sender, counter) and file it: data by (seq, step, src), a
        heartbeat into the peers' progress; a bad one is dropped with a log line."""
        try:
            msg = decode_frame(frames[0], secret=self.secret, job=self.job) if len(frames) == 1 else decode(frames, secret=self.secret, job=self.job)
            if msg.src not in self.last_seen:
                raise ProtocolError(f"a frame from rank {msg.src}, not a peer of this job")
            if self.sender_keys is not None and _sender_key(frames[0]) != self.sender_keys[msg.src]:
                raise ProtocolError(f"a frame that claims to come from rank {msg.src} arrived over another rank's connection")
            # heartbeats come over their own socket: a stream of their own
            self.guard.check((msg.src, msg.kind is Kind.HEARTBEAT), msg)
            if self.data_path == "tcp" and msg.kind in (Kind.TENSOR, Kind.OBJECT) and msg.seq != OFFER_SEQ:
                raise ProtocolError(f"{msg.kind.name} #{msg.seq} from rank {msg.src} over zmq, where this job's data goes over TCP")
        except ProtocolError as e:
            log.warning("rank %d: dropped a message: %s", self.rank, e)
            return
        self.last_seen[msg.src] = time.monotonic()
        if msg.kind is Kind.TENSOR:
            self.early[(msg.seq, msg.flags, msg.src)] = msg.tensor
            self.progress.heard(msg.src, msg.seq, True, 0.0)
        elif msg.kind is Kind.OBJECT:
            self.early[(msg.seq, msg.flags, msg.src)] = msg.obj
            self.progress.heard(msg.src, msg.seq, True, 0.0)
        elif msg.kind is Kind.HEARTBEAT:
            busy = msg.obj.get("busy_ms", 0) if isinstance(msg.obj, dict) else 0
            self.progress.heard(msg.src, msg.seq, bool(msg.flags & 1), busy / 1000 if isinstance(busy, int) and busy >= 0 else 0.0)
        else:
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

    @_collective
    def all_reduce(self, t: torch.Tensor, *, site: str) -> torch.Tensor:
        seq = self._next_seq()
        if t.numel() * t.element_size() >= self.ring_threshold and t.numel() >= self.world_size:
            return self._ring_all_reduce(t, seq)
        parts = self._exchange(t.detach().contiguous(), seq)
        # in rank order on every rank: bit-identical results everywhere
        if len(parts) == 2:
            torch.add(parts[0], parts[1], out=t.detach())  # one kernel, written in place (elementwise: t may be an input)
            return t
        total = torch.add(parts[0], parts[1])
        for p in parts[2:]:
            total += p
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

    @_collective
    def all_gather(self, t: torch.Tensor, dim: int = -1, *, site: str, out: torch.Tensor | None = None) -> torch.Tensor:
        parts = self._exchange(t.detach().contiguous(), self._next_seq())
        return torch.cat(parts, dim=dim) if out is None else torch.cat(parts, dim=dim, out=out)

    @_collective
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

    @_collective
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
        if self.links is not None:
            self.links.close()  # a peer may still wait for the rest of our last message
        if self.listener is not None:
            self.listener.close()
        for s in self.outbox.values():
            s.close(linger=1000)  # a peer may still wait for our last message: let it leave
        self.inbox.close(0)
        if getattr(self, "owned_gate", None) is not None:
            self.owned_gate.stop()
        if getattr(self, "owned_context", None) is not None:
            self.owned_context.term()
