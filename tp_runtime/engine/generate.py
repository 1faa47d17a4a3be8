"""generate(): a batch of prompts through the engine loop, prefilled in one step and decoded
until each finishes (its EOS / stop id, max_new_tokens, or the context's end)."""

from __future__ import annotations

from typing import Iterator, Sequence

from tp_runtime.engine.engine import Engine
from tp_runtime.engine.sampling import SamplingParams, noise_seed
from tp_runtime.engine.sequence import Chunk, StepPlan, TokenEvent


def generate(engine: Engine, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[TokenEvent]:
    """Token events as they come; sequence ids are the prompts' indices. The engine's stats
    (`engine.stats`, the communicator's) describe this run afterwards."""
    engine.check_batch(prompts)  # every prompt checked before any work
    engine.reset_stats()
    seqs = []
    try:
        # each prompt its own noise (the first keeps the request's seed: alone, it samples as a
        # one-prompt call does)
        for i, p in enumerate(prompts):
            seqs.append(engine.add(i, p, params, seed=params.seed if i == 0 else noise_seed(params.seed, -i)))
        yield from engine.step(StepPlan(prefill=tuple(Chunk(s, len(s.prompt)) for s in seqs)))
        with engine.decode_context():
            while live := tuple(s for s in seqs if not s.finished):
                yield from engine.step(StepPlan(decode=live))
    finally:  # a consumer that stops early (or an error) frees the slots
        for s in seqs:
            engine.abort(s)
        engine.stats.finish_reasons = [s.finish_reason or "" for s in seqs]
