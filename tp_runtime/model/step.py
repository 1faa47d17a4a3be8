"""What one forward step needs to know besides token ids: positions and cache bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """One prompt chunk of a ragged step: its tokens are rows offset..offset+length-1 of the
    step's single row of tokens, at positions start..start+length-1 of cache row `slot`."""

    slot: int
    start: int
    offset: int
    length: int


@dataclass
class Ragged:
    """A step of prompt chunks and decodes in one forward (vLLM's mixed batch): the tokens are
    flattened into one row [1, total]; the chunks come first, then one token per decoding
    sequence (rows decode_offset..total-1). Only attention needs to know where each sequence's
    tokens are; every linear layer sees one matrix of all of them."""

    chunks: tuple[Segment, ...]
    decode_offset: int
    # the decoding sequences' positions, cache rows and valid keys (int64 [n_decode]) and the
    # longest of those on the host; None when the step decodes nothing
    positions: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    cache_lens: torch.Tensor | None = None
    max_len: int = 0


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
    # a mixed step (prefill chunks and decodes in one forward); batch is then 1
    ragged: Ragged | None = None
