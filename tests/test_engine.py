"""Engine behaviour in one process: stopping rules, batches, continuation."""

import json
import shutil

import pytest
import torch

from tp_runtime.config import ParallelConfig, RuntimeConfig
from tp_runtime.engine.llm import LLM
from tp_runtime.engine.sampling import SamplingParams
from tp_runtime.engine.sequence import Chunk, StepPlan
from tp_runtime.errors import GenerationError
from tp_runtime.kernels import cpu_gemv


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


@pytest.mark.parametrize("decode_step", ["eager", "fused"])
def test_a_sequence_keeps_its_slot_and_its_tokens_while_neighbours_come_and_go(small_model, decode_step):
    """Engine steps as a server's scheduler would plan them: A (sampled, seeded) is prefilled in
    two chunks beside a filler in slot 0, decodes alone in slot 1 once the filler is done, then
    beside B, admitted mid-way into the freed slot 0 and prefilled in the same step as A's decode.
    A's tokens are those of A run alone; B's are those of B alone."""
    if decode_step == "fused" and not cpu_gemv.available():
        pytest.skip("no C compiler: the fused step needs the CPU kernel")
    llm = _load(small_model, dtype="float32", max_batch_size=3, decode_step=decode_step)
    eng = llm.engine
    hot = SamplingParams(max_new_tokens=10, temperature=0.8, seed=5, ignore_eos=True)
    b_params = SamplingParams(max_new_tokens=3, temperature=1.1, top_k=20, seed=9, ignore_eos=True)
    a_prompt, b_prompt = [1, 7, 3, 8, 2], [9, 9, 4, 1]
    a_alone = [e.token_id for e in llm.generate([a_prompt], hot)]
    b_alone = [e.token_id for e in llm.generate([b_prompt], b_params)]

    filler = eng.add(100, [4, 4, 4], SamplingParams(max_new_tokens=2, ignore_eos=True))
    a = eng.add(0, a_prompt, hot)
    assert (filler.slot, a.slot) == (0, 1)
    assert [e.seq for e in eng.step(StepPlan(prefill=(Chunk(filler, 3), Chunk(a, 3))))] == [100]  # A's prompt is not done
    assert {e.seq for e in eng.step(StepPlan(prefill=(Chunk(a, 5),), decode=(filler,)))} == {0, 100}
    assert filler.finish_reason == "length" and eng.free_slots == [2, 0]
    for _ in range(3):
        eng.step(StepPlan(decode=(a,)))
    b = eng.add(1, b_prompt, b_params)
    assert b.slot == 0
    eng.step(StepPlan(prefill=(Chunk(b, len(b_prompt)),), decode=(a,)))
    while not a.finished:
        eng.step(StepPlan(decode=tuple(s for s in (a, b) if not s.finished)))
    assert a.output == a_alone and b.output == b_alone
    assert sorted(eng.free_slots) == [0, 1, 2] and not eng.running
    llm.close()


def test_step_plans_that_do_not_fit_the_records_are_refused(small_model):
    llm = _load(small_model, max_batch_size=1)
    eng = llm.engine
    s = eng.add(0, [1, 2, 3], SamplingParams())
    with pytest.raises(GenerationError, match="not ready to decode"):
        eng.step(StepPlan(decode=(s,)))  # its prompt is not prefilled
    with pytest.raises(GenerationError, match="cannot prefill"):
        eng.step(StepPlan(prefill=(Chunk(s, 4),)))  # past its prompt
    with pytest.raises(GenerationError, match="no free KV cache slot"):
        eng.add(1, [1], SamplingParams())
    with pytest.raises(GenerationError, match="exceed the batch size"):
        list(llm.generate([[1]], SamplingParams()))
    eng.abort(s)
    assert s.finish_reason == "abort" and eng.free_slots == [0]
    assert len(list(llm.generate([[1]], SamplingParams(max_new_tokens=2, ignore_eos=True)))) == 2
    llm.close()


def test_a_consumer_that_stops_early_frees_the_slots(small_model):
    llm = _load(small_model, max_batch_size=2)
    events = llm.generate([[1, 2], [3, 4]], SamplingParams(max_new_tokens=20, ignore_eos=True))
    next(events)
    events.close()
    assert sorted(llm.engine.free_slots) == [0, 1] and not llm.engine.running
    assert llm.engine.last_stats.finish_reasons == ["abort", "abort"]


def test_release_of_a_stale_record_keeps_a_newer_sequence_under_the_same_id(small_model):
    llm = _load(small_model, max_batch_size=2)
    eng = llm.engine
    old = eng.add(0, [1, 2], SamplingParams(max_new_tokens=1, ignore_eos=True))
    eng.step(StepPlan(prefill=(Chunk(old, 2),)))
    assert old.finished and eng.free_slots == [1, 0]
    new = eng.add(0, [3, 4], SamplingParams(max_new_tokens=2, ignore_eos=True))
    eng.abort(old)  # a stale handle: nothing of the new sequence's goes
    assert eng.running == {0: new} and sorted(eng.free_slots) == [1]
    eng.step(StepPlan(prefill=(Chunk(new, 2),)))
    with pytest.raises(GenerationError, match="appears twice"):
        eng.step(StepPlan(decode=(new, new)))
    llm.close()


def test_a_failed_admission_frees_the_slots_already_taken(small_model):
    llm = _load(small_model, max_batch_size=3)
    eng = llm.engine
    blocker = eng.add(1, [5], SamplingParams())
    with pytest.raises(GenerationError, match="already running"):
        list(llm.generate([[1, 2], [3]], SamplingParams()))  # prompt 1 collides with id 1
    assert eng.running == {1: blocker} and len(eng.free_slots) == 2
    llm.close()


def test_identical_prompts_in_one_call_sample_independently(small_model):
    llm = _load(small_model, max_batch_size=2)
    params = SamplingParams(max_new_tokens=12, temperature=1.5, seed=3, ignore_eos=True)
    events = list(llm.generate([[1, 2, 3], [1, 2, 3]], params))
    a, b = ([e.token_id for e in events if e.seq == i] for i in (0, 1))
    assert a != b
    assert a == [e.token_id for e in llm.generate([[1, 2, 3]], params)]  # the first is the prompt alone
    llm.close()
