"""Which slice of which tensor each rank owns. Pure functions, no I/O, no torch.

Vocabulary (defined here, used everywhere):
- column-parallel: weight [out, in] split on `out` (dim 0); each rank produces a slice of
  the output features and no communication is needed.
- row-parallel: weight [out, in] split on `in` (dim 1); each rank produces a partial sum of
  the full output, which an all-reduce completes.
- vocab-parallel: the embedding / LM head split on the vocabulary (dim 0); the lookup is
  masked and all-reduced, the logits are all-gathered.
- replicated: every rank holds the whole tensor (norms, row-parallel biases).

Any tp from 1 to the number of attention heads works. Heads, the MLP's intermediate size and
the vocabulary are split into contiguous ranges by `split_sizes`, which gives sizes that
differ by at most one unit when no weights are given (weights let a faster rank take a larger
share). A rank holds exactly the kv heads its q heads read, so a kv head is replicated on
every rank that needs it: this covers tp > num_kv_heads and head splits that cut a group.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Sequence

from tp_runtime.config import ModelConfig
from tp_runtime.errors import ShardingError


def split_sizes(total: int, parts: int, weights: Sequence[float] | None = None, unit: int = 1) -> list[int]:
    """Split `total` into `parts` contiguous sizes, proportional to `weights`, each a multiple
    of `unit` (a quantized format's block: a row-parallel weight's columns are cut on blocks).

    Largest-remainder rounding over whole units: with equal weights the sizes differ by at most
    one unit and the larger ones come first.
    """
    if parts < 1:
        raise ShardingError(f"cannot split into {parts} parts")
    if total < 0:
        raise ShardingError(f"cannot split a negative size {total}")
    if unit < 1 or total % unit:
        raise ShardingError(f"cannot split {total} into whole units of {unit}")
    if unit > 1:
        return [n * unit for n in split_sizes(total // unit, parts, weights)]
    if weights is None:
        weights = [1.0] * parts
    if len(weights) != parts or any(not math.isfinite(w) or w <= 0 for w in weights):
        raise ShardingError(f"need {parts} positive finite split weights, got {list(weights)}")
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    sizes = [int(x) for x in exact]
    short = total - sum(sizes)
    by_remainder = sorted(range(parts), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[:short]:
        sizes[i] += 1
    return sizes


def split_ranges(total: int, parts: int, weights: Sequence[float] | None = None, unit: int = 1) -> list[tuple[int, int]]:
    ranges, start = [], 0
    for size in split_sizes(total, parts, weights, unit):
        ranges.append((start, start + size))
        start += size
    return ranges


def shares(cfg: ModelConfig, tp: int, weights: Sequence[float] | None = None) -> Sequence[float] | None:
    """The split weights of a split over tp ranks: those given, else the config's --shares when
    it has one per rank (a split over another count, such as the dense parts' world of 1
    under --attention dp, is even)."""
    if weights is None and cfg.shares is not None and len(cfg.shares) == tp:
        return cfg.shares
    return weights


def vocab_ranges(cfg: ModelConfig, tp: int, weights: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """Every rank's vocabulary rows [lo, hi)."""
    return split_ranges(cfg.vocab_size, tp, shares(cfg, tp, weights))


def dense_split(cfg: ModelConfig, tp: int, rank: int) -> tuple[int, int]:
    """(ranks, rank) over which the dense parts (attention, embedding, head, dense MLPs, shared
    experts) are split: the group's, or (1, 0) under --attention dp, where every rank holds
    them whole and runs its own sequences."""
    if cfg.moe is not None and cfg.moe.data_parallel:
        return 1, 0
    return tp, rank


def check_tp(cfg: ModelConfig, tp: int) -> None:
    if tp < 1:
        raise ShardingError(f"tp must be at least 1, got {tp}")
    if dense_split(cfg, tp, 0)[0] == tp and tp > cfg.num_heads:  # (--attention dp splits no heads)
        raise ShardingError(
            f"tp={tp} is larger than the number of attention heads ({cfg.num_heads}) of this "
            f"{cfg.architecture}; use tp between 1 and {cfg.num_heads}"
        )
    if cfg.moe is not None and cfg.moe.parallel == "ep" and cfg.moe.num_experts < tp:
        raise ShardingError(f"--moe ep gives each rank whole experts, and this {cfg.architecture} has {cfg.moe.num_experts} experts "
                            f"for {tp} ranks; use --moe tp or at most {cfg.moe.num_experts} ranks")


def check_job(cfg: ModelConfig, world: int) -> None:
    """check_tp for a job of `world` ranks, and its --shares: one weight per rank."""
    check_tp(cfg, world)
    if cfg.shares is not None and len(cfg.shares) != world:
        raise ShardingError(f"--shares gives {len(cfg.shares)} weights ({','.join(f'{w:g}' for w in cfg.shares)}) for {world} ranks; give one per rank")


@dataclass(frozen=True)
class HeadLayout:
    """The attention heads one rank owns."""

    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int
    kv_head_of_q: tuple[int, ...]  # local kv head index read by each local q head

    @property
    def num_q_local(self) -> int:
        return self.q_stop - self.q_start

    @property
    def num_kv_local(self) -> int:
        return self.kv_stop - self.kv_start

    @property
    def uniform_group(self) -> int | None:
        """q heads per kv head when every local kv head serves the same consecutive number of q heads."""
        if self.num_q_local % self.num_kv_local:
            return None
        g = self.num_q_local // self.num_kv_local
        ok = all(kv == i // g for i, kv in enumerate(self.kv_head_of_q))
        return g if ok else None


def head_layout(cfg: ModelConfig, tp: int, rank: int, weights: Sequence[float] | None = None) -> HeadLayout:
    check_tp(cfg, tp)
    weights = shares(cfg, tp, weights)
    q_start, q_stop = split_ranges(cfg.num_heads, tp, weights)[rank]
    if q_stop == q_start:
        raise ShardingError(f"split weights {list(weights or [])} leave rank {rank} without attention heads; every rank needs at least one")
    group = cfg.num_heads // cfg.num_kv_heads
    kv_start = q_start // group
    kv_stop = (q_stop - 1) // group + 1
    kv_of_q = tuple(h // group - kv_start for h in range(q_start, q_stop))
    return HeadLayout(q_start, q_stop, kv_start, kv_stop, kv_of_q)


def mlp_unit(cfg: ModelConfig, tp: int, weights: Sequence[float] | None = None, total: int | None = None) -> int:
    """The unit the MLP (or an expert's `total` features) is split in: the config's (a GGUF's
    down_proj block) where every rank then gets at least one, else single features (the slices
    inside blocks are decoded)."""
    u = cfg.mlp_unit
    total = cfg.intermediate_size if total is None else total
    weights = shares(cfg, tp, weights)
    if u > 1 and total % u == 0 and all(split_sizes(total, tp, weights, u)):
        return u
    return 1


def _feature_range(total: int, what: str, cfg: ModelConfig, tp: int, rank: int, weights: Sequence[float] | None, unit: int | None = None) -> tuple[int, int]:
    """`total` features split over tp in whole `unit`s (None: mlp_unit's choice); rank's range."""
    weights = shares(cfg, tp, weights)
    if unit is None:
        unit = mlp_unit(cfg, tp, weights, total)
    lo, hi = split_ranges(total, tp, weights, unit)[rank]
    if lo == hi:
        raise ShardingError(f"{what}'s {total} features in units of {unit} leave rank {rank} of tp={tp} without any; use a smaller tp")
    return lo, hi


def expert_range(cfg: ModelConfig, tp: int, rank: int, weights: Sequence[float] | None = None) -> tuple[int, int]:
    """The routed experts [lo, hi) whose weights `rank` holds: all of them (--moe tp, each
    sliced), or whole experts, E/tp each, uneven counts allowed (--moe ep)."""
    moe = cfg.moe
    if moe.parallel == "tp":
        return 0, moe.num_experts
    check_tp(cfg, tp)
    weights = shares(cfg, tp, weights)
    lo, hi = split_ranges(moe.num_experts, tp, weights)[rank]
    if lo == hi:
        raise ShardingError(f"--moe ep: split weights {list(weights or [])} leave rank {rank} without an expert")
    return lo, hi


def expert_intermediate_range(cfg: ModelConfig, tp: int, rank: int, weights: Sequence[float] | None = None) -> tuple[int, int]:
    """An expert's intermediate features on `rank`: a slice (--moe tp) or all of them (--moe ep)."""
    if cfg.moe.parallel == "ep":
        return 0, cfg.moe.intermediate_size
    return _feature_range(cfg.moe.intermediate_size, "an expert", cfg, tp, rank, weights)


def shared_expert_range(cfg: ModelConfig, tp: int, rank: int, weights: Sequence[float] | None = None) -> tuple[int, int]:
    """The shared expert's features on `rank`: split like the dense MLP's in either --moe mode."""
    return _feature_range(cfg.moe.shared_intermediate_size, "the shared expert", cfg, tp, rank, weights)


def holds_expert(cfg: ModelConfig, tp: int, rank: int, expert: int | None, weights: Sequence[float] | None = None) -> bool:
    """Whether `rank` holds any of routed expert `expert`'s weights (None: not an expert's tensor)."""
    if expert is None:
        return True
    lo, hi = expert_range(cfg, tp, rank, weights)
    return lo <= expert < hi


def intermediate_range(cfg: ModelConfig, tp: int, rank: int, weights: Sequence[float] | None = None, unit: int | None = None) -> tuple[int, int]:
    """The MLP's intermediate features of `rank`: whole units of `unit` (down_proj's column
    blocks; None: mlp_unit's choice); every rank needs at least one."""
    check_tp(cfg, tp)
    return _feature_range(cfg.intermediate_size, "the MLP", cfg, tp, rank, weights, unit)


def vocab_range(cfg: ModelConfig, tp: int, rank: int, weights: Sequence[float] | None = None) -> tuple[int, int]:
    check_tp(cfg, tp)
    return vocab_ranges(cfg, tp, weights)[rank]


def vocab_shard_padded(cfg: ModelConfig, tp: int, weights: Sequence[float] | None = None) -> int:
    """Rows every rank's LM head shard is padded to, so that logits all-gather in equal pieces."""
    return max(split_sizes(cfg.vocab_size, tp, shares(cfg, tp, weights)))


class Parallel(enum.Enum):
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    REPLICATED = "replicated"


@dataclass(frozen=True)
class ShardSpec:
    """Rows (dim 0) or columns (dim 1) [start, stop) of a checkpoint tensor that a rank reads."""

    style: Parallel
    dim: int | None
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


# Megatron layout of a Llama block: the one table of what is split how.
_STYLE_BY_ROLE = {
    "q_proj": Parallel.COLUMN,
    "k_proj": Parallel.COLUMN,
    "v_proj": Parallel.COLUMN,
    "gate_proj": Parallel.COLUMN,
    "up_proj": Parallel.COLUMN,
    "o_proj": Parallel.ROW,
    "down_proj": Parallel.ROW,
    "expert_gate_proj": Parallel.COLUMN,
    "expert_up_proj": Parallel.COLUMN,
    "expert_down_proj": Parallel.ROW,
    "shared_gate_proj": Parallel.COLUMN,
    "shared_up_proj": Parallel.COLUMN,
    "shared_down_proj": Parallel.ROW,
    "router": Parallel.REPLICATED,
    "router_bias": Parallel.REPLICATED,
    "shared_expert_gate": Parallel.REPLICATED,
    "q_norm": Parallel.REPLICATED,
    "k_norm": Parallel.REPLICATED,
    # MLA (model/mla.py): the low-rank down projections and their norms whole on every rank, the
    # up projections by heads (MLA has no kv heads of its own: a rank expands the keys and
    # values of its q heads), o_proj (above) row-parallel over the heads' values
    "q_a_proj": Parallel.REPLICATED,
    "kv_a_proj": Parallel.REPLICATED,
    "q_a_layernorm": Parallel.REPLICATED,
    "kv_a_layernorm": Parallel.REPLICATED,
    "q_b_proj": Parallel.COLUMN,
    "kv_b_proj": Parallel.COLUMN,
    "embed_tokens": Parallel.VOCAB,
    "lm_head": Parallel.VOCAB,
    "input_layernorm": Parallel.REPLICATED,
    "post_attention_layernorm": Parallel.REPLICATED,
    "norm": Parallel.REPLICATED,
}


def spec(role: str, kind: str, cfg: ModelConfig, tp: int, rank: int, weights: Sequence[float] | None = None, unit: int | None = None) -> ShardSpec:
    """The slice of a checkpoint tensor that `rank` of `tp` reads, by its role (the names
    table's: "q_proj", "down_proj", ...) and kind ("weight" or "bias"); `unit` as for
    intermediate_range."""
    if role not in _STYLE_BY_ROLE:
        raise ShardingError(f"no sharding rule for a tensor of role {role!r}")
    check_tp(cfg, tp)  # every entry point goes through it
    if not role.startswith("expert_"):
        tp, rank = dense_split(cfg, tp, rank)
    style = _STYLE_BY_ROLE[role]
    hd = cfg.head_dim
    heads = head_layout(cfg, tp, rank, weights) if role in ("q_proj", "k_proj", "v_proj", "o_proj", "q_b_proj", "kv_b_proj") else None
    if style is Parallel.REPLICATED:
        return ShardSpec(style, None, 0, cfg.hidden_size)
    if style is Parallel.VOCAB:
        lo, hi = vocab_range(cfg, tp, rank, weights)
        return ShardSpec(style, 0, lo, hi)
    if role in ("q_proj", "q_b_proj"):  # (MLA: head_dim is the key's, qk_nope + qk_rope)
        lo, hi = heads.q_start * hd, heads.q_stop * hd
    elif role == "kv_b_proj":  # each head's qk_nope key features, then its value
        per = cfg.mla.qk_nope_head_dim + cfg.mla.v_head_dim
        lo, hi = heads.q_start * per, heads.q_stop * per
    elif role in ("k_proj", "v_proj"):
        lo, hi = heads.kv_start * hd, heads.kv_stop * hd
    elif role in ("gate_proj", "up_proj", "down_proj"):
        lo, hi = intermediate_range(cfg, tp, rank, weights, unit)
    elif role.startswith("expert_"):
        lo, hi = expert_intermediate_range(cfg, tp, rank, weights)
    elif role.startswith("shared_"):
        lo, hi = shared_expert_range(cfg, tp, rank, weights)
    else:  # o_proj: its input is the concatenated q heads (MLA: their values, v_head_dim each)
        vd = cfg.mla.v_head_dim if cfg.mla is not None else hd
        lo, hi = heads.q_start * vd, heads.q_stop * vd
    if style is Parallel.ROW:
        if kind == "bias":  # a row-parallel bias is added once, after the all-reduce
            return ShardSpec(Parallel.REPLICATED, None, 0, cfg.hidden_size)
        return ShardSpec(style, 1, lo, hi)
    return ShardSpec(style, 0, lo, hi)
