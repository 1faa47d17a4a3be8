"""The Communicator protocol: the only communication surface the model and engine see.

Every call carries a `site` tag ("layer.3.attn_out") so that the stats can say which part of
the model issued it. Implementations live in tp_runtime/comm/ (the only place that imports
torch.distributed or zmq); comm/timing.py wraps them to time every call. A world of size 1
returns its input untouched.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Communicator(Protocol):
    rank: int
    world_size: int
    transport: str  # "local", "gloo", "nccl", "zmq"
    stats: Any  # comm.timing.CommStats: the engine sets .phase and reads summaries

    def all_reduce(self, t: torch.Tensor, *, site: str) -> torch.Tensor:
        """Sum over ranks, in place where the transport allows; returns the result."""

    def all_gather(self, t: torch.Tensor, dim: int = -1, *, site: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Concatenate every rank's equally shaped `t` along `dim`, in rank order; into `out`
        (returned) when given, which the shared-memory and torch.distributed transports fill
        without allocating (the fused decode step's logits)."""

    def all_to_all(self, t: torch.Tensor, *, site: str) -> torch.Tensor:
        """Split dim 0 into world_size chunks; chunk i goes to rank i."""

    def broadcast(self, obj: Any, src: int = 0, *, site: str) -> Any:
        """A tensor (same shape everywhere) or a small JSON-able object from `src`."""

    def barrier(self, *, site: str) -> None: ...

    def close(self) -> None: ...
