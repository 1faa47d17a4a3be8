"""The serving engine loop: rank 0 schedules and leads, every other rank follows.

Rank 0 runs `Leader.run()` in its main thread: it takes new requests and aborts from the HTTP
server's threads (a queue), lets the scheduler plan the next step, broadcasts the step's
changes (serve/plan_wire.py), runs the step and hands each request its tokens (all of a step's
at once: one wake-up of the HTTP thread per step, `hand_out`). A rank other
than 0 runs `follow()`: receive the changes, apply them to its engine, run the same step. The
engine, the scheduler and the step are those `generate()` uses: one engine loop.

What a request sees (`Stream`): its token events, in order, then its end (a finish reason, or
an error if the loop failed), delivered into the asyncio loop of the HTTP server.

A group generation (serve over tp-workers, launch/coordinator.py `serve_with_workers`): a
Leader lives as long as its communicator. `run()` returns STOP (shut down) or REJOIN (asked to
stop at the next moment with no request in flight, so that the group is formed again with the
workers that answer), or raises when a step fails (a lost rank): every request it holds, running,
waiting or not yet taken, ends with an error, and a request handed in afterwards is refused at
once ("unavailable"), so none hangs while the group is formed again. An idle zmq group runs a
barrier with every idle tick, so a worker lost while no request runs is noticed within seconds too.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tp_runtime.engine.llm import LLM
from tp_runtime.engine.scheduler import Request, Scheduler, apply_changes
from tp_runtime.errors import LaunchError
from tp_runtime.serve import plan_wire

log = logging.getLogger("tp_runtime")

IDLE_SECONDS = 1.0  # how often an idle rank 0 tells the others it is alive
STOP, REJOIN = "stop", "rejoin"  # how Leader.run() ended (a failure raises)


def idle_check(comm) -> None:
    """Every rank, on each idle tick: over tp-workers a barrier, so a lost worker is named while
    no request runs (the idle message alone is a send, which never fails). Elsewhere nothing:
    the launcher watches local ranks."""
    if comm.world_size > 1 and getattr(comm, "transport", None) == "zmq":
        comm.barrier(site=plan_wire.SITE)


@dataclass
class Stream:
    """One request's channel from the engine loop to its HTTP handler."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # when its first step ran (queue time ends)

    def put(self, item: Any) -> None:
        """From the engine thread: an event, or ("end", reason, error)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


def _deliver(batch: list[tuple[Stream, Any]]) -> None:
    """In the HTTP server's loop: one step's items, in order."""
    for stream, item in batch:
        stream.events.put_nowait(item)


def hand_out(items: list[tuple[Stream, Any]]) -> None:
    """From the engine thread: a step's items for many streams in one call per event loop.
    Each call_soon_threadsafe writes to the loop's wake-up socket, a syscall during which the
    woken HTTP thread takes the GIL, and the engine thread waits for it back: one call per
    token cost the loop ~0.35 ms a token (SmolLM2, tp=2, 8 streams, 2 cores), one per step
    pays that wait once."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Any]]] = {}
    for stream, item in items:
        by_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, batch in by_loop.items():
        loop.call_soon_threadsafe(_deliver, batch)


@dataclass
class LoopStats:
    steps: int = 0
    plan_bytes: int = 0
    plan_seconds: float = 0.0
    host_seconds: float = 0.0  # per-step time outside engine.step (taking requests, scheduling, the broadcast, hand-out)
    running: int = 0
    waiting: int = 0


class Leader:
    """Rank 0's loop. submit/abort are called from other threads; run() from the main one."""

    def __init__(self, llm: LLM, scheduler: Scheduler, max_queue: int, on_step: Callable[[LoopStats], None] | None = None) -> None:
        self.llm, self.scheduler = llm, scheduler
        self.max_queue = max_queue
        self.inbox: queue.Queue = queue.Queue()
        self.streams: dict[int, Stream] = {}
        self.stats = LoopStats()
        self.on_step = on_step or (lambda stats: None)
        self._pending = 0  # submitted, not yet taken from the inbox
        self._lock = threading.Lock()
        self._next_id = 0
        self.stopping = threading.Event()
        self.rejoin = threading.Event()  # stop at the next moment with no request in flight
        self.failed: str | None = None
        self.closed: str | None = None  # why a request handed in now is refused (the loop has ended)
        self.on_fail: Callable[[str], None] | None = None  # told before the open requests are (a server that re-forms)

    # ---- from the HTTP threads -------------------------------------------------------------

    def queue_full(self) -> bool:
        """Whether --max-queue requests already wait (those handed in but not yet taken count,
        less the places free in the running batch, which they will take)."""
        with self._lock:
            free = max(0, self.scheduler.max_num_seqs - self.stats.running)
            return self._pending + self.stats.waiting - free >= self.max_queue

    def new_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def submit(self, stream: Stream) -> None:
        with self._lock:
            if self.closed is not None:  # the loop has ended: refused at once, never left waiting
                stream.put(("end", "unavailable", self.closed))
                return
            self._pending += 1
        self.inbox.put(("add", stream))

    def abort(self, req_id: int) -> None:
        self.inbox.put(("abort", req_id))

    def stop(self) -> None:
        self.stopping.set()
        self.inbox.put(("wake", None))

    def request_rejoin(self) -> None:
        self.rejoin.set()
        self.inbox.put(("wake", None))

    def _close(self, kind: str, why: str) -> None:
        """End every request this loop holds, and refuse those handed in from now on."""
        with self._lock:
            self.closed = why
        for s in self.streams.values():
            s.put(("end", kind, why))
        self.streams.clear()
        while True:  # handed in, never taken: they would wait forever
            try:
                what, value = self.inbox.get_nowait()
            except queue.Empty:
                return
            if what == "add":
                value.put(("end", "unavailable", why))

    # ---- the loop --------------------------------------------------------------------------

    def _take(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=IDLE_SECONDS) if block else self.inbox.get_nowait()
            while True:
                kind, value = item
                if kind == "add":
                    with self._lock:
                        self._pending -= 1
                    self.streams[value.request.req_id] = value
                    self.scheduler.add(value.request)
                elif kind == "abort":
                    stream = self.streams.pop(value, None)
                    if stream is not None:
                        self.scheduler.abort(value)
                        stream.put(("end", "abort", None))
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def run(self) -> str:
        """STOP or REJOIN; raises when a step fails, every request it holds ended with the error."""
        comm, engine = self.llm.comm, self.llm.engine
        outcome = STOP
        try:
            while not self.stopping.is_set():
                busy = self.scheduler.has_work()
                t_in = time.perf_counter()
                self._take(block=not busy)
                self.stats.running, self.stats.waiting = self.scheduler.num_running, self.scheduler.num_waiting
                if not self.scheduler.has_work():
                    if self.rejoin.is_set() and self.inbox.empty():  # nothing in flight: re-form now
                        outcome = REJOIN
                        break
                    engine.end_decode_run()
                    plan_wire.send(comm, plan_wire.IDLE)
                    idle_check(comm)
                    continue
                t0 = time.perf_counter()
                taken = t0 - t_in if busy else 0.0  # taking requests counts; waiting for one while idle does not
                plan, changes = self.scheduler.schedule()
                nbytes = plan_wire.send(comm, plan_wire.STEP, changes, plan_wire.digest(engine))
                t1 = time.perf_counter()
                events = engine.step(plan)
                t2 = time.perf_counter()
                self.scheduler.retire()
                for a in changes.admitted:
                    s = self.streams.get(a.req_id)
                    if s is not None:
                        s.admitted = t1
                out = []
                for e in events:
                    s = self.streams.get(e.seq)
                    if s is None:
                        continue
                    out.append((s, e))
                    if e.finish_reason:
                        del self.streams[e.seq]
                        out.append((s, ("end", e.finish_reason, None)))
                hand_out(out)
                st = self.stats
                st.steps += 1
                st.plan_bytes += nbytes
                st.plan_seconds += t1 - t0
                st.running, st.waiting = self.scheduler.num_running, self.scheduler.num_waiting
                st.host_seconds += taken + (t1 - t0) + (time.perf_counter() - t2)
                self.on_step(st)
            # stopped with requests open (or handed in meanwhile): each is told, none hangs
            self._close("error", "the server is shutting down" if outcome == STOP else "the server is re-forming its group")
            plan_wire.send(comm, plan_wire.STOP)
            return outcome
        except BaseException as e:
            self.failed = f"{type(e).__name__}: {e}"
            if self.on_fail is not None:
                self.on_fail(self.failed)
            self._close("error", self.failed)
            raise


def follow(llm: LLM) -> None:
    """A rank other than 0: run rank 0's steps until it says stop."""
    engine = llm.engine
    steps = 0
    while True:
        op, changes, check = plan_wire.receive(llm.comm)
        if op == plan_wire.STOP:
            return
        if op == plan_wire.IDLE:
            engine.end_decode_run()
            idle_check(llm.comm)
            continue
        plan = apply_changes(engine, changes)
        if check is not None and plan_wire.digest(engine) != check:
            raise LaunchError(f"rank {llm.comm.rank} holds other sequences than rank 0 before step {steps + 1} "
                              f"({sorted((s.seq_id, s.num_tokens) for s in engine.running.values())[:8]}); the ranks diverged")
        engine.step(plan)
        steps += 1
