"""Token selection: greedy, temperature, top-k, top-p, seeded.

Every rank holds the same float32 logits after the LM head's all-gather and draws the same
noise, so every rank picks the same token with no extra collective. Sampling uses the
exponential race (argmax of p / E with E ~ Exp(1)), which is exactly sampling from p, and
whose noise does not depend on the logits: tp=1 and tp=2, whose logits differ only by
rounding, pick the same tokens for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


def noise_seed(seed: int, index: int) -> int:
    """The generator seed for token `index` of a request seeded `seed`: splitmix64 of the pair, so
    that neighbouring seeds and indices give unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * mul) & _MASK64
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


_MASK64 = (1 << 64) - 1


class Sampler:
    """Picks one token per row of a batch's logits, each row by its own request's parameters.

    A row's noise comes from a generator seeded by (request seed, token index) alone, so a
    request's tokens do not depend on which requests share its batch or in which row it sits,
    and every rank, holding the same logits, picks the same token without a broadcast."""

    def __init__(self) -> None:
        # noise is drawn on the CPU: a device generator's stream may depend on the device model
        # (launch geometry), and ranks on different GPUs, or GPU and CPU ranks, must agree
        self.generator = torch.Generator(device="cpu")
        self._greedy: torch.Tensor | None = None  # the greedy tokens, one buffer reused every step

    def __call__(self, logits: torch.Tensor, rows: Sequence[tuple[SamplingParams, int, int]]) -> list[int]:
        """logits: [n, vocab] float32; rows: each row's (params, noise seed, index of the token it
        picks)."""
        n = logits.shape[0]
        if len(rows) != n:
            raise ValueError(f"sampler: {len(rows)} rows of parameters for {n} rows of logits")
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy's argmax: ~3 us for a 49k vocabulary on one thread, where torch's takes ~45
            # (decode runs torch on one thread); the same rule: the first maximum, NaN counting
            # as the maximum
            tokens = logits.detach().numpy().argmax(-1).tolist()
        else:
            out = self._greedy
            if out is None or out.shape[0] < n or out.device != logits.device:
                out = self._greedy = torch.empty(max(n, 8), dtype=torch.long, device=logits.device)
            torch.argmax(logits, dim=-1, out=out[:n])
            tokens = out[:n].tolist()
        for i, (params, seed, index) in enumerate(rows):
            if params.temperature > 0:
                self.generator.manual_seed(noise_seed(seed, index))
                tokens[i] = self._sample(logits[i], params)
        return tokens

    def _sample(self, logits: torch.Tensor, p: SamplingParams) -> int:
        x = logits / p.temperature
        if 0 < p.top_k < x.shape[-1]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            sorted_p = sorted_x.softmax(dim=-1)
            drop = (sorted_p.cumsum(dim=-1) - sorted_p) > p.top_p  # keep the smallest prefix reaching top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.empty_like(x).scatter_(-1, order, sorted_x)
        probs = x.softmax(dim=-1).cpu()
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        return int((probs / noise).argmax())
