"""Uneven machines (`--shares`): how much of each split a rank takes.

A decode step waits for the slowest rank, so on a rig of unequal machines an equal split runs
at the speed of the weakest. With `--shares 3,1` rank 0 takes three quarters of the heads, MLP
features, vocabulary and experts (sharding.py reads `ModelConfig.shares`); with `--shares auto`
every rank times a GEMV over a matrix larger than its caches at load (what decode does: read
weights once per token), the ranks all-gather the rates, and each takes a share in proportion.
The ranks measure at the same time, so a core that a neighbour shares shows as slower.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from tp_runtime.communicator import Communicator
from tp_runtime.errors import ConfigError

PROBE_ROWS, PROBE_COLS = 4096, 4096  # 64 MiB of float32: past any last-level cache here
PROBE_REPEATS = 7


def parse(text: str) -> str | tuple[float, ...]:
    """--shares: "auto", or a weight per rank ("3,1", "0.6,0.4")."""
    if text.strip() == "auto":
        return "auto"
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise ConfigError(f"--shares {text!r}: 'auto' or one positive weight per rank, comma-separated (e.g. 3,1)") from None
    return weights


@torch.inference_mode()
def gemv_rate(device: torch.device) -> float:
    """Bytes of weights this rank reads per second in a matrix-vector product (median of a few
    repeats after one warm-up)."""
    w = torch.randn(PROBE_ROWS, PROBE_COLS, device=device)
    x = torch.randn(1, PROBE_COLS, device=device)
    seconds = []
    for i in range(PROBE_REPEATS + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        F.linear(x, w)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            seconds.append(time.perf_counter() - t0)
    return w.numel() * w.element_size() / statistics.median(seconds)


def measured(comm: Communicator, device: torch.device) -> tuple[float, ...]:
    """Every rank's share from the rates all ranks measure now (the same tuple on every rank),
    normalised to sum to 1 and rounded, so that logs and --json show plain numbers."""
    with comm.stats.in_phase("load"):
        rates = comm.all_gather(torch.tensor([gemv_rate(device)], dtype=torch.float64, device=device), dim=0, site="shares").cpu().tolist()
    total = sum(rates)
    return tuple(max(round(r / total, 3), 0.001) for r in rates)


def describe(shares: tuple[float, ...] | None, world: int) -> str:
    """'0.667, 0.333' (or 'equal')."""
    return "equal" if shares is None else ", ".join(f"{w / sum(shares):.3f}" for w in shares)
