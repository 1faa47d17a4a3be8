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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from tp_runtime.checkpoint.layer_state import weight_tensors


class LayerSource(Protocol):
    def fill(self, layer: int, module: nn.Module) -> int:
        """Copy decoder layer `layer`'s weights into `module` (same structure); returns bytes."""

    def prefetch(self, layer: int) -> None:
        """Start bringing `layer`'s bytes closer (readahead); must not block."""


@dataclass
class StreamStats:
    copies: int = 0  # layer copies into staging buffers
    bytes: int = 0
    seconds: float = 0.0  # time the compute waited for copies (CPU: the copies themselves)


class StreamedLayer(nn.Module):
    """Stands in `model.layers[i]` for a layer that is not resident; holds no parameters."""

    def __init__(self, layer: int, streamer: LayerStreamer) -> None:
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "_streamer", streamer)  # not a submodule: shared by every streamed layer

    def forward(self, *args):
        return self._streamer.run(self.layer, *args)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, streamed"

    def fused_problem(self) -> str:
        return "is streamed (not resident)"


class LayerStreamer:
    """CPU: synchronous copies into one staging layer, readahead of the next one."""

    def __init__(self, staging: Sequence[nn.Module], source: LayerSource, streamed: Sequence[int]) -> None:
        self.staging = list(staging)
        self.source = source
        order = sorted(streamed)
        # the next streamed layer after each (wrapping: the next token starts again at the first)
        self.next_of = {a: b for a, b in zip(order, order[1:] + order[:1])}
        self.stats = StreamStats()

    def source_close(self) -> None:
        close = getattr(self.source, "close", None)
        if close:
            close()

    def run(self, layer: int, *args):
        module = self.acquire(layer)
        try:
            return module(*args)
        finally:
            self.release(layer)

    def acquire(self, layer: int) -> nn.Module:
        t0 = time.perf_counter()
        module = self.staging[0]
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

    def __init__(self, staging: Sequence[nn.Module], source: LayerSource, streamed: Sequence[int], device: torch.device) -> None:
        super().__init__(staging, source, streamed)
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self.ready: list[torch.cuda.Event | None] = [None] * len(self.staging)
        self.freed: list[torch.cuda.Event | None] = [None] * len(self.staging)
        self.slot_of: dict[int, int] = {}
        self.turn = 0

    def _issue(self, layer: int) -> None:
        slot = self.turn
        self.turn = (self.turn + 1) % len(self.staging)
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
    """GPU disk tier: the mmap'd checkpoint -> one pinned host layer -> device (non-blocking)."""

    def __init__(self, disk: LayerSource, pinned: nn.Module) -> None:
        self.disk = disk
        self.pinned = pinned
        self.last_copy: torch.cuda.Event | None = None

    def fill(self, layer: int, module: nn.Module) -> int:
        if self.last_copy is not None:
            self.last_copy.synchronize()  # the previous device copy still reads the pinned buffer
        self.disk.fill(layer, self.pinned)
        n = 0
        pinned = weight_tensors(self.pinned)
        for name, p in weight_tensors(module).items():
            p.data.copy_(pinned[name], non_blocking=True)
            n += p.numel() * p.element_size()
        self.last_copy = torch.cuda.Event()
        self.last_copy.record(torch.cuda.current_stream())
        return n

    def prefetch(self, layer: int) -> None:
        self.disk.prefetch(layer)

    def close(self) -> None:
        self.disk.close()


class RoutedSource:
    """Layers from several sources (GPU: host-tier layers and disk-tier layers)."""

    def __init__(self, by_layer: dict[int, LayerSource]) -> None:
        self.by_layer = by_layer

    def close(self) -> None:
        for src in {id(s): s for s in self.by_layer.values()}.values():
            if hasattr(src, "close"):
                src.close()

    def fill(self, layer: int, module: nn.Module) -> int:
        return self.by_layer[layer].fill(layer, module)

    def prefetch(self, layer: int) -> None:
        self.by_layer[layer].prefetch(layer)


def replace_streamed_layers(model: nn.Module, streamer: LayerStreamer, streamed: Sequence[int]) -> None:
    """Put placeholders in `model.layers` for the streamed layers (before materialising)."""
    for i in streamed:
        model.layers[i] = StreamedLayer(i, streamer)


def build_staging(make_layer: Callable[[int], nn.Module], count: int, device: torch.device) -> list[nn.Module]:
    out = []
    for _ in range(count):
        with torch.device("meta"):
            m = make_layer(0)
        m.to_empty(device=device)
        if hasattr(m.attn, "init_buffers"):
            m.attn.init_buffers()
        out.append(m.eval())
    return out
