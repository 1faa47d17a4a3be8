"""Vocab-parallel embedding and LM head: each rank holds a contiguous range of vocab rows.

The range sizes may differ by one (tp need not divide the vocab); every shard is padded to
the largest size with zero rows so that logits all-gather in equal pieces, and the padding is
dropped after the gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tp_runtime.checkpoint.loader import copy_checked
from tp_runtime.communicator import Communicator
from tp_runtime.kernels import cpu_quant


HEAD_TILE_ROWS = 4096  # vocab rows of a quantized table decoded at once for a several-row product


def load_vocab_rows(param: torch.Tensor, data: torch.Tensor, rows: int) -> None:
    copy_checked(param[:rows], data)
    param[rows:].zero_()  # padding rows give logits that are dropped after the gather


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_ranges: list[tuple[int, int]], rows_padded: int, rank: int, hidden: int, dtype: torch.dtype, comm: Communicator, site: str) -> None:
        """rows_padded: every shard's rows (sharding.vocab_shard_padded)."""
        super().__init__()
        self.comm, self.site = comm, site
        self.vocab_start, self.vocab_stop = vocab_ranges[rank]
        self.rows_padded, self.hidden, self.dtype = rows_padded, hidden, dtype
        self.split = comm.world_size > 1
        self._make_weight()

    def _make_weight(self) -> None:
        self.weight = nn.Parameter(torch.empty(self.rows_padded, self.hidden, dtype=self.dtype), requires_grad=False)

    def load_weight(self, name: str, data: torch.Tensor, slot: str | None) -> None:
        load_vocab_rows(self.weight, data, self.vocab_stop - self.vocab_start)

    def lookup(self, local_ids: torch.Tensor) -> torch.Tensor:
        """The rows of this shard's local ids (any shape) in the model's dtype: [*ids, hidden]."""
        return F.embedding(local_ids, self.weight)

    def row_into_(self, local_id: int, out: torch.Tensor) -> None:
        """out [hidden] <- the row of one local id (the fused decode step's lookup)."""
        out.copy_(self.weight[local_id])

    def stored_row_into_(self, row: torch.Tensor, storage: str | None, out: torch.Tensor) -> None:
        """out [1, hidden] <- the row this table holds for a checkpoint row as the file stores it
        (`row` [1, hidden] values, or [1, row bytes] of GGML `storage` blocks): the fused step's
        lookup in the mapped checkpoint, which must give what `lookup` gives. A table that
        quantises at load quantises the row alike."""
        if storage is None:
            out.copy_(row)
        else:
            cpu_quant.dequantize_(row, storage, out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [batch, seq] -> [batch, seq, hidden]
        if not self.split:
            return self.lookup(ids)
        mine = (ids >= self.vocab_start) & (ids < self.vocab_stop)
        local = torch.where(mine, ids - self.vocab_start, 0)
        out = self.lookup(local) * mine.unsqueeze(-1).to(self.dtype)
        return self.comm.all_reduce(out, site=self.site)  # vocab-parallel: one rank holds each row


class ParallelLMHead(nn.Module):
    """logits = gather_vocab(h @ W_local^T). Shares the embedding's weight when tied."""

    def __init__(self, embedding: VocabParallelEmbedding, vocab_ranges: list[tuple[int, int]], tied: bool, comm: Communicator, site: str) -> None:
        super().__init__()
        self.comm, self.site = comm, site
        self.rows = embedding.vocab_stop - embedding.vocab_start
        self.rows_padded = pad = embedding.rows_padded
        self._make_weight(embedding, tied)
        # columns of the gathered logits that are real vocab entries, in vocab order
        self._keep = [r * pad + i for r, (lo, hi) in enumerate(vocab_ranges) for i in range(hi - lo)]
        self.uneven = len(self._keep) != pad * len(vocab_ranges)
        self.register_buffer("keep", torch.empty(len(self._keep) if self.uneven else 0, dtype=torch.long), persistent=False)

    def _make_weight(self, embedding: VocabParallelEmbedding, tied: bool) -> None:
        if tied:
            self.weight = embedding.weight
        else:
            self.weight = nn.Parameter(torch.empty_like(embedding.weight), requires_grad=False)

    def tie_(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's weight again (materialising the meta-built model allocates
        shared parameters separately)."""
        self.weight = embedding.weight

    def load_weight(self, name: str, data: torch.Tensor, slot: str | None) -> None:
        load_vocab_rows(self.weight, data, self.rows)

    def init_buffers(self) -> None:
        """Called once the model is materialised (it is built on the meta device)."""
        if self.uneven:
            self.keep.copy_(torch.tensor(self._keep, dtype=torch.long))

    matmul = staticmethod(F.linear)  # kernels.cpu_linear for decode on CPU (see linear.py)

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [n, hidden] -> this shard's logits [n, rows_padded]."""
        return self.matmul(h, self.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: [n, hidden] -> logits [n, vocab] (float32, identical on every rank)
        logits = self.comm.all_gather(self.local_logits(h), dim=-1, site=self.site)  # vocab-parallel: shards -> full vocab
        if self.uneven:
            logits = logits.index_select(-1, self.keep)
        return logits.float()

    def fused_problem(self) -> str | None:
        return None if self.weight.is_contiguous() else "has a weight that is not row-major"

    def bind_decode(self, binder):
        """The fused step's GEMV of this shard's logits (a Gemv: its input .x, its output .out)."""
        return binder.float_gemv(self.weight, binder.buffer(self.weight.shape[0]))
