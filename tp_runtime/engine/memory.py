"""Where a rank's memory went: weights per tier, KV cache, staging, peak use.

Peak use is the process's own accounting: torch.cuda.max_memory_allocated on a GPU, the
peak resident set on a CPU (VmHWM of /proc/self/status, which counts touched pages of mapped
files too; not getrusage's ru_maxrss, which a child inherits from the process that forked it
across exec). `rss_at_start` is the resident set before any weight was allocated (the interpreter,
torch and the modules a meta build imports, the tokenizer, the transport's buffers): what a
--max-host-memory budget does not cover.
"""

from __future__ import annotations

import resource

import torch
from torch import nn

from tp_runtime.checkpoint.layer_state import weight_tensors
from tp_runtime.placement import RankPlan

# the fields gathered from every rank, in order (bytes; copies: counts). stream_bytes: every byte
# streamed in (layers and experts); expert_bytes / expert_copies: those of the streamed experts
FIELDS = ("weights_device", "weights_host", "weights_disk", "kv_cache", "staging", "peak_allocated", "rss_at_start", "peak_rss", "stream_copies", "stream_bytes",
          "expert_copies", "expert_bytes", "weights_experts_streamed")


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: the rusage figure, in KiB on Linux-likes, bytes on macOS
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rank_memory(model: nn.Module, plan: RankPlan, streamer, kv_bytes: int, device: torch.device, rss_at_start: int) -> dict[str, int]:
    """This rank's numbers now (call at load and at the end)."""
    resident = _nbytes(model.parameters()) + _nbytes(b for b in model.buffers())
    staging = 0
    if streamer is not None:
        staging = sum(_nbytes(weight_tensors(m).values()) for m in streamer.staging_modules())
    fast = plan.fast.name
    weights = {"device": 0, "host": 0, "disk": plan.disk_read_bytes}
    weights[fast] += resident
    if fast == "device":
        weights["host"] += plan.layer_bytes_on("host")
    peak_alloc = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    stats = streamer.stats if streamer is not None else None
    experts = streamer.experts.stats if streamer is not None and streamer.experts is not None else None
    return {
        "weights_device": weights["device"],
        "weights_host": weights["host"],
        "weights_disk": weights["disk"],
        "kv_cache": kv_bytes,
        "staging": staging,
        "peak_allocated": peak_alloc,
        "rss_at_start": rss_at_start,
        "peak_rss": peak_rss_bytes(),
        "stream_copies": stats.copies if stats else 0,
        "stream_bytes": (stats.bytes if stats else 0) + (experts.bytes if experts else 0),
        "expert_copies": experts.copies if experts else 0,
        "expert_bytes": experts.bytes if experts else 0,
        # the routed experts not resident (what their tiers hold; a step reads the chosen ones)
        "weights_experts_streamed": sum(plan.sizes.expert_bytes(i) for i in plan.experts_streamed),
    }


def format_memory(ranks: list[dict[str, int]]) -> str:
    from tp_runtime.units import format_bytes

    head = f"{'rank':>4} {'weights dev':>12} {'weights host':>12} {'weights disk':>12} {'KV cache':>10} {'staging':>10} {'peak alloc':>11} {'peak RSS':>10} {'streamed/step':>15}"
    lines = [head]
    for r, m in enumerate(ranks):
        lines.append(
            f"{r:>4} {format_bytes(m['weights_device']):>12} {format_bytes(m['weights_host']):>12} {format_bytes(m['weights_disk']):>12} "
            f"{format_bytes(m['kv_cache']):>10} {format_bytes(m['staging']):>10} {format_bytes(m['peak_allocated']):>11} "
            f"{format_bytes(m['peak_rss']):>10} {format_bytes(m['stream_bytes_per_step']) if m.get('stream_bytes_per_step') else '-':>15}"
        )
    return "\n".join(lines)
