"""The scheduler: continuous admission, chunked prefill, prefix reuse, aborts, and a follower
engine that applies rank 0's step changes holding the same sequences. Each request's tokens
equal the same request run alone (greedy, and seeded sampling)."""

import pytest

from tp_runtime.config import ParallelConfig, RuntimeConfig
from tp_runtime.engine.llm import LLM
from tp_runtime.engine.sampling import SamplingParams
from tp_runtime.engine.scheduler import Request, Scheduler, apply_changes
from tp_runtime.errors import ConfigError

GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=0.8, top_p=0.9)
PROMPTS = {0: [1, 5, 9, 2], 1: list(range(3, 40)), 2: [7, 7, 1], 3: [2, 4, 6, 8, 10, 12]}


@pytest.fixture(scope="module")
def llm(small_model):
    model = LLM.load(small_model, ParallelConfig(), RuntimeConfig(show_progress=False, max_batch_size=4, max_seq_len=128))
    yield model
    model.close()


def _alone(llm, prompt, params, seed):
    s = Scheduler(llm.engine, prefix_reuse=False)
    s.add(Request(0, prompt, params, seed))
    out = []
    while s.has_work():
        events, _ = s.step()
        out += [e.token_id for e in events]
    return out


def _drive(s: Scheduler, arrivals: dict[int, list[Request]], steps: int = 200):
    """Step s, adding arrivals[k] before step k; returns (tokens per request, per-step (prefill ids, decode ids))."""
    out: dict[int, list[int]] = {}
    trace = []
    for k in range(steps):
        for r in arrivals.get(k, []):
            s.add(r)
        if not s.has_work() and k > max(arrivals):
            break
        events, changes = s.step()
        trace.append(([i for i, _ in changes.prefill], changes.decode))
        for e in events:
            out.setdefault(e.seq, []).append(e.token_id)
    return out, trace


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_late_arrivals_and_chunked_prefill_give_each_request_its_alone_tokens(llm, params):
    want = {i: _alone(llm, p, params, seed=100 + i) for i, p in PROMPTS.items()}
    s = Scheduler(llm.engine, max_num_seqs=3, max_num_batched_tokens=8, prefix_reuse=False)
    arrivals = {0: [Request(0, PROMPTS[0], params, 100)], 2: [Request(1, PROMPTS[1], params, 101), Request(2, PROMPTS[2], params, 102)],
                3: [Request(3, PROMPTS[3], params, 103)]}
    mixed = llm.engine.stats.mixed_steps
    got, trace = _drive(s, arrivals)
    assert got == want
    # the steps that prefilled a chunk while others decoded ran both in one (ragged) forward
    assert llm.engine.stats.mixed_steps - mixed == sum(1 for pre, dec in trace if pre and set(dec) - set(pre)) > 0
    # the 37-token prompt took several steps of at most 8 tokens, while request 0 kept decoding
    long_steps = [k for k, (pre, dec) in enumerate(trace) if 1 in pre]
    assert len(long_steps) >= 5 and all(0 in trace[k][1] for k in long_steps[:3])
    # max_num_seqs 3: request 3 waited for a free place
    first_of_3 = next(k for k, (pre, _) in enumerate(trace) if 3 in pre)
    assert first_of_3 > 3 and all(len(pre) + len(set(dec) - set(pre)) <= 3 for pre, dec in trace)


def test_prefix_reuse_prefills_only_the_new_tokens_and_changes_nothing(llm):
    s = Scheduler(llm.engine)
    first, _ = _drive(s, {0: [Request(0, PROMPTS[1], GREEDY, 1)]})
    history = PROMPTS[1] + first[0] + [5, 6, 7]  # a chat resending its history
    before = s.reused_tokens
    second, trace = _drive(s, {0: [Request(1, history, GREEDY, 1)]})
    reused = s.reused_tokens - before
    # every token whose K/V the slot kept: the prompt and all but the last generated token
    assert reused == len(PROMPTS[1]) + len(first[0]) - 1
    assert second[1] == _alone(llm, history, GREEDY, 1)


def test_abort_frees_the_slot_for_the_next_request(llm):
    s = Scheduler(llm.engine, max_num_seqs=1, prefix_reuse=False)
    s.add(Request(0, PROMPTS[0], GREEDY, 0))
    s.add(Request(1, PROMPTS[2], GREEDY, 0))
    s.step()
    s.step()
    assert s.num_running == 1 and s.num_waiting == 1
    assert s.abort(0) and not s.abort(0)
    got, _ = _drive(s, {0: []})
    assert got[1] == _alone(llm, PROMPTS[2], GREEDY, 0)
    assert sorted(llm.engine.free_slots) == [0, 1, 2, 3]


def test_a_follower_engine_applying_the_changes_holds_the_same_sequences(llm, small_model):
    """What a serving rank other than 0 does: no scheduler of its own, rank 0's changes applied
    to its engine, the same plan run: the same tokens, sampled on its own."""
    follower = LLM.load(small_model, ParallelConfig(), RuntimeConfig(show_progress=False, max_batch_size=4, max_seq_len=128))
    try:
        s = Scheduler(llm.engine, max_num_seqs=3, max_num_batched_tokens=8)
        for i, p in PROMPTS.items():
            s.add(Request(i, p, SAMPLED, 7 + i))
        for k in range(100):
            if not s.has_work():
                break
            if k == 4:
                s.abort(2)
            plan, changes = s.schedule()
            lead = [(e.seq, e.token_id) for e in llm.engine.step(plan)]
            s.retire()
            follow = [(e.seq, e.token_id) for e in follower.engine.step(apply_changes(follower.engine, changes))]
            assert lead == follow, k
            assert {i: q.slot for i, q in llm.engine.running.items()} == {i: q.slot for i, q in follower.engine.running.items()}
        assert not follower.engine.running
    finally:
        follower.close()


def test_bad_limits_are_refused(llm):
    with pytest.raises(ConfigError, match="max-num-batched-tokens"):
        Scheduler(llm.engine, max_num_batched_tokens=0)
    with pytest.raises(ConfigError, match="max-num-seqs"):
        Scheduler(llm.engine, max_num_seqs=0)


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_moe"])
def test_mixed_steps_of_latent_attention_and_experts_give_the_alone_tokens(name, tmp_path):
    """A ragged step (prompt chunks and decodes in one forward) through MLA's attention and a MoE
    layer's routing (every token routed, none of them padding): each request's greedy tokens equal
    the request run alone at float32."""
    import hf_models

    path, _ = hf_models.build(name, tmp_path)
    model = LLM.load(path, ParallelConfig(), RuntimeConfig(show_progress=False, max_batch_size=4, max_seq_len=128, dtype="float32"))
    try:
        prompts = {0: [1, 5, 9, 2], 1: list(range(3, 30)), 2: [7, 7, 1, 4, 4]}
        want = {i: _alone(model, p, GREEDY, 0) for i, p in prompts.items()}
        s = Scheduler(model.engine, max_num_batched_tokens=6, prefix_reuse=False)
        got, _ = _drive(s, {0: [Request(0, prompts[0], GREEDY, 0)], 2: [Request(1, prompts[1], GREEDY, 0)], 4: [Request(2, prompts[2], GREEDY, 0)]})
        assert got == want and model.engine.stats.mixed_steps >= 5
    finally:
        model.close()
