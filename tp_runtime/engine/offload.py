"""Wire a placement plan to a meta-built model: placeholders for the layers that are not
resident in the fastest tier, their staging buffers, and where their weights come from."""

from __future__ import annotations

import torch
from torch import nn

from tp_runtime.checkpoint import offload
from tp_runtime.checkpoint.index import CheckpointIndex
from tp_runtime.checkpoint.layer_state import weight_tensors
from tp_runtime.checkpoint.loader import CheckpointLayerSource
from tp_runtime.checkpoint.offload import OffloadedLayerSource
from tp_runtime.config import ModelConfig
from tp_runtime.model.offload import (
    CudaLayerStreamer,
    HostLayerSource,
    LayerStreamer,
    PinnedDiskSource,
    RoutedSource,
    build_staging,
    replace_streamed_layers,
)
from tp_runtime.placement import RankPlan


def attach_streaming(
    model: nn.Module,
    plan: RankPlan,
    index: CheckpointIndex,
    cfg: ModelConfig,
    device: torch.device,
    offload_dir: str | None = None,
    layout: str = "",
) -> LayerStreamer | None:
    """Call on the meta-built model, before it is materialised: streamed layers then take no
    memory. Host-tier layers of a GPU plan are loaded here (pinned); disk-tier layers are read
    on every use from the checkpoint, or from `offload_dir` where they are written once in the
    runtime's layout (`layout`: the dtype, the quantization, GGUF blocks kept, e.g.
    "float32-int8"; it names the folder)."""
    streamed = plan.streamed
    if not streamed:
        return None
    tp, rank = plan.tp, plan.rank
    disk_layers = plan.layers_on("disk")
    disk = None
    if disk_layers:
        disk = CheckpointLayerSource(index, cfg, tp, rank, disk_layers)
        if offload_dir:
            disk = _offloaded(disk, plan, index, model, offload_dir, layout)
    if device.type != "cuda":
        streamer: LayerStreamer = LayerStreamer(build_staging(model.make_layer, 1, device), disk, streamed)
    else:
        sources = {}
        host_layers = plan.layers_on("host")
        if host_layers:
            host = HostLayerSource()
            loader = CheckpointLayerSource(index, cfg, tp, rank, host_layers)
            for i in host_layers:
                (layer,) = build_staging(model.make_layer, 1, torch.device("cpu"))
                loader.fill(i, layer)
                host.add(i, layer)  # pinned; the unpinned layer goes with this iteration
            loader.close()
            sources.update({i: host for i in host_layers})
        if disk_layers:
            (pinned,) = build_staging(model.make_layer, 1, torch.device("cpu"))
            for p in weight_tensors(pinned).values():
                p.data = p.data.pin_memory()
            through_pinned = PinnedDiskSource(disk, pinned)
            sources.update({i: through_pinned for i in disk_layers})
        streamer = CudaLayerStreamer(build_staging(model.make_layer, 2, device), RoutedSource(sources), streamed, device)
    replace_streamed_layers(model, streamer, streamed)
    return streamer


def _offloaded(checkpoint: CheckpointLayerSource, plan: RankPlan, index: CheckpointIndex, model: nn.Module, root: str, layout: str) -> OffloadedLayerSource:
    """Write the rank's disk layers the offload folder lacks (through a CPU layer), then read
    them back from there."""
    disk_layers = plan.layers_on("disk")
    folder = offload.rank_folder(root, index, plan.tp, plan.rank, layout)
    (scratch,) = build_staging(model.make_layer, 1, torch.device("cpu"))
    meta = {"model": str(index.model_dir), "tp": plan.tp, "rank": plan.rank, "layout": layout, "source": offload.source_identity(index.files)}
    offload.prepare(folder, disk_layers, {i: plan.sizes.layers[i] for i in disk_layers}, scratch, checkpoint.fill, meta)
    checkpoint.close()
    del scratch
    return OffloadedLayerSource(folder, disk_layers)
