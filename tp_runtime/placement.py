"""Where each rank's bytes live: device memory, host RAM, or the mmap'd checkpoint on disk.

Pure arithmetic on the config, tp, dtype and budgets: nothing is loaded. Per rank, the KV
cache, the activations' working set, the embedding, the LM head, the final norm and the
staging buffers of streamed layers go into the fastest tier first (they are touched on every
token and cannot be streamed); then as many decoder layers as fit, in order; then host RAM;
the rest is read from disk on every token (llama.cpp's -ngl + mmap habit, Accelerate's
device_map="auto").

On a CPU the fastest tier *is* host RAM: the tiers are "host" (resident: loaded once) and
"disk" (streamed: read from the mmap'd file on every use, the page cache allowed).

A mixture-of-experts model streams its routed experts first (llama.cpp's --n-cpu-moe habit):
when the fastest tier cannot hold everything, the experts of whole MoE layers leave it, from
the last MoE layer back, while attention, norms, routers, shared experts and dense MLPs (a
layer's "core") stay; a forward then reads only the experts its tokens chose (top-k of them at
batch 1) into a few staging experts. Only when every layer's experts are out and the cores
still do not fit do whole layers (their cores) stream as well.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

from tp_runtime import sharding, sol
from tp_runtime.checkpoint.loader import sliced_shape
from tp_runtime.checkpoint.names import expected_tensors, held_by
from tp_runtime.config import ModelConfig
from tp_runtime.errors import ConfigError
from tp_runtime.units import format_bytes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30
# what a planner leaves free of what the machine reports: allocator slack, CUDA context,
# other processes (vLLM's gpu_memory_utilization=0.9 is the same habit)
DEVICE_SHARE = 0.9
HOST_SHARE = 0.85
# assumption, not a measurement: a PCIe 4.0 NVMe SSD reads 3-7 GB/s sequentially; 3 GB/s is
# what a 4 MiB-chunked mmap read typically sustains. `tp-run plan --disk-bandwidth` overrides.
DISK_READ_Bps = 3e9
# host -> device copies of streamed layers (pinned memory): sol's PCIe 4.0 x16 figure
H2D_LINK = "pcie4"

# the fixed items a rank keeps in its fastest tier, in table order
FIXED_ITEMS = ("kv_cache", "activations", "embedding", "lm_head", "norm", "staging")


class PlacementError(ConfigError):
    """The minimum a rank needs does not fit where it has to live."""


@dataclass(frozen=True)
class Tier:
    name: str  # "device" | "host" | "disk"
    capacity: int | None  # bytes; None: unbounded (the disk tier reads the checkpoint in place)
    read_Bps: float  # how fast a token's bytes come out of this tier

    @property
    def label(self) -> str:
        return {"device": "device memory", "host": "host RAM", "disk": "disk (mmap)"}[self.name]


@dataclass(frozen=True)
class ShardBytes:
    """Byte counts of one rank's shard, before anything is allocated."""

    layers: tuple[int, ...]  # weights of each decoder layer on this rank (its routed experts included)
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    norm: int
    kv_cache: int
    activations: int
    experts: tuple[int, ...] = ()  # of each layer's bytes, its routed experts' on this rank (0: a dense layer)
    local_experts: int = 0  # routed experts this rank holds (whole under ep, a slice of each under tp) per MoE layer

    @property
    def weights(self) -> int:
        return sum(self.layers) + self.embedding + self.lm_head + self.norm

    def expert_bytes(self, i: int) -> int:
        return self.experts[i] if self.experts else 0

    def core(self, i: int) -> int:
        """Layer i without its routed experts: attention, norms, router, shared expert, dense MLP."""
        return self.layers[i] - self.expert_bytes(i)

    @property
    def one_expert(self) -> int:
        """The bytes of one routed expert (or this rank's slice of one); all are alike."""
        return max(self.experts, default=0) // self.local_experts if self.local_experts else 0


def layer_kinds(cfg: ModelConfig) -> list[str]:
    """Each decoder layer's structure, "moe" (routed experts) or "dense": a staging layer holds
    a streamed layer of its own kind (Qwen2-MoE's mlp_only_layers, DeepSeek's first dense ones)."""
    return ["moe" if cfg.moe is not None and cfg.moe.sparse_layers[i] else "dense" for i in range(cfg.num_layers)]


def _param_bytes(shape: tuple[int, ...], dtype_bytes: int, quantize: str | None = None) -> int:
    n = math.prod(shape)
    if quantize == "int8":  # int8 weight + one scale per output row, in the activation dtype
        return n + shape[0] * dtype_bytes
    if quantize == "int4":  # Q4_0 blocks: 18 bytes per 32 values
        return n // 32 * 18
    return n * dtype_bytes


def _vocab_bytes(rows: int, hidden: int, dtype_bytes: int, quantize: str | None, stored: tuple[int, int] | None) -> int:
    """One vocab table (the embedding, or an untied LM head) of `rows` rows, padding included: a
    GGUF's blocks where kept (`stored`: values, bytes per block), else what --quantize makes of it
    (int8: a byte per value and a float32 scale per row, model/quant.py; int4: Q8_0 blocks, 34
    bytes per 32 values, model/int4.py), else floats."""
    if stored is not None:
        return rows * hidden // stored[0] * stored[1]
    if quantize == "int8":
        return rows * hidden + rows * 4
    if quantize == "int4":
        return rows * hidden // 32 * 34
    return rows * hidden * dtype_bytes


def stored_blocks(index) -> dict[str, tuple[int, int]]:
    """The weights of a checkpoint (a GGUF's CheckpointIndex) that a model keeping blocks holds
    as blocks (a type with a native kernel; the decoder layers' linears, the embedding and the
    LM head), F16 matrices included (kept float16: model/blocks.py keeps_f16): name -> (values,
    bytes) per block."""
    from tp_runtime.kernels import cpu_gemv, cpu_quant

    def kept(storage) -> bool:
        return cpu_quant.supported(storage.name) if storage.quantized else storage.name == "F16" and cpu_gemv.load() is not None

    return {n: (r.storage.block, r.storage.block_bytes) for n, r in index.tensors.items() if len(r.shape) == 2 and kept(r.storage)}


def shard_bytes(cfg: ModelConfig, tp: int, rank: int, dtype: str, max_seq_len: int, max_batch: int, quantize: str | None = None,
                blocks: dict[str, tuple[int, int]] | None = None) -> ShardBytes:
    """Exact weight bytes of this rank's parameters (merged q/k/v and gate/up, vocab padding),
    the KV cache, and an upper bound on the activations of a full-context prefill. blocks: the
    checkpoint tensors kept in memory as quantized blocks (a GGUF's linears), by name ->
    (values per block, bytes per block); a slice whose columns do not fall on blocks is held as
    float32 values instead."""
    nb = DTYPE_BYTES[dtype]
    layers = [0] * cfg.num_layers
    experts = [0] * cfg.num_layers
    embedding = lm_head = norm = 0
    vocab_rows = sharding.vocab_shard_padded(cfg, sharding.dense_split(cfg, tp, rank)[0])
    for e in held_by(expected_tensors(cfg), cfg, tp, rank):
        spec = sharding.spec(e.role, e.kind, cfg, tp, rank)
        shape = sliced_shape(e.shape, spec)
        if e.layer is not None:
            stored = (blocks or {}).get(e.hf_name) if e.kind == "weight" else None
            if stored is not None:
                block, block_bytes = stored
                aligned = spec.dim != 1 or (spec.start % block == 0 and spec.stop % block == 0)
                n = shape[0] * shape[1] // block * block_bytes if aligned else shape[0] * shape[1] * 4
            elif e.role in ("router", "router_bias"):  # float32 whatever the dtype (model/moe.py Router)
                n = _param_bytes(tuple(shape), 4)
            else:
                quantized = e.kind == "weight" and e.role.endswith("_proj")
                n = _param_bytes(tuple(shape), nb, quantize if quantized else None)
            layers[e.layer] += n
            if e.expert is not None:
                experts[e.layer] += n
        elif e.target in ("embed_tokens.weight", "lm_head.weight"):  # padded to the largest shard
            size = _vocab_bytes(vocab_rows, cfg.hidden_size, nb, quantize, (blocks or {}).get(e.hf_name))
            if e.target == "lm_head.weight":
                lm_head = size
            else:
                embedding = size
        else:
            norm += _param_bytes(tuple(shape), nb)
    dense = sharding.dense_split(cfg, tp, rank)  # (1, 0) under --attention dp: whole heads and vocab, own sequences
    heads = sharding.head_layout(cfg, *dense)
    lo, hi = sharding.intermediate_range(cfg, *dense)
    hd = cfg.head_dim
    kv_cache = 2 * cfg.num_layers * max_batch * heads.num_kv_local * max_seq_len * hd * nb
    # a full-context prefill: hidden, residual and norm output, qkv, attention output, gate/up
    # and its product per token, plus fp32 logits of every sequence before and after the gather
    per_token = (3 * cfg.hidden_size + (heads.num_q_local + 2 * heads.num_kv_local) * hd + heads.num_q_local * hd + 3 * (hi - lo)) * nb
    logits = 2 * max_batch * vocab_rows * dense[0] * 4
    activations = max_batch * max_seq_len * per_token + logits
    local_experts = 0
    if cfg.moe is not None:
        lo, hi = sharding.expert_range(cfg, tp, rank)
        local_experts = hi - lo
    return ShardBytes(tuple(layers), embedding, lm_head, norm, kv_cache, activations, tuple(experts), local_experts)


@dataclass
class RankPlan:
    rank: int
    tp: int
    device_type: str  # "cuda" | "cpu"
    sizes: ShardBytes
    tiers: list[Tier]
    layer_tier: list[str]  # per decoder layer: the tier its core lives in (the whole layer, for a dense one)
    fixed: dict[str, int] = field(default_factory=dict)  # FIXED_ITEMS -> bytes in tiers[0]
    host_staging: int = 0  # GPU with disk layers: a pinned host buffer of one layer (per layer kind staged)
    disk_scale: float = 1.0  # bytes a disk layer reads per byte it holds in memory (bf16 file, fp32 run: 0.5)
    expert_tier: list[str] = field(default_factory=list)  # per layer: the tier its routed experts live in
    staging_kinds: tuple[str, ...] = ()  # the layer kinds (layer_kinds) with staging layers
    staged_experts: int = 0  # staging experts that streamed experts are read into (top-k, at most the rank's)
    expert_share: float = 1.0  # of a layer's routed experts, the share one decode step reads (estimate)

    def __post_init__(self) -> None:
        if not self.expert_tier:
            self.expert_tier = list(self.layer_tier)

    @property
    def fast(self) -> Tier:
        return self.tiers[0]

    def tier(self, name: str) -> Tier | None:
        return next((t for t in self.tiers if t.name == name), None)

    def layers_on(self, name: str) -> list[int]:
        """The layers whose cores (a dense layer: all of it) live in tier `name`."""
        return [i for i, t in enumerate(self.layer_tier) if t == name]

    def experts_on(self, name: str) -> list[int]:
        """The MoE layers whose routed experts live in tier `name`."""
        return [i for i, t in enumerate(self.expert_tier) if t == name and self.sizes.expert_bytes(i)]

    def layer_bytes_on(self, name: str, expert_share: float = 1.0) -> int:
        """Decoder-layer bytes in tier `name`: the cores there, and the routed experts there
        (times expert_share: what a step reads of them)."""
        cores = sum(self.sizes.core(i) for i in self.layers_on(name))
        return cores + int(expert_share * sum(self.sizes.expert_bytes(i) for i in self.experts_on(name)))

    def expert_bytes_on(self, name: str) -> int:
        return sum(self.sizes.expert_bytes(i) for i in self.experts_on(name))

    @property
    def disk_read_bytes(self) -> int:
        """Bytes the disk-tier weights occupy in their files: what one forward pass reads of its
        streamed layers' cores, and what its streamed experts hold (a pass reads the chosen ones)."""
        return int(self.layer_bytes_on("disk") * self.disk_scale)

    def used(self, name: str) -> int:
        n = self.disk_read_bytes if name == "disk" else self.layer_bytes_on(name)
        if name == self.fast.name:
            n += sum(self.fixed.values())
        if name == "host" and self.fast.name != "host":
            n += self.host_staging
        return n

    @property
    def streamed(self) -> list[int]:
        """Layers not resident in the fastest tier: copied in (or read) on every use."""
        return [i for i, t in enumerate(self.layer_tier) if t != self.fast.name]

    @property
    def experts_streamed(self) -> list[int]:
        """MoE layers whose routed experts are not resident: each forward reads the chosen ones."""
        return [i for i in range(len(self.expert_tier)) if self.sizes.expert_bytes(i) and self.expert_tier[i] != self.fast.name]

    @property
    def streamed_fraction(self) -> float:
        total = sum(self.sizes.layers)
        return sum(self.layer_bytes_on(t.name) for t in self.tiers[1:]) / total if total else 0.0

    def decode_seconds(self, page_cache: bool) -> float:
        """Per-token time the tiers' bandwidths allow (weights only; KV and communication not
        counted). Streamed copies overlap compute on a GPU (side stream), not on a CPU; streamed
        experts are read only when chosen (expert_share of them per step)."""
        fast = self.fast
        slow = [t.name for t in self.tiers[1:]]
        skipped = (1.0 - self.expert_share) * sum(self.expert_bytes_on(t) for t in slow)  # streamed experts not chosen
        reads = self.sizes.weights - skipped  # every weight a step reads passes through the fastest tier once
        disk = int(self.layer_bytes_on("disk", self.expert_share) * self.disk_scale)
        if self.device_type == "cuda":
            host = self.layer_bytes_on("host", self.expert_share)
            h2d = sol.LINKS[H2D_LINK].bandwidth_Bps
            # a page-cache copy into the pinned buffer is a host memcpy: taken as fast as the link
            disk_Bps = h2d if page_cache else self.tier("disk").read_Bps
            return max(reads / fast.read_Bps, (host + disk) / h2d + disk / disk_Bps)
        disk_Bps = fast.read_Bps / 2 if page_cache else self.tier("disk").read_Bps  # a page-cache copy reads and writes
        return reads / fast.read_Bps + disk / disk_Bps


def _assign(layers: Sequence[int], tiers: Sequence[Tier], free: dict[str, int | None]) -> list[str]:
    """Each layer, in order, to the fastest tier with room left (the last tier is unbounded)."""
    room = dict(free)
    out = []
    for n in layers:
        t = next(t for t in tiers if room[t.name] is None or n <= room[t.name])
        if room[t.name] is not None:
            room[t.name] -= n
        out.append(t.name)
    return out


def _staging_layers(device_type: str) -> int:
    # GPU: double buffer (copy layer i+1 while layer i computes); CPU: one buffer, with the
    # kernel's readahead (madvise WILLNEED) fetching the next layer's pages meanwhile
    return 2 if device_type == "cuda" else 1


def plan_rank(
    cfg: ModelConfig,
    tp: int,
    rank: int,
    dtype: str,
    max_seq_len: int,
    max_batch: int,
    device_type: str,
    tiers: Sequence[Tier],
    quantize: str | None = None,
    disk_dtype: str | None = None,
    blocks: dict[str, tuple[int, int]] | None = None,
    offloaded: bool = False,
) -> RankPlan:
    """tiers: fastest first; the last one is the disk (unbounded). disk_dtype: the dtype the
    checkpoint's files hold; offloaded: the disk tier is an offload folder, which holds the layers
    as memory does (quantized, in `dtype`). blocks: as for shard_bytes."""
    sizes = shard_bytes(cfg, tp, rank, dtype, max_seq_len, max_batch, quantize, blocks)
    tiers = list(tiers)
    fast = tiers[0]
    fixed = {"kv_cache": sizes.kv_cache, "activations": sizes.activations, "embedding": sizes.embedding, "lm_head": sizes.lm_head, "norm": sizes.norm, "staging": 0}
    disk_scale = 1.0  # an offload folder, or a GGUF's blocks: the file holds what memory does
    if not offloaded and not blocks:
        disk_scale = DTYPE_BYTES.get(disk_dtype or dtype, DTYPE_BYTES[dtype]) / DTYPE_BYTES[dtype]
        if quantize:  # the checkpoint holds the values that streaming quantizes on every use
            unquantized = shard_bytes(cfg, tp, rank, dtype, max_seq_len, max_batch)
            disk_scale *= sum(unquantized.layers) / max(1, sum(sizes.layers))
    n = cfg.num_layers
    if fast.capacity is None or sum(fixed.values()) + sum(sizes.layers) <= fast.capacity:
        return RankPlan(rank, tp, device_type, sizes, tiers, [fast.name] * n, fixed, disk_scale=disk_scale)
    kinds = layer_kinds(cfg)
    core = [sizes.core(i) for i in range(n)]
    moe_layers = [i for i in range(n) if sizes.expert_bytes(i)]
    staged = min(cfg.moe.top_k, sizes.local_experts) if moe_layers else 0
    expert_staging = staged * sizes.one_expert  # one set of staging experts, on CPU and GPU alike
    share = min(1.0, max_batch * cfg.moe.top_k / cfg.moe.num_experts) if moe_layers else 1.0
    moe_args = dict(staged_experts=staged, expert_share=share)

    def experts_out(out: list[int], free: dict[str, int | None], layer_tier: list[str]) -> list[str]:
        """Each layer's tier for its experts: its core's for all but `out`, whose experts go, layer
        by layer, to the next tier after the fastest with room (what the cores left of it)."""
        tier_of = list(layer_tier)
        for i, t in zip(out, _assign([sizes.experts[i] for i in out], tiers[1:], free)):
            tier_of[i] = t
        return tier_of

    if moe_layers:
        # experts first: every core stays, and the routed experts of the last MoE layers leave
        base = sum(fixed.values()) + expert_staging + sum(core)
        keep = next((j for j in range(len(moe_layers), -1, -1) if base + sum(sizes.experts[i] for i in moe_layers[:j]) <= fast.capacity), None)
        if keep is not None:
            fixed["staging"] = expert_staging
            free = {t.name: t.capacity for t in tiers[1:]}
            return RankPlan(rank, tp, device_type, sizes, tiers, [fast.name] * n, fixed, disk_scale=disk_scale,
                            expert_tier=experts_out(moe_layers[keep:], free, [fast.name] * n), **moe_args)
    # whole layers (with every MoE layer's experts out): the cores in order, each through a
    # staging layer of its kind; the kinds staged are those of the layers that then stream
    largest = {k: max(core[i] for i in range(n) if kinds[i] == k) for k in set(kinds)}
    count = _staging_layers(device_type)
    staging_kinds: set[str] = set()
    while True:
        fixed["staging"] = expert_staging + count * sum(largest[k] for k in staging_kinds)
        free = {t.name: t.capacity for t in tiers}
        free[fast.name] -= sum(fixed.values())
        layer_tier = _assign(core, tiers, free)
        kinds_out = {kinds[i] for i, t in enumerate(layer_tier) if t != fast.name}
        if kinds_out <= staging_kinds:
            break
        staging_kinds |= kinds_out
    minimum = sum(fixed.values())
    if minimum > fast.capacity:
        flag = "--max-device-memory" if fast.name == "device" else "--max-host-memory"
        parts = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in fixed.items() if v)
        raise PlacementError(
            f"rank {rank} of tp={tp} needs at least {format_bytes(minimum)} in {fast.label} ({parts}), "
            f"but its budget ({flag}, or that flag's default) allows {format_bytes(fast.capacity)}: {format_bytes(minimum - fast.capacity)} missing. "
            f"Raise {flag}, lower --max-seq-len or --max-batch-size (the KV cache and activations), or use more ranks (--tp)"
        )
    host_staging = 0
    if fast.name == "device" and "disk" in layer_tier and free.get("host") is not None:
        # disk layers pass through a pinned host buffer (one per kind) on their way to the device
        host_staging = sum(largest[k] for k in staging_kinds)
        if host_staging > free["host"]:
            raise PlacementError(
                f"rank {rank} of tp={tp} streams layers from disk through a pinned host buffer of {format_bytes(host_staging)}, "
                f"but what --max-host-memory (or its default) leaves allows {format_bytes(free['host'])}: {format_bytes(host_staging - free['host'])} missing. "
                "Raise --max-host-memory or --max-device-memory, or use more ranks (--tp)"
            )
        free["host"] -= host_staging
        layer_tier = _assign(core, tiers, free)
    for i, t in enumerate(layer_tier):  # what the cores leave of the slower tiers, for the experts
        if free.get(t) is not None and t != fast.name:
            free[t] -= core[i]
    return RankPlan(rank, tp, device_type, sizes, tiers, layer_tier, fixed, host_staging, disk_scale,
                    expert_tier=experts_out(moe_layers, {t.name: free[t.name] for t in tiers[1:]}, layer_tier) if moe_layers else [],
                    staging_kinds=tuple(sorted(staging_kinds)), **moe_args)


# ---------------------------------------------------------------------------------------------
# what the machine has


def host_memory_available() -> int:
    """What this process can still get: MemAvailable of /proc/meminfo (what the kernel gives
    without swapping), capped by the cgroup's limit minus its use inside a container."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = _cgroup_room()
    return avail if room is None else min(avail, room)


_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
)


def _cgroup_room(files=_CGROUP_FILES) -> int | None:
    """The cgroup's memory limit minus its use (v2, else v1); None when unlimited or unknown."""
    for limit_file, usage_file in files:
        try:
            limit = open(limit_file).read().strip()
            usage = int(open(usage_file).read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None


def default_host_budget(local_ranks: int) -> int:
    return int(host_memory_available() * HOST_SHARE / max(local_ranks, 1))


def make_tiers(device_type: str, device_bytes: int | None, host_bytes: int, hardware: sol.Hardware, disk_Bps: float = DISK_READ_Bps) -> list[Tier]:
    """The tiers of one rank, fastest first. On a CPU the device tier does not exist."""
    disk = Tier("disk", None, disk_Bps)
    if device_type == "cpu":
        return [Tier("host", host_bytes, hardware.mem_bandwidth_Bps), disk]
    if device_bytes is None:
        raise ConfigError("planning for a GPU needs its memory: pass --max-device-memory (no GPU is visible here)")
    host_Bps = sol.LINKS[H2D_LINK].bandwidth_Bps
    return [Tier("device", device_bytes, hardware.mem_bandwidth_Bps), Tier("host", host_bytes, host_Bps), disk]


def smallest_tp(cfg: ModelConfig, dtype: str, max_seq_len: int, max_batch: int, fast_bytes: int | Callable[[int], int], quantize: str | None = None,
                blocks: dict[str, tuple[int, int]] | None = None) -> int | None:
    """The smallest tp at which every rank's whole shard (and its KV cache and activations) fits
    in `fast_bytes` per rank (or `fast_bytes(tp)`: ranks that share one machine's RAM get less
    each as tp grows); None if even tp = number of heads does not fit."""
    for tp in range(1, cfg.num_heads + 1):
        cap = fast_bytes(tp) if callable(fast_bytes) else fast_bytes
        if all(
            (s := shard_bytes(cfg, tp, r, dtype, max_seq_len, max_batch, quantize, blocks)).weights + s.kv_cache + s.activations <= cap
            for r in range(tp)
        ):
            return tp
    return None


# ---------------------------------------------------------------------------------------------
# rendering


def plan_rows(plan: RankPlan) -> list[dict]:
    """One row per tier (the table `tp-run plan` prints and --json carries)."""
    rows = []
    for t in plan.tiers:
        layers = plan.layers_on(t.name)
        experts = plan.experts_on(t.name)
        row = {
            "rank": plan.rank,
            "tier": t.name,
            "capacity": t.capacity,
            "used": plan.used(t.name),
            "layers": _ranges(layers),  # whose cores live here (a dense layer: all of it)
            "num_layers": len(layers),
            "layer_bytes": plan.layer_bytes_on(t.name),  # those cores and the experts below
            "expert_layers": _ranges(experts),  # MoE layers whose routed experts live here
            "num_expert_layers": len(experts),
            "expert_bytes": plan.expert_bytes_on(t.name),
            "kv_cache": plan.fixed["kv_cache"] if t is plan.fast else 0,
            "headroom": None if t.capacity is None else t.capacity - plan.used(t.name),
        }
        rows.append(row)
    return rows


def _ranges(items: list[int]) -> str:
    if not items:
        return "-"
    out, start, prev = [], items[0], items[0]
    for i in items[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def format_plan(plans: Sequence[RankPlan]) -> str:
    """The tiers of each rank; a MoE model's get an "experts" column: the MoE layers whose routed
    experts live in that tier ("layers" then says where the layers' cores live)."""
    moe = any(p.sizes.local_experts for p in plans)
    experts_head = f" {'experts':<12} {'expert bytes':>12}" if moe else ""
    head = f"{'rank':>4}  {'tier':<14} {'capacity':>11} {'used':>11} {'layers':<12}{experts_head} {'layer bytes':>11} {'KV cache':>10} {'headroom':>11}"
    lines = [head, "-" * len(head)]
    for plan in plans:
        for row, t in zip(plan_rows(plan), plan.tiers):
            cap = "unbounded" if t.capacity is None else format_bytes(t.capacity)
            headroom = "-" if row["headroom"] is None else format_bytes(row["headroom"])
            kv = format_bytes(row["kv_cache"]) if row["kv_cache"] else "-"
            experts = f" {row['expert_layers']:<12} {format_bytes(row['expert_bytes']):>12}" if moe else ""
            lines.append(
                f"{plan.rank:>4}  {t.label:<14} {cap:>11} {format_bytes(row['used']):>11} {row['layers']:<12}{experts} "
                f"{format_bytes(row['layer_bytes']):>11} {kv:>10} {headroom:>11}"
            )
        fixed = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in plan.fixed.items() if v)
        lines.append(f"{'':>4}  in {plan.fast.label}: {fixed}")
        if out := plan.experts_streamed:
            lines.append(f"{'':>4}  routed experts streamed: {len(out)} of {sum(1 for i in range(len(plan.layer_tier)) if plan.sizes.expert_bytes(i))} MoE layers' "
                         f"({_ranges(out)}, {format_bytes(sum(plan.sizes.expert_bytes(i) for i in out))}); a step reads its chosen experts "
                         f"into {plan.staged_experts} staging experts of {format_bytes(plan.sizes.one_expert)}")
    return "\n".join(lines)


def model_facts(cfg: ModelConfig, dtype: str) -> dict[str, float]:
    """The sizes people ask about besides inference memory, by the usual rules of thumb."""
    shape = sol.ModelShape.from_config(cfg, bytes_per_param=DTYPE_BYTES[dtype])
    params = shape.params_total
    chinchilla = 20 * params  # Hoffmann et al. 2022: ~20 training tokens per parameter
    return {
        "parameters": params,
        "weight_bytes": params * DTYPE_BYTES[dtype],
        # one multiply-add per weight a token multiplies by: every matmul, the LM head included,
        # not the embedding table (a lookup)
        "flops_per_token": 2.0 * shape.nonrouted_matmul_params(),
        "kv_bytes_per_token": 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * DTYPE_BYTES[dtype],
        "chinchilla_tokens": chinchilla,
        "chinchilla_training_flops": 6.0 * params * chinchilla,  # ~6 N D (forward + backward)
    }


# one small collective between ranks of one host through the shared-memory transport, as the
# fused CPU decode step pays it (SmolLM2 at tp=2: all-reduces of 1152 bytes 21-24 us p50, the
# floor of Python and torch calls in comm/shm.py; measured 2026-12-07, docs/peers/)
LOCAL_COLLECTIVE_S = 25e-6
LOCAL_TP_NOTE_SHARE = 0.25  # note when a token's collectives would cost this share of its weight reads or more


def local_tp_estimate(cfg: ModelConfig, dtype: str, quantize: str | None = None, blocks: dict[str, tuple[int, int]] | None = None,
                      hardware: sol.Hardware = sol.HARDWARE["this-cpu"]) -> dict[str, float]:
    """What ranks on one CPU host add to a decode token against what they share: the
    collectives per token (2 a layer + the logits' all-gather) at LOCAL_COLLECTIVE_S each, and
    the weight bytes every token reads (the embedding table only as the LM head when tied) at
    the host's memory bandwidth, which the ranks of one host share: splitting the weights over
    them does not add bandwidth, so the collectives are a cost with little to pay for them."""
    one = shard_bytes(cfg, 1, 0, dtype, 1, 1, quantize, blocks)
    read = sum(one.layers) + (one.lm_head or one.embedding) + one.norm
    collectives = 2 * cfg.num_layers + 1
    return {"collectives_per_token": collectives, "comm_s": collectives * LOCAL_COLLECTIVE_S, "weight_bytes": read,
            "read_s": read / hardware.mem_bandwidth_Bps, "bandwidth_Bps": hardware.mem_bandwidth_Bps}


def local_tp_note(cfg: ModelConfig, tp: int, dtype: str, quantize: str | None = None, blocks: dict[str, tuple[int, int]] | None = None) -> str | None:
    """A note for `--tp tp` with every rank on one CPU host when the collectives would cost
    LOCAL_TP_NOTE_SHARE of a token's weight reads or more (a small model): tp=1 is then likely
    the faster choice. None otherwise, or for tp 1."""
    if tp < 2:
        return None
    e = local_tp_estimate(cfg, dtype, quantize, blocks)
    if e["comm_s"] < LOCAL_TP_NOTE_SHARE * e["read_s"]:
        return None
    return (f"note: --tp {tp} on one host adds ~{e['collectives_per_token']:.0f} collectives per decode token (~{LOCAL_COLLECTIVE_S * 1e6:.0f} us each "
            f"over shared memory: ~{e['comm_s'] * 1e3:.1f} ms) to ~{e['read_s'] * 1e3:.1f} ms of weight reads ({e['weight_bytes'] / 1e6:.0f} MB at "
            f"~{e['bandwidth_Bps'] / 1e9:.0f} GB/s), and ranks on one host share its memory bandwidth: for a model this small --tp 1 is likely faster")
