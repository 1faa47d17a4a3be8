"""Start N local ranks (like `torchrun --standalone`), watch them, and reap every one.

Each rank is `python -m tp_runtime <same arguments>` with torchrun's variables set and a
free port for the rendezvous. A rank that fails writes its cause to its error file (see
`record_failure`); the first failure brings the others down (SIGTERM, then SIGKILL after a
grace period) and surfaces as one LaunchError naming the rank and the cause. Children die
with the launcher even if it is SIGKILLed (PR_SET_PDEATHSIG), so no rank is left behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from tp_runtime.errors import LaunchError, TPRuntimeError

ERROR_FILE_ENV = "TP_RUNTIME_ERROR_FILE"
RESULT_FILE_ENV = "TP_RUNTIME_RESULT_FILE"
WIND_DOWN_S = 15.0  # a server's ranks, told to stop by rank 0, finish their step and exit
GRACE_S = 3.0
POLL_S = 0.05


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(nprocs: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nprocs)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the launcher's own cleanup still applies


def core_sets(nprocs: int, threads: int) -> list[set[int]] | None:
    """Disjoint cores for each rank when they fit (a rank's threads stay on its own cores and
    its memory traffic is not interleaved with a peer's); None when ranks must share cores."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if nprocs * threads > len(cores):
        return None
    return [set(cores[r * threads : (r + 1) * threads]) for r in range(nprocs)]


def _child_setup(cpus: set[int] | None):
    def setup() -> None:
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def record_failure(rank: int, exc: BaseException) -> None:
    """Called by a rank on its way out: leave the cause where the launcher will look."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    payload = {
        "rank": rank,
        "type": type(exc).__name__,
        "message": str(exc),
        "time": time.time(),
        "traceback": "" if isinstance(exc, TPRuntimeError) else "".join(traceback.format_exception(exc)),
    }
    try:
        Path(path).write_text(json.dumps(payload))
    except OSError:
        pass


def write_result(result: dict[str, Any]) -> None:
    path = os.environ.get(RESULT_FILE_ENV)
    if path:
        Path(path).write_text(json.dumps(result))


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wind_down(procs: list[subprocess.Popen]) -> bool:
    """Ask rank 0 to stop (it stops the others) and wait; whether every rank exited 0."""
    if procs and procs[0].poll() is None:
        procs[0].send_signal(signal.SIGTERM)
    deadline = time.monotonic() + WIND_DOWN_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
    return all(p.returncode == 0 for p in procs)


def _failure_message(workdir: Path, failed: dict[int, int]) -> str:
    reports = []
    for rank, code in failed.items():
        f = workdir / f"error-{rank}.json"
        if f.is_file():
            try:
                rep = json.loads(f.read_text())
                reports.append((rep["time"], rank, f"{rep['type']}: {rep['message']}", rep.get("traceback", "")))
                continue
            except (json.JSONDecodeError, KeyError):
                pass
        # no report: killed by a signal (SIGKILL, the OOM killer) or gone before it could write one.
        # A signal is the cause wherever it shows: the other ranks' reports are then their
        # noticing it (a peer that died); an exit code without a report sorts last
        reports.append((float("-inf") if code < 0 else float("inf"), rank, _describe_exit(code), ""))
    reports.sort()
    _, rank, cause, tb = reports[0]  # the earliest failure is the cause; the rest are its echoes
    msg = f"rank {rank} failed: {cause}"
    if tb:
        msg += "\n" + tb.rstrip()
    return msg


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _on_sigterm_interrupt() -> Any:
    """A SIGTERM to the launcher unwinds like Ctrl-C, so the ranks are reaped."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def spawn(
    argv: list[str],
    nprocs: int,
    threads: int | None = None,
    extra_env: dict[str, str] | None = None,
    program: list[str] | None = None,
    graceful: bool = False,
) -> dict[str, Any] | None:
    """Run `program *argv` as ranks 0..nprocs-1; returns rank 0's result, if it wrote one.

    program defaults to `python -m tp_runtime`; tests pass their own rank scripts. graceful (a
    server): Ctrl-C or SIGTERM is passed to rank 0 alone, which tells the others to stop; the
    launcher returns normally if they all then exit 0 within the grace time.
    """
    program = program or [sys.executable, "-m", "tp_runtime"]
    threads = threads or threads_per_rank(nprocs)
    pinned = core_sets(nprocs, threads)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tp-run-") as tmp:
        workdir = Path(tmp)
        procs: list[subprocess.Popen] = []
        previous_term = _on_sigterm_interrupt()
        try:
            for rank in range(nprocs):
                env = dict(os.environ)
                env.update(extra_env or {})
                env.update(
                    RANK=str(rank),
                    WORLD_SIZE=str(nprocs),
                    LOCAL_RANK=str(rank),
                    LOCAL_WORLD_SIZE=str(nprocs),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
                    OMP_NUM_THREADS=str(threads),
                    **{ERROR_FILE_ENV: str(workdir / f"error-{rank}.json")},
                )
                env.pop("TORCHELASTIC_RUN_ID", None)
                if rank == 0:
                    env[RESULT_FILE_ENV] = str(workdir / "result.json")
                procs.append(subprocess.Popen([*program, *argv], env=env, preexec_fn=_child_setup(pinned[rank] if pinned else None)))
            while True:
                codes = [p.poll() for p in procs]
                failed = {r: c for r, c in enumerate(codes) if c not in (None, 0)}
                if failed:
                    # give simultaneous failures a moment to land so the earliest is named
                    time.sleep(0.2)
                    failed = {r: p.poll() for r, p in enumerate(procs) if p.poll() not in (None, 0)}
                    _stop_all(procs)
                    raise LaunchError(_failure_message(workdir, failed) + f"\n(all {nprocs} ranks stopped)")
                if all(c == 0 for c in codes):
                    result = workdir / "result.json"
                    return json.loads(result.read_text()) if result.is_file() else None
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            if graceful and _wind_down(procs):
                return None
            _stop_all(procs)
            raise
        finally:
            _stop_all(procs)
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
