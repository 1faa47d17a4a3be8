"""Sampling: the rules themselves, and the same seed giving the same text at tp=1 and tp=2."""

import pytest
import torch

from conftest import last_json, run_cli
from tp_runtime.engine.sampling import Sampler, SamplingParams
from tp_runtime.errors import GenerationError


def _sample(params, logits, n):
    s = Sampler(params, torch.device("cpu"))
    return torch.stack([s(logits) for _ in range(n)])


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(Sampler(SamplingParams(), torch.device("cpu"))(logits), logits.argmax(-1))


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
