"""Transports behind the Communicator protocol. The only package that imports torch.distributed."""

from __future__ import annotations

import torch

import os
from dataclasses import replace

from tp_runtime.comm.local import LocalCommunicator
from tp_runtime.comm.shm import DEFAULT_SLOT_BYTES, ShmCommunicator, ordering_available
from tp_runtime.comm.timing import TimedCommunicator, wrap
from tp_runtime.comm.torch_dist import TorchDistCommunicator
from tp_runtime.config import CommConfig, ParallelConfig
from tp_runtime.errors import ConfigError

__all__ = ["LocalCommunicator", "ShmCommunicator", "TimedCommunicator", "TorchDistCommunicator", "create", "pick_transport"]


def pick_transport(parallel: ParallelConfig, device: torch.device, comm_cfg: CommConfig) -> str:
    if comm_cfg.transport != "auto":
        return comm_cfg.transport
    if device.type == "cuda":
        return "nccl"
    return "shm" if parallel.local_world_size == parallel.world_size and ordering_available() else "gloo"


def create(parallel: ParallelConfig, device: torch.device, comm_cfg: CommConfig = CommConfig(), message_bytes: int | None = None):
    """The communicator for this process, timed; world 1 needs no transport at all.
    message_bytes: the largest per-rank message of a decode step (the same on every rank), which
    sizes the shared-memory slots; larger messages go through gloo."""
    if parallel.world_size == 1:
        return LocalCommunicator(trace=comm_cfg.trace)
    transport = pick_transport(parallel, device, comm_cfg)
    if transport == "shm":
        if device.type != "cpu":
            raise ConfigError(f"--transport shm moves CPU tensors; this rank runs on {device}")
        if parallel.local_world_size != parallel.world_size:
            raise ConfigError(f"--transport shm needs every rank on this host ({parallel.local_world_size} of {parallel.world_size} are local)")
        group = TorchDistCommunicator.init(parallel, device, replace(comm_cfg, transport="gloo"))
        inner = ShmCommunicator(group, slot_bytes=message_bytes or DEFAULT_SLOT_BYTES, timeout_s=comm_cfg.timeout_s)
    else:
        inner = TorchDistCommunicator.init(parallel, device, comm_cfg)
    return wrap(inner, comm_cfg, device, oversubscribed=device.type == "cpu" and parallel.local_world_size > (os.cpu_count() or 1))
