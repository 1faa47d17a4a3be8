"""Decoder layers whose weights do not live in the fastest memory: streamed in per use.

A streamed layer is a parameter-free placeholder in `model.layers`; its forward borrows a
staging layer (a real DecoderLayer, allocated once), has the layer's weights copied into it
and runs it as that layer (KV cache slot, collective sites). The weights come from a
`LayerSource`, which the engine wires to the checkpoint (the model never opens files):

- CPU: one staging layer; the copy reads the mmap'd file (page cache or disk) and, while a
  layer computes, the kernel reads ahead the next streamed layer's pages.
- GPU: two staging layers on the device; the next streamed layer's host -> device copy runs on
  a side stream while the current one computes (pinned host memory; disk layers pass through
  one pinned host buffer). Events order the copy after the last use of its buffer.

A staging layer serves the streamed layers of its kind (placement.layer_kinds: a dense layer
and a mixture-of-experts one differ; Qwen2-MoE's mlp_only_layers and DeepSeek's first layers are
dense), so there is a set of staging layers per kind. Routed experts stream on their own
(`ExpertStreamer`): a MoE layer whose experts are not resident (and every whole streamed MoE
layer: its staging layer holds no experts) reads, per forward, only the experts its tokens
chose from an `ExpertSource` into a few staging experts. A streamed MoE layer's routed-token
counts stay with its placeholder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from tp_runtime.checkpoint.layer_state import weight_tensors
from tp_runtime.model.moe import SparseMoe


class LayerSource(Protocol):
    def fill(self, layer: int, module: nn.Module) -> int:
        """Copy decoder layer `layer`'s weights into `module` (same structure); returns bytes."""

    def prefetch(self, layer: int) -> None:
        """Start bringing `layer`'s bytes closer (readahead); must not block."""


class ExpertSource(Protocol):
    def fill(self, layer: int, expert: int, module: nn.Module) -> int:
        """Copy routed expert `expert` of layer `layer` (this rank's part) into `module` (an
        ExpertMLP of the shard); returns the bytes read."""

    def prefetch(self, layer: int, expert: int) -> None:
        """Start bringing the expert's bytes closer (readahead); must not block."""


@dataclass
class StreamStats:
    copies: int = 0  # layer (or expert) copies into staging buffers
    bytes: int = 0
    seconds: float = 0.0  # time the compute waited for copies (CPU: the copies themselves)


class ExpertStreamer:
    """Routed experts that are not resident: per forward, the experts a MoE layer's tokens chose
    (this rank's) are read from `source` into the staging experts, in rounds of as many as there
    are staging experts (top-k of them: a decode step at batch 1 needs one round), so a step
    reads the chosen experts' bytes, not the layer's (llama.cpp gets the same from mmap).
    Copies are synchronous: on a GPU they are ordered on the compute stream."""

    def __init__(self, staging: Sequence[nn.Module], source: ExpertSource) -> None:
        self.staging = list(staging)
        self.source = source
        self.stats = StreamStats()

    def modules(self, layer: int, experts: Sequence[int]):
        """(expert, a staging module holding its weights) for each of `experts`, in order; a
        module is refilled once the caller has moved on past its expert."""
        for e in experts[len(self.staging):]:  # the kernel reads the later rounds' experts ahead
            self.source.prefetch(layer, e)
        n = len(self.staging)
        for lo in range(0, len(experts), n):
            chunk = experts[lo : lo + n]
            t0 = time.perf_counter()
            for e, module in zip(chunk, self.staging):
                self.stats.bytes += self.source.fill(layer, e, module)
                self.stats.copies += 1
            self.stats.seconds += time.perf_counter() - t0
            yield from zip(chunk, self.staging)

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if close:
            close()


class StreamedLayer(nn.Module):
    """Stands in `model.layers[i]` for a layer that is not resident; holds no parameters (a MoE
    layer's: only its routed-token counts, which its staging layer counts into)."""

    def __init__(self, layer: int, streamer: LayerStreamer, routed: torch.Size | None = None) -> None:
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "_streamer", streamer)  # not a submodule: shared by every streamed layer
        if routed is not None:
            self.register_buffer("routed", torch.zeros(routed, dtype=torch.int64), persistent=False)

    def init_buffers(self) -> None:
        if getattr(self, "routed", None) is not None:
            self.routed.zero_()

    def forward(self, *args):
        return self._streamer.run(self.layer, *args, routed=getattr(self, "routed", None))

    def idle_pass(self, x: torch.Tensor) -> None:
        """--attention dp: this rank's (empty) part in the layer's all-to-alls."""
        if getattr(self, "routed", None) is not None:
            self._streamer.idle(self.layer, x, self.routed)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, streamed"

    def fused_problem(self) -> str:
        return "is streamed (not resident)"


class LayerStreamer:
    """CPU: synchronous copies into one staging layer (per kind), readahead of the next one.

    staging_kinds[j]: the kind of staging[j]; layer_kinds: each streamed layer's (both default
    to one kind); experts: the ExpertStreamer of the model's streamed experts, if any (a plan
    may stream experts and no whole layer: `staging` is then empty)."""

    def __init__(self, staging: Sequence[nn.Module], source: LayerSource | None, streamed: Sequence[int], staging_kinds: Sequence | None = None,
                 layer_kinds: dict[int, object] | None = None, experts: ExpertStreamer | None = None) -> None:
        self.staging = list(staging)
        self.source = source
        self.kind_of = dict(layer_kinds or {})
        self.slots: dict[object, list[int]] = {}  # kind -> its staging layers' indices
        for j, kind in enumerate(staging_kinds if staging_kinds is not None else [None] * len(self.staging)):
            self.slots.setdefault(kind, []).append(j)
        order = sorted(streamed)
        # the next streamed layer after each (wrapping: the next token starts again at the first)
        self.next_of = {a: b for a, b in zip(order, order[1:] + order[:1])}
        self.stats = StreamStats()
        self.experts = experts

    def staging_modules(self) -> list[nn.Module]:
        """Every staging module: the layers', then the experts'."""
        return self.staging + (self.experts.staging if self.experts is not None else [])

    def source_close(self) -> None:
        close = getattr(self.source, "close", None)
        if close:
            close()
        if self.experts is not None:
            self.experts.close()

    def run(self, layer: int, *args, routed: torch.Tensor | None = None):
        module = self.acquire(layer)
        if routed is not None:  # the layer's own routed-token counts
            module.mlp.routed = routed
        try:
            return module(*args)
        finally:
            self.release(layer)

    def idle(self, layer: int, x: torch.Tensor, routed: torch.Tensor) -> None:
        """--attention dp, a forward with no tokens of this rank: its part in a streamed MoE
        layer's all-to-alls. Needs no core weights (the router sees no row); the experts other
        ranks' tokens chose are read through the expert stream as in any forward."""
        module = self.staging[self.slots[self.kind_of.get(layer)][0]]
        if getattr(module.mlp, "dispatch", False):
            module.retarget(layer)
            module.mlp.routed = routed
            module.mlp.exchange(x)

    def acquire(self, layer: int) -> nn.Module:
        t0 = time.perf_counter()
        module = self.staging[self.slots[self.kind_of.get(layer)][0]]
        self.stats.bytes += self.source.fill(layer, module)
        self.stats.copies += 1
        self.stats.seconds += time.perf_counter() - t0
        self.source.prefetch(self.next_of[layer])  # the kernel reads ahead while this layer computes
        module.retarget(layer)
        return module

    def release(self, layer: int) -> None:
        pass


class CudaLayerStreamer(LayerStreamer):
    """GPU: double-buffered device staging, copies on a side stream, ordered by events."""

    def __init__(self, staging: Sequence[nn.Module], source: LayerSource, streamed: Sequence[int], device: torch.device, staging_kinds: Sequence | None = None,
                 layer_kinds: dict[int, object] | None = None, experts: ExpertStreamer | None = None) -> None:
        super().__init__(staging, source, streamed, staging_kinds, layer_kinds, experts)
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self.ready: list[torch.cuda.Event | None] = [None] * len(self.staging)
        self.freed: list[torch.cuda.Event | None] = [None] * len(self.staging)
        self.slot_of: dict[int, int] = {}
        self.turn: dict[object, int] = {}  # per kind: the next of its staging layers to fill

    def _issue(self, layer: int) -> None:
        kind = self.kind_of.get(layer)
        slots = self.slots[kind]
        slot = slots[self.turn.get(kind, 0)]
        self.turn[kind] = (self.turn.get(kind, 0) + 1) % len(slots)
        # a buffer holds one layer: whatever was queued into it before is gone (a pass that
        # raised can leave a queued layer behind)
        self.slot_of = {i: s for i, s in self.slot_of.items() if s != slot}
        with torch.cuda.stream(self.copy_stream):
            if self.freed[slot] is not None:  # the layer that used this buffer has finished
                self.copy_stream.wait_event(self.freed[slot])
            self.stats.bytes += self.source.fill(layer, self.staging[slot])  # non_blocking copies
            self.ready[slot] = torch.cuda.Event()
            self.ready[slot].record(self.copy_stream)
        self.stats.copies += 1
        self.slot_of[layer] = slot

    def acquire(self, layer: int) -> nn.Module:
        if layer not in self.slot_of:  # the first streamed layer of the first token
            self._issue(layer)
        slot = self.slot_of.pop(layer)
        torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        module = self.staging[slot]
        module.retarget(layer)
        self._current = slot
        return module

    def release(self, layer: int) -> None:
        # the layer's kernels are queued, not finished: the buffer is free once they are
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self.freed[self._current] = ev
        # issued now, the next layer's copy (and a disk layer's read into the pinned buffer, on
        # this thread) overlaps the queued compute of this one
        nxt = self.next_of[layer]
        if nxt not in self.slot_of:
            self._issue(nxt)
        self.source.prefetch(self.next_of[nxt])  # the kernel reads a disk layer ahead meanwhile


class HostLayerSource:
    """GPU host tier: each layer's parameters held in pinned host memory, copied per use."""

    def __init__(self) -> None:
        self.tensors: dict[int, dict[str, torch.Tensor]] = {}

    def add(self, layer: int, module: nn.Module) -> None:
        """Keep pinned copies of a loaded CPU layer's weights (one layer at a time, so the
        unpinned copy never doubles the host tier)."""
        self.tensors[layer] = {n: p.detach().pin_memory() for n, p in weight_tensors(module).items()}

    def fill(self, layer: int, module: nn.Module) -> int:
        host = self.tensors[layer]
        n = 0
        for name, p in weight_tensors(module).items():
            p.data.copy_(host[name], non_blocking=True)
            n += p.numel() * p.element_size()
        return n

    def prefetch(self, layer: int) -> None:
        pass


class PinnedDiskSource:
    """GPU disk tier: the mmap'd checkpoint -> one pinned host layer (per kind) -> device (non-blocking).
    pinned: a layer, or kind -> a layer of that kind, with layer_kinds: each layer's kind."""

    def __init__(self, disk: LayerSource, pinned: nn.Module | dict, layer_kinds: dict[int, object] | None = None) -> None:
        self.disk = disk
        self.pinned = pinned if isinstance(pinned, dict) else {None: pinned}
        self.kind_of = dict(layer_kinds or {})
        self.last_copy: dict[object, torch.cuda.Event] = {}

    def fill(self, layer: int, module: nn.Module) -> int:
        kind = self.kind_of.get(layer)
        if kind in self.last_copy:
            self.last_copy[kind].synchronize()  # the previous device copy still reads the pinned buffer
        buffer = self.pinned[kind]
        self.disk.fill(layer, buffer)
        n = 0
        pinned = weight_tensors(buffer)
        for name, p in weight_tensors(module).items():
            p.data.copy_(pinned[name], non_blocking=True)
            n += p.numel() * p.element_size()
        self.last_copy[kind] = torch.cuda.Event()
        self.last_copy[kind].record(torch.cuda.current_stream())
        return n

    def prefetch(self, layer: int) -> None:
        self.disk.prefetch(layer)

    def close(self) -> None:
        self.disk.close()


class HostExpertSource:
    """GPU host tier for routed experts: each expert's weights in pinned host memory, copied per use."""

    def __init__(self) -> None:
        self.tensors: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def add(self, layer: int, expert: int, module: nn.Module) -> None:
        self.tensors[(layer, expert)] = {n: p.detach().pin_memory() for n, p in weight_tensors(module).items()}

    def fill(self, layer: int, expert: int, module: nn.Module) -> int:
        host = self.tensors[(layer, expert)]
        n = 0
        for name, p in weight_tensors(module).items():
            p.data.copy_(host[name], non_blocking=True)  # on the compute stream: ordered after the last use
            n += p.numel() * p.element_size()
        return n

    def prefetch(self, layer: int, expert: int) -> None:
        pass


class RoutedSource:
    """Layers (or their experts) from several sources (GPU: host-tier and disk-tier ones)."""

    def __init__(self, by_layer: dict[int, LayerSource]) -> None:
        self.by_layer = by_layer

    def close(self) -> None:
        for src in {id(s): s for s in self.by_layer.values()}.values():
            if hasattr(src, "close"):
                src.close()

    def fill(self, layer: int, *args) -> int:
        return self.by_layer[layer].fill(layer, *args)

    def prefetch(self, layer: int, *args) -> None:
        self.by_layer[layer].prefetch(layer, *args)


def replace_streamed_layers(model: nn.Module, streamer: LayerStreamer, streamed: Sequence[int]) -> None:
    """Put placeholders in `model.layers` for the streamed layers (before materialising)."""
    for i in streamed:
        mlp = getattr(model.layers[i], "mlp", None)
        model.layers[i] = StreamedLayer(i, streamer, mlp.routed.shape if isinstance(mlp, SparseMoe) else None)


def build_staging(make_layer: Callable[[int], nn.Module], count: int, device: torch.device, layer: int = 0,
                  experts: ExpertStreamer | None = None) -> list[nn.Module]:
    """`count` decoder layers of layer `layer`'s kind on `device`. A MoE layer's are built without
    routed experts: they stream through `experts` (None: a layer that only holds weights)."""
    out = []
    for _ in range(count):
        with torch.device("meta"):
            m = make_layer(layer)
        if isinstance(getattr(m, "mlp", None), SparseMoe):
            m.mlp.stream_experts(experts)
        m.to_empty(device=device)
        if hasattr(m.attn, "init_buffers"):
            m.attn.init_buffers()
        if hasattr(m.mlp, "init_buffers"):
            m.mlp.init_buffers()
        out.append(m.eval())
    return out


def build_expert_staging(make_layer: Callable[[int], nn.Module], layer: int, count: int, device: torch.device) -> list[nn.Module]:
    """`count` routed experts (ExpertMLP) of MoE layer `layer`'s shape, on `device`."""
    with torch.device("meta"):
        m = make_layer(layer)
    out = list(m.mlp.experts.values())[:count]
    for e in out:
        e.to_empty(device=device)
    return [e.eval() for e in out]
