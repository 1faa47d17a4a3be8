"""The decode step on CPU as a fixed list of kernel calls on buffers allocated
once: no eager torch op and no allocation per token.

The eager model spends dozens of torch ops per layer on a decode token (norms, RoPE, views,
casts, attention, SiLU), each a few microseconds of dispatch plus a fresh tensor; on a small
model that host time is a large share of the token. Here every module the step drives binds its
own calls into the C kernels (kernels/cpu_decode.py) with every pointer fixed at build time:
each class has a `bind_decode(binder, ...)` beside its `forward`, and a `fused_problem()` that
says why it cannot bind (None when it can). The order of a layer's calls lives once, in its
class; a new layer kind or weight format brings its own binding. The collectives are the
model's own (same communicator, same sites: a row-parallel linear's binding ends in its
all-reduce, the LM head's all-gather is here), written into fixed buffers; the vocab-parallel
embedding's all-reduce too, unless the engine hands the step the whole embedding table to look
rows up in.

It reads the loaded model's weights and KV cache in place, so prefill (eager) and decode share
them, and decodes any number of sequences up to the cache's slots, each at its own position in
its own slot: a GEMV reads a tile of weight rows once for all of them. The numerics are the
eager path's (see cpu_decode.c). Applies on CPU, float32 or bfloat16, every layer bindable, the
kernel built; `unsupported` says why not otherwise and the engine keeps the eager step.

Recorded programs. Calling ten bound kernels a layer from Python costs ~1-2 us each in ctypes
and closures (0.5-0.7 ms of a 30-layer model's token, 5-6% of SmolLM2's). So the first step
of each shape (batch size, slots given or not) runs every layer's bound calls once in record
mode: a kernel call is written into a list of ops instead of running (`Kernels`, the library as
`binder.lib` hands it out), a row-parallel sum becomes a Python item, and the step then runs as
a few `tp_program_run` calls (cpu_decode.c) between the collectives: one call for a whole token
at tp=1, two a layer at tp=2. What a bound call passes must therefore be fixed for the shape:
buffers allocated at bind time, the binder's per-step arrays (positions, lengths, slots), which
the ops read at run time. A layer whose run does anything else (a torch op: a MoE layer's
router; a kernel no op stands for) is caught while recording and runs as Python, as before.
"""

from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tp_runtime.kernels import cpu_decode, cpu_gemv
from tp_runtime.model.kv_cache import KVCache


def unsupported_setup(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fused step cannot run on this device at this dtype (known before loading), or None."""
    if device.type != "cpu":
        return f"it runs on CPU (this model is on {device})"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"it takes float32 and bfloat16 models, not {str(dtype).removeprefix('torch.')}"
    if cpu_decode.lib() is None:
        return "the CPU kernel is not loaded (no C compiler, see the warning above; or a forked process)"
    return None


def binding_problem(module: nn.Module, what: str) -> str | None:
    """Why `module` cannot bind into the fused step ("<what> ..."), or None."""
    probe = getattr(module, "fused_problem", None)
    why = probe() if probe is not None else None
    if why:
        return f"{what} {why}"
    if probe is None or not hasattr(module, "bind_decode"):
        return f"{what} is a {type(module).__name__}, which has no fused binding"
    return None


def unsupported(model: nn.Module, device: torch.device) -> str | None:
    """Why the fused step cannot run this loaded model here, or None: can every layer bind?"""
    why = unsupported_setup(device, model.norm.weight.dtype)
    if why:
        return why
    if model.cfg.head_dim > 1024 or model.cfg.head_dim % 2:
        return f"takes even head sizes up to 1024, not {model.cfg.head_dim}"
    for i, layer in enumerate(model.layers):
        if why := binding_problem(layer, f"layer {i}"):
            return why
    return binding_problem(model.lm_head, "the LM head")


# kernel -> its op number in cpu_decode.c's tp_program_run (the kernels a program can hold)
PROGRAM_OPS = {"tp_gemv": 1, "tp_gemv_q8": 2, "tp_qgemv": 3, "tp_rmsnorm": 4, "tp_qkv_rope": 5, "tp_decode_attn": 6, "tp_silu_mul": 7}
_OP_ARGS = 20  # cpu_decode.c OP_ARGS


class _Op(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("a", ctypes.c_int64 * _OP_ARGS), ("f", ctypes.c_double * 2)]


class _NotRecordable(Exception):
    """A layer's run did something a program cannot hold (a torch op, an unknown kernel)."""


class _NoTorchOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        raise _NotRecordable(f"the torch op {func}")


class Recorder:
    """Where the calls of a step being recorded go: kernel calls become ops, Python items (a
    collective) end the stretch of ops before them."""

    def __init__(self) -> None:
        self.items: list[Any] = []  # lists of _Op (a stretch run in one call) and Python callables
        self.thread = threading.get_ident()

    def op(self, kernel: "Kernel", args: tuple) -> None:
        op = _Op(kind=PROGRAM_OPS[kernel.name])
        ints, floats = [], []
        for arg, kind in zip(args, kernel.fn.argtypes):
            if kind is ctypes.c_float:
                floats.append(float(arg))
            elif arg is None:
                ints.append(0)
            elif isinstance(arg, ctypes.Array):
                ints.append(ctypes.addressof(arg))  # a per-step array: read when the op runs
            else:
                ints.append(int(arg))
        if len(args) != len(kernel.fn.argtypes) or len(ints) > _OP_ARGS or len(floats) > 2:
            raise _NotRecordable(f"{kernel.name} with {len(args)} arguments")
        op.a[: len(ints)] = ints
        op.f[: len(floats)] = floats
        if not self.items or not isinstance(self.items[-1], list):
            self.items.append([])
        self.items[-1].append((kernel.name, op))

    def python(self, run: Callable[[], None]) -> None:
        self.items.append(run)


class Kernel:
    """A kernel of the library as a binding holds it: calls it, or, while its step records on
    this thread, writes the call into the recorder (and returns 0, the kernels' success)."""

    def __init__(self, name: str, fn, state: "Kernels") -> None:
        self.name, self.fn, self.state = name, fn, state

    def __call__(self, *args):
        rec = self.state.recorder
        if rec is None or rec.thread != threading.get_ident():
            return self.fn(*args)
        if self.name not in PROGRAM_OPS:
            raise _NotRecordable(f"the kernel {self.name}")
        rec.op(self, args)
        return 0


class Kernels:
    """The kernel library as `binder.lib`: its functions as `Kernel`s, which record while
    `recording()` is on. The library's own attributes are swapped for the recording too, so a
    binding that looks a kernel up at call time (the GGUF block linears) is recorded as well."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.raw = lib
        self.recorder: Recorder | None = None
        self._kernels: dict[str, Kernel] = {}

    def __getattr__(self, name: str) -> Kernel:
        k = self._kernels.get(name)
        if k is None:
            k = self._kernels[name] = Kernel(name, getattr(self.raw, name), self)
        return k

    @contextmanager
    def recording(self, recorder: Recorder):
        names = [n for n in PROGRAM_OPS if hasattr(self.raw, n)]
        saved = {n: getattr(self.raw, n) for n in names}
        self.recorder = recorder
        for n in names:
            setattr(self.raw, n, getattr(self, n))
        try:
            with _NoTorchOps():
                yield recorder
        finally:
            self.recorder = None
            for n, fn in saved.items():
                setattr(self.raw, n, fn)


class Program:
    """A recorded step's stretch of layers: runs of ops (one tp_program_run call each) and the
    Python items between them."""

    def __init__(self, raw: ctypes.CDLL, items: list[Any]) -> None:
        self.raw = raw
        self.recorded = items  # (kernel name, op) lists and Python items, as recorded (bench/overhead.py reads them)
        self.items: list[Any] = []
        for item in items:
            if isinstance(item, list):
                ops = (_Op * len(item))(*(op for _, op in item))
                self.items.append(partial(self._run_ops, ops, len(item), [name for name, _ in item]))
            else:
                self.items.append(item)
        self.calls = len(self.items)

    def _run_ops(self, ops, n: int, names: list[str]) -> None:
        rc = self.raw.tp_program_run(ops, n)
        if rc:
            k, code = (rc >> 32) - 1, rc & 0xFFFFFFFF
            raise RuntimeError(f"fused decode step: the kernel {names[k]} (op {k} of {n}) failed with code {code - (1 << 32) if code >= 1 << 31 else code}")

    def __call__(self) -> None:
        for item in self.items:
            item()


class Gemv:
    """One weight's GEMV bound to its input and output buffers ([slots, *] each); call(nb)
    multiplies the first nb rows. `x` is the buffer its producer writes (float32 or bfloat16,
    whichever the kernel reads)."""

    def __init__(self, x: torch.Tensor, out: torch.Tensor, call: Callable[[int], int]) -> None:
        self.x, self.out, self._call = x, out, call
        self.x_bf16 = int(x.dtype == torch.bfloat16)

    def __call__(self, nb: int) -> None:
        self._call(nb)


@dataclass
class Bound:
    """A bound block: the input buffer `x` its producer writes, and run(nb) (also its call)."""

    x: torch.Tensor
    run: Callable[[int], None]

    def __call__(self, nb: int) -> None:
        self.run(nb)


class DecodeBinder:
    """What a module's `bind_decode` binds against: the kernel library, the step's shared
    buffers (the residual stream `res`, each block's output `h`, attention scores, per-sequence
    positions, key counts and slots filled every step) and helpers for the common calls."""

    def __init__(self, lib, dtype: torch.dtype, rows: int, hidden: int, q_heads_local: int, cache: KVCache, rotary, comm) -> None:
        self.lib = lib if isinstance(lib, Kernels) else Kernels(lib)
        self.dtype, self.rows, self.cache, self.rotary, self.comm = dtype, rows, cache, rotary, comm
        self.mbf = int(dtype == torch.bfloat16)
        self._bound: list[torch.Tensor] = []  # every tensor whose address a call holds, kept alive here
        self.res = self.buffer(hidden)
        self.h = self.buffer(hidden)
        self.scratch = torch.zeros(rows * q_heads_local, cache.max_seq_len, dtype=torch.float32)
        self.positions, self.lengths = (ctypes.c_int64 * rows)(), (ctypes.c_int64 * rows)()
        self.slot_rows = (ctypes.c_int64 * rows)()
        self.slots: ctypes.Array | None = None  # slot_rows for a step whose slots are not 0..nb-1

    def ptr(self, t: torch.Tensor | None) -> int | None:
        """t's address for a bound call (None for no tensor); t stays alive as long as the step."""
        if t is None:
            return None
        self._bound.append(t)
        return t.data_ptr()

    def buffer(self, cols: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.zeros(self.rows, cols, dtype=dtype or self.dtype)

    def float_gemv(self, weight: torch.Tensor, out: torch.Tensor, x: torch.Tensor | None = None) -> Gemv:
        """out[:nb] = x[:nb] @ weight^T for a row-major float32 / bfloat16 / float16 weight; x: an
        input buffer shared with other GEMVs (of the dtype the kernel reads), else a new one."""
        kind = cpu_decode.gemv_kind(weight)
        x = self.buffer(weight.shape[1], torch.bfloat16 if kind == 2 else torch.float32) if x is None else x
        call = partial(self.lib.tp_gemv, self.ptr(weight), self.ptr(x), self.ptr(out), weight.shape[1], weight.shape[0], kind, self.mbf)
        return Gemv(x, out, call)

    def int8_gemv(self, qweight: torch.Tensor, block_sums: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> Gemv:
        """out[:nb] = x[:nb] @ (qweight * scales)^T, x float32 quantised per 64 values; out in the
        model's dtype, or float32 (the LM head's logits)."""
        x = self.buffer(qweight.shape[1], torch.float32)
        scales = scales.float()  # what the eager int8 path hands the kernel
        ybf = int(out.dtype == torch.bfloat16)
        call = partial(self.lib.tp_gemv_q8, self.ptr(qweight), self.ptr(block_sums), self.ptr(scales), self.ptr(x), self.ptr(out), qweight.shape[1], qweight.shape[0], ybf)
        if call(self.rows):  # sizes the kernel's activation buffer now, not in a token step
            raise MemoryError("int8 GEMV: the activation buffer could not be allocated")
        return Gemv(x, out, call)

    @staticmethod
    def bound(x: torch.Tensor, run: Callable[[int], None]) -> Bound:
        return Bound(x, run)

    def all_reduce(self, out: torch.Tensor, site: str, bias: torch.Tensor | None) -> Callable[[int], None]:
        """The row-parallel sum of out[:nb] over the ranks (timed under `site`), then the bias."""

        views = [out[:nb] for nb in range(self.rows + 1)]  # out[:nb], made once (a slice is an op)
        alone = self.comm.world_size == 1

        def reduce(nb: int) -> None:
            h = views[nb]
            if not alone:  # world 1: nothing to sum
                self.comm.all_reduce(h, site=site)  # row-parallel: partial sums -> full output
            if bias is not None:
                h.add_(bias)

        def run(nb: int) -> None:
            rec = self.lib.recorder
            if rec is not None and rec.thread == threading.get_ident():
                if not alone or bias is not None:
                    rec.python(partial(reduce, nb))  # a collective: between two stretches of ops
                return
            reduce(nb)

        return run

    def rms_norm(self, weight: torch.Tensor, eps: float, out: torch.Tensor, add: bool) -> Callable[[int], None]:
        """out[:nb] = rms_norm(h + res) with res = h + res written back (add), else rms_norm(res)."""
        return partial(self.lib.tp_rmsnorm, self.ptr(self.h), self.ptr(self.res), self.ptr(weight), self.ptr(out), weight.numel(), eps, int(add), int(out.dtype == torch.bfloat16), self.mbf)


class FusedDecodeStep:
    """step(tokens, positions, slots) -> float32 logits [nb, vocab] for nb <= the cache's slots
    sequences, sequence b's token at position positions[b] (its k/v written there in cache row
    slots[b], its attention over that row's positions up to it). The logits are a view of the
    same buffer every step."""

    # the whole [vocab, hidden] embedding (any float dtype, e.g. a view of the mapped checkpoint;
    # or uint8 rows of GGML blocks of type embedding_storage), set by the engine when every rank
    # has one: each rank then looks a token's row up itself, and a step issues no embedding
    # all-reduce (2 all-reduces per layer + 1 all-gather per token)
    embedding_table: torch.Tensor | None = None
    embedding_storage: str | None = None

    def __init__(self, model: nn.Module, cache: KVCache) -> None:
        why = unsupported(model, cache.k.device)
        if why:
            raise ValueError(f"fused decode step: {why}")
        cfg = model.cfg
        self.dtype = dtype = model.norm.weight.dtype
        self.comm = model.embed_tokens.comm
        self.embed, self.head = model.embed_tokens, model.lm_head
        rows = self.max_batch = cache.max_batch
        self.max_seq_len = cache.max_seq_len
        b = self.binder = DecodeBinder(cpu_decode.lib(), dtype, rows, cfg.hidden_size, model.heads.num_q_local, cache, model.rotary, self.comm)
        self.res = b.res  # the residual stream; the embedding lands here
        self.layers = [layer.bind_decode(b, first=i == 0) for i, layer in enumerate(model.layers)]
        # layers known to run torch ops each step (a MoE layer's router): never recorded
        self.unrecorded = {i for i, layer in enumerate(model.layers) if any(getattr(m, "decode_runs_torch_ops", False) for m in layer.modules())}
        tp, shard = self.comm.world_size, self.head.rows_padded
        self.lm = self.head.bind_decode(b)
        self.norm = b.rms_norm(model.norm.weight, model.norm.eps, self.lm.x, add=True)
        ldt = self.lm.out.dtype  # the head's output: float32 from a quantized table, else the model's dtype (as eager)
        if tp == 1:  # world 1: the head's output is the gathered logits
            self.pieces = self.gathered = self.lm.out
        else:
            self.pieces = torch.zeros(tp * rows, shard, dtype=ldt)  # the ranks' logits, rank after rank
            self.gathered = torch.zeros(rows, tp * shard, dtype=ldt)  # ... and sequence after sequence
        self._one_out, self._one_gathered = self.lm.out[:1], self.gathered[:1].view(tp, shard)  # nb = 1: gathered in place
        self.kept = torch.zeros(rows, cfg.vocab_size, dtype=ldt) if self.head.uneven else self.gathered
        self.logits = self.kept if ldt == torch.float32 else torch.zeros(rows, cfg.vocab_size, dtype=torch.float32)
        # the step's units in order, each recorded alone: the layers, then the final norm and
        # the LM head; programs by (batch size, slots given) as they are first needed
        self.units: list[Callable[[int], None]] = [*self.layers, self.norm, self.lm]
        self.record = True  # False: run the bound calls from Python every step (bench/overhead.py times them so)
        self.programs: dict[tuple[int, bool], Program] = {}
        # what the step streams every token (weights, the KV cache) onto 2 MB pages: a 4 KB page's
        # TLB miss is a two-level page walk under a hypervisor (SmolLM2 decode 20-50% faster here)
        self.huge_page_bytes = cpu_gemv.onto_huge_pages(b._bound)

    def _embed(self, tokens: Sequence[int]) -> None:
        if self.embedding_table is not None:  # every rank has every row: no collective
            for b, token in enumerate(tokens):  # the row the embedding holds for it (quantised as at load, where it quantises)
                self.embed.stored_row_into_(self.embedding_table[token : token + 1], self.embedding_storage, self.res[b : b + 1])
            return
        e = self.embed
        for b, token in enumerate(tokens):
            if e.vocab_start <= token < e.vocab_stop:
                e.row_into_(token - e.vocab_start, self.res[b])
            else:
                self.res[b].zero_()
        if e.split:
            self.comm.all_reduce(self.res[: len(tokens)], site=e.site)  # vocab-parallel: one rank holds each row

    def program(self, nb: int) -> Program:
        """The recorded program of the step's units for nb sequences and the binder's current
        slots (recorded now if new): each unit's kernel calls as ops, a unit that cannot be
        recorded as itself."""
        key = (nb, self.binder.slots is not None)
        prog = self.programs.get(key)
        if prog is None:
            items: list[Any] = []
            lib = self.binder.lib
            for i, unit in enumerate(self.units):
                if i in self.unrecorded:
                    items.append(partial(unit, nb))
                    continue
                rec = Recorder()
                try:
                    with lib.recording(rec):
                        unit(nb)
                except _NotRecordable:
                    items.append(partial(unit, nb))
                    continue
                items.extend(rec.items)
            prog = self.programs[key] = Program(lib.raw, _merged(items))
        return prog

    def _logits(self, nb: int) -> torch.Tensor:
        head, tp = self.head, self.comm.world_size
        if tp > 1 and nb == 1:  # one sequence: rank after rank is already the vocabulary's order
            self.comm.all_gather(self._one_out, dim=0, site=head.site, out=self._one_gathered)  # vocab-parallel: shards -> full vocab
        elif tp > 1:
            pieces = self.pieces[: tp * nb]
            self.comm.all_gather(self.lm.out[:nb], dim=0, site=head.site, out=pieces)  # vocab-parallel: shards -> full vocab
            rows = pieces.shape[1]
            self.gathered[:nb].view(nb, tp, rows).copy_(pieces.view(tp, nb, rows).transpose(0, 1))
        if head.uneven:
            torch.index_select(self.gathered[:nb], -1, head.keep, out=self.kept[:nb])
        if self.logits is not self.kept:
            self.logits[:nb].copy_(self.kept[:nb])
        return self.logits[:nb]

    @torch.inference_mode()
    def __call__(self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int] | None = None) -> torch.Tensor:
        """slots: each sequence's KV cache row (default: rows 0..nb-1)."""
        nb, b = len(tokens), self.binder
        if not 0 < nb <= self.max_batch or len(positions) != nb or (slots is not None and len(slots) != nb):
            raise ValueError(f"fused decode step: {nb} tokens, {len(positions)} positions and {nb if slots is None else len(slots)} slots for a cache of {self.max_batch} sequences")
        for i, pos in enumerate(positions):
            if not 0 <= pos < self.max_seq_len:
                raise ValueError(f"decode position {pos} is outside the KV cache (0..{self.max_seq_len - 1})")
            b.positions[i], b.lengths[i] = pos, pos + 1
        b.slots = None
        if slots is not None:
            if len(set(slots)) != nb or not all(0 <= r < self.max_batch for r in slots):
                raise ValueError(f"fused decode step: cache slots {list(slots)} are not distinct rows of 0..{self.max_batch - 1}")
            for i, r in enumerate(slots):
                b.slot_rows[i] = r
            b.slots = b.slot_rows
        self._embed(tokens)
        if self.record:
            self.program(nb)()
        else:
            for unit in self.units:
                unit(nb)
        return self._logits(nb)


def _merged(items: list[Any]) -> list[Any]:
    """Consecutive runs of ops (from neighbouring units) joined into one."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, list) and out and isinstance(out[-1], list):
            out[-1] = out[-1] + item
        else:
            out.append(item)
    return out
