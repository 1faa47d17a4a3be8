"""The Communicator protocol: the only communication surface the model and engine see.

Every call carries a `site` tag ("layer.3.attn_out") so that the stats can say which part of
the model issued it. Implementations live in tp_runtime/comm/ (the only place that imports
torch.distributed or zmq); comm/timing.py wraps them to time every call. A world of size 1
returns its input untouched.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

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

    def all_to_all(self, t: torch.Tensor, send_splits: Sequence[int] | None = None, recv_splits: Sequence[int] | None = None, *, site: str) -> torch.Tensor:
        """Rows send_splits[i] of t (dim 0, in order) go to rank i; returns the rows from every
        rank in rank order, recv_splits[i] of them from rank i (each rank's send_splits[me]).
        Splits may be zero or uneven; both None: world_size equal chunks. `check_splits` says
        what a transport may assume."""

    def broadcast(self, obj: Any, src: int = 0, *, site: str) -> Any:
        """A tensor (same shape everywhere) or a small JSON-able object from `src`."""

    def barrier(self, *, site: str) -> None: ...

    def close(self) -> None: ...


def check_splits(t: torch.Tensor, world_size: int, send_splits: Sequence[int] | None, recv_splits: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """The all_to_all split sizes, checked before any byte moves (a bad split would otherwise hang
    the peers or fail deep inside a transport). None for both: equal chunks of dim 0."""
    if (send_splits is None) != (recv_splits is None):
        raise ValueError("all_to_all: give both send_splits and recv_splits, or neither")
    rows = t.shape[0] if t.dim() else 0
    if send_splits is None:
        if t.dim() == 0 or rows % world_size:
            raise ValueError(f"all_to_all without split sizes needs dim 0 ({rows}) divisible by the world size ({world_size})")
        return [rows // world_size] * world_size, [rows // world_size] * world_size
    send, recv = [int(n) for n in send_splits], [int(n) for n in recv_splits]
    if len(send) != world_size or len(recv) != world_size:
        raise ValueError(f"all_to_all: {len(send)} send and {len(recv)} receive splits for a world of {world_size}")
    if min(send + recv) < 0:
        raise ValueError(f"all_to_all: negative split sizes (send {send}, receive {recv})")
    if sum(send) != rows:
        raise ValueError(f"all_to_all: send splits {send} sum to {sum(send)}, but the tensor has {rows} rows")
    return send, recv
