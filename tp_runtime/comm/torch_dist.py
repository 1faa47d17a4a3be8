"""torch.distributed transport: NCCL on CUDA devices, gloo on CPU."""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from tp_runtime.communicator import CommStats, Timer
from tp_runtime.config import ParallelConfig
from tp_runtime.errors import LaunchError

# A rank that never shows up must not hang the others for torch's default 10-30 minutes.
DEFAULT_TIMEOUT_S = 120


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TorchDistCommunicator:
    def __init__(self, group: Any, rank: int, world_size: int, backend: str) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.stats = CommStats()

    @classmethod
    def init(cls, parallel: ParallelConfig, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> TorchDistCommunicator:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            url = parallel.rendezvous
            try:
                dist.init_process_group(
                    backend,
                    init_method=url,
                    rank=parallel.rank,
                    world_size=parallel.world_size,
                    timeout=datetime.timedelta(seconds=timeout_s),
                    device_id=device if device.type == "cuda" else None,
                )
            except Exception as e:  # rendezvous errors come from deep in c10d
                raise LaunchError(
                    f"rank {parallel.rank}: could not join the process group at {url} "
                    f"(world size {parallel.world_size}, backend {backend}): {e}"
                ) from e
        return cls(dist.group.WORLD, dist.get_rank(), dist.get_world_size(), backend)

    def all_reduce(self, t: torch.Tensor, *, site: str) -> torch.Tensor:
        with Timer(self.stats, "all_reduce", site, _nbytes(t)):
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1, *, site: str) -> torch.Tensor:
        t = t.contiguous()
        with Timer(self.stats, "all_gather", site, _nbytes(t)):
            if self.backend == "nccl":
                out = torch.empty((self.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
                dist.all_gather_into_tensor(out, t, group=self.group)
                parts = out.chunk(self.world_size, dim=0)
            else:
                parts = [torch.empty_like(t) for _ in range(self.world_size)]
                dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=dim)

    def all_to_all(self, t: torch.Tensor, *, site: str) -> torch.Tensor:
        t = t.contiguous()
        out = torch.empty_like(t)
        with Timer(self.stats, "all_to_all", site, _nbytes(t)):
            if self.backend == "nccl":
                dist.all_to_all_single(out, t, group=self.group)
            else:  # gloo has no all_to_all: one scatter per source rank
                chunks = list(t.chunk(self.world_size, dim=0))
                outs = list(out.chunk(self.world_size, dim=0))
                for src in range(self.world_size):
                    dist.scatter(outs[src], chunks if src == self.rank else None, src=src, group=self.group)
        return out

    def broadcast(self, obj: Any, src: int = 0, *, site: str) -> Any:
        if isinstance(obj, torch.Tensor):
            with Timer(self.stats, "broadcast", site, _nbytes(obj)):
                dist.broadcast(obj, src=src, group=self.group)
            return obj
        box = [obj]
        with Timer(self.stats, "broadcast", site, 0):
            dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self, *, site: str) -> None:
        with Timer(self.stats, "barrier", site, 0):
            dist.barrier(group=self.group)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
