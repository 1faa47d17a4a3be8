"""Timings of one generate() call."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunStats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps (the first token comes from prefill)
    decode_seconds: float = 0.0
    decode_steps: int = 0  # decode-only steps
    mixed_steps: int = 0  # steps that ran prompt chunks and decodes in one forward
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0
