"""The coordinator side of a job on hand-started workers (`tp-run generate --workers h1:7340,h2:7340`).

The coordinator is rank 0; worker i is rank i. It greets every worker (protocol version,
shared secret), sends the job, streams each worker exactly its own slices when the worker has
neither a local copy nor a cached one, collects the workers' data ports, tells everyone where
everyone is, and then runs rank 0 itself: from there on the ranks exchange activations
directly, peer to peer, through the pyzmq communicator.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
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
from tp_runtime.comm.sockets import new_context
from tp_runtime.comm.protocol import Kind
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
    secret: bytes | None,
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
    ctx = new_context()
    clients = [ControlClient(ctx, f"tcp://{h}:{p}", secret, f"{h}:{p}") for h, p in workers]
    comm = inbox = None
    try:
        for c in clients:
            c.send(Kind.HELLO, {"role": "coordinator"})
        for c in clients:
            c.recv(HELLO_TIMEOUT_S, "handshake")
        my_addr = advertise or _local_address_towards(workers[0][0])
        inbox, my_port = bind_inbox(ctx, my_addr)
        streamed = 0
        epoch = secrets.randbits(32)  # this job's: a late frame of an earlier one is dropped
        for rank, c in enumerate(clients, start=1):
            c.send(Kind.JOB, {
                "fingerprint": fp, "config": model.config_json,
                "generation_config": gen_cfg,
                "tp": tp, "rank": rank, "names": rank_names, "epoch": epoch,
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

        raw = ZmqCommunicator(ctx, 0, peers, inbox, secret=secret, names=rank_names, watch=watch, epoch=epoch)
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
        ctx.term()
