"""`tp-run serve`: one rank's part of a serving job.

Rank 0 starts the HTTP server (uvicorn, in a thread of its own) before it loads the model, so
that /health answers 503 while loading; then it runs the engine loop in its main thread until
SIGINT / SIGTERM, and tells the other ranks to stop. Every other rank loads its shard and
follows rank 0's steps. A failed step (a rank that died, a collective that timed out) ends every
open request with an error, turns /health to 503, and ends the process non-zero.
"""

from __future__ import annotations

import logging
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


def run_serve(args: Any, parallel: ParallelConfig, runtime: RuntimeConfig, comm: Any = None) -> int:
    from tp_runtime.engine.llm import LLM
    from tp_runtime.engine.scheduler import Scheduler
    from tp_runtime.serve.api import ServeState, build_app
    from tp_runtime.serve.engine_loop import Leader, follow
    from tp_runtime.serve.metrics import ServeMetrics

    if args.max_queue < 1:
        raise ConfigError(f"--max-queue must be at least 1, got {args.max_queue}")
    if parallel.rank != 0:
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
    name = args.served_model_name or Path(args.model).name
    state = ServeState(model_name=name, api_key=args.api_key)
    server, thread = _uvicorn_thread(build_app(state), args.host, args.port)
    llm = LLM.load(args.model, parallel, runtime, comm=comm)
    try:
        if llm.tokenizer is None:
            raise ConfigError(f"{args.model} has no tokenizer: serving text needs one")
        scheduler = Scheduler(llm.engine, args.max_num_seqs, args.max_num_batched_tokens)
        leader = Leader(llm, scheduler, args.max_queue)
        state.llm, state.leader, state.metrics, state.max_model_len = llm, leader, ServeMetrics(leader, llm.comm, name), llm.engine.max_seq_len
        state.ready = True
        stop = lambda signum, frame: leader.stop()  # noqa: E731
        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        print(f"tp-run serve: {name} on http://{args.host}:{args.port} (tp={parallel.world_size}, {scheduler.max_num_seqs} sequences, "
              f"context {llm.engine.max_seq_len}); Ctrl-C stops", file=sys.stderr, flush=True)
        try:
            leader.run()
        except BaseException:
            # open requests were handed their error: let the HTTP thread write it out (and
            # /health say 503) before the process goes
            time.sleep(FLUSH_SECONDS)
            raise
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return 0
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        llm.close()
