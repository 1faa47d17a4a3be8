"""The coordinator side of a job on hand-started workers (`tp-run generate --workers h1:7340,h2:7340`).

The coordinator is rank 0; worker i is rank i. It greets every worker (protocol version, a
fresh session nonce; in a keyed network over CURVE, each worker pinned to the key its
known-workers line names, as ssh pins known_hosts), sends the job (a fresh job nonce and, when
keyed, every rank's public key, so that the ranks' peer-to-peer sockets admit exactly each
other), streams each worker exactly its own slices when the worker has neither a local copy nor
a cached one, collects the workers' data ports, tells everyone where everyone is, and then runs
rank 0 itself: from there on the ranks exchange activations directly, peer to peer, through the
pyzmq communicator. Without keys it contacts only workers on loopback, unless --insecure.
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tp_runtime import sharding
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
from tp_runtime.errors import ConfigError

log = logging.getLogger("tp_runtime.coordinator")

HELLO_TIMEOUT_S = 5.0
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
    if runtime.shares == "auto":  # the slices are streamed before the ranks could measure anything
        raise ConfigError("--shares auto is not available over tp-workers yet: give each rank's weight, e.g. --shares 3,1")
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
            c.send(Kind.HELLO, {"role": "coordinator"})
        for c in clients:
            c.recv(HELLO_TIMEOUT_S, "handshake")
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

        raw = ZmqCommunicator(ctx, 0, peers, inbox, secret=secret, names=rank_names, watch=watch, job=job, keys=keys)
        comm = wrap(raw, runtime.comm, device=torch.device("cpu"))
        result = run_rank0(ParallelConfig(world_size=tp, rank=0), comm, {"weights_streamed_bytes": streamed})
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
