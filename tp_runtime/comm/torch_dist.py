"""torch.distributed transport: NCCL on CUDA devices, gloo on CPU."""

from __future__ import annotations

import datetime
import math
from typing import Any, Sequence

import torch
import torch.distributed as dist

from tp_runtime.communicator import check_splits
from tp_runtime.config import CommConfig, ParallelConfig
from tp_runtime.errors import LaunchError

# the ranks' equal pieces into one tensor; torch 2.13 names it all_gather_single (and warns on
# the older all_gather_into_tensor), which older torch builds lack
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TorchDistCommunicator:
    def __init__(self, group: Any, rank: int, world_size: int, backend: str) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.backend = self.transport = backend

    @classmethod
    def init(cls, parallel: ParallelConfig, device: torch.device, comm_cfg: CommConfig) -> TorchDistCommunicator:
        backend = comm_cfg.transport if comm_cfg.transport != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if not dist.is_initialized():
            url = parallel.rendezvous
            try:
                dist.init_process_group(
                    backend,
                    init_method=url,
                    rank=parallel.rank,
                    world_size=parallel.world_size,
                    timeout=datetime.timedelta(seconds=comm_cfg.timeout_s),
                    device_id=device if device.type == "cuda" else None,
                )
            except Exception as e:  # rendezvous errors come from deep in c10d
                raise LaunchError(
                    f"rank {parallel.rank}: could not join the process group at {url} "
                    f"(world size {parallel.world_size}, backend {backend}): {e}"
                ) from e
        return cls(dist.group.WORLD, dist.get_rank(), dist.get_world_size(), backend)

    def all_reduce(self, t: torch.Tensor, *, site: str) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1, *, site: str, out: torch.Tensor | None = None) -> torch.Tensor:
        t = t.contiguous()
        if out is not None and out.is_contiguous() and math.prod(t.shape[: dim % t.dim()]) == 1:
            # nothing before `dim`: the concatenation is the ranks' pieces back to back
            _gather_single(out.view(-1), t.view(-1), group=self.group)
            return out
        if out is not None:
            return out.copy_(self.all_gather(t, dim, site=site))
        if self.backend == "nccl":
            out = torch.empty((self.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
            _gather_single(out, t, group=self.group)
            parts = out.chunk(self.world_size, dim=0)
        else:
            parts = [torch.empty_like(t) for _ in range(self.world_size)]
            dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=dim)

    def all_to_all(self, t: torch.Tensor, send_splits: Sequence[int] | None = None, recv_splits: Sequence[int] | None = None, *, site: str) -> torch.Tensor:
        send, recv = check_splits(t, self.world_size, send_splits, recv_splits)
        t = t.contiguous()
        out = t.new_empty((sum(recv), *t.shape[1:]))
        dist.all_to_all_single(out, t, output_split_sizes=recv, input_split_sizes=send, group=self.group)  # NCCL and gloo alike
        return out

    def broadcast(self, obj: Any, src: int = 0, *, site: str) -> Any:
        if isinstance(obj, torch.Tensor):
            dist.broadcast(obj, src=src, group=self.group)
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self, *, site: str) -> None:
        dist.barrier(group=self.group)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
