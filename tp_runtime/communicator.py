"""The Communicator protocol: the only communication surface the model and engine see.

Every call carries a `site` tag ("layer.3.attn_out") so that the stats can say which part of
the model issued it. Implementations live in tp_runtime/comm/ (the only place that imports
torch.distributed); a world of size 1 returns its input untouched.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class OpStats:
    count: int = 0
    bytes: int = 0
    seconds: float = 0.0


class CommStats:
    """Per (op, site) counters of every collective issued through a Communicator."""

    def __init__(self) -> None:
        self.by_site: dict[tuple[str, str], OpStats] = defaultdict(OpStats)

    def record(self, op: str, site: str, nbytes: int, seconds: float) -> None:
        s = self.by_site[(op, site)]
        s.count += 1
        s.bytes += nbytes
        s.seconds += seconds

    def reset(self) -> None:
        self.by_site.clear()

    def count(self, op: str | None = None) -> int:
        return sum(s.count for (o, _), s in self.by_site.items() if op is None or o == op)

    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.by_site.values())

    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.by_site.values())


class Timer:
    """Context manager that records one collective into CommStats."""

    __slots__ = ("stats", "op", "site", "nbytes", "t0")

    def __init__(self, stats: CommStats, op: str, site: str, nbytes: int) -> None:
        self.stats, self.op, self.site, self.nbytes = stats, op, site, nbytes

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.stats.record(self.op, self.site, self.nbytes, time.perf_counter() - self.t0)


@runtime_checkable
class Communicator(Protocol):
    rank: int
    world_size: int
    stats: CommStats

    def all_reduce(self, t: torch.Tensor, *, site: str) -> torch.Tensor:
        """Sum over ranks, in place where the transport allows; returns the result."""

    def all_gather(self, t: torch.Tensor, dim: int = -1, *, site: str) -> torch.Tensor:
        """Concatenate every rank's equally shaped `t` along `dim`, in rank order."""

    def all_to_all(self, t: torch.Tensor, *, site: str) -> torch.Tensor:
        """Split dim 0 into world_size chunks; chunk i goes to rank i."""

    def broadcast(self, obj: Any, src: int = 0, *, site: str) -> Any:
        """A tensor (same shape everywhere) or a small picklable object from `src`."""

    def barrier(self, *, site: str) -> None: ...

    def close(self) -> None: ...
