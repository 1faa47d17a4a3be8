"""Transports behind the Communicator protocol. The only package that imports torch.distributed."""

from __future__ import annotations

import torch

from tp_runtime.comm.local import LocalCommunicator
from tp_runtime.comm.timing import TimedCommunicator, wrap
from tp_runtime.comm.torch_dist import TorchDistCommunicator
from tp_runtime.config import CommConfig, ParallelConfig

__all__ = ["LocalCommunicator", "TimedCommunicator", "TorchDistCommunicator", "create"]


def create(parallel: ParallelConfig, device: torch.device, comm_cfg: CommConfig = CommConfig()):
    """The communicator for this process, timed; world 1 needs no transport at all."""
    if parallel.world_size == 1:
        return LocalCommunicator(trace=comm_cfg.trace)
    return wrap(TorchDistCommunicator.init(parallel, device, comm_cfg), comm_cfg, device)
