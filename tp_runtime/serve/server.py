"""`tp-run serve`: one rank's part of a serving job.

Rank 0 starts the HTTP server (uvicorn, in a thread of its own: `Front`) before it loads the
model, so that /health answers 503 while loading; then it runs the engine loop in its main
thread (`Front.generation`) until SIGINT / SIGTERM, and tells the other ranks to stop. Every
other rank loads its shard and follows rank 0's steps. A failed step (a rank that died, a
collective that timed out) ends every open request with an error and turns /health to 503.

Local ranks (spawned, torchrun) and tp=1: the process then ends non-zero (`run_serve`).
Over tp-workers (launch/coordinator.py `serve_with_workers`) the Front outlives the group: the
coordinator forms the group again with the workers that still answer and calls `generation`
once more (a new job, the model loaded again at the new tp), while /health says re-forming and
new requests get 503 with Retry-After; the seconds from the loss noticed to serving again are
printed and kept in /metrics. POST /admin/rejoin has the next re-form (at once when idle, else
at the next moment with no request in flight) try every worker of --workers again.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tp_runtime.config import ParallelConfig, RuntimeConfig
from tp_runtime.errors import ConfigError

log = logging.getLogger("tp_runtime")

FLUSH_SECONDS = 1.0  # after a failed step: time for the error events to reach the clients


def _uvicorn_thread(app, host: str, port: int):
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    return server, thread


class Front:
    """Rank 0's HTTP side: the server thread and its state (API key, metrics), alive across group
    generations. Construct in the main thread (it takes SIGINT / SIGTERM); close() when done."""

    def __init__(self, args: Any, full_tp: int = 1, workers: list[str] | None = None) -> None:
        from tp_runtime.serve.api import ServeState, build_app
        from tp_runtime.serve.metrics import ServeMetrics

        if args.max_queue < 1:
            raise ConfigError(f"--max-queue must be at least 1, got {args.max_queue}")
        self.args = args
        self.name = args.served_model_name or Path(args.model).name
        self.state = ServeState(model_name=self.name, api_key=args.api_key, full_tp=full_tp, tp=full_tp)
        self.state.metrics = ServeMetrics(self.state, self.name)
        if workers is not None:
            self.state.rejoin = self.ask_rejoin
        self.workers = workers or []
        self.stopping = False
        self.rejoin_asked = threading.Event()
        self.lost_at: float | None = None  # when the last loss was noticed, until serving again
        self.reforms = 0
        self.generations = 0  # groups that reached serving
        self.server, self.thread = _uvicorn_thread(build_app(self.state), args.host, args.port)
        self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True
        if self.state.leader is not None:
            self.state.leader.stop()

    # ---- from the HTTP thread -----------------------------------------------------------------

    def ask_rejoin(self) -> str:
        self.rejoin_asked.set()
        leader = self.state.leader
        if leader is not None and self.state.reforming is None:
            leader.request_rejoin()
            return f"the group is formed again with every worker that answers of {', '.join(self.workers)} as soon as no request is in flight"
        return f"the re-form under way tries every worker of {', '.join(self.workers)}"

    # ---- from the coordinator (main thread) ---------------------------------------------------

    def reforming(self, why: str, lost: list[str], loss: bool = True) -> None:
        """The group is gone (loss: a lost worker, why; else a rejoin): /health and new requests say
        so until serving again."""
        st = self.state
        st.ready = False
        told, st.reforming = st.reforming is not None, why
        st.lost = tuple(lost)
        if loss and self.lost_at is None:
            self.lost_at = time.monotonic()
        if not told:
            what = "the group is lost" if loss else "leaving the group"
            print(f"tp-run serve: {what} at tp={st.tp} ({why}); forming it again", file=sys.stderr, flush=True)

    def generation(self, parallel: ParallelConfig, runtime: RuntimeConfig, comm: Any = None, lost: list[str] | None = None,
                   reason: str | None = None) -> str:
        """Load the model at this group's tp, serve until stopped (STOP) or a rejoin (REJOIN);
        raises when a step fails, after every request it held was ended with the error.
        lost: the workers of --workers left out of this group; reason: why it was formed again
        ("lost", "rejoin"; None the first time)."""
        from tp_runtime.engine.llm import LLM
        from tp_runtime.engine.scheduler import Scheduler
        from tp_runtime.serve.engine_loop import Leader

        args, st = self.args, self.state
        llm = LLM.load(args.model, parallel, runtime, comm=comm)
        try:
            if llm.tokenizer is None:
                raise ConfigError(f"{args.model} has no tokenizer: serving text needs one")
            scheduler = Scheduler(llm.engine, args.max_num_seqs, args.max_num_batched_tokens)
            leader = Leader(llm, scheduler, args.max_queue)
            if self.state.rejoin is not None:  # over workers: /health says re-forming before the open requests hear of it
                leader.on_fail = lambda why: self.reforming(why, sorted({*st.lost, *self.named(why)}))
            st.llm, st.leader, st.max_model_len, st.tp = llm, leader, llm.engine.max_seq_len, parallel.world_size
            if lost is not None:
                st.lost = tuple(lost)
            st.reforming = None
            st.ready = True
            self.generations += 1
            if self.lost_at is not None:
                seconds = time.monotonic() - self.lost_at
                self.lost_at = None
                self.reforms += 1
                st.metrics.reforms.labels("lost").inc()
                st.metrics.reform_seconds.observe(seconds)
                st.metrics.last_reform_seconds.set(seconds)
                print(f"tp-run serve: serving again at tp={parallel.world_size} ({'without ' + ', '.join(st.lost) if st.lost else 'every worker back'}), "
                      f"{seconds:.1f} s after the loss was noticed", file=sys.stderr, flush=True)
            elif reason is not None:
                st.metrics.reforms.labels(reason).inc()
                print(f"tp-run serve: serving at tp={parallel.world_size}{' without ' + ', '.join(st.lost) if st.lost else ''}",
                      file=sys.stderr, flush=True)
            else:
                print(f"tp-run serve: {self.name} on http://{args.host}:{args.port} (tp={parallel.world_size}, {scheduler.max_num_seqs} sequences, "
                      f"context {llm.engine.max_seq_len}); Ctrl-C stops", file=sys.stderr, flush=True)
            if self.stopping:  # a signal while loading
                leader.stop()
            elif self.rejoin_asked.is_set():  # asked after this group's workers were chosen: once idle, again
                leader.request_rejoin()
            return leader.run()
        except BaseException:
            st.ready = False
            raise
        finally:
            llm.close()

    def named(self, text: str) -> list[str]:
        """The workers of --workers an error names (a first guess, before the survivors answer): those
        the transport says stopped responding, else every one named (a worker reporting a failure)."""
        silent = [w for w in self.workers if re.search(rf"worker {re.escape(w)} \(rank \d+\) stopped responding", text)]
        return silent or [w for w in self.workers if re.search(rf"worker {re.escape(w)}(?!\d)", text)]

    def close(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.server.should_exit = True
        self.thread.join(timeout=5)


def run_serve(args: Any, parallel: ParallelConfig, runtime: RuntimeConfig, comm: Any = None) -> int:
    """One group, local ranks or tp=1: serve until stopped; a failed step ends the process."""
    from tp_runtime.engine.llm import LLM
    from tp_runtime.serve.engine_loop import follow

    if parallel.rank != 0:
        if args.max_queue < 1:
            raise ConfigError(f"--max-queue must be at least 1, got {args.max_queue}")
        # a terminal's Ctrl-C, or torchrun's SIGTERM, reaches every rank; only rank 0 acts on it
        # and tells the others (a follower also ends when rank 0 is gone: its collective fails)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        llm = LLM.load(args.model, parallel, runtime, comm=comm)
        try:
            follow(llm)
        finally:
            llm.close()
        return 0
    front = Front(args, full_tp=parallel.world_size)
    try:
        front.generation(parallel, runtime, comm)
        return 0
    except BaseException:
        # open requests were handed their error: let the HTTP thread write it out (and
        # /health say 503) before the process goes
        time.sleep(FLUSH_SECONDS)
        raise
    finally:
        front.close()
