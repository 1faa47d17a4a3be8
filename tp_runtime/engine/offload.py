"""Wire a placement plan to a meta-built model: placeholders for the layers that are not
resident in the fastest tier, MoE layers that read their routed experts per forward, their
staging buffers, and where their weights come from."""

from __future__ import annotations

import torch
from torch import nn

from tp_runtime import placement
from tp_runtime.checkpoint import offload
from tp_runtime.checkpoint.index import CheckpointIndex
from tp_runtime.checkpoint.layer_state import weight_tensors
from tp_runtime.checkpoint.loader import CheckpointExpertSource, CheckpointLayerSource
from tp_runtime.checkpoint.offload import OffloadedExpertSource, OffloadedLayerSource
from tp_runtime.config import ModelConfig
from tp_runtime.model.offload import (
    CudaLayerStreamer,
    ExpertStreamer,
    HostExpertSource,
    HostLayerSource,
    LayerStreamer,
    PinnedDiskSource,
    RoutedSource,
    build_expert_staging,
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
    """Call on the meta-built model, before it is materialised: streamed layers and streamed
    experts then take no memory. Host-tier layers (and experts) of a GPU plan are loaded here
    (pinned); disk-tier ones are read on every use from the checkpoint, or from `offload_dir`
    where they are written once in the runtime's layout (`layout`: the dtype, the quantization,
    GGUF blocks kept, e.g. "float32-int8"; it names the folder)."""
    streamed, expert_layers = plan.streamed, plan.experts_streamed
    if not streamed and not expert_layers:
        return None
    tp, rank = plan.tp, plan.rank
    kinds = placement.layer_kinds(cfg)
    first_of = {k: kinds.index(k) for k in set(kinds)}  # a layer of each kind, to build its staging from
    experts = None
    if expert_layers:
        staging = build_expert_staging(model.make_layer, expert_layers[0], plan.staged_experts, device)
        experts = ExpertStreamer(staging, _expert_source(model, plan, index, cfg, device, offload_dir, layout))
        for i in expert_layers:
            if i not in streamed:  # whole streamed layers' experts go through their staging layer's
                model.layers[i].mlp.stream_experts(experts)
    layer_kinds = {i: kinds[i] for i in streamed}
    disk_layers = plan.layers_on("disk")
    disk = None
    if disk_layers:
        disk = CheckpointLayerSource(index, cfg, tp, rank, disk_layers)
        if offload_dir:
            disk = _offloaded(disk, plan, index, model, offload_dir, layout, kinds)

    def stagings(count: int, dev: torch.device) -> tuple[list[nn.Module], list[str]]:
        mods, of_kind = [], []
        for k in plan.staging_kinds:
            mods += build_staging(model.make_layer, count, dev, first_of[k], experts)
            of_kind += [k] * count
        return mods, of_kind

    if not streamed:  # experts only: no staging layer, no layer copies
        streamer: LayerStreamer = LayerStreamer([], None, [], experts=experts)
    elif device.type != "cuda":
        staging, staging_kinds = stagings(1, device)
        streamer = LayerStreamer(staging, disk, streamed, staging_kinds, layer_kinds, experts)
    else:
        sources = {}
        host_layers = plan.layers_on("host")
        if host_layers:
            host = HostLayerSource()
            loader = CheckpointLayerSource(index, cfg, tp, rank, host_layers)
            for i in host_layers:
                (layer,) = build_staging(model.make_layer, 1, torch.device("cpu"), i)
                loader.fill(i, layer)
                host.add(i, layer)  # pinned; the unpinned layer goes with this iteration
            loader.close()
            sources.update({i: host for i in host_layers})
        if disk_layers:
            pinned = {}
            for k in plan.staging_kinds:
                (pinned[k],) = build_staging(model.make_layer, 1, torch.device("cpu"), first_of[k])
                for p in weight_tensors(pinned[k]).values():
                    p.data = p.data.pin_memory()
            through_pinned = PinnedDiskSource(disk, pinned, layer_kinds)
            sources.update({i: through_pinned for i in disk_layers})
        staging, staging_kinds = stagings(2, device)
        streamer = CudaLayerStreamer(staging, RoutedSource(sources), streamed, device, staging_kinds, layer_kinds, experts)
    replace_streamed_layers(model, streamer, streamed)
    return streamer


def _expert_source(model: nn.Module, plan: RankPlan, index: CheckpointIndex, cfg: ModelConfig, device: torch.device, offload_dir: str | None, layout: str):
    """Where the streamed experts come from: the checkpoint (or the offload folder) for the disk
    tier's; pinned host copies, loaded now, for a GPU plan's host tier."""
    sources = {}
    disk_layers = plan.experts_on("disk")
    if disk_layers:
        disk = CheckpointExpertSource(index, cfg, plan.tp, plan.rank, disk_layers)
        if offload_dir:
            folder = offload.rank_folder(offload_dir, index, plan.tp, plan.rank, layout)
            (scratch,) = build_expert_staging(model.make_layer, disk_layers[0], 1, torch.device("cpu"))
            offload.prepare_experts(folder, {i: disk.experts(i) for i in disk_layers}, {i: plan.sizes.expert_bytes(i) for i in disk_layers},
                                    scratch, disk.fill, _offload_meta(index, plan, layout))
            disk.close()
            disk = OffloadedExpertSource(folder, disk_layers)
        sources.update({i: disk for i in disk_layers})
    host_layers = plan.experts_on("host") if device.type == "cuda" else []
    if host_layers:
        host = HostExpertSource()
        loader = CheckpointExpertSource(index, cfg, plan.tp, plan.rank, host_layers)
        (scratch,) = build_expert_staging(model.make_layer, host_layers[0], 1, torch.device("cpu"))
        for i in host_layers:
            for x in loader.experts(i):
                loader.fill(i, x, scratch)
                host.add(i, x, scratch)
        loader.close()
        sources.update({i: host for i in host_layers})
    return RoutedSource(sources)


def _offload_meta(index: CheckpointIndex, plan: RankPlan, layout: str) -> dict:
    return {"model": str(index.model_dir), "tp": plan.tp, "rank": plan.rank, "layout": layout, "source": offload.source_identity(index.files)}


def _offloaded(checkpoint: CheckpointLayerSource, plan: RankPlan, index: CheckpointIndex, model: nn.Module, root: str, layout: str,
               kinds: list[str]) -> OffloadedLayerSource:
    """Write the rank's disk layers the offload folder lacks (through a CPU layer of each kind),
    then read them back from there."""
    disk_layers = plan.layers_on("disk")
    folder = offload.rank_folder(root, index, plan.tp, plan.rank, layout)
    scratch: dict[str, nn.Module] = {}
    for i in disk_layers:
        if kinds[i] not in scratch:
            (scratch[kinds[i]],) = build_staging(model.make_layer, 1, torch.device("cpu"), i)
    offload.prepare(folder, disk_layers, {i: plan.sizes.core(i) for i in disk_layers}, lambda i: scratch[kinds[i]], checkpoint.fill, _offload_meta(index, plan, layout))
    checkpoint.close()
    del scratch
    return OffloadedLayerSource(folder, disk_layers)
