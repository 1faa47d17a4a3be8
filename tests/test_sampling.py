"""Sampling: the rules themselves, and the same seed giving the same text at tp=1 and tp=2."""

import pytest
import torch

from conftest import last_json, run_cli
from tp_runtime.engine.sampling import Sampler, SamplingParams
from tp_runtime.errors import GenerationError


def _sample(params, logits, n):
    """n draws for every row of logits, as tokens 0..n-1 of one request each."""
    s = Sampler()
    return torch.tensor([s(logits, [(params, params.seed, i)] * logits.shape[0]) for i in range(n)])


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert Sampler()(logits, [(SamplingParams(), 0, 0)] * 4) == logits.argmax(-1).tolist()


def test_noise_is_keyed_by_seed_and_token_index_not_by_row():
    """A request's draw depends on its seed and token index alone: the same in any row, beside
    any neighbours with any parameters; another index or seed draws anew."""
    logits = torch.randn(1, 1000)
    hot = SamplingParams(temperature=1.0, seed=3)
    s = Sampler()
    alone = [s(logits, [(hot, hot.seed, i)])[0] for i in range(20)]
    for i in range(20):
        mixed = s(logits.expand(3, -1), [(SamplingParams(temperature=2.0, top_k=5), 9, i + 4), (SamplingParams(), 0, 0), (hot, hot.seed, i)])
        assert mixed[2] == alone[i] and mixed[1] == int(logits.argmax())
    assert len(set(alone)) > 10  # 20 draws from a flat-ish distribution over 1000 tokens
    assert [s(logits, [(hot, 4, i)])[0] for i in range(20)] != alone


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(3, 40)
    for params in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)):
        assert (_sample(params, logits, 20) == logits.argmax(-1)).all()


def test_temperature_sampling_matches_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    n = 20000
    draws = _sample(SamplingParams(temperature=0.7, seed=5), logits, n)[:, 0]
    freq = torch.bincount(draws, minlength=4).float() / n
    want = (logits[0] / 0.7).softmax(-1)
    # binomial standard error at n=20000 is <= 0.0036: 5 sigma
    assert (freq - want).abs().max() < 0.018, (freq, want)


def test_top_k_and_top_p_never_pick_outside_their_set():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0, -2.0]])
    k = _sample(SamplingParams(temperature=5.0, top_k=3, seed=1), logits, 2000)
    assert set(k.flatten().tolist()) == {0, 1, 2}
    # probabilities at T=1: the first three hold ~0.93 of the mass; top_p=0.5 keeps the first two
    p = _sample(SamplingParams(temperature=1.0, top_p=0.5, seed=1), logits, 2000)
    assert set(p.flatten().tolist()) == {0, 1}


def test_seed_fixes_the_draws():
    logits = torch.randn(2, 100)
    a = _sample(SamplingParams(temperature=1.0, seed=11), logits, 30)
    b = _sample(SamplingParams(temperature=1.0, seed=11), logits, 30)
    c = _sample(SamplingParams(temperature=1.0, seed=12), logits, 30)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2), dict(max_new_tokens=0)])
def test_bad_params_rejected(bad):
    with pytest.raises(GenerationError):
        SamplingParams(**bad)


def test_same_seed_same_text_at_tp1_and_tp2(small_model):
    common = ["generate", "--model", str(small_model), "--prompt", "The quick brown fox", "--max-new-tokens", "24", "--ignore-eos",
              "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--json", "--quiet"]
    one = last_json(run_cli([*common, "--seed", "7"]).stdout)
    two = last_json(run_cli([*common, "--seed", "7", "--tp", "2"]).stdout)
    other = last_json(run_cli([*common, "--seed", "8"]).stdout)
    assert one["output_ids"] == two["output_ids"] and one["text"] == two["text"]
    assert len(one["output_ids"]) == 24
    assert other["output_ids"] != one["output_ids"], "a different seed should change a 24-token sample"


def test_greedy_takes_the_first_maximum_and_counts_nan_as_the_maximum():
    """The CPU float32 path (numpy's argmax) keeps torch's rule for ties and NaN."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, float("nan"), 5.0, float("nan")], [-1.0, -1.0, -1.0, -1.0]])
    assert Sampler()(logits, [(SamplingParams(), 0, 0)] * 3) == [1, 1, 0] == logits.argmax(-1).tolist()
    wide = torch.randn(2, 49152)
    assert Sampler()(wide, [(SamplingParams(), 0, 0)] * 2) == wide.argmax(-1).tolist()
