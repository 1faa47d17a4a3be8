"""generate(): a batch of prompts through the engine loop (a Scheduler over them), prefilled in
one step and decoded until each finishes (its EOS / stop id, max_new_tokens, or the context's end).

Under --attention dp each rank runs the prompts whose slots it owns (Engine.step), and every
rank yields every prompt's events as they come (each step's tokens are shared)."""

from __future__ import annotations

from typing import Iterator, Sequence

from tp_runtime.engine.engine import Engine
from tp_runtime.engine.sampling import SamplingParams, noise_seed
from tp_runtime.engine.scheduler import Request, Scheduler
from tp_runtime.engine.sequence import TokenEvent


def generate(engine: Engine, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[TokenEvent]:
    """Token events as they come; sequence ids are the prompts' indices. The engine's stats
    (`engine.stats`, the communicator's) describe this run afterwards."""
    engine.check_batch(prompts)  # every prompt checked before any work
    engine.reset_stats()
    # every prompt admitted at once and prefilled in one step: the whole batch's budget
    scheduler = Scheduler(engine, max_num_seqs=len(prompts), prefix_reuse=False)
    for i, prompt in enumerate(prompts):
        # each prompt its own noise (the first keeps the request's seed: alone, it samples as a
        # one-prompt call does)
        scheduler.add(Request(i, list(prompt), params, params.seed if i == 0 else noise_seed(params.seed, -i)))
    reasons = [""] * len(prompts)
    try:
        while scheduler.has_work():
            events, _ = scheduler.step()
            for ev in events:
                if ev.finish_reason:
                    reasons[ev.seq] = ev.finish_reason
            yield from events
    finally:  # a consumer that stops early (or an error) frees the slots
        for req_id in list(scheduler.running):
            scheduler.abort(req_id)
            reasons[req_id] = reasons[req_id] or "abort"
        engine.end_decode_run()
        engine.stats.finish_reasons = reasons


