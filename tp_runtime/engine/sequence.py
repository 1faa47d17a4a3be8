"""What the engine steps over: one record per request, and the plan of one step.

A `Sequence` lives from admission to finish in one KV cache slot; its `cached` count says how
many of its tokens have keys and values there. A `StepPlan` names the work of one engine step:
prompt chunks to prefill and sequences to decode one token each. Every rank holds the same
records and runs the same plans, so every rank issues the same collectives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tp_runtime.engine.sampling import SamplingParams


@dataclass(frozen=True)
class TokenEvent:
    seq: int  # the sequence's id (generate(): the index of its prompt)
    token_id: int
    index: int  # 0 for the first generated token
    finish_reason: str | None  # None, "stop" (EOS / stop id) or "length"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    slot: int  # its KV cache row
    max_new: int  # tokens it may generate: max_new_tokens within the context left after the prompt
    stops: frozenset[int]  # token ids that finish it
    seed: int  # of its sampling noise (with the token index)
    output: list[int] = field(default_factory=list)
    cached: int = 0  # leading tokens (prompt, then output) whose keys and values are in the slot
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def prefilled(self) -> bool:
        return self.cached >= len(self.prompt)

    def append(self, token: int) -> TokenEvent:
        self.output.append(token)
        if token in self.stops:
            self.finish_reason = "stop"
        elif len(self.output) >= self.max_new:
            self.finish_reason = "length"
        return TokenEvent(self.seq_id, token, len(self.output) - 1, self.finish_reason)


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens [seq.cached, stop) of a sequence to prefill; the chunk that reaches the end
    of the prompt also picks the sequence's first token."""

    seq: Sequence
    stop: int


@dataclass(frozen=True)
class StepPlan:
    prefill: tuple[Chunk, ...] = ()
    decode: tuple[Sequence, ...] = ()  # each decodes its last token at position num_tokens - 1

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)
