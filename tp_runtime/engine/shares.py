"""Uneven machines (`--shares`): how much of each split a rank takes.

A decode step waits for the slowest rank, so on a rig of unequal machines an equal split runs
at the speed of the weakest. With `--shares 3,1` rank 0 takes three quarters of the heads, MLP
features, vocabulary and experts (sharding.py reads `ModelConfig.shares`); with `--shares auto`
every rank times a GEMV over a matrix larger than its caches at load (what decode does: read
weights once per token), the ranks all-gather the rates, and each takes a share in proportion.
The ranks measure at the same time, so a core that a neighbour shares shows as slower.

Over tp-workers the coordinator streams each worker its slices before any rank loads, so the
rates come earlier: the coordinator asks for them in its HELLO, each worker measures while the
coordinator does and answers with its rate and memory budget in its WELCOME, and the
coordinator turns them into explicit shares (`from_rates`, capped by `memory_caps`) that the
job carries like `--shares 3,1`.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from tp_runtime.communicator import Communicator
from tp_runtime.errors import ConfigError
from tp_runtime.kernels import cpu_gemv

if TYPE_CHECKING:
    from tp_runtime.placement import ShardBytes

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
    repeats after one warm-up), through what decode runs: on CPU the GEMV kernel (its pool of
    threads; BLAS where it is not built), which reads 1.5-2x faster than F.linear here, so a
    BLAS probe would misjudge a rank whose kernel is what differs."""
    w = torch.randn(PROBE_ROWS, PROBE_COLS, device=device)
    x = torch.randn(1, PROBE_COLS, device=device)
    product = cpu_gemv.cpu_linear if device.type == "cpu" else F.linear
    seconds = []
    for i in range(PROBE_REPEATS + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        product(x, w)
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
    return from_rates(rates)


def from_rates(rates: Sequence[float], caps: Sequence[float] | None = None) -> tuple[float, ...]:
    """Shares in proportion to the rates, each at most its cap (a fraction of the model the
    rank's memory holds), summing to 1, rounded to 3 decimals (at least 0.001 each).

    Capping is water-filling: a rank whose rate share exceeds its cap gets the cap, and what it
    gives up is split over the others in proportion to their rates, again capped, until none is
    over. Caps apply only when together they hold the whole model (sum >= 1); otherwise every
    rank will stream some layers anyway (placement.py plans that per rank) and the rates alone
    decide, since a decode step waits for the slowest rank."""
    n = len(rates)
    if n == 0 or any(not r > 0 for r in rates):
        raise ConfigError(f"--shares auto: every rank needs a positive measured rate, got {list(rates)}")
    share = [r / sum(rates) for r in rates]
    if caps is not None and len(caps) == n and sum(caps) >= 1:
        fixed: dict[int, float] = {}
        while True:
            free = [i for i in range(n) if i not in fixed]
            if not free:
                break
            left = 1.0 - sum(fixed.values())
            rate_free = sum(rates[i] for i in free)
            for i in free:
                share[i] = left * rates[i] / rate_free
            over = [i for i in free if share[i] > caps[i]]
            if not over:
                break
            for i in over:
                fixed[i] = share[i] = caps[i]
    total = sum(share)
    return tuple(max(round(w / total, 3), 0.001) for w in share)


def memory_caps(shard_bytes: ShardBytes, budgets: Sequence[int | None]) -> list[float] | None:
    """Each rank's cap: the fraction of the model (weights and KV cache, which split by the
    shares; `shard_bytes` is the whole model's, tp=1) its memory budget holds after the
    activations, which every rank needs whole. None when a budget is unknown."""
    if any(b is None for b in budgets):
        return None
    splittable = shard_bytes.weights + shard_bytes.kv_cache
    return [max(b - shard_bytes.activations, 0) / splittable for b in budgets]


def describe(shares: tuple[float, ...] | None, world: int) -> str:
    """'0.667, 0.333' (or 'equal')."""
    return "equal" if shares is None else ", ".join(f"{w / sum(shares):.3f}" for w in shares)
