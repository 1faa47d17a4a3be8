"""Fill a meta-built shard from a checkpoint, reading only this rank's slices.

1. `validate` checks every expected tensor's presence, shape and dtype family against the
   config, and that every tensor in the files is used or explicitly ignored; it raises one
   CheckpointError listing everything wrong, before any weight is allocated.
2. `load_shard` walks the table in names.py: for each tensor, sharding.spec says which rows or
   columns this rank owns, the mapped file is viewed at just those (checkpoint/mapped.py), and the layer that owns
   the parameter puts them in place (its `load_weight(name, data, slot)`, or a plain copy).
   Every parameter slot must be filled exactly once.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from tp_runtime import sharding
from tp_runtime.checkpoint.index import CheckpointIndex
from tp_runtime.checkpoint.mapped import MappedCheckpoint, release_pages
from tp_runtime.checkpoint.names import TensorEntry, expected_tensors, held_by, is_ignored
from tp_runtime.config import ModelConfig
from tp_runtime.errors import CheckpointError

_MAX_LISTED = 20


def _bullet_list(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n  ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return title + "".join(f"\n  - {s}" for s in shown) + more


def sliced_shape(shape: tuple[int, ...], spec: sharding.ShardSpec) -> tuple[int, ...]:
    if spec.dim is None:
        return shape
    return tuple(spec.size if d == spec.dim else n for d, n in enumerate(shape))


def validate(index: CheckpointIndex, cfg: ModelConfig, tp: int = 1, rank: int = 0) -> list[TensorEntry]:
    """Checks the files against the config; returns the entries `rank` of `tp` reads (all but
    other ranks' experts under --moe ep). A cache of pre-cut slices holds only those."""
    entries = expected_tensors(cfg)
    problems: list[str] = []
    if index.sliced_for is not None and index.sliced_for != (tp, rank):
        raise CheckpointError(f"{index.model_dir} holds the slices of rank {index.sliced_for[1]} of tp={index.sliced_for[0]}, not of rank {rank} of tp={tp}")
    if index.sliced_for is not None:
        entries = held_by(entries, cfg, tp, rank)
    for e in entries:
        meta = index.tensors.get(e.hf_name)
        want = e.shape if index.sliced_for is None else sliced_shape(e.shape, sharding.spec(e.role, e.kind, cfg, tp, rank))
        if meta is None:
            problems.append(f"missing tensor {e.hf_name} (expected shape {list(want)})")
        elif meta.shape != want:
            problems.append(f"tensor {e.hf_name} in {meta.file.name} has shape {list(meta.shape)}, config implies {list(want)}")
        elif not (meta.storage.is_float or (meta.storage.quantized and len(meta.shape) == 2)):
            problems.append(f"tensor {e.hf_name} in {meta.file.name} has dtype {meta.storage.name}, expected a float or a block-quantized type")
    expected = {e.hf_name for e in entries}
    unused = sorted(n for n in index.tensors if n not in expected and not is_ignored(n, cfg))
    problems += [f"unexpected tensor {n} in {index.tensors[n].file.name} (not used by {cfg.architecture})" for n in unused]
    if problems:
        raise CheckpointError(_bullet_list(f"checkpoint {index.model_dir} does not match its config.json:", problems))
    return held_by(entries, cfg, tp, rank)


_CHUNK_BYTES = 8 << 20


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src, in row blocks of ~8 MiB: a source that views the mapped checkpoint has each
    block's pages released right after, so a large tensor never sits twice in memory."""
    if dst.shape != src.shape:
        raise ValueError(f"slice of shape {list(src.shape)} does not fit parameter of shape {list(dst.shape)}")
    row_bytes = max(1, src[0].numel() * src.element_size()) if src.dim() else 1
    step = max(1, _CHUNK_BYTES // row_bytes) if src.dim() else 1
    if src.dim() == 0 or step >= src.shape[0]:
        dst.copy_(src)
        release_pages(src)
        return
    for lo in range(0, src.shape[0], step):
        dst[lo : lo + step].copy_(src[lo : lo + step])
        release_pages(src[lo : lo + step])


def load_entry(root: torch.nn.Module, files: MappedCheckpoint, e: TensorEntry, target: str, spec: sharding.ShardSpec | None) -> int:
    """Put this rank's slice of entry `e` into parameter `target` of `root`: as stored blocks
    where the owning module keeps blocks of that type (and the slice falls on blocks), else as
    values. Returns the bytes taken from the file."""
    module_name, _, param_name = target.rpartition(".")
    module = root.get_submodule(module_name)
    takes = getattr(module, "takes_blocks", None)
    if takes is not None and takes(files.storage(e.hf_name)) and (blocks := files.blocks(e.hf_name, spec)) is not None:
        module.load_blocks(param_name, blocks, files.storage(e.hf_name), e.slot)
        release_pages(blocks)
        return blocks.numel()
    data = files.values(e.hf_name, spec)
    nbytes = data.numel() * data.element_size()
    put_weight(root, target, data, e.slot)  # releases the mapped pages as it copies
    return nbytes


def put_weight(root: torch.nn.Module, target: str, data: torch.Tensor, slot: str | None) -> None:
    """Copy `data` into parameter `target` of `root` (or its `slot` of a merged parameter)."""
    module_name, _, param_name = target.rpartition(".")
    module = root.get_submodule(module_name)
    if hasattr(module, "load_weight"):
        module.load_weight(param_name, data, slot)
    else:
        copy_checked(getattr(module, param_name), data)


def _loads_itself(root: torch.nn.Module, target: str) -> bool:
    """Whether `target` names a weight that its module stores in a form of its own (an int8
    weight and its scales) through `load_weight`."""
    module_name, _, _ = target.rpartition(".")
    try:
        return hasattr(root.get_submodule(module_name), "load_weight")
    except AttributeError:
        return False


def load_shard(
    model: torch.nn.Module,
    index: CheckpointIndex,
    entries: Iterable[TensorEntry],
    cfg: ModelConfig,
    tp: int,
    rank: int,
    progress: Callable[[Iterable[TensorEntry]], Iterable[TensorEntry]] = lambda it: it,
) -> int:
    """Reads this rank's slices of `entries` into `model` (already materialised); returns the
    bytes read. Every parameter of `model` must be filled: layers left out of `entries` (streamed
    ones) must be left out of the model too."""
    params = dict(model.named_parameters())
    entries = list(entries)
    slots_wanted = {(e.target, e.slot) for e in entries}
    filled: set[tuple[str, str | None]] = set()
    nbytes = 0
    files = MappedCheckpoint(index)
    try:
        with torch.no_grad():
            for e in progress(entries):
                if e.target not in params and not _loads_itself(model, e.target):
                    raise CheckpointError(f"{e.hf_name}: the model has no parameter {e.target} to load it into")
                # a slice cache already holds exactly this rank's part
                spec = None if index.sliced_for else sharding.spec(e.role, e.kind, cfg, tp, rank)
                try:
                    nbytes += load_entry(model, files, e, e.target, spec)
                except ValueError as err:
                    raise CheckpointError(f"{e.hf_name} -> {e.target} on rank {rank}: {err}") from None
                if (e.target, e.slot) in filled:
                    raise CheckpointError(f"{e.hf_name}: parameter {e.target} slot {e.slot} filled twice")
                filled.add((e.target, e.slot))
    finally:
        files.close()
    unfilled = sorted(f"{t}[{s}]" if s else t for t, s in slots_wanted - filled)
    untouched = sorted(n for n in params if n not in {t for t, _ in filled})
    if unfilled or untouched:
        raise CheckpointError(_bullet_list("parameters left unfilled after loading:", unfilled + untouched))
    return nbytes


class CheckpointLayerSource:
    """Decoder layers of this rank read from the mmap'd checkpoint on every use (the disk tier).

    `fill(i, module)` copies layer i's slices into `module` (a decoder layer of the same
    shard), converting dtype and merging q/k/v and gate/up exactly as loading does; copy_checked
    releases the mapped pages as it copies, so the process holds only the staging layer. A MoE
    layer's routed experts are not part of it: a streamed layer's experts stream on their own
    (CheckpointExpertSource)."""

    def __init__(self, index: CheckpointIndex, cfg: ModelConfig, tp: int, rank: int, layers: Iterable[int]) -> None:
        self.files = MappedCheckpoint(index)
        wanted = set(layers)
        self.entries: dict[int, list[tuple[TensorEntry, sharding.ShardSpec | None]]] = {i: [] for i in wanted}
        self._stored_in: dict[int, tuple[str, ...]] = {}  # id(module) -> storage of the layer it holds
        for e in held_by(expected_tensors(cfg), cfg, tp, rank):
            if e.layer in wanted and e.expert is None:
                spec = None if index.sliced_for else sharding.spec(e.role, e.kind, cfg, tp, rank)
                self.entries[e.layer].append((e, spec))

    def fill(self, layer: int, module: torch.nn.Module) -> int:
        stored = tuple(self.files.storage(e.hf_name) for e, _ in self.entries[layer])
        if self._stored_in.setdefault(id(module), stored) != stored:
            # a layer stored otherwise than the last one in `module` (a Q4_K_M file's layers
            # differ in which slots are Q6_K): its block linears' parts are rebuilt as it loads
            for m in module.modules():
                if hasattr(m, "set_layout"):
                    m.set_layout([], {})
            self._stored_in[id(module)] = stored
        nbytes = 0
        with torch.no_grad():
            for e, spec in self.entries[layer]:
                nbytes += load_entry(module, self.files, e, e.target_in_layer, spec)
        return nbytes

    def prefetch(self, layer: int) -> None:
        for e, spec in self.entries[layer]:
            self.files.willneed(e.hf_name, spec)

    def close(self) -> None:
        self.files.close()


class CheckpointExpertSource:
    """Routed experts of this rank read from the mmap'd checkpoint per use (model/offload.py
    ExpertSource): `fill(i, x, module)` copies this rank's part of expert x of layer i (whole
    under --moe ep, its slice under tp) into `module` (an ExpertMLP of the shard) as loading
    does, releasing the mapped pages as it copies."""

    def __init__(self, index: CheckpointIndex, cfg: ModelConfig, tp: int, rank: int, layers: Iterable[int]) -> None:
        self.files = MappedCheckpoint(index)
        wanted = set(layers)
        self.entries: dict[tuple[int, int], list[tuple[TensorEntry, sharding.ShardSpec | None, str]]] = {}
        for e in held_by(expected_tensors(cfg), cfg, tp, rank):
            if e.layer in wanted and e.expert is not None:
                spec = None if index.sliced_for else sharding.spec(e.role, e.kind, cfg, tp, rank)
                target = e.target.removeprefix(f"layers.{e.layer}.mlp.experts.{e.expert}.")  # inside the expert
                self.entries.setdefault((e.layer, e.expert), []).append((e, spec, target))

    def experts(self, layer: int) -> list[int]:
        """The experts of `layer` this rank holds (a part of)."""
        return sorted(x for i, x in self.entries if i == layer)

    def fill(self, layer: int, expert: int, module: torch.nn.Module) -> int:
        nbytes = 0
        with torch.no_grad():
            for e, spec, target in self.entries[(layer, expert)]:
                nbytes += load_entry(module, self.files, e, target, spec)
        return nbytes

    def prefetch(self, layer: int, expert: int) -> None:
        for e, spec, _ in self.entries[(layer, expert)]:
            self.files.willneed(e.hf_name, spec)

    def close(self) -> None:
        self.files.close()
