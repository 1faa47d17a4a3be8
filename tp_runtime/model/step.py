"""What one forward step needs to know besides token ids: positions and cache bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepInfo:
    # positions: [batch, seq] absolute position of every input token
    positions: torch.Tensor
    prefill: bool
    # prefill: the tokens are written to cache positions start..start+seq-1 of every sequence
    start: int = 0
    # decode (seq == 1): cache_lens [batch] = valid keys per sequence including the new one;
    # max_len = its maximum, known on the host so that no device->host sync is needed
    cache_lens: torch.Tensor | None = None
    max_len: int = 0
    # rows of the final hidden state that need logits, [n] indices into batch*seq
    logit_rows: torch.Tensor | None = None
    # the KV cache slot of each sequence, int64 [batch]; None: slots 0..batch-1
    slots: torch.Tensor | None = None
    # prefill of prompts of different lengths: indices into batch*seq of the real tokens (the rest
    # pad the batch to its widest prompt); None: every token is real. Routing skips the padding.
    real_rows: torch.Tensor | None = None
