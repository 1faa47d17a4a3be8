"""Shared-memory transport for ranks on one host: all-reduce and all-gather through a mapped file.

Setup goes through a gloo group (the segment's name and every rank's pid are exchanged once);
after that a collective touches no socket and no syscall:

    segment (a file in /dev/shm, unlinked as soon as every rank has mapped it):
        flags  int64[world]                  flags[r] = number of the last collective r published
        slots  [2][world][slot_bytes]        double-buffered: collective s uses slots[s % 2]

    collective s on rank r:
        wait until every flags[q] >= s - 1    (peers are done reading slots[s % 2] from s - 2)
        copy my tensor into slots[s % 2][r]; flags[r] = s      (a release store)
        wait until every flags[q] >= s (acquire loads); read the peers' slots (sum in rank
        order, or concatenate)

Every rank sums the same slots in the same order, so every rank holds the same bits. The
flags are stored and loaded through the CPU kernel library's atomics (release / acquire), so the
slot's bytes are visible before its flag on any CPU; without the library, plain stores are
ordered only on x86, and elsewhere the transport refuses to start (`ordering_available`).

Waiting spins for ~50 us, then yields the core, then naps, so that more ranks than cores still
progress; a long wait naps longer (1/64 of the time waited so far, at most 1 ms), so that a
serve follower waiting between requests for the next step's plan (a broadcast: up to a second
between rank 0's idle keepalives) costs next to no CPU, and a new plan is seen within 1 ms.
While waiting it checks every ~0.2 s that the late peers' processes live: a dead peer
is named within that; a live one is waited for up to the configured collective timeout (a rank
still loading from a cold disk, a server rank between requests), then named as hung.

Which collectives use the slots is decided from sizes every rank shares, never by one rank
alone: all-reduce, all-gather and a tensor broadcast take equal shapes everywhere, and an
all-to-all's rows differ per rank, so each rank first writes a header (whether its rows fit, its
split sizes) beside them, and all fall back together when one does not fit. A broadcast is a
collective like the others (every rank opens it and publishes its flag, so the double buffer
stays in step) in which only the source writes its slot; the others copy from it into their
tensor. Tensors larger than a slot (slots are sized by the engine for the model's largest decode
message) and the rarer collectives (broadcast of objects, barrier) go through the gloo group.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import platform
import time
import uuid
from typing import Any, Sequence

import numpy as np
import torch

from tp_runtime.communicator import check_splits
from tp_runtime.errors import ConfigError, WorkerError
from tp_runtime.kernels import cpu_gemv

DEFAULT_SLOT_BYTES = 1 << 20  # one hidden vector is a few KiB; logits of a 128k vocab are 512 KiB
SHM_DIR = "/dev/shm"
_SPIN_S, _YIELD_S, _NAP_S = 50e-6, 1e-3, 50e-6
_MAX_NAP_S = 1e-3  # a long wait naps waited / 64, at most this: it adds at most 1/64 of the wait, and at most 1 ms
LIVENESS_CHECK_S = 0.2  # how often a waiting rank checks that the peers it waits for live
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def ordering_available() -> bool:
    """Whether flags can be published in order here: the kernel library's atomics, or x86."""
    return cpu_gemv.available() or _X86


class _Flags:
    """flags[r] of the segment: one int64 per 64-byte line. Release stores and acquire loads
    through the kernel library where it is loaded; plain numpy accesses on x86 otherwise."""

    def __init__(self, buf: mmap.mmap, world: int) -> None:
        self.view = np.frombuffer(buf, dtype=np.int64, count=8 * world, offset=0)[::8]
        self.world = world
        lib = cpu_gemv.load()
        if lib is None and not _X86:
            raise ConfigError(f"the shared-memory transport needs the CPU kernel library on {platform.machine()} "
                              "(ordered flags); install a C compiler or use --transport gloo")
        self.lib = lib
        self._anchor = ctypes.c_char.from_buffer(buf) if lib is not None else None  # an export of the mapping, dropped in close()
        self.base = ctypes.addressof(self._anchor) if lib is not None else 0

    def min(self) -> int:
        if self.lib is None:
            return int(self.view.min())
        return self.lib.tp_flags_min(self.base, self.world, 8)

    def store(self, rank: int, value: int) -> None:
        if self.lib is None:
            self.view[rank] = value
        else:
            self.lib.tp_flag_store(self.base + 64 * rank, value)

    def __getitem__(self, rank: int) -> int:
        return int(self.view[rank])

    def close(self) -> None:
        self.view = self._anchor = None
        self.base = 0


def _write_nothing(slot: torch.Tensor) -> None:
    """A broadcast's receivers publish their flag with an empty slot."""


class ShmCommunicator:
    transport = "shm"

    def __init__(self, group_comm: Any, slot_bytes: int = DEFAULT_SLOT_BYTES, timeout_s: float = 120.0) -> None:
        """group_comm: a working gloo communicator of the same ranks (setup and fallbacks).
        slot_bytes: the largest message a rank puts in a slot (every rank must pass the same);
        timeout_s: how long a live peer is waited for (CommConfig.timeout_s)."""
        self.fallback = group_comm
        self.rank, self.world_size = group_comm.rank, group_comm.world_size
        slot_bytes = max(4096, -(-int(slot_bytes) // 64) * 64)  # whole cache lines: every slot stays aligned
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
        self.flags = _Flags(self.map, p)
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
        with more ranks than cores, a spinning rank would steal the core its peer computes on.
        Naps grow with the wait (an idle serve follower would otherwise wake 10k times a second)."""
        flags = self.flags
        if flags.min() >= at_least:
            return
        start = time.perf_counter()
        next_check = start + LIVENESS_CHECK_S
        while flags.min() < at_least:
            now = time.perf_counter()
            waited = now - start
            if waited < _SPIN_S:
                continue
            if waited < _YIELD_S:
                os.sched_yield()
                continue
            time.sleep(min(_MAX_NAP_S, max(_NAP_S, waited / 64)))
            if now > next_check:
                self._check_peers(at_least, waited)
                next_check = now + LIVENESS_CHECK_S

    def _check_peers(self, at_least: int, waited: float) -> None:
        """Name a late peer that died (at once) or that has made no progress for timeout_s."""
        for r in range(self.world_size):
            if self.flags[r] >= at_least:
                continue
            try:
                os.kill(self.pids[r], 0)
            except ProcessLookupError:
                raise WorkerError(f"local rank {r} (pid {self.pids[r]}) died: rank {self.rank} waited for its part of collective #{at_least}") from None
            except PermissionError:
                pass
            if waited > self.timeout_s:
                raise WorkerError(f"local rank {r} (pid {self.pids[r]}) made no progress for {waited:.0f} s at collective #{at_least} "
                                  f"(the collective timeout is {self.timeout_s:g} s); it hangs")

    def _publish(self, write, nbytes: int) -> int:
        """Open the next collective, write(slot of `nbytes`) into this rank's slot, publish it and
        wait for every peer's; returns the collective's number."""
        self.seq += 1
        s = self.seq
        self._wait_all(s - 1)
        write(self._slot(s, self.rank, nbytes))
        self.flags.store(self.rank, s)
        self._wait_all(s)
        return s

    def _publish_tensor(self, t: torch.Tensor) -> int | None:
        """t into this rank's slot of the next collective; None if it does not fit (every rank
        passes the same shape, so every rank decides alike)."""
        nbytes = t.numel() * t.element_size()
        if nbytes > self.slot_bytes:
            return None
        self._publish(lambda slot: slot.copy_(t.contiguous().view(-1).view(torch.uint8)), nbytes)
        return nbytes

    def _peer(self, r: int, nbytes: int, like: torch.Tensor) -> torch.Tensor:
        return self._slot(self.seq, r, nbytes).view(like.dtype).view(like.shape)

    def all_reduce(self, t: torch.Tensor, *, site: str) -> torch.Tensor:
        nbytes = self._publish_tensor(t)
        if nbytes is None:
            return self.fallback.all_reduce(t, site=site)
        torch.add(self._peer(0, nbytes, t), self._peer(1, nbytes, t), out=t)
        for r in range(2, self.world_size):
            t += self._peer(r, nbytes, t)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1, *, site: str, out: torch.Tensor | None = None) -> torch.Tensor:
        nbytes = self._publish_tensor(t)
        if nbytes is None:
            return self.fallback.all_gather(t, dim, site=site, out=out)
        parts = [self._peer(r, nbytes, t) for r in range(self.world_size)]
        return torch.cat(parts, dim=dim) if out is None else torch.cat(parts, dim=dim, out=out)

    def all_to_all(self, t: torch.Tensor, send_splits: Sequence[int] | None = None, recv_splits: Sequence[int] | None = None, *, site: str) -> torch.Tensor:
        """Each rank's slot: a header [fits, send splits...] (int64) and, if they fit, its rows;
        a peer reads its own rows at the offset the sender's splits give."""
        send, recv = check_splits(t, self.world_size, send_splits, recv_splits)
        p = self.world_size
        header = 8 * (p + 1)
        t = t.contiguous()
        row_bytes = math.prod(t.shape[1:]) * t.element_size()
        data = t.numel() * t.element_size()
        fits = header + data <= self.slot_bytes

        def write(slot: torch.Tensor) -> None:
            slot[:header].view(torch.int64).copy_(torch.tensor([int(fits), *send], dtype=torch.int64))
            if fits and data:
                slot[header : header + data].copy_(t.view(-1).view(torch.uint8))

        s = self._publish(write, header + data if fits else header)
        heads = [self._slot(s, r, header).view(torch.int64).tolist() for r in range(p)]
        if not all(h[0] for h in heads):  # one rank's rows do not fit: everyone goes through gloo
            return self.fallback.all_to_all(t, send, recv, site=site)
        parts = []
        for r, (_, *splits) in enumerate(heads):
            if splits[self.rank] != recv[r]:
                raise WorkerError(f"all_to_all: local rank {r} sends {splits[self.rank]} rows to rank {self.rank}, which expected {recv[r]}")
            off = header + sum(splits[: self.rank]) * row_bytes
            n = recv[r] * row_bytes
            parts.append(self._slot(s, r, off + n)[off:].view(t.dtype).view(recv[r], *t.shape[1:]))
        return torch.cat(parts, dim=0)

    def broadcast(self, obj: Any, src: int = 0, *, site: str) -> Any:
        """A tensor that fits a slot: src writes it into its slot, the others copy it from there
        into theirs (in place); every rank opens the collective, the others writing nothing.
        Larger tensors and objects: the gloo group (every rank passes the same shape, so every
        rank decides alike)."""
        if not isinstance(obj, torch.Tensor):
            return self.fallback.broadcast(obj, src, site=site)
        nbytes = obj.numel() * obj.element_size()
        if nbytes > self.slot_bytes:
            return self.fallback.broadcast(obj, src, site=site)
        if self.rank == src:
            self._publish(lambda slot: slot.copy_(obj.contiguous().view(-1).view(torch.uint8)), nbytes)
        else:
            s = self._publish(_write_nothing, 0)
            obj.copy_(self._slot(s, src, nbytes).view(obj.dtype).view(obj.shape))
        return obj

    def barrier(self, *, site: str) -> None:
        self.fallback.barrier(site=site)

    def close(self) -> None:
        if self.flags is not None:
            self.flags.close()
        self.flags = None
        self.raw = None
        try:
            self.map.close()
        except BufferError:
            pass  # a tensor view still alive; the mapping goes with the process
        self.fallback.close()
