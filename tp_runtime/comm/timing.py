"""Timing of every collective, and latency injection to emulate slower links.

`TimedCommunicator` wraps any transport: each call records op, site, bytes, wall time and the
injected delay into `CommStats`, keyed by the engine's current phase (prefill / decode). On
CUDA, the time of an asynchronous NCCL call is taken with events, resolved only when a report
is asked for, so timing adds no synchronisation of its own.

Injection (`--inject-latency 200us`, `--inject-bandwidth 1Gbit`) adds latency + bytes/bandwidth
after the real collective, by spinning (sleep is too coarse below ~100 us). Every rank issues
the same collectives with the same sizes, so every rank adds the same delay and none drifts.
"""

from __future__ import annotations

import json
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from tp_runtime.communicator import check_splits
from tp_runtime.config import CommConfig


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# latency samples kept per site for percentiles: the most recent ones, so that a process that
# runs for days (a server) holds a bounded amount; counts and totals stay exact
WINDOW = 4096


@dataclass
class SiteStats:
    count: int = 0
    bytes: int = 0
    measured: float = 0.0  # seconds, every call
    injected: float = 0.0
    latencies: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # the last WINDOW calls' seconds
    to_rank: list[int] | None = None  # all_to_all: bytes this rank sent each destination (its own rows: to itself)

    def add(self, seconds: float) -> None:
        self.measured += seconds
        self.latencies.append(seconds)

    @property
    def seconds(self) -> float:
        return self.measured + self.injected


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


class CommStats:
    """Per (phase, op, site) counters and latency samples; an optional Chrome trace."""

    def __init__(self, trace: bool = False) -> None:
        self.phase = "prefill"
        self.by_key: dict[tuple[str, str, str], SiteStats] = {}
        self.trace_events: list[dict[str, Any]] | None = [] if trace else None
        self._pending: list[tuple[SiteStats, Any, Any]] = []  # CUDA events not yet resolved
        self._t0 = time.perf_counter()

    # -- recording (hot path) --
    def _site(self, op: str, site: str) -> SiteStats:
        key = (self.phase, op, site)
        s = self.by_key.get(key)
        if s is None:
            s = self.by_key[key] = SiteStats()
        return s

    def record(self, op: str, site: str, nbytes: int, seconds: float, injected: float, start: float) -> None:
        s = self._site(op, site)
        s.count += 1
        s.bytes += nbytes
        s.add(seconds)
        s.injected += injected
        if self.trace_events is not None:
            self.trace_events.append(
                {"name": f"{op} {site}", "cat": "comm", "ph": "X", "ts": (start - self._t0) * 1e6, "dur": (seconds + injected) * 1e6,
                 "args": {"bytes": nbytes, "injected_us": injected * 1e6, "phase": self.phase}}
            )

    def record_pairs(self, op: str, site: str, send_bytes: list[int]) -> None:
        """An all_to_all's bytes per destination (after record(): the same site's counters)."""
        s = self._site(op, site)
        s.to_rank = [a + b for a, b in zip(s.to_rank, send_bytes)] if s.to_rank else list(send_bytes)

    def record_cuda(self, op: str, site: str, nbytes: int, start_event: Any, end_event: Any, injected: float) -> None:
        s = self._site(op, site)
        s.count += 1
        s.bytes += nbytes
        s.injected += injected
        self._pending.append((s, start_event, end_event))

    def span(self, name: str, start: float, end: float, **args: Any) -> None:
        """A non-communication span (a decode step) for the trace."""
        if self.trace_events is not None:
            self.trace_events.append({"name": name, "cat": "step", "ph": "X", "ts": (start - self._t0) * 1e6, "dur": (end - start) * 1e6, "args": args})

    @contextmanager
    def in_phase(self, phase: str):
        """Collectives issued inside are counted under `phase` (prefill, decode, load, report);
        the previous phase is back afterwards."""
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    # -- reporting --
    def resolve(self) -> None:
        if self._pending:
            torch.cuda.synchronize()
            for s, e0, e1 in self._pending:
                s.add(e0.elapsed_time(e1) / 1e3)
            self._pending.clear()

    def reset(self) -> None:
        self.resolve()
        self.by_key.clear()
        if self.trace_events is not None:
            self.trace_events.clear()

    def count(self, op: str | None = None, phase: str | None = None) -> int:
        return sum(s.count for (ph, o, _), s in self.by_key.items() if (op is None or o == op) and (phase is None or ph == phase))

    def seconds(self, phase: str | None = None) -> tuple[float, float]:
        """(measured, injected) seconds spent in collectives."""
        self.resolve()
        items = [s for (ph, _, _), s in self.by_key.items() if phase is None or ph == phase]
        return sum(s.measured for s in items), sum(s.injected for s in items)

    def summary(self, decode_seconds: float, decode_steps: int) -> dict[str, Any]:
        """Decode-phase table per (op, site), plus totals; what --comm-stats prints and --json holds."""
        self.resolve()
        rows = []
        steps = max(decode_steps, 1)
        for (phase, op, site), s in sorted(self.by_key.items(), key=lambda kv: (kv[0][0], kv[0][1], _site_order(kv[0][2]))):
            if phase != "decode":
                continue
            lat = sorted(s.latencies)
            rows.append({
                "op": op, "site": site, "count": s.count, "per_token": s.count / steps,
                "bytes_per_call": s.bytes // max(s.count, 1),
                "p50_us": _percentile(lat, 0.5) * 1e6, "p90_us": _percentile(lat, 0.9) * 1e6, "p99_us": _percentile(lat, 0.99) * 1e6,
                "measured_s": s.measured, "injected_s": s.injected,
                "share_of_decode": s.seconds / decode_seconds if decode_seconds else 0.0,
                **({"bytes_to_rank": list(s.to_rank)} if s.to_rank is not None else {}),
            })
        measured, injected = self.seconds("decode")
        pre_measured, pre_injected = self.seconds("prefill")
        return {
            "decode_steps": decode_steps,
            "collectives_per_token": self.count(phase="decode") / steps,
            "bytes_per_token": sum(s.bytes for (ph, _, _), s in self.by_key.items() if ph == "decode") / steps,
            "measured_s": measured,
            "injected_s": injected,
            "comm_share_of_decode": (measured + injected) / decode_seconds if decode_seconds else 0.0,
            "compute_s_per_token": max(decode_seconds - measured - injected, 0.0) / steps,
            "comm_s_per_token": (measured + injected) / steps,
            "sites": rows,
            "prefill": {"count": self.count(phase="prefill"), "measured_s": pre_measured, "injected_s": pre_injected},
        }

    def write_trace(self, path: str | Path, rank: int) -> None:
        self.resolve()
        events = [dict(e, pid=rank, tid=0 if e["cat"] == "step" else 1) for e in (self.trace_events or [])]
        meta = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}}]
        Path(path).write_text(json.dumps({"traceEvents": meta + events, "displayTimeUnit": "ns"}))


def _site_order(site: str) -> tuple:
    """layer.10 after layer.9: numeric parts compare as numbers."""
    return tuple(int(p) if p.isdigit() else p for p in site.split("."))


def format_table(summary: dict[str, Any], collapse_layers: bool = True) -> str:
    """Aligned text table of a summary; layer.N.x sites are merged into layer.*.x by default."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in summary["sites"]:
        site = r["site"]
        if collapse_layers and site.startswith("layer."):
            site = "layer.*." + site.split(".", 2)[2]
        key = (r["op"], site)
        agg = rows.setdefault(key, {"count": 0, "per_token": 0.0, "bytes": r["bytes_per_call"], "p50": [], "p90": [], "p99": [], "share": 0.0, "injected": 0.0})
        agg["count"] += r["count"]
        agg["per_token"] += r["per_token"]
        agg["share"] += r["share_of_decode"]
        agg["injected"] += r["injected_s"]
        for q in ("p50", "p90", "p99"):
            agg[q].append(r[f"{q}_us"])
    head = f"{'op':<11} {'site':<18} {'/token':>7} {'bytes':>9} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} {'injected':>9} {'of decode':>9}"
    lines = [head, "-" * len(head)]
    for (op, site), a in rows.items():
        # merged sites: the median of per-layer p50s, the max of the tails
        p50 = sorted(a["p50"])[len(a["p50"]) // 2]
        lines.append(
            f"{op:<11} {site:<18} {a['per_token']:>7.1f} {a['bytes']:>9} {p50:>8.1f} {max(a['p90']):>8.1f} {max(a['p99']):>8.1f} "
            f"{a['injected'] * 1e3:>7.1f}ms {a['share'] * 100:>8.1f}%"
        )
    lines.append("-" * len(head))
    lines.append(
        f"per token: {summary['collectives_per_token']:.1f} collectives, {summary['bytes_per_token'] / 1e3:.1f} kB, "
        f"compute {summary['compute_s_per_token'] * 1e3:.2f} ms + comm {summary['comm_s_per_token'] * 1e3:.2f} ms "
        f"({summary['comm_share_of_decode'] * 100:.1f}% of decode; injected {summary['injected_s'] * 1e3:.1f} ms in all)"
    )
    return "\n".join(lines)


class LatencyInjector:
    def __init__(self, latency_s: float, bandwidth_Bps: float | None, spin: bool = True) -> None:
        """spin=False when ranks outnumber cores: a spinning rank would hold the core a peer
        needs to compute, stretching the emulated link far beyond its latency."""
        self.latency_s, self.bandwidth_Bps, self.spin = latency_s, bandwidth_Bps, spin

    def delay_for(self, nbytes: int) -> float:
        return self.latency_s + (nbytes / self.bandwidth_Bps if self.bandwidth_Bps else 0.0)

    def wait(self, seconds: float) -> None:
        end = time.perf_counter() + seconds
        if not self.spin:
            time.sleep(seconds)
            return
        if seconds > 2e-3:
            # asleep for the bulk (leaving the core to a co-located rank), the last millisecond
            # spun: a wake-up can come late by ~0.1-1 ms on a busy machine, and a late rank
            # delays every peer at the next collective
            time.sleep(seconds - 1e-3)
        while time.perf_counter() < end:
            pass


class TimedCommunicator:
    """Wraps a transport: the same protocol, every call timed (and delayed, if injecting)."""

    def __init__(self, inner: Any, stats: CommStats, injector: LatencyInjector | None = None, cuda: bool = False) -> None:
        self.inner, self.stats, self.injector, self.cuda = inner, stats, injector, cuda
        self.rank, self.world_size, self.transport = inner.rank, inner.world_size, inner.transport

    def _timed(self, op: str, site: str, nbytes: int, fn, /, *args, **kwargs):
        if self.cuda:
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            out = fn(*args, **kwargs)
            e1.record()
            injected = self._inject(nbytes)
            self.stats.record_cuda(op, site, nbytes, e0, e1, injected)
            return out
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        t1 = time.perf_counter()
        self.stats.record(op, site, nbytes, t1 - t0, self._inject(nbytes), t0)
        return out

    def _inject(self, nbytes: int) -> float:
        if self.injector is None:
            return 0.0
        d = self.injector.delay_for(nbytes)
        if self.cuda:
            torch.cuda.synchronize()  # an emulated link delays the data, so the data must exist first
        self.injector.wait(d)
        return d

    def all_reduce(self, t: torch.Tensor, *, site: str) -> torch.Tensor:
        return self._timed("all_reduce", site, _nbytes(t), self.inner.all_reduce, t, site=site)

    def all_gather(self, t: torch.Tensor, dim: int = -1, *, site: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._timed("all_gather", site, _nbytes(t), self.inner.all_gather, t, dim, site=site, out=out)

    def all_to_all(self, t: torch.Tensor, send_splits: Sequence[int] | None = None, recv_splits: Sequence[int] | None = None, *, site: str) -> torch.Tensor:
        send, recv = check_splits(t, self.world_size, send_splits, recv_splits)  # a bad split: a clear error before any count
        row_bytes = _nbytes(t) // t.shape[0] if t.shape[0] else 0
        sent = (t.shape[0] - send[self.rank]) * row_bytes  # its own rows stay on this rank
        out = self._timed("all_to_all", site, sent, self.inner.all_to_all, t, send, recv, site=site)
        self.stats.record_pairs("all_to_all", site, [n * row_bytes for n in send])
        return out

    def broadcast(self, obj: Any, src: int = 0, *, site: str) -> Any:
        nbytes = _nbytes(obj) if isinstance(obj, torch.Tensor) else 0
        return self._timed("broadcast", site, nbytes, self.inner.broadcast, obj, src, site=site)

    def barrier(self, *, site: str) -> None:
        return self._timed("barrier", site, 0, self.inner.barrier, site=site)

    def close(self) -> None:
        self.inner.close()


def wrap(inner: Any, comm_cfg: CommConfig, device: torch.device, oversubscribed: bool = False) -> TimedCommunicator:
    """oversubscribed: more local ranks than cores (injected delays then sleep instead of spin)."""
    injector = None
    if comm_cfg.inject_latency_s or comm_cfg.inject_bandwidth_Bps:
        injector = LatencyInjector(comm_cfg.inject_latency_s, comm_cfg.inject_bandwidth_Bps, spin=not oversubscribed)
    return TimedCommunicator(inner, CommStats(trace=comm_cfg.trace), injector, cuda=device.type == "cuda")
