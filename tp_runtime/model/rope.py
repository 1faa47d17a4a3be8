"""Rotary position embedding tables: default, linear, llama3 and yarn frequency scaling.

The table is computed once for max_seq_len positions in float32 (as transformers does) and
indexed by position at every step, so each rank and each step see bit-identical angles.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tp_runtime.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = _scaled(rope, head_dim)
    if rope.freq_factors:
        return inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32)
    return inv_freq


def _scaled(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_ctx = rope.original_max_position_embeddings
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed down by `factor`, short ones kept, the band between blended
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, blended, scaled)
    if rope.rope_type == "yarn":
        return _yarn(rope, head_dim)
    return inv_freq


def _yarn(rope: RopeConfig, dim: int) -> torch.Tensor:
    """YaRN (transformers' _compute_yarn_parameters): frequencies that turn fewer than beta_slow
    times over the original context are slowed down by `factor`, those turning more than
    beta_fast times kept, the band between blended linearly by feature index."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)

    def feature(rotations: float) -> float:  # the feature index whose frequency turns `rotations` times
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = feature(rope.beta_fast), feature(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # (transformers' guard against a zero-width band)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolated (kept), 0: interpolated (slowed down)
    return 1.0 / (rope.factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep


class RotaryTable(nn.Module):
    def __init__(self, rope: RopeConfig, head_dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.rope, self.head_dim, self.max_seq_len = rope, head_dim, max_seq_len
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)

    def init_buffers(self) -> None:
        inv_freq = inv_frequencies(self.rope, self.head_dim).to(self.cos.device)
        pos = torch.arange(self.max_seq_len, dtype=torch.float32, device=self.cos.device)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos.copy_(emb.cos() * self.rope.attention_factor)  # (1 but for yarn)
        self.sin.copy_(emb.sin() * self.rope.attention_factor)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [batch, seq] -> cos, sin: [batch, 1, seq, head_dim] (broadcast over heads)
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)
