"""Engine behaviour in one process: stopping rules, batches, continuation."""

import json
import shutil

import pytest
import torch

from tp_runtime.config import ParallelConfig, RuntimeConfig
from tp_runtime.engine.llm import LLM
from tp_runtime.engine.sampling import SamplingParams


def _load(path, **kw):
    return LLM.load(path, ParallelConfig(), RuntimeConfig(show_progress=False, **kw))


@pytest.fixture
def eos_model(small_model, tmp_path):
    """The small model with its EOS set to the token greedy decoding produces third for [1, 5, 9]."""
    llm = _load(small_model)
    tokens = [e.token_id for e in llm.generate([[1, 5, 9]], SamplingParams(max_new_tokens=3, ignore_eos=True))]
    dst = tmp_path / "eos"
    shutil.copytree(small_model, dst)
    gen = json.loads((dst / "generation_config.json").read_text())
    gen["eos_token_id"] = [tokens[2]]
    (dst / "generation_config.json").write_text(json.dumps(gen))
    return dst, tokens


def test_stops_at_eos_from_generation_config(eos_model):
    path, tokens = eos_model
    llm = _load(path)
    assert tokens[2] in llm.cfg.eos_token_ids
    events = list(llm.generate([[1, 5, 9]], SamplingParams(max_new_tokens=20)))
    assert [e.token_id for e in events] == tokens[:3]
    assert events[-1].finish_reason == "stop" and all(e.finish_reason is None for e in events[:-1])
    assert len(list(llm.generate([[1, 5, 9]], SamplingParams(max_new_tokens=20, ignore_eos=True)))) == 20


def test_batch_member_stopping_early_does_not_disturb_the_others(eos_model):
    path, _ = eos_model
    llm = _load(path)
    other = [1, 7, 3, 8, 2]
    alone = [e.token_id for e in llm.generate([other], SamplingParams(max_new_tokens=12))]
    events = list(llm.generate([[1, 5, 9], other], SamplingParams(max_new_tokens=12)))
    first = [e for e in events if e.seq == 0]
    second = [e.token_id for e in events if e.seq == 1]
    assert first[-1].finish_reason == "stop" and len(first) == 3
    assert second == alone
    assert llm.engine.last_stats.finish_reasons[0] == "stop"


def test_max_new_tokens_and_stats(small_model):
    llm = _load(small_model)
    events = list(llm.generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=7, ignore_eos=True)))
    assert [e.index for e in events] == list(range(7)) and events[-1].finish_reason == "length"
    st = llm.engine.last_stats
    assert st.prompt_tokens == 4 and st.decode_tokens == 6 and st.decode_steps == 6
    assert st.prefill_tokens_per_s > 0 and st.decode_tokens_per_s > 0


def test_prompt_logits_match_generation(small_model):
    llm = _load(small_model)
    prompt = [1, 9, 4, 22, 17]
    logits = llm.prompt_logits([prompt])[0]
    first = next(iter(llm.generate([prompt], SamplingParams(max_new_tokens=1))))
    assert logits.shape == (5, llm.cfg.vocab_size)
    assert int(logits[-1].argmax()) == first.token_id
