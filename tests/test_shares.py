"""Uneven machines (--shares): each rank's share of the heads, MLP features, vocabulary and
experts follows its weight; tokens stay those of tp=1; auto measures the ranks; bad weights
are refused naming the flag."""

import pytest

from conftest import last_json, run_cli
from tp_runtime import sharding
from tp_runtime.config import ModelConfig, RuntimeConfig
from tp_runtime.engine import shares
from tp_runtime.errors import ConfigError, ShardingError
from tp_runtime.checkpoint.synthetic import llama_config_dict

PROMPT = ["--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "12", "--quiet", "--json", "--dtype", "float32"]


def _cfg(weights=None) -> ModelConfig:
    cfg = ModelConfig.from_dict(llama_config_dict(hidden_size=128, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=256, vocab_size=300))
    return RuntimeConfig(shares=weights).split_config(cfg)


def test_every_split_follows_the_weights():
    cfg = _cfg((3.0, 1.0))
    heads = [sharding.head_layout(cfg, 2, r) for r in range(2)]
    assert [h.num_q_local for h in heads] == [6, 2]
    # rank 0's 6 q heads read both kv heads (the second group cut), rank 1's 2 read kv head 1
    assert [(h.kv_start, h.kv_stop) for h in heads] == [(0, 2), (1, 2)]
    assert [sharding.intermediate_range(cfg, 2, r) for r in range(2)] == [(0, 192), (192, 256)]
    assert sharding.vocab_ranges(cfg, 2) == [(0, 225), (225, 300)] and sharding.vocab_shard_padded(cfg, 2) == 225
    # a split over another count (the dense parts' world of 1 under --attention dp) is whole
    assert sharding.head_layout(cfg, 1, 0).num_q_local == 8


def test_bad_weights_are_refused_naming_the_flag():
    with pytest.raises(ConfigError, match="--shares"):
        RuntimeConfig(shares=(1.0, 0.0))
    with pytest.raises(ConfigError, match="--shares"):
        shares.parse("3,x")
    with pytest.raises(ShardingError, match="--shares gives 3 weights"):
        sharding.check_job(_cfg((1.0, 1.0, 1.0)), 2)
    with pytest.raises(ShardingError, match="without attention heads"):
        sharding.head_layout(_cfg((100.0, 1.0)), 2, 1)


def test_uneven_shares_and_auto_give_the_tp1_tokens(small_model):
    want = last_json(run_cli(["generate", "--model", str(small_model), "--tp", "1", *PROMPT]).stdout)["output_ids"]
    for flag, check in (("1,3", lambda s: s == [1.0, 3.0]), ("auto", lambda s: len(s) == 2 and abs(sum(s) - 1) < 0.01 and min(s) > 0)):
        r = run_cli(["generate", "--model", str(small_model), "--tp", "2", "--shares", flag, *PROMPT])
        assert r.returncode == 0, r.stderr[-2000:]
        got = last_json(r.stdout)
        assert got["output_ids"] == want and check(got["shares"]), (flag, got["shares"])
    r = run_cli(["generate", "--model", str(small_model), "--tp", "2", "--shares", "1,1,1", *PROMPT])
    assert r.returncode != 0 and "--shares gives 3 weights" in r.stderr


def test_measured_rates_become_shares_capped_by_memory():
    """--shares auto over tp-workers: shares follow the rates; a rank whose memory holds less than
    its rate's share gets what it holds and the rest goes to the others by their rates; caps that
    cannot hold the model together are ignored (every rank streams then, placement.py)."""
    from tp_runtime import placement

    assert shares.from_rates([3e9, 1e9]) == (0.75, 0.25)
    assert shares.from_rates([3.0, 1.0, 1.0], caps=[0.5, 0.3, 0.9]) == (0.5, 0.25, 0.25)
    assert shares.from_rates([3.0, 1.0], caps=[0.3, 0.3]) == (0.75, 0.25)  # 0.6 < 1: rates alone
    cfg = _cfg()
    whole = placement.shard_bytes(cfg, 1, 0, "float32", 64, 1)
    half = whole.activations + (whole.weights + whole.kv_cache) // 2
    caps = shares.memory_caps(whole, [half, 10 * half])
    assert caps[0] == pytest.approx(0.5, abs=1e-3) and caps[1] > 1
    assert shares.from_rates([3.0, 1.0], caps) == (0.5, 0.5)
    assert shares.memory_caps(whole, [half, None]) is None
    with pytest.raises(ConfigError, match="--shares auto"):
        shares.from_rates([1.0, 0.0])
