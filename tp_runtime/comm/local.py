"""World size 1: every collective is the identity."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from tp_runtime.comm.timing import CommStats
from tp_runtime.communicator import check_splits


class LocalCommunicator:
    rank = 0
    world_size = 1
    transport = "local"

    def __init__(self, trace: bool = False) -> None:
        self.stats = CommStats(trace=trace)

    def all_reduce(self, t: torch.Tensor, *, site: str) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1, *, site: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return t if out is None else out.copy_(t)

    def all_to_all(self, t: torch.Tensor, send_splits: Sequence[int] | None = None, recv_splits: Sequence[int] | None = None, *, site: str) -> torch.Tensor:
        send, recv = check_splits(t, 1, send_splits, recv_splits)
        if recv != send:
            raise ValueError(f"all_to_all in a world of 1: receive splits {recv} differ from send splits {send}")
        return t

    def broadcast(self, obj: Any, src: int = 0, *, site: str) -> Any:
        return obj

    def barrier(self, *, site: str) -> None:
        return None

    def close(self) -> None:
        return None
