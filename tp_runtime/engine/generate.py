"""Prefill then decode over a static KV cache, for a batch of prompts of different lengths.

Prompts are right-padded for prefill (causal attention never lets a real token see padding);
in decode every sequence writes and reads at its own position, and attention masks each
sequence's cache at its own length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from contextlib import nullcontext
from typing import Callable, ContextManager, Iterator, Sequence

import torch

from tp_runtime.communicator import Communicator
from tp_runtime.config import ModelConfig
from tp_runtime.engine.sampling import Sampler, SamplingParams
from tp_runtime.engine.stats import RunStats
from tp_runtime.errors import GenerationError
from tp_runtime.model.kv_cache import KVCache
from tp_runtime.model.step import StepInfo


@dataclass(frozen=True)
class TokenEvent:
    seq: int  # index of the prompt in the batch
    token_id: int
    index: int  # 0 for the first generated token
    finish_reason: str | None  # None, "stop" (EOS / stop id) or "length"


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        comm: Communicator,
        cfg: ModelConfig,
        max_seq_len: int,
        max_batch: int,
        device: torch.device,
        dtype: torch.dtype,
        fault: tuple[int, int] | None = None,
        decode_context: Callable[[], ContextManager] = nullcontext,
        fused_decode: Callable[[list[int], list[int]], torch.Tensor] | None = None,
    ) -> None:
        """decode_context: entered around the decode loop (the CPU GEMV kernel's thread handover).
        fused_decode: (tokens, positions) -> logits, the allocation-free decode step
        (model/fused_decode.py) that replaces the eager one."""
        self.model, self.comm, self.cfg = model, comm, cfg
        self.max_seq_len, self.max_batch, self.device = max_seq_len, max_batch, device
        self.cache = KVCache(cfg.num_layers, max_batch, model.heads.num_kv_local, max_seq_len, cfg.head_dim, dtype, device)
        self.fault = fault
        self.decode_context = decode_context
        self.fused_decode = fused_decode
        self.last_stats = RunStats()

    def _check(self, prompts: Sequence[Sequence[int]]) -> None:
        if not prompts:
            raise GenerationError("no prompt given")
        if len(prompts) > self.max_batch:
            raise GenerationError(f"{len(prompts)} prompts exceed the batch size the KV cache was sized for ({self.max_batch}); raise --max-batch-size")
        for i, p in enumerate(prompts):
            if not p:
                raise GenerationError(f"prompt {i} is empty")
            if len(p) >= self.max_seq_len:
                raise GenerationError(
                    f"prompt {i} has {len(p)} tokens, but the context holds {self.max_seq_len} "
                    f"(--max-seq-len, at most the model's {self.cfg.max_position_embeddings}) and needs room for at least one new token"
                )
            bad = [t for t in p if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise GenerationError(f"prompt {i} has token ids outside the vocabulary [0, {self.cfg.vocab_size}): {bad[:5]}")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prefill_inputs(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids [batch, width] and positions [batch, width]."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        return ids, torch.arange(width, device=self.device).expand(len(prompts), width)

    def prompt_logits(self, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        self._check(prompts)
        ids, positions = self._prefill_inputs(prompts)
        logits = self.model(ids, StepInfo(positions, prefill=True, start=0), self.cache)
        logits = logits.view(len(prompts), ids.shape[1], -1)
        return [logits[i, : len(p)] for i, p in enumerate(prompts)]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[TokenEvent]:
        self._check(prompts)
        dev = self.device
        b = len(prompts)
        lens = [len(p) for p in prompts]
        width = max(lens)
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.cfg.eos_token_ids))
        budget = [min(params.max_new_tokens, self.max_seq_len - n) for n in lens]
        stats = RunStats(prompt_tokens=sum(lens))
        self.last_stats = stats
        sampler = Sampler(params, dev)
        comm_stats = self.comm.stats
        comm_stats.reset()  # the stats describe the latest run
        comm_stats.phase = "prefill"

        ids, positions = self._prefill_inputs(prompts)
        logit_rows = torch.tensor([i * width + n - 1 for i, n in enumerate(lens)], device=dev)

        t0 = time.perf_counter()
        logits = self.model(ids, StepInfo(positions, prefill=True, start=0, logit_rows=logit_rows), self.cache)
        tokens = sampler(logits)
        tokens_host = tokens.tolist()
        self._sync()
        stats.prefill_seconds = time.perf_counter() - t0
        comm_stats.span("prefill", t0, t0 + stats.prefill_seconds, tokens=stats.prompt_tokens)
        comm_stats.phase = "decode"

        produced = [0] * b
        finished = [False] * b
        reasons: list[str] = [""] * b

        def emit(token_list: list[int]) -> Iterator[TokenEvent]:
            for i, tok in enumerate(token_list):
                if finished[i]:
                    continue
                produced[i] += 1
                reason = "stop" if tok in stops else ("length" if produced[i] >= budget[i] else None)
                if reason:
                    finished[i], reasons[i] = True, reason
                yield TokenEvent(i, tok, produced[i] - 1, reason)

        yield from emit(tokens_host)

        fused = self.fused_decode
        pos = torch.tensor(lens, dtype=torch.long, device=dev)  # where each sequence's next token goes
        cache_lens = pos + 1
        host_pos = list(lens)
        step_no = 0
        t0 = time.perf_counter()
        decode_time = 0.0
        with self.decode_context():
            while not all(finished):
                if self.fault is not None and self.fault == (self.comm.rank, step_no):
                    raise RuntimeError(f"injected fault on rank {self.comm.rank} at decode step {step_no} (test hook)")
                # finished sequences keep a slot in the batch; their positions stop at the context end
                if fused is not None:
                    logits = fused(tokens_host, [min(p, self.max_seq_len - 1) for p in host_pos])
                else:
                    max_len = min(max(host_pos), self.max_seq_len - 1) + 1
                    step = StepInfo(pos.clamp(max=self.max_seq_len - 1)[:, None], prefill=False, cache_lens=cache_lens.clamp(max=self.max_seq_len), max_len=max_len)
                    logits = self.model(tokens[:, None], step, self.cache)
                    pos += 1
                    cache_lens += 1
                tokens = sampler(logits)
                tokens_host = tokens.tolist()
                step_no += 1
                now = time.perf_counter()
                decode_time += now - t0
                comm_stats.span("decode step", t0, now, step=step_no)
                stats.decode_tokens += sum(1 for f in finished if not f)
                events = list(emit(tokens_host))
                host_pos = [p + 1 for p in host_pos]
                yield from events
                t0 = time.perf_counter()  # the consumer's time (printing) is not decode time
        stats.decode_seconds = decode_time
        stats.decode_steps = step_no
        stats.finish_reasons = reasons
