"""sharding.py: uneven splits, GQA head layouts and the per-tensor ShardSpec.

Pure tests: no processes, no files. The spec() tests slice random full tensors the way the
loader does and put the pieces back together across ranks.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch

from tp_runtime import sharding
from tp_runtime.checkpoint.names import expected_tensors
from tp_runtime.checkpoint.synthetic import llama_config_dict
from tp_runtime.config import ModelConfig
from tp_runtime.errors import ShardingError
from tp_runtime.sharding import Parallel
from model_configs import make_cfg




# ---------------------------------------------------------------------------------------------
# split_sizes / split_ranges


@pytest.mark.parametrize("total", [0, 1, 2, 7, 8, 37, 100, 1001, 32000])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 5, 7, 8, 13])
def test_split_sizes_equal_weights(total, parts):
    sizes = sharding.split_sizes(total, parts)
    assert len(sizes) == parts
    assert sum(sizes) == total
    assert all(s >= 0 for s in sizes)
    assert max(sizes) - min(sizes) <= 1, sizes
    # larger ones first: non-increasing
    assert sizes == sorted(sizes, reverse=True), sizes
    # exactly total % parts ranks get the extra unit
    assert sizes.count(total // parts + 1) == (total % parts if total % parts else 0)


@pytest.mark.parametrize(
    "total, weights, expected",
    [
        (100, [3, 1], [75, 25]),
        (100, [1, 3], [25, 75]),
        (100, [1.0, 1.0, 2.0], [25, 25, 50]),
        (12, [2, 1, 1], [6, 3, 3]),
        (10, [0.5, 0.5], [5, 5]),
        (1000, [7, 2, 1], [700, 200, 100]),
    ],
)
def test_split_sizes_proportional(total, weights, expected):
    assert sharding.split_sizes(total, len(weights), weights) == expected


@pytest.mark.parametrize("total", [1, 7, 101, 999, 32001])
@pytest.mark.parametrize("weights", [[3, 1], [1, 2, 3], [5, 1, 1, 1], [0.1, 0.7, 0.2], [1, 1, 1, 1, 1, 1, 3]])
def test_split_sizes_weighted_rounding(total, weights):
    sizes = sharding.split_sizes(total, len(weights), weights)
    assert sum(sizes) == total
    exact = [total * w / sum(weights) for w in weights]
    # largest-remainder rounding: every size is the floor or the ceiling of its exact share
    for s, x in zip(sizes, exact):
        assert math.floor(x) <= s <= math.ceil(x), (sizes, exact)


@pytest.mark.parametrize(
    "parts, weights",
    [
        (2, [1.0, 0.0]),
        (2, [1.0, -1.0]),
        (2, [1.0]),
        (2, [1.0, 1.0, 1.0]),
        (3, []),
        (2, [float("nan"), 1.0]),
        (2, [float("inf"), 1.0]),
    ],
    ids=["zero", "negative", "too-few", "too-many", "empty", "nan", "inf"],
)
def test_split_sizes_bad_weights_raise(parts, weights):
    with pytest.raises(ShardingError):
        sharding.split_sizes(10, parts, weights)


@pytest.mark.parametrize("parts", [0, -1])
def test_split_sizes_bad_parts_raise(parts):
    with pytest.raises(ShardingError):
        sharding.split_sizes(10, parts)


@pytest.mark.parametrize("total, parts, weights", [(0, 3, None), (10, 3, None), (1001, 4, None), (100, 2, [3, 1]), (37, 5, [1, 2, 3, 4, 5])])
def test_split_ranges_contiguous_and_covering(total, parts, weights):
    ranges = sharding.split_ranges(total, parts, weights)
    sizes = sharding.split_sizes(total, parts, weights)
    assert len(ranges) == parts
    assert ranges[0][0] == 0
    assert ranges[-1][1] == total
    for (a, b), (c, _d) in zip(ranges, ranges[1:]):
        assert b == c, ranges
    assert [b - a for a, b in ranges] == sizes
    covered = [i for a, b in ranges for i in range(a, b)]
    assert covered == list(range(total))


# ---------------------------------------------------------------------------------------------
# head_layout


def _layout_cases():
    cases = set()
    # exhaustive over small shapes: every kv count dividing the heads, every tp up to the heads
    for heads in range(1, 17):
        for kv in range(1, heads + 1):
            if heads % kv:
                continue
            for tp in range(1, heads + 1):
                cases.add((heads, kv, tp))
    # named shapes: tp that cuts groups, tp > kv heads, tp = heads
    cases |= {(8, 2, 3), (12, 4, 5), (32, 8, 7), (32, 8, 32), (32, 8, 16), (32, 8, 12), (64, 8, 6), (40, 8, 6), (28, 4, 3), (14, 2, 4)}
    return sorted(cases)


def check_layout(heads: int, kv: int, tp: int, weights=None) -> None:
    cfg = make_cfg(heads, kv)
    group = heads // kv
    layouts = [sharding.head_layout(cfg, tp, r, weights) for r in range(tp)]
    owner = Counter()
    kv_owners = Counter()
    prev_stop = 0
    for r, lay in enumerate(layouts):
        assert lay.q_start == prev_stop, (r, lay)  # contiguous
        prev_stop = lay.q_stop
        q_heads = range(lay.q_start, lay.q_stop)
        owner.update(q_heads)
        # the kv heads this rank holds are exactly those its q heads read
        read = {h // group for h in q_heads}
        assert set(range(lay.kv_start, lay.kv_stop)) == read, (r, lay)
        assert lay.num_kv_local == len(read)
        kv_owners.update(read)
        # kv_head_of_q: local index of the global kv head each local q head reads
        assert len(lay.kv_head_of_q) == lay.num_q_local
        for i, h in enumerate(q_heads):
            assert lay.kv_head_of_q[i] + lay.kv_start == h // group, (r, i, lay)
        # uniform_group: an int exactly when every local kv head serves the same number of
        # consecutive local q heads
        counts = Counter(lay.kv_head_of_q)
        uniform = len(set(counts.values())) == 1 and list(lay.kv_head_of_q) == sorted(lay.kv_head_of_q)
        expected = counts[0] if uniform else None
        assert lay.uniform_group == expected, (r, lay)
    assert prev_stop == heads
    assert owner == Counter(range(heads)), "every q head must be owned by exactly one rank"
    assert set(kv_owners) == set(range(kv)), "every kv head must live on at least one rank"
    if weights is None:
        sizes = [lay.num_q_local for lay in layouts]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("heads, kv, tp", _layout_cases())
def test_head_layout(heads, kv, tp):
    check_layout(heads, kv, tp)


@pytest.mark.parametrize("heads, kv, weights", [(8, 2, [3, 1]), (12, 4, [1, 2, 3]), (32, 8, [5, 1, 1, 1]), (16, 16, [1, 3])])
def test_head_layout_weighted(heads, kv, weights):
    check_layout(heads, kv, len(weights), weights)


def test_head_layout_group_cut_by_tp3():
    # 8 q heads over 2 kv heads (group 4), tp=3 -> q [0,3) [3,6) [6,8)
    cfg = make_cfg(8, 2)
    l0, l1, l2 = (sharding.head_layout(cfg, 3, r) for r in range(3))
    assert (l0.q_start, l0.q_stop, l0.kv_start, l0.kv_stop, l0.kv_head_of_q, l0.uniform_group) == (0, 3, 0, 1, (0, 0, 0), 3)
    assert (l1.q_start, l1.q_stop, l1.kv_start, l1.kv_stop, l1.kv_head_of_q, l1.uniform_group) == (3, 6, 0, 2, (0, 1, 1), None)
    assert (l2.q_start, l2.q_stop, l2.kv_start, l2.kv_stop, l2.kv_head_of_q, l2.uniform_group) == (6, 8, 1, 2, (0, 0), 2)


def test_head_layout_tp_above_kv_heads_replicates():
    # 8 q over 2 kv, tp=4: each rank 2 q heads and 1 kv head; kv head 0 on ranks 0,1, kv 1 on 2,3
    cfg = make_cfg(8, 2)
    lays = [sharding.head_layout(cfg, 4, r) for r in range(4)]
    assert [(l.kv_start, l.kv_stop) for l in lays] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert all(l.uniform_group == 2 for l in lays)


# ---------------------------------------------------------------------------------------------
# check_tp


@pytest.mark.parametrize("heads, tp", [(8, 9), (4, 5), (32, 64)])
def test_check_tp_too_large(heads, tp):
    cfg = make_cfg(heads, heads)
    with pytest.raises(ShardingError) as ei:
        sharding.check_tp(cfg, tp)
    msg = str(ei.value)
    assert re.search(rf"(?<!\d){tp}(?!\d)", msg), msg
    assert re.search(rf"(?<!\d){heads}(?!\d)", msg), msg
    # every entry point goes through the check
    with pytest.raises(ShardingError):
        sharding.head_layout(cfg, tp, 0)
    with pytest.raises(ShardingError):
        sharding.spec("norm", "weight", cfg, tp, 0)


@pytest.mark.parametrize("tp", [0, -1])
def test_check_tp_nonpositive(tp):
    cfg = make_cfg(8, 2)
    with pytest.raises(ShardingError):
        sharding.check_tp(cfg, tp)


def test_check_tp_accepts_one_to_heads():
    cfg = make_cfg(6, 2)
    for tp in range(1, 7):
        sharding.check_tp(cfg, tp)


# ---------------------------------------------------------------------------------------------
# spec(): slice every checkpoint tensor and put the pieces back together

EXPECTED_STYLE = {
    "q_proj": Parallel.COLUMN,
    "k_proj": Parallel.COLUMN,
    "v_proj": Parallel.COLUMN,
    "gate_proj": Parallel.COLUMN,
    "up_proj": Parallel.COLUMN,
    "o_proj": Parallel.ROW,
    "down_proj": Parallel.ROW,
    "embed_tokens": Parallel.VOCAB,
    "lm_head": Parallel.VOCAB,
    "input_layernorm": Parallel.REPLICATED,
    "post_attention_layernorm": Parallel.REPLICATED,
    "norm": Parallel.REPLICATED,
}

SPEC_CONFIGS = {
    # GQA 8 over 2, vocab and intermediate not divisible by most tp
    "llama_gqa": dict(heads=8, kv_heads=2, head_dim=4, hidden=24, inter=37, vocab=1001, layers=2),
    # q/k/v bias, tied embeddings
    "qwen2_bias": dict(heads=6, kv_heads=2, head_dim=4, hidden=20, inter=30, vocab=103, layers=2, architecture="Qwen2ForCausalLM", tie_word_embeddings=True),
    # o_proj bias and MLP biases (row-parallel biases are replicated)
    "llama_all_bias": dict(heads=4, kv_heads=4, head_dim=3, hidden=12, inter=11, vocab=29, layers=1, attention_bias=True, mlp_bias=True),
    # MQA
    "llama_mqa": dict(heads=5, kv_heads=1, head_dim=2, hidden=10, inter=9, vocab=17, layers=1),
}


def _take(full: torch.Tensor, s: sharding.ShardSpec) -> torch.Tensor:
    """Exactly how the loader takes a slice (checkpoint/mapped.py MappedCheckpoint.view)."""
    if s.dim is None:
        return full
    if s.dim == 0:
        return full[s.start : s.stop]
    return full[:, s.start : s.stop]


def _spec_cases():
    out = []
    for name, kw in SPEC_CONFIGS.items():
        for tp in range(1, kw["heads"] + 1):
            out.append((name, tp, None))
    out += [("llama_gqa", 2, [3, 1]), ("llama_gqa", 3, [1, 2, 5]), ("qwen2_bias", 4, [1, 1, 1, 3])]
    return out


@pytest.mark.parametrize("cfg_name, tp, weights", _spec_cases())
def test_spec_reassembles_every_tensor(cfg_name, tp, weights):
    kw = dict(SPEC_CONFIGS[cfg_name])
    cfg = make_cfg(kw.pop("heads"), kw.pop("kv_heads"), **kw)
    if cfg_name == "qwen2_bias":
        assert cfg.qkv_bias and not cfg.o_bias
    if cfg_name == "llama_all_bias":
        assert cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias
    hd = cfg.head_dim
    gen = torch.Generator().manual_seed(1234 + tp)
    layouts = [sharding.head_layout(cfg, tp, r, weights) for r in range(tp)]
    entries = expected_tensors(cfg)
    roles_seen = set()
    specs_by_name = {}
    for e in entries:
        role, kind = e.role, e.kind
        roles_seen.add((role, kind))
        full = torch.randn(e.shape, generator=gen, dtype=torch.float64)
        specs = [sharding.spec(e.role, e.kind, cfg, tp, r, weights) for r in range(tp)]
        specs_by_name[e.hf_name] = specs
        pieces = [_take(full, s) for s in specs]
        where = f"{e.hf_name} tp={tp} weights={weights}"

        row_bias = EXPECTED_STYLE[role] is Parallel.ROW and kind == "bias"
        style = Parallel.REPLICATED if row_bias else EXPECTED_STYLE[role]
        assert all(s.style is style for s in specs), (where, specs)

        if style is Parallel.REPLICATED:
            for s, p in zip(specs, pieces):
                assert s.dim is None and (s.start, s.stop) == (0, full.shape[0]), (where, s)
                assert torch.equal(p, full), where
        elif style is Parallel.ROW:
            assert all(s.dim == 1 for s in specs), where
            assert all(p.shape[0] == full.shape[0] for p in pieces), where
            assert torch.equal(torch.cat(pieces, dim=1), full), where
        elif role in ("k_proj", "v_proj"):
            assert all(s.dim == 0 for s in specs), where
            # each rank's rows are exactly its kv heads (GQA replication where needed)
            for s, lay in zip(specs, layouts):
                assert (s.start, s.stop) == (lay.kv_start * hd, lay.kv_stop * hd), (where, s, lay)
            rows = {}
            for s, p in zip(specs, pieces):
                assert p.shape[0] == s.size
                for i in range(s.size):
                    rows.setdefault(s.start + i, []).append(p[i])
            assert sorted(rows) == list(range(full.shape[0])), f"{where}: kv rows not covered"
            for row, copies in rows.items():
                for c in copies:  # replicated rows are identical copies of the checkpoint row
                    assert torch.equal(c, full[row]), (where, row)
            if tp <= cfg.num_kv_heads and weights is None and cfg.num_heads % tp == 0 and cfg.num_kv_heads % tp == 0:
                # no group is cut: no replication at all
                assert torch.equal(torch.cat(pieces, dim=0), full), where
        else:  # column (q, gate, up) and vocab: disjoint, concatenated on dim 0
            assert all(s.dim == 0 for s in specs), where
            assert specs[0].start == 0 and specs[-1].stop == full.shape[0], where
            for a, b in zip(specs, specs[1:]):
                assert a.stop == b.start, (where, specs)
            assert torch.equal(torch.cat(pieces, dim=0), full), where

    # every role the config implies was exercised
    assert ("q_proj", "weight") in roles_seen and ("down_proj", "weight") in roles_seen
    if cfg.qkv_bias:
        assert ("k_proj", "bias") in roles_seen
    if cfg.o_bias:
        assert ("o_proj", "bias") in roles_seen

    # matching partitions: o_proj's input columns are the q heads of the same rank, down_proj's
    # are the gate/up rows, the LM head's rows are the embedding's
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        for r in range(tp):
            q = specs_by_name[f"{p}.self_attn.q_proj.weight"][r]
            o = specs_by_name[f"{p}.self_attn.o_proj.weight"][r]
            assert (o.start, o.stop) == (q.start, q.stop)
            assert (q.start, q.stop) == (layouts[r].q_start * hd, layouts[r].q_stop * hd)
            g = specs_by_name[f"{p}.mlp.gate_proj.weight"][r]
            u = specs_by_name[f"{p}.mlp.up_proj.weight"][r]
            d = specs_by_name[f"{p}.mlp.down_proj.weight"][r]
            assert (g.start, g.stop) == (u.start, u.stop) == (d.start, d.stop)
            if cfg.qkv_bias:
                for slot in "qkv":
                    w = specs_by_name[f"{p}.self_attn.{slot}_proj.weight"][r]
                    b = specs_by_name[f"{p}.self_attn.{slot}_proj.bias"][r]
                    assert (w.start, w.stop) == (b.start, b.stop)
    if not cfg.tie_word_embeddings:
        for r in range(tp):
            emb = specs_by_name["model.embed_tokens.weight"][r]
            head = specs_by_name["lm_head.weight"][r]
            assert (emb.start, emb.stop) == (head.start, head.stop)


def test_spec_unknown_role_raises():
    cfg = make_cfg(8, 2)
    with pytest.raises(ShardingError, match="rotary_emb"):
        sharding.spec("rotary_emb", "inv_freq", cfg, 2, 0)


def test_roles_come_from_the_names_table():
    """Every expected tensor names its role; the role is the module its HF name ends in (the
    table, not a parser, is what sharding reads)."""
    cfg = make_cfg(8, 2, qkv_bias=True)
    for e in expected_tensors(cfg):
        assert e.hf_name.split(".")[-2:] == [e.role, e.kind], e


@pytest.mark.parametrize(("total", "parts", "weights", "unit", "want"), [
    (1024, 2, None, 256, [512, 512]),
    (1536, 4, None, 256, [512, 512, 256, 256]),  # uneven, on blocks
    (1536, 3, [1, 1, 2], 256, [512, 256, 768]),
    (96, 3, None, 32, [32, 32, 32]),
])
def test_split_on_units(total, parts, weights, unit, want):
    assert sharding.split_sizes(total, parts, weights, unit) == want
    assert all(n % unit == 0 for n in want)


def test_split_on_units_refuses_what_no_unit_split_can_do():
    with pytest.raises(ShardingError, match="whole units of 256"):
        sharding.split_sizes(1000, 2, unit=256)
    cfg = make_cfg(8, 2, inter=512)
    with pytest.raises(ShardingError, match="without any"):
        sharding.intermediate_range(cfg, 4, 3, unit=256)  # 2 blocks for 4 ranks
    lo, hi = sharding.intermediate_range(cfg, 2, 1, unit=256)
    assert (lo, hi) == (256, 512)
    s = sharding.spec("down_proj", "weight", cfg, 2, 1, unit=256)
    assert (s.dim, s.start, s.stop) == (1, 256, 512)


# ---------------------------------------------------------------------------------------------
# vocab padding


@pytest.mark.parametrize("vocab", [1, 7, 101, 1001, 32000, 128256])
@pytest.mark.parametrize("tp, weights", [(1, None), (2, None), (3, None), (4, None), (7, None), (8, None), (2, [3, 1]), (3, [1, 2, 5])])
def test_vocab_shard_padded(vocab, tp, weights):
    cfg = make_cfg(8, 2, vocab=vocab)
    padded = sharding.vocab_shard_padded(cfg, tp, weights)
    sizes = [b - a for a, b in (sharding.vocab_range(cfg, tp, r, weights) for r in range(tp))]
    assert sum(sizes) == vocab
    assert padded == max(sizes) == max(sharding.split_sizes(vocab, tp, weights))
    assert padded * tp >= vocab
    if weights is None:
        assert padded == -(-vocab // tp)


def test_the_mlp_splits_on_the_configs_unit_where_every_rank_gets_one():
    """A GGUF's down_proj block (cfg.mlp_unit) cuts the MLP on blocks: 512 features of Q4_0
    (32) at tp 3 are 192/160/160, not 171/171/170; where the unit would leave a rank without
    features (2 K-quant blocks for 4 ranks) the split falls back to single features."""
    from dataclasses import replace

    cfg = replace(ModelConfig.from_dict(llama_config_dict(hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=512, vocab_size=64)), mlp_unit=32)
    assert [sharding.intermediate_range(cfg, 3, r) for r in range(3)] == [(0, 192), (192, 352), (352, 512)]
    assert sharding.spec("down_proj", "weight", cfg, 3, 1) == sharding.ShardSpec(sharding.Parallel.ROW, 1, 192, 352)
    k = replace(cfg, mlp_unit=256)
    assert sharding.mlp_unit(k, 2) == 256 and sharding.mlp_unit(k, 4) == 1
    assert [sharding.intermediate_range(k, 4, r) for r in range(4)] == [(0, 128), (128, 256), (256, 384), (384, 512)]
