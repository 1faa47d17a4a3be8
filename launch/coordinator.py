"""The coordinator side of a job on hand-started workers (`tp-run generate --workers h1:7340,h2:7340`).

The coordinator is rank 0; worker i is rank i. It greets every worker (protocol version, a
fresh session nonce; in a keyed network over CURVE, each worker pinned to the key its
known-workers line names, as ssh pins known_hosts), sends the job (a fresh job nonce and, when
keyed, every rank's public key, so that the ranks' peer-to-peer sockets admit exactly each
other), streams each worker exactly its own slices when the worker has neither a local copy nor
a cached one, collects the workers' data ports, tells everyone where everyone is, and then runs
rank 0 itself: from there on the ranks exchange activations directly, peer to peer, through the
pyzmq communicator (payloads over its TCP links, comm/tcp_data.py, unless --data-path zmq). Without keys it contacts only workers on loopback, unless --insecure.

A server over workers (`serve_with_workers`) outlives its group: when a worker is lost, the
job ends, the workers that still answer a HELLO form a new one (a new job nonce, tp = 1 + those
workers, --shares kept for the ranks left, each worker's slices for the new split from its cache
or streamed from the checkpoint, the memory plan made again by the load at that tp), and the
server's HTTP side (serve/server.py Front) goes on; POST /admin/rejoin has the next one try every
worker of --workers again.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from dataclasses import replace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tp_runtime import placement, sharding
from tp_runtime.checkpoint.index import CheckpointIndex, fingerprint
from tp_runtime.checkpoint.loader import validate
from tp_runtime.checkpoint.mapped import MappedCheckpoint, release_pages
from tp_runtime.checkpoint.model_files import open_model
from tp_runtime.checkpoint.names import TensorEntry, held_by
from tp_runtime.comm.control import ControlClient
from tp_runtime.comm.keys import DATA_DOMAIN, KNOWN_FILE, CurveClient, Gate, JobKeys, Keypair, KnownWorkers, is_loopback, load_keypair
from tp_runtime.comm.sockets import new_context
from tp_runtime.comm.protocol import Kind, new_nonce
from tp_runtime.comm.timing import wrap
from tp_runtime.comm.zmq_transport import ZmqCommunicator, bind_inbox
from tp_runtime.config import ModelConfig, ParallelConfig, RuntimeConfig
from tp_runtime.engine import shares
from tp_runtime.errors import ConfigError, LaunchError, WorkerError

log = logging.getLogger("tp_runtime.coordinator")

HELLO_TIMEOUT_S = 5.0
MEASURE_TIMEOUT_S = 30.0  # --shares auto: the workers' GEMV probe before their WELCOME
# a worker of a lost group answers once its own side of the job has failed (its collective names
# the lost rank within the transport's dead_after_s), so the survivors are given this long
REFORM_HELLO_TIMEOUT_S = 15.0
REJOIN_HELLO_TIMEOUT_S = 3.0  # every worker is idle then (the group stopped cleanly)
WATCH_HELLO_TIMEOUT_S = 2.0  # a lost worker asked whether it is back (watch_lost)
CONNECT_TIMEOUT_S = 1.0
SETUP_STRIKES = 3  # groups that failed before serving, in a row, before rank 0 serves alone
READY_TIMEOUT_S = 120.0
DEFAULT_PORT = 7340


def parse_workers(text: str) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", str(DEFAULT_PORT))
        try:
            out.append((host or "127.0.0.1", int(port)))
        except ValueError:
            raise ConfigError(f"--workers entry {item!r} is not host:port") from None
    if not out:
        raise ConfigError("--workers names no worker")
    return out


@dataclass(frozen=True)
class WorkerAccess:
    """How this coordinator proves itself to workers and checks them: the shared secret (an
    HMAC layer), its CURVE keypair and the workers' pinned keys, or plain TCP where allowed."""

    secret: bytes | None = None
    keys: Keypair | None = None
    known: KnownWorkers | None = None
    insecure: bool = False


def worker_access(secret_file: str | None, worker_keys: str | None, known_workers: str | None, insecure: bool) -> WorkerAccess:
    """From the flags: --secret-file, --worker-keys DIR, --known-workers FILE (default DIR/known_workers), --insecure."""
    from tp_runtime.launch.worker import load_secret

    if known_workers and not worker_keys:
        raise ConfigError("--known-workers needs --worker-keys DIR (this coordinator's own keypair, made by `tp-worker --keygen DIR`)")
    keys = load_keypair(worker_keys) if worker_keys else None
    known = KnownWorkers(known_workers or Path(worker_keys).expanduser() / KNOWN_FILE) if keys else None
    return WorkerAccess(load_secret(secret_file), keys, known, insecure)


def _check_access(access: WorkerAccess, workers: list[tuple[str, int]]) -> list[bytes] | None:
    """The workers' pinned keys (None: an unkeyed job), or the refusal, before any worker is contacted."""
    if access.keys is None:
        exposed = [f"{h}:{p}" for h, p in workers if not is_loopback(h)]
        if exposed and not access.insecure:
            raise ConfigError(f"refusing to send a job to {', '.join(exposed)} without keys: the weights, prompts and activations would "
                              f"cross the network readable and forgeable. Use --worker-keys DIR (and pin each worker in DIR/{KNOWN_FILE}), "
                              f"or pass --insecure on a network you trust")
        return None
    return [access.known.key_for(f"{h}:{p}") for h, p in workers]


def _local_address_towards(host: str) -> str:
    """The address of this machine that `host` can reach us on (no packet is sent)."""
    if host in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def _measure(runtime: RuntimeConfig) -> dict[str, Any]:
    """The coordinator's own GEMV rate and memory budget for --shares auto (as a worker measures its)."""
    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)  # as rank 0 will run
    return {"gemv_rate": shares.gemv_rate(torch.device("cpu")), "memory_budget": placement.default_host_budget(1)}


def _auto_shares(runtime: RuntimeConfig, model_cfg: ModelConfig, own: dict[str, Any], welcomes: list, names: list[str]) -> tuple[RuntimeConfig, dict[str, Any]]:
    """--shares auto over workers: every rank's share from the rates measured in the handshake,
    capped by each rank's memory budget (--max-host-memory where given, which every rank then
    runs under, else what each machine reported); the runtime with them as explicit weights,
    and what the result shows."""
    about = [own] + [w.obj or {} for w in welcomes]
    rates = [a.get("gemv_rate") for a in about]
    if not all(isinstance(r, (int, float)) and r > 0 for r in rates):
        missing = [n for n, r in zip(names, rates) if not isinstance(r, (int, float)) or r <= 0]
        raise ConfigError(f"--shares auto: {', '.join(missing)} sent no GEMV rate (a tp-worker of an older version?); give the weights, e.g. --shares 3,1")
    budgets = [runtime.max_host_memory if runtime.max_host_memory is not None else a.get("memory_budget") for a in about]
    cfg = runtime.split_config(model_cfg)
    whole = placement.shard_bytes(cfg, 1, 0, runtime.resolve_dtype(cfg, "cpu"), runtime.resolve_max_seq_len(cfg), runtime.max_batch_size, runtime.quantize)
    caps = shares.memory_caps(whole, budgets)
    weights = shares.from_rates(rates, caps)
    capped = caps is not None and any(abs(w - r / sum(rates)) > 0.0015 for w, r in zip(weights, rates))
    line = ", ".join(f"{n} {w:.3f} ({r / 1e9:.1f} GB/s)" for n, w, r in zip(names, weights, rates))
    if runtime.show_progress:
        print(f"shares by rank (--shares auto, GEMV rates measured now{'; capped by memory budgets' if capped else ''}): {line}", file=sys.stderr, flush=True)
    log.info("shares by rank: %s", line)
    return replace(runtime, shares=weights), {"shares": list(weights), "gemv_rates": rates, "memory_budgets": budgets, "shares_capped": capped}


def _stream_slices(client: ControlClient, index: CheckpointIndex, entries: list[TensorEntry], cfg: ModelConfig, tp: int, rank: int) -> int:
    """Send worker `rank` exactly its slices; returns the bytes sent. A GGUF file's quantized
    slices go as their blocks (rows in the Hugging Face order), their types named up front."""
    entries = held_by(entries, cfg, tp, rank)  # not other ranks' experts (--moe ep)
    files = MappedCheckpoint(index)
    sent = 0
    try:
        specs = [sharding.spec(e.role, e.kind, cfg, tp, rank) for e in entries]
        blocks = {e.hf_name: files.storage(e.hf_name) for e, spec in zip(entries, specs) if files.has_blocks(e.hf_name, spec)}
        client.send(Kind.WEIGHTS_BEGIN, {"names": [e.hf_name for e in entries], "blocks": blocks})
        for i, (e, spec) in enumerate(zip(entries, specs)):
            view = files.blocks(e.hf_name, spec) if e.hf_name in blocks else files.values(e.hf_name, spec)
            # a copy: zmq sends without copying, after the mapping may be gone
            data = torch.empty_like(view, memory_format=torch.contiguous_format).copy_(view)
            release_pages(view)
            client.send(Kind.WEIGHTS, tensor=data, seq=i)
            sent += data.numel() * data.element_size()
            del data, view
    finally:
        files.close()
    return sent


def run_with_workers(
    model_dir: str,
    workers: list[tuple[str, int]],
    access: WorkerAccess,
    runtime: RuntimeConfig,
    prompts: list[list[int]],
    sampling: dict[str, Any],
    run_rank0: Callable[[ParallelConfig, Any, dict[str, Any]], Any],
    advertise: str | None = None,
    mode: str = "generate",
) -> Any:
    """Drive the workers through a job and run rank 0 here with `run_rank0(parallel, comm, extra)`;
    extra holds what the coordinator learnt (bytes of weights streamed) for the result. mode
    "serve": the workers follow rank 0's steps (serve/engine_loop.py) until it stops them."""
    pinned = _check_access(access, workers)
    model = open_model(model_dir)  # a Hugging Face folder or a GGUF file, checked before any worker is contacted
    cfg, index = runtime.split_config(model.cfg), model.index
    tp = len(workers) + 1
    auto_shares = runtime.shares == "auto"  # measured in the handshake (below), before any slice is cut
    sharding.check_job(cfg, tp)
    fp = fingerprint(model_dir, index)
    entries = validate(index, cfg)
    gen_cfg_path = Path(model_dir) / "generation_config.json"  # a GGUF file's are in its metadata, hence in the config
    gen_cfg = json.loads(gen_cfg_path.read_text()) if model.format == "safetensors" and gen_cfg_path.is_file() else None
    rank_names = ["coordinator"] + [f"worker {h}:{p}" for h, p in workers]
    secret = access.secret
    ctx = new_context()
    gate = keys = None
    if pinned is not None:
        keys = JobKeys(access.keys, (access.keys.public, *pinned))
        gate = Gate(ctx)
        gate.admit(DATA_DOMAIN, keys.others(0))
    clients = []
    comm = inbox = None
    try:
        for i, (h, p) in enumerate(workers):
            addr = f"{h}:{p}"
            curve = CurveClient(access.keys, pinned[i]) if pinned is not None else None
            clients.append(ControlClient(ctx, f"tcp://{addr}", secret, addr, curve=curve, pinned_at=access.known.where(addr) if curve else ""))
        for c in clients:
            c.send(Kind.HELLO, {"role": "coordinator", **({"measure": True} if auto_shares else {})})
        own = _measure(runtime) if auto_shares else None  # while the workers measure theirs
        welcomes = [c.recv(HELLO_TIMEOUT_S + (MEASURE_TIMEOUT_S if auto_shares else 0), "handshake") for c in clients]
        shares_extra = {}
        if auto_shares:
            runtime, shares_extra = _auto_shares(runtime, model.cfg, own, welcomes, rank_names)
            cfg = runtime.split_config(model.cfg)
            sharding.check_job(cfg, tp)
            entries = validate(index, cfg)
        my_addr = advertise or _local_address_towards(workers[0][0])
        inbox, my_port = bind_inbox(ctx, my_addr, keys=keys)
        streamed = 0
        job = new_nonce()  # this job's: a late or replayed frame of an earlier one is dropped
        for rank, c in enumerate(clients, start=1):
            c.send(Kind.JOB, {
                "fingerprint": fp, "config": model.config_json,
                "generation_config": gen_cfg,
                "tp": tp, "rank": rank, "names": rank_names, "job": job,
                "keys": [k.decode() for k in keys.ranks] if keys else None,
                "runtime": runtime.for_job(),  # every setting but the rank-local ones: all ranks run alike
                "prompts": prompts, "sampling": sampling, "mode": mode,
            })
        ports = {}
        for rank, c in enumerate(clients, start=1):
            msg = c.recv(READY_TIMEOUT_S, "job set-up")
            if msg.kind is Kind.NEED_WEIGHTS:
                streamed += _stream_slices(c, index, entries, cfg, tp, rank)
                msg = c.recv(READY_TIMEOUT_S, "receiving weights")
            if msg.kind is not Kind.READY:
                raise ConfigError(f"worker {c.name} answered {msg.kind.name} instead of READY")
            ports[rank] = msg.obj["data_port"]
        peers = [f"tcp://{my_addr}:{my_port}"] + [f"tcp://{h}:{ports[r]}" for r, (h, _) in enumerate(workers, start=1)]
        for c in clients:
            c.send(Kind.START, {"peers": peers})

        def watch() -> None:
            for c in clients:
                c.check()

        raw = ZmqCommunicator(ctx, 0, peers, inbox, secret=secret, names=rank_names, watch=watch, job=job, keys=keys, data_path=runtime.comm.data_path)
        comm = wrap(raw, runtime.comm, device=torch.device("cpu"))
        result = run_rank0(ParallelConfig(world_size=tp, rank=0), comm, {"weights_streamed_bytes": streamed, **shares_extra})
        for c in clients:
            c.recv(READY_TIMEOUT_S, "end of job")  # DONE
        return result
    finally:
        if comm is not None:
            comm.close()  # closes the inbox too
        elif inbox is not None:
            inbox.close(0)
        for c in clients:
            c.close()
        if gate is not None:
            gate.stop()
        ctx.term()


def _port_open(host: str, port: int) -> bool:
    """Whether something accepts a TCP connection there within CONNECT_TIMEOUT_S (nothing is sent):
    a killed worker's port refuses at once, an unplugged one times out."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def answering(workers: list[tuple[str, int]], access: WorkerAccess, timeout_s: float) -> list[tuple[str, int]]:
    """Those of `workers` that answer a HELLO within timeout_s, all asked at once (a worker still
    ending its side of a failed job answers when that is done); a port that takes no TCP
    connection is given up at once."""
    reachable = [w for w in workers if _port_open(*w)]
    if not reachable:
        return []
    pinned = _check_access(access, reachable)
    ctx = new_context()
    clients = []
    try:
        for i, (h, p) in enumerate(reachable):
            addr = f"{h}:{p}"
            curve = CurveClient(access.keys, pinned[i]) if pinned is not None else None
            c = ControlClient(ctx, f"tcp://{addr}", access.secret, addr, curve=curve, pinned_at=access.known.where(addr) if curve else "")
            clients.append(c)
            c.send(Kind.HELLO, {"role": "coordinator"})
        deadline = time.monotonic() + timeout_s
        out = []
        for w, c in zip(reachable, clients):
            try:
                c.recv(max(0.1, deadline - time.monotonic()), "forming the group again")
                out.append(w)
            except WorkerError as e:
                log.warning("left out of the group: %s", e)
        return out
    finally:
        for c in clients:
            c.close()
        ctx.term()


def _runtime_for(runtime: RuntimeConfig, workers: list[tuple[str, int]], group: list[tuple[str, int]]) -> RuntimeConfig:
    """--shares w0,w1,... of the whole list, kept for the ranks of this group."""
    if isinstance(runtime.shares, tuple) and len(runtime.shares) == len(workers) + 1:
        return replace(runtime, shares=(runtime.shares[0], *(runtime.shares[1 + workers.index(w)] for w in group)))
    return runtime


def watch_lost(front: Any, workers: list[tuple[str, int]], access: WorkerAccess, every_s: float, stop: threading.Event) -> None:
    """While workers of --workers are out of the serving group, ask them for a HELLO every
    every_s seconds; when one answers (restarted, its link back), ask the front for a rejoin,
    which happens as POST /admin/rejoin's does: at the next moment with no request in flight.
    A port that takes no connection costs nothing to ask (answering gives it up at once)."""
    while not stop.wait(every_s):
        st = front.state
        if front.stopping or st.reforming is not None or front.rejoin_asked.is_set() or not st.lost:
            continue
        lost = [w for w in workers if f"{w[0]}:{w[1]}" in st.lost]
        try:
            back = answering(lost, access, WATCH_HELLO_TIMEOUT_S)
        except Exception as e:  # a pin that no longer matches, a key file gone: say so, keep serving, ask again later
            log.warning("asking the lost workers whether they are back failed: %s", e)
            continue
        if back and not front.stopping:
            log.warning("%s answer again: taking them back into the group once no request is in flight", ", ".join(f"{h}:{p}" for h, p in back))
            front.ask_rejoin()


def serve_with_workers(model_dir: str, workers: list[tuple[str, int]], access: WorkerAccess, runtime: RuntimeConfig, front: Any,
                       advertise: str | None = None, rejoin_every_s: float = 0.0) -> int:
    """`tp-run serve --workers`: rank 0 is `front` (serve/server.py Front: the HTTP side, alive
    throughout); each group is a job of run_with_workers whose rank 0 is `front.generation`. A lost
    worker (WorkerError) ends the group: it is formed again with the workers that answer, down to
    rank 0 alone. A rejoin (front.rejoin_asked: POST /admin/rejoin, or watch_lost finding a lost
    worker back every rejoin_every_s seconds) forms it again with every worker that answers."""
    stop_watch = threading.Event()
    if rejoin_every_s > 0:
        threading.Thread(target=watch_lost, args=(front, workers, access, rejoin_every_s, stop_watch), name="rejoin-watch", daemon=True).start()
    try:
        return _serve_groups(model_dir, workers, access, runtime, front, advertise)
    finally:
        stop_watch.set()


def _serve_groups(model_dir: str, workers: list[tuple[str, int]], access: WorkerAccess, runtime: RuntimeConfig, front: Any, advertise: str | None) -> int:
    from tp_runtime.serve.engine_loop import STOP

    group, reason, strikes = list(workers), None, 0
    while not front.stopping:
        if front.rejoin_asked.is_set():
            front.rejoin_asked.clear()
            if front.state.reforming is None:
                front.reforming("rejoin: asking every worker of --workers", list(front.state.lost), loss=False)
            group, reason = answering(workers, access, REJOIN_HELLO_TIMEOUT_S), reason or "rejoin"
            log.warning("rejoin: %d of %d workers answer", len(group), len(workers))
        left_out = [f"{h}:{p}" for h, p in workers if (h, p) not in group]
        job_runtime = _runtime_for(runtime, workers, group)
        before = front.generations  # a group that fails before it serves is a strike

        def rank0(parallel: ParallelConfig, comm: Any, extra: dict[str, Any]) -> str:
            # --shares auto: the shares this job's handshake measured, as the workers run them
            rt = replace(job_runtime, shares=tuple(extra["shares"])) if extra.get("shares") else job_runtime
            return front.generation(parallel, rt, comm, lost=left_out, reason=reason)

        try:
            if group:
                outcome = run_with_workers(model_dir, group, access, job_runtime, [], {}, run_rank0=rank0, advertise=advertise, mode="serve")
            else:
                outcome = rank0(ParallelConfig(), None, {})
        except (WorkerError, LaunchError) as e:
            if not group or front.generations == 0:  # the first group must form as asked (a wrong key, a worker not started)
                raise
            front.reforming(f"{type(e).__name__}: {e}", sorted({*left_out, *front.named(str(e))}))
            strikes = 0 if front.generations > before else strikes + 1
            group = answering(group, access, REFORM_HELLO_TIMEOUT_S)
            if strikes >= SETUP_STRIKES:
                log.warning("%d groups in a row failed before serving: rank 0 serves alone (POST /admin/rejoin tries the workers again)", strikes)
                group = []
            reason = "lost"
            continue
        if outcome == STOP:
            return 0
        reason = "rejoin"  # REJOIN: the flag is set, the loop's top asks every worker
    return 0
