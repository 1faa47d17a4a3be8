"""The engine: admit sequences into KV cache slots, run one step of a plan, release them.

One loop drives every entry point: a `Scheduler` (engine/scheduler.py) admits sequences,
plans each step and aborts between steps; `generate()` runs one over its prompts (prefilled in
one step, decoded until each finishes), a server over what arrives. A step that only prefills
runs its prompt chunks right-padded into one forward per distinct start position (causal
attention never lets a real token see padding); one that only decodes runs its sequences (each
at its own position, in its own slot) through the fused CPU step when there is one; one that
does both runs them in a single ragged forward (model/step.py Ragged: all tokens in one row,
attention per sequence), so that a prompt admitted mid-stream costs the running sequences no
forward of their own. Then it samples one token for every sequence whose prompt is done. Finished sequences
leave the batch and free their slot, so they cost nothing afterwards. Decode steps run inside
`decode_context()` (the CPU kernel's thread handover), entered by the first decode step and
left by the next prefill or `end_decode_run()`, so a run of decode steps enters it once.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack, nullcontext
from typing import Callable, ContextManager, Sequence as Seq

import torch

from tp_runtime.communicator import Communicator
from tp_runtime.config import ModelConfig
from tp_runtime.engine.sampling import Sampler, SamplingParams
from tp_runtime.engine.sequence import Chunk, Sequence, StepPlan, TokenEvent
from tp_runtime.engine.stats import RunStats
from tp_runtime.errors import GenerationError
from tp_runtime.model.kv_cache import KVCache
from tp_runtime.model.step import Ragged, Segment, StepInfo


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
        fused_decode: Callable[..., torch.Tensor] | None = None,
        stall: tuple[int, int, float] | None = None,
    ) -> None:
        """decode_context: entered around a run of decode steps (the CPU GEMV kernel's thread
        handover). fused_decode: (tokens, positions, slots) -> logits, the allocation-free decode
        step (model/fused_decode.py) that replaces the eager one. fault, stall: test hooks,
        (rank, decode step) to raise at and (rank, decode step, seconds) to sleep at."""
        self.model, self.comm, self.cfg = model, comm, cfg
        self.max_seq_len, self.max_batch, self.device = max_seq_len, max_batch, device
        self.cache = KVCache(cfg.num_layers, max_batch, model.heads.num_kv_local, max_seq_len, cfg.head_dim, dtype, device)
        self.fault, self.stall = fault, stall
        self.decode_context = decode_context
        self.fused_decode = fused_decode
        self.sampler = Sampler()
        self.stats = RunStats()
        self.free_slots = list(range(max_batch))
        self.running: dict[int, Sequence] = {}
        self._decode_run: ExitStack | None = None  # decode_context, open across decode-only steps
        # --attention dp: each rank runs the sequences of the slots it owns (slot % world), and
        # every forward meets the other ranks' in the experts' all-to-alls (Engine.step)
        self.group_sync = cfg.moe is not None and cfg.moe.data_parallel and comm.world_size > 1

    @property
    def last_stats(self) -> RunStats:
        return self.stats

    def reset_stats(self) -> None:
        """Start a new run's counts: this engine's and the communicator's."""
        self.stats = RunStats()
        self.comm.stats.reset()

    # ---- admission -------------------------------------------------------------------------

    def check_prompt(self, prompt: Seq[int], i: int = 0) -> None:
        if not prompt:
            raise GenerationError(f"prompt {i} is empty")
        if len(prompt) >= self.max_seq_len:
            raise GenerationError(
                f"prompt {i} has {len(prompt)} tokens, but the context holds {self.max_seq_len} "
                f"(--max-seq-len, at most the model's {self.cfg.max_position_embeddings}) and needs room for at least one new token"
            )
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token ids outside the vocabulary [0, {self.cfg.vocab_size}): {bad[:5]}")

    def check_batch(self, prompts: Seq[Seq[int]]) -> None:
        if not prompts:
            raise GenerationError("no prompt given")
        if len(prompts) > len(self.free_slots):
            raise GenerationError(
                f"{len(prompts)} prompts exceed the batch size the KV cache was sized for ({self.max_batch}, "
                f"{len(self.free_slots)} free); raise --max-batch-size"
            )
        for i, p in enumerate(prompts):
            self.check_prompt(p, i)

    def add(self, seq_id: int, prompt: Seq[int], params: SamplingParams, slot: int | None = None, seed: int | None = None) -> Sequence:
        """Admit a sequence into a free KV cache slot (the lowest, unless a plan names one).
        seed: its sampling noise's (default params.seed)."""
        self.check_prompt(prompt, seq_id)
        if seq_id in self.running:
            raise GenerationError(f"sequence {seq_id} is already running")
        if not self.free_slots or (slot is not None and slot not in self.free_slots):
            raise GenerationError(f"no free KV cache slot for sequence {seq_id} (slot {slot}; free: {self.free_slots}; --max-batch-size {self.max_batch})")
        slot = min(self.free_slots) if slot is None else slot
        self.free_slots.remove(slot)
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.cfg.eos_token_ids))
        seq = Sequence(seq_id, list(prompt), params, slot, min(params.max_new_tokens, self.max_seq_len - len(prompt)), stops, params.seed if seed is None else seed)
        self.running[seq_id] = seq
        return seq

    def release(self, seq: Sequence) -> None:
        """Free a sequence's slot (finished, or aborted): its cache row is then another's."""
        if self.running.get(seq.seq_id) is seq:  # not a newer sequence under a reused id
            del self.running[seq.seq_id]
            self.free_slots.append(seq.slot)

    def abort(self, seq: Sequence) -> None:
        if not seq.finished:
            seq.finish_reason = "abort"
        self.release(seq)

    # ---- one step --------------------------------------------------------------------------

    def step(self, plan: StepPlan) -> list[TokenEvent]:
        """Run one step: its prefill chunks, then its decodes; one token event per sequence that
        picked a token (a prompt's last chunk, every decode). Finished sequences are released."""
        events: list[TokenEvent] = []
        named = [c.seq.seq_id for c in plan.prefill] + [s.seq_id for s in plan.decode]
        if len(set(named)) != len(named):
            raise GenerationError(f"step plan: a sequence appears twice ({sorted(i for i in set(named) if named.count(i) > 1)})")
        for chunk in plan.prefill:
            s = chunk.seq
            if s.seq_id not in self.running or not s.cached < chunk.stop <= len(s.prompt):
                raise GenerationError(f"step plan: sequence {s.seq_id} cannot prefill [{s.cached}, {chunk.stop}) of its {len(s.prompt)}-token prompt")
        for s in plan.decode:
            if s.seq_id not in self.running or s.finished or not s.prefilled or s.cached != s.num_tokens - 1:
                raise GenerationError(f"step plan: sequence {s.seq_id} is not ready to decode (cached {s.cached} of {s.num_tokens} tokens)")
        if not self.group_sync:
            return self._run(plan)
        # --attention dp: this rank runs the sequences whose slots it owns; a rank with fewer
        # forwards than another makes up the rest as idle passes (every forward meets the
        # others' in the experts' all-to-alls); then the step's tokens are shared
        world, rank = self.comm.world_size, self.comm.rank
        parts = [StepPlan(tuple(c for c in plan.prefill if c.seq.slot % world == r), tuple(q for q in plan.decode if q.slot % world == r)) for r in range(world)]
        mine = parts[rank]
        idle = max(_forwards(p) for p in parts) - _forwards(mine)
        events = self._run(mine)
        if idle:
            with self.comm.stats.in_phase("idle"):
                for _ in range(idle):
                    self.model.idle_pass()
        return events + self._share_tokens(plan, mine, events)

    def _run(self, plan: StepPlan) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        mixed = bool(plan.prefill and plan.decode)
        if plan.prefill:
            self.end_decode_run()  # prefill's GEMMs want torch's threads back
        if mixed:
            return self._mixed(plan.prefill, plan.decode)
        for start in sorted({c.seq.cached for c in plan.prefill}):
            events += self._prefill([c for c in plan.prefill if c.seq.cached == start], start)
        if plan.decode:
            if self._decode_run is None:
                self._decode_run = ExitStack()
                self._decode_run.enter_context(self.decode_context())
            events += self._decode(plan.decode)
        return events

    def _share_tokens(self, plan: StepPlan, mine: StepPlan, events: list[TokenEvent]) -> list[TokenEvent]:
        """--attention dp: every rank's tokens of this step to every rank (one all-gather of a
        token per slot), so that each holds every sequence as it is (rank 0 hands them to the
        server's requests; the scheduler sees every finish); the other ranks' sequences advance
        here as they did on their own rank. Their events, in plan order."""
        theirs = [c for c in plan.prefill if c not in mine.prefill]
        decode = [q for q in plan.decode if q not in mine.decode]
        picking = [c.seq for c in theirs if c.stop == len(c.seq.prompt)] + decode
        if not any(c.stop == len(c.seq.prompt) for c in plan.prefill) and not plan.decode:
            for c in theirs:
                c.seq.cached = c.stop
            return []  # only mid-prompt chunks this step: no rank picked a token
        mine_tokens = torch.full((self.max_batch,), -1, dtype=torch.int64)
        slot_of = {q.seq_id: q.slot for q in [c.seq for c in mine.prefill] + list(mine.decode)}
        for e in events:
            mine_tokens[slot_of[e.seq]] = e.token_id
        with self.comm.stats.in_phase("decode" if plan.decode else "prefill"):
            tokens = self.comm.all_gather(mine_tokens.to(self.device), dim=0, site="dp.step").view(-1, self.max_batch).cpu()
        world = self.comm.world_size
        for c in theirs:
            c.seq.cached = c.stop
        for q in decode:
            q.cached += 1
        out = []
        for q in picking:
            out.append(q.append(int(tokens[q.slot % world, q.slot])))
            if q.finished:
                self.release(q)
        return out

    def end_decode_run(self) -> None:
        """Leave decode_context (entered by the first decode step after a prefill or a pause);
        a driver calls it when it stops stepping."""
        if self._decode_run is not None:
            run, self._decode_run = self._decode_run, None
            run.close()

    def _sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[TokenEvent]:
        tokens = self.sampler(logits, [(s.params, s.seed, len(s.output)) for s in seqs])
        events = [s.append(t) for s, t in zip(seqs, tokens)]
        for s in seqs:
            if s.finished:
                self.release(s)
        return events

    def _slots(self, slots: list[int]) -> torch.Tensor | None:
        """Cache rows as an index, or None when they are rows 0..n-1 in order (the cache is then
        read as a view)."""
        return None if slots == list(range(len(slots))) else torch.tensor(slots, dtype=torch.long, device=self.device)

    def _padded(self, token_lists: Seq[Seq[int]]) -> torch.Tensor:
        """Right-padded ids [n, longest] on the device."""
        ids = torch.zeros(len(token_lists), max(len(t) for t in token_lists), dtype=torch.long)
        for i, t in enumerate(token_lists):
            ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return ids.to(self.device)

    def _real_rows(self, lens: Seq[int]) -> torch.Tensor | None:
        """Indices into the padded [n, longest] batch of its real tokens (StepInfo.real_rows);
        None when no prompt is padded. Only a MoE model reads them (routing skips the padding)."""
        width = max(lens)
        if self.model.cfg.moe is None or min(lens) == width:
            return None
        return torch.tensor([i * width + j for i, n in enumerate(lens) for j in range(n)], dtype=torch.long, device=self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prefill(self, chunks: Seq[Chunk], start: int) -> list[TokenEvent]:
        t0 = time.perf_counter()
        dev = self.device
        lens = [c.stop - start for c in chunks]
        width = max(lens)
        ids = self._padded([c.seq.prompt[start : c.stop] for c in chunks])
        done = [i for i, c in enumerate(chunks) if c.stop == len(c.seq.prompt)]  # rows that pick a token
        positions = torch.arange(start, start + width, device=dev).expand(len(chunks), width)
        logit_rows = torch.tensor([i * width + lens[i] - 1 for i in done], dtype=torch.long, device=dev)
        # a step of mid-prompt chunks only needs no logits: every rank skips the LM head alike
        step = StepInfo(positions, prefill=True, start=start, logit_rows=logit_rows, slots=self._slots([c.seq.slot for c in chunks]), real_rows=self._real_rows(lens))
        with self.comm.stats.in_phase("prefill"):
            logits = self.model(ids, step, self.cache)
        for c in chunks:
            c.seq.cached = c.stop
        events = self._sample(logits, [chunks[i].seq for i in done]) if done else []
        self._sync()
        t1 = time.perf_counter()
        self.stats.prompt_tokens += sum(lens)
        self.stats.prefill_seconds += t1 - t0
        self.comm.stats.span("prefill", t0, t1, tokens=sum(lens))
        return events

    def _mixed(self, chunks: Seq[Chunk], seqs: Seq[Sequence]) -> list[TokenEvent]:
        """Prompt chunks and decodes in one forward: every linear layer multiplies all their
        tokens at once, so the decoding sequences ride along with a prompt's GEMMs instead of
        waiting for it and then reading every weight again in a forward of their own."""
        self._check_fault()
        t0 = time.perf_counter()
        dev = self.device
        tokens: list[int] = []
        positions: list[int] = []
        segments: list[Segment] = []
        for c in chunks:
            s = c.seq
            segments.append(Segment(s.slot, s.cached, len(tokens), c.stop - s.cached))
            tokens += s.prompt[s.cached : c.stop]
            positions += range(s.cached, c.stop)
        n_prefill = len(tokens)
        done = [(c.seq, g.offset + g.length - 1) for c, g in zip(chunks, segments) if c.stop == len(c.seq.prompt)]
        decode_pos = [s.num_tokens - 1 for s in seqs]
        tokens += [s.output[-1] for s in seqs]
        positions += decode_pos
        dpos = torch.tensor(decode_pos, dtype=torch.long, device=dev)
        ragged = Ragged(tuple(segments), n_prefill, dpos, torch.tensor([s.slot for s in seqs], dtype=torch.long, device=dev), dpos + 1, max(decode_pos) + 1)
        rows = [r for _, r in done] + list(range(n_prefill, len(tokens)))
        step = StepInfo(torch.tensor([positions], dtype=torch.long, device=dev), prefill=True, logit_rows=torch.tensor(rows, dtype=torch.long, device=dev), ragged=ragged)
        with self.comm.stats.in_phase("mixed"):
            logits = self.model(torch.tensor([tokens], dtype=torch.long, device=dev), step, self.cache)
        for c in chunks:
            c.seq.cached = c.stop
        for s in seqs:
            s.cached += 1
        events = self._sample(logits, [s for s, _ in done] + list(seqs))
        self._sync()
        t1 = time.perf_counter()
        # the step's time split between its prompt and decode tokens by their share of the rows
        # (what the GEMMs, nearly all of it, scale with)
        st, share = self.stats, n_prefill / len(tokens)
        st.prompt_tokens += n_prefill
        st.prefill_seconds += (t1 - t0) * share
        st.decode_tokens += len(seqs)
        st.decode_seconds += (t1 - t0) * (1 - share)
        st.mixed_steps += 1
        self.comm.stats.span("mixed step", t0, t1, tokens=n_prefill, decodes=len(seqs))
        return events

    def _check_fault(self) -> None:
        if self.fault is not None and self.fault == (self.comm.rank, self.stats.decode_steps):
            raise RuntimeError(f"injected fault on rank {self.comm.rank} at decode step {self.stats.decode_steps} (test hook)")
        if self.stall is not None and self.stall[:2] == (self.comm.rank, self.stats.decode_steps):
            print(f"rank {self.comm.rank} stalls for {self.stall[2]:.1f} s at decode step {self.stats.decode_steps} (test hook)", file=sys.stderr, flush=True)
            time.sleep(self.stall[2])  # the main loop only: the transport's threads (heartbeats) go on

    def _decode(self, seqs: Seq[Sequence]) -> list[TokenEvent]:
        self._check_fault()
        t0 = time.perf_counter()
        tokens = [s.output[-1] for s in seqs]
        positions = [s.num_tokens - 1 for s in seqs]
        slots = [s.slot for s in seqs]
        with self.comm.stats.in_phase("decode"):
            if self.fused_decode is not None:
                logits = self.fused_decode(tokens, positions, None if slots == list(range(len(slots))) else slots)
            else:
                dev = self.device
                pos = torch.tensor(positions, dtype=torch.long, device=dev)
                step = StepInfo(pos[:, None], prefill=False, cache_lens=pos + 1, max_len=max(positions) + 1, slots=self._slots(slots))
                logits = self.model(torch.tensor(tokens, dtype=torch.long, device=dev)[:, None], step, self.cache)
        for s in seqs:
            s.cached += 1
        events = self._sample(logits, seqs)
        t1 = time.perf_counter()
        st = self.stats
        st.decode_steps += 1
        st.decode_tokens += len(seqs)
        st.decode_seconds += t1 - t0
        self.comm.stats.span("decode step", t0, t1, step=st.decode_steps)
        return events

    # ---- scoring ---------------------------------------------------------------------------

    def prompt_logits(self, prompts: Seq[Seq[int]]) -> list[torch.Tensor]:
        """float32 logits at every prompt position ([len_i, vocab] each), in free slots."""
        self.check_batch(prompts)
        self.end_decode_run()
        ids = self._padded(prompts)
        width = ids.shape[1]
        positions = torch.arange(width, device=self.device).expand(len(prompts), width)
        slots = self._slots(sorted(self.free_slots)[: len(prompts)])
        with self.comm.stats.in_phase("prefill"):
            logits = self.model(ids, StepInfo(positions, prefill=True, start=0, slots=slots, real_rows=self._real_rows([len(p) for p in prompts])), self.cache)
        logits = logits.view(len(prompts), width, -1)
        return [logits[i, : len(p)] for i, p in enumerate(prompts)]


def _forwards(plan: StepPlan) -> int:
    """How many forwards Engine._run makes of a plan: one mixed, or one per distinct prefill
    start and one decode."""
    if plan.prefill and plan.decode:
        return 1
    return len({c.seq.cached for c in plan.prefill}) + bool(plan.decode)
