"""generate(): a batch of prompts through the engine loop (a Scheduler over them), prefilled in
one step and decoded until each finishes (its EOS / stop id, max_new_tokens, or the context's end).

Under --attention dp each rank runs its own share of the prompts (prompt i on rank i % world)
and yields their events as they come; when the group is done, every rank also yields the other
ranks' events (one object broadcast per rank), so that each ends with every prompt's tokens."""

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
    comm = engine.comm
    own = range(comm.rank, len(prompts), comm.world_size) if engine.group_sync else range(len(prompts))
    for i in own:
        # each prompt its own noise (the first keeps the request's seed: alone, it samples as a
        # one-prompt call does)
        scheduler.add(Request(i, list(prompts[i]), params, params.seed if i == 0 else noise_seed(params.seed, -i)))
    reasons = [""] * len(prompts)
    mine: list[TokenEvent] = []
    engine.group_idle = False
    try:
        while scheduler.has_work() or engine.group_busy:
            events, _ = scheduler.step()
            for ev in events:
                if ev.finish_reason:
                    reasons[ev.seq] = ev.finish_reason
            if engine.group_sync:
                mine += events
            yield from events
    finally:  # a consumer that stops early (or an error) frees the slots
        for req_id in list(scheduler.running):
            scheduler.abort(req_id)
            reasons[req_id] = reasons[req_id] or "abort"
        engine.end_decode_run()
        engine.stats.finish_reasons = reasons
    if engine.group_sync:
        with comm.stats.in_phase("report"):
            for src in range(comm.world_size):
                theirs = comm.broadcast([list(map(_plain, (e.seq, e.token_id, e.index, e.finish_reason))) for e in mine] if src == comm.rank else None, src=src, site="dp.results")
                if src != comm.rank:
                    for seq, token, index, reason in theirs:
                        if reason:
                            reasons[seq] = reason
                        yield TokenEvent(seq, token, index, reason)


def _plain(v):
    return v if v is None or isinstance(v, str) else int(v)
