"""Shared-memory transport for ranks on one host: all-reduce and all-gather through a mapped file.

Setup goes through a gloo group (the segment's name and every rank's pid are exchanged once);
after that a collective touches no socket and no syscall:

    segment (a file in /dev/shm, unlinked as soon as every rank has mapped it):
        flags  int64[world]                  flags[r] = number of the last collective r published
        slots  [2][world][slot_bytes]        double-buffered: collective s uses slots[s % 2]

    collective s on rank r:
        wait until every flags[q] >= s - 1    (peers are done reading slots[s % 2] from s - 2)
        copy my tensor into slots[s % 2][r]; flags[r] = s      (x86 stores are not reordered)
        wait until every flags[q] >= s; read the peers' slots (sum in rank order, or concatenate)

Every rank sums the same slots in the same order, so every rank holds the same bits.
Waiting spins for ~50 us, then yields the core, then naps, so that more ranks than cores
still progress; a peer that makes no progress for `timeout_s` is checked
for life and named in the error. Tensors larger than a slot, and the rarer collectives
(broadcast of objects, all-to-all, barrier), go through the gloo group.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid
from typing import Any

import numpy as np
import torch

from tp_runtime.errors import WorkerError

DEFAULT_SLOT_BYTES = 1 << 20  # one hidden vector is a few KiB; logits of a 128k vocab are 512 KiB
SHM_DIR = "/dev/shm"
_SPIN_S, _YIELD_S, _NAP_S = 50e-6, 1e-3, 50e-6


class ShmCommunicator:
    transport = "shm"

    def __init__(self, group_comm: Any, slot_bytes: int = DEFAULT_SLOT_BYTES, timeout_s: float = 30.0) -> None:
        """group_comm: a working gloo communicator of the same ranks (setup and fallbacks)."""
        self.fallback = group_comm
        self.rank, self.world_size = group_comm.rank, group_comm.world_size
        self.slot_bytes, self.timeout_s = slot_bytes, timeout_s
        p = self.world_size
        flags_bytes = 64 * p  # one cache line per flag: no false sharing between ranks
        size = flags_bytes + 2 * p * slot_bytes
        name = group_comm.broadcast(f"tp-runtime-{uuid.uuid4().hex}" if self.rank == 0 else None, src=0, site="shm.setup")
        path = os.path.join(SHM_DIR if os.path.isdir(SHM_DIR) else "/tmp", name)
        if self.rank == 0:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(fd, size)
        group_comm.barrier(site="shm.setup")
        if self.rank != 0:
            fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(fd, size)
        os.close(fd)
        self.pids = self._exchange_pids(group_comm)
        if self.rank == 0:
            os.unlink(path)  # every rank has it mapped: nothing is left behind, even after a crash
        self.flags = np.frombuffer(self.map, dtype=np.int64, count=8 * p, offset=0)[::8]
        self.raw = torch.frombuffer(self.map, dtype=torch.uint8, count=2 * p * slot_bytes, offset=flags_bytes)
        self.seq = 0

    def _exchange_pids(self, group_comm: Any) -> list[int]:
        pids = torch.zeros(self.world_size, dtype=torch.int64)
        pids[self.rank] = os.getpid()
        group_comm.all_reduce(pids, site="shm.setup")
        return pids.tolist()

    def _slot(self, seq: int, rank: int, nbytes: int) -> torch.Tensor:
        start = ((seq % 2) * self.world_size + rank) * self.slot_bytes
        return self.raw[start : start + nbytes]

    def _wait_all(self, at_least: int) -> None:
        """Spin ~50 us (peers are usually that close), then yield the core up to ~1 ms, then nap:
        with more ranks than cores, a spinning rank would steal the core its peer computes on."""
        flags = self.flags
        if flags.min() >= at_least:
            return
        start = time.perf_counter()
        deadline = start + self.timeout_s
        while flags.min() < at_least:
            waited = time.perf_counter() - start
            if waited < _SPIN_S:
                continue
            if waited < _YIELD_S:
                os.sched_yield()
            else:
                time.sleep(_NAP_S)
                if time.perf_counter() > deadline:
                    self._blame(at_least)
                    deadline = time.perf_counter() + self.timeout_s

    def _blame(self, at_least: int) -> None:
        for r, f in enumerate(self.flags):
            if f >= at_least:
                continue
            try:
                os.kill(self.pids[r], 0)
            except ProcessLookupError:
                raise WorkerError(f"local rank {r} (pid {self.pids[r]}) died: rank {self.rank} waited for its part of collective #{at_least}") from None
            except PermissionError:
                pass
            raise WorkerError(f"local rank {r} (pid {self.pids[r]}) made no progress for {self.timeout_s:.0f} s at collective #{at_least}; it hangs")

    def _publish(self, t: torch.Tensor) -> int | None:
        """Write t into this rank's slot of the next collective; None if it does not fit."""
        nbytes = t.numel() * t.element_size()
        if nbytes > self.slot_bytes:
            return None
        self.seq += 1
        s = self.seq
        self._wait_all(s - 1)
        self._slot(s, self.rank, nbytes).copy_(t.contiguous().view(-1).view(torch.uint8))
        self.flags[self.rank] = s
        self._wait_all(s)
        return nbytes

    def _peer(self, r: int, nbytes: int, like: torch.Tensor) -> torch.Tensor:
        return self._slot(self.seq, r, nbytes).view(like.dtype).view(like.shape)

    def all_reduce(self, t: torch.Tensor, *, site: str) -> torch.Tensor:
        nbytes = self._publish(t)
        if nbytes is None:
            return self.fallback.all_reduce(t, site=site)
        torch.add(self._peer(0, nbytes, t), self._peer(1, nbytes, t), out=t)
        for r in range(2, self.world_size):
            t += self._peer(r, nbytes, t)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1, *, site: str, out: torch.Tensor | None = None) -> torch.Tensor:
        nbytes = self._publish(t)
        if nbytes is None:
            return self.fallback.all_gather(t, dim, site=site, out=out)
        parts = [self._peer(r, nbytes, t) for r in range(self.world_size)]
        return torch.cat(parts, dim=dim) if out is None else torch.cat(parts, dim=dim, out=out)

    def all_to_all(self, t: torch.Tensor, *, site: str) -> torch.Tensor:
        return self.fallback.all_to_all(t, site=site)

    def broadcast(self, obj: Any, src: int = 0, *, site: str) -> Any:
        return self.fallback.broadcast(obj, src, site=site)

    def barrier(self, *, site: str) -> None:
        self.fallback.barrier(site=site)

    def close(self) -> None:
        self.flags = None
        self.raw = None
        try:
            self.map.close()
        except BufferError:
            pass  # a tensor view still alive; the mapping goes with the process
        self.fallback.close()
