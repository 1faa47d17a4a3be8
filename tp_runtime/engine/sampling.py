"""Token selection: greedy, temperature, top-k, top-p, seeded.

Every rank holds the same float32 logits after the LM head's all-gather and the same seeded
generator, so every rank picks the same token with no extra collective. Sampling uses the
exponential race (argmax of p / E with E ~ Exp(1)), which is exactly sampling from p, and
whose noise does not depend on the logits: tp=1 and tp=2, whose logits differ only by
rounding, pick the same tokens for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tp_runtime.errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed)
        self._greedy: torch.Tensor | None = None  # the greedy tokens, one buffer reused every step

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [batch, vocab] float32 -> token ids [batch]; greedy tokens come in the same
        buffer every call (valid until the next call)."""
        p = self.params
        if p.temperature == 0:
            out = self._greedy
            if out is None or out.shape[0] != logits.shape[0] or out.device != logits.device:
                out = self._greedy = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
            return torch.argmax(logits, dim=-1, out=out)
        return self._sample(logits)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        x = logits / p.temperature
        if 0 < p.top_k < x.shape[-1]:
            kth = torch.topk(x, p.top_k, dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            sorted_p = sorted_x.softmax(dim=-1)
            drop = (sorted_p.cumsum(dim=-1) - sorted_p) > p.top_p  # keep the smallest prefix reaching top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.empty_like(x).scatter_(-1, order, sorted_x)
        probs = x.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        return (probs / noise).argmax(dim=-1)
