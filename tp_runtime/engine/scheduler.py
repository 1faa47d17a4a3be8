"""Which sequences run in each engine step: continuous batching, chunked prefill, prefix reuse.

Requests wait in arrival order. Each step the scheduler decodes every running sequence whose
prompt is done (one token each), and spends what is left of the step's token budget
(`max_num_batched_tokens`, vLLM's name: decode tokens count one each) on prompt chunks: first
the prompts already being prefilled, then new requests, admitted while a KV cache slot is free
and fewer than `max_num_seqs` run. A long prompt is thus prefilled over several steps while the
others keep decoding, and a request that arrives late joins at the next step.

Prefix reuse (llama-server's prompt cache): a slot keeps the keys and values of the sequence
that last held it. A new request whose prompt starts with those tokens (a chat resending its
history, a shared system prompt) takes that slot and prefills only the rest: positions and
tokens are the same, so the cached rows are what it would have computed.

Every rank must run the same steps. `generate()` runs a scheduler on every rank (the same
prompts give the same decisions); a server runs one on rank 0, which sends each step's
`StepChanges` (admissions with their prompts, aborts, the plan's ids) to the others
(serve/plan_wire.py), whose engines then hold the same sequences.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence as Seq

from tp_runtime.engine.engine import Engine
from tp_runtime.engine.sampling import SamplingParams
from tp_runtime.engine.sequence import Chunk, Sequence, StepPlan, TokenEvent
from tp_runtime.errors import ConfigError


@dataclass
class Request:
    req_id: int
    prompt: list[int]
    params: SamplingParams
    seed: int


@dataclass
class Admission:
    """A request entering the engine: what another rank needs to hold the same sequence."""

    req_id: int
    slot: int
    reused: int  # leading prompt tokens whose keys and values the slot already holds
    prompt: list[int]
    params: SamplingParams
    seed: int


@dataclass
class StepChanges:
    """One step as a diff of the engine's state: what was admitted and aborted since the last
    step, and the step's plan by sequence ids (prefill chunks as (id, stop))."""

    admitted: list[Admission] = field(default_factory=list)
    aborted: list[int] = field(default_factory=list)
    prefill: list[tuple[int, int]] = field(default_factory=list)
    decode: list[int] = field(default_factory=list)


def apply_changes(engine: Engine, changes: StepChanges) -> StepPlan:
    """Bring an engine to the state `changes` describes (a rank following rank 0's scheduler);
    returns the step's plan."""
    for req_id in changes.aborted:
        seq = engine.running.get(req_id)
        if seq is not None:
            engine.abort(seq)
    for a in changes.admitted:
        seq = engine.add(a.req_id, a.prompt, a.params, slot=a.slot, seed=a.seed)
        seq.cached = a.reused
    run = engine.running
    return StepPlan(prefill=tuple(Chunk(run[i], stop) for i, stop in changes.prefill), decode=tuple(run[i] for i in changes.decode))


def _common_prefix(a: Seq[int], b: Seq[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    def __init__(self, engine: Engine, max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None, prefix_reuse: bool = True) -> None:
        if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
            raise ConfigError(f"--max-num-batched-tokens must be at least 1, got {max_num_batched_tokens}")
        if max_num_seqs is not None and not 1 <= max_num_seqs:
            raise ConfigError(f"--max-num-seqs must be at least 1, got {max_num_seqs}")
        self.engine = engine
        self.max_num_seqs = min(max_num_seqs or engine.max_batch, engine.max_batch)
        self.token_budget = max_num_batched_tokens or engine.max_batch * engine.max_seq_len
        self.prefix_reuse = prefix_reuse
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Sequence] = {}
        self.slot_tokens: dict[int, list[int]] = {}  # free slot -> tokens whose K/V it still holds
        self._freed: list[int] = []  # free slots, least recently freed first
        self._changes = StepChanges()
        self.reused_tokens = 0  # prompt tokens served from a slot's cache (all requests so far)

    # ---- requests ----------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.engine.check_prompt(request.prompt, request.req_id)
        self.waiting.append(request)

    def abort(self, req_id: int) -> bool:
        """Drop a request, waiting or running; False when it is neither (finished already)."""
        for r in self.waiting:
            if r.req_id == req_id:
                self.waiting.remove(r)
                return True
        seq = self.running.pop(req_id, None)
        if seq is None:
            return False
        self.engine.abort(seq)
        self._keep_cache(seq)
        self._changes.aborted.append(req_id)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- a step ------------------------------------------------------------------------------

    def schedule(self) -> tuple[StepPlan, StepChanges]:
        """The next step's plan (admitting what fits) and the changes since the last one."""
        decode = [s for s in self.running.values() if s.prefilled and not s.finished]
        budget = self.token_budget - len(decode)
        chunks: list[Chunk] = []
        for s in self.running.values():  # prompts already being prefilled go first
            if not s.prefilled and budget > 0:
                stop = min(len(s.prompt), s.cached + budget)
                chunks.append(Chunk(s, stop))
                budget -= stop - s.cached
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and self.engine.free_slots:
            r = self.waiting.popleft()
            slot, reused = self._slot_for(r.prompt)
            seq = self.engine.add(r.req_id, r.prompt, r.params, slot=slot, seed=r.seed)
            seq.cached = reused
            self.reused_tokens += reused
            self.running[r.req_id] = seq
            self._changes.admitted.append(Admission(r.req_id, slot, reused, r.prompt, r.params, r.seed))
            stop = min(len(r.prompt), reused + budget)
            chunks.append(Chunk(seq, stop))
            budget -= stop - reused
        plan = StepPlan(prefill=tuple(chunks), decode=tuple(decode))
        changes, self._changes = self._changes, StepChanges()
        changes.prefill = [(c.seq.seq_id, c.stop) for c in chunks]
        changes.decode = [s.seq_id for s in decode]
        return plan, changes

    def step(self) -> tuple[list[TokenEvent], StepChanges]:
        """Schedule and run one step; its token events and the changes it was made of."""
        plan, changes = self.schedule()
        events = self.engine.step(plan) if plan else []
        self.retire()
        return events, changes

    def retire(self) -> None:
        """Forget the sequences that finished in the last step (the engine freed their slots)."""
        for seq in [s for s in self.running.values() if s.finished]:
            del self.running[seq.seq_id]
            self._keep_cache(seq)

    # ---- slots -------------------------------------------------------------------------------

    def _keep_cache(self, seq: Sequence) -> None:
        if self.prefix_reuse:
            self.slot_tokens[seq.slot] = (seq.prompt + seq.output)[: seq.cached]
        if seq.slot in self._freed:
            self._freed.remove(seq.slot)
        self._freed.append(seq.slot)

    def _load_first(self, slot: int):
        """A sort key for free slots: under --attention dp the slot of the rank running the fewest
        sequences first (a rank runs the slots slot % world == rank); then by slot, or by when it
        was freed (the order of self._freed)."""
        order = self._freed.index(slot) if slot in self.slot_tokens else slot
        if not self.engine.group_sync:
            return (0, order)
        world = self.engine.comm.world_size
        return (sum(1 for q in self.running.values() if q.slot % world == slot % world), order)

    def _slot_for(self, prompt: list[int]) -> tuple[int, int]:
        """A free slot and how many of the prompt's leading tokens it already holds: the slot
        with the longest common prefix; else one holding nothing, else the least recently freed
        (under --attention dp: of the least busy rank)."""
        free = self.engine.free_slots
        best, best_len = None, 0
        if self.prefix_reuse:
            for slot in free:
                n = _common_prefix(prompt, self.slot_tokens.get(slot, ()))
                if n > best_len:
                    best, best_len = slot, n
        if best is None:
            empty = [s for s in free if s not in self.slot_tokens]
            best = min(empty, key=self._load_first) if empty else min((s for s in self._freed if s in free), key=self._load_first)
        self.slot_tokens.pop(best, None)  # its rows from `reused` on are overwritten
        return best, min(best_len, len(prompt) - 1)  # at least one token to prefill: its logits
