"""The decode step on CPU as a fixed list of kernel calls on buffers allocated
once: no eager torch op and no allocation per token.

The eager model spends ~40 torch ops per layer on a decode token (norms, RoPE, views, casts,
attention, SiLU), each a few microseconds of dispatch plus a fresh tensor; on a small model
that host time is a third of the token. Here a layer is ten calls into the C kernels
(kernels/cpu_decode.py: norm, GEMV, RoPE + cache write, attention, GEMV, all-reduce, norm,
GEMV, SiLU * up, GEMV, all-reduce) with every pointer bound at build time; the collectives
are the model's own (same communicator, same sites: 2 all-reduces per layer and the LM head's
all-gather per token, written into fixed buffers; the vocab-parallel embedding's all-reduce
too, unless the engine hands the step the whole embedding table to look rows up in).

It reads the loaded model's weights and KV cache in place, so prefill (eager) and decode
share them, and decodes any number of sequences up to the cache's batch, each at its own
position: a GEMV reads a tile of weight rows once for all of them. The numerics are the eager
path's (see cpu_decode.c). Applies on CPU, float32 or bfloat16, resident layers, the kernel
built; `unsupported` says why not otherwise and the engine keeps the eager step.
"""

from __future__ import annotations

import ctypes
from functools import partial
from typing import Sequence

import torch
from torch import nn

from tp_runtime.kernels import cpu_decode, cpu_gemv
from tp_runtime.model.kv_cache import KVCache
from tp_runtime.model.linear import ColumnParallelLinear, RowParallelLinear
from tp_runtime.model.quant import Int8ColumnParallelLinear, Int8RowParallelLinear

_LINEARS = (ColumnParallelLinear, RowParallelLinear, Int8ColumnParallelLinear, Int8RowParallelLinear)


def unsupported_setup(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fused step cannot run on this device at this dtype (known before loading), or None."""
    if device.type != "cpu":
        return f"it runs on CPU (this model is on {device})"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"it takes float32 and bfloat16 models, not {str(dtype).removeprefix('torch.')}"
    if cpu_decode.lib() is None:
        return "the CPU kernel is not loaded (no C compiler, see the warning above; or a forked process)"
    return None


def unsupported(model: nn.Module, device: torch.device) -> str | None:
    """Why the fused step cannot run this loaded model here, or None."""
    why = unsupported_setup(device, model.norm.weight.dtype)
    if why:
        return why
    if model.cfg.head_dim > 1024 or model.cfg.head_dim % 2:
        return f"takes even head sizes up to 1024, not {model.cfg.head_dim}"
    for i, layer in enumerate(model.layers):
        linears = [layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj] if hasattr(layer, "attn") else []
        if not linears:
            return f"layer {i} is streamed (not resident)"
        for m in linears:
            if not isinstance(m, _LINEARS):
                return f"layer {i} has a {type(m).__name__}"
            if isinstance(m, (Int8ColumnParallelLinear, Int8RowParallelLinear)):
                if m.block_sums is None or not cpu_gemv.has_int8_dot():
                    return "int8 layers need AVX512-VNNI and input sizes divisible by 64"
            elif not m.weight.is_contiguous():
                return f"layer {i}'s {type(m).__name__} weight is not row-major"
    if not model.lm_head.weight.is_contiguous():
        return "the LM head weight is not row-major"
    return None


class _Gemv:
    """One linear layer's GEMV bound to its input and output buffers ([max batch, *] each);
    call(nb) multiplies the first nb rows."""

    def __init__(self, lib, module: nn.Module, out: torch.Tensor, dtype: torch.dtype, ptr) -> None:
        self.out = out
        ybf = int(dtype == torch.bfloat16)
        rows = out.shape[0]
        if hasattr(module, "qweight"):
            q = module.qweight
            scales = module.scales.float()  # what the eager int8 path hands the kernel
            self.x = torch.zeros(rows, q.shape[1], dtype=torch.float32)
            self.call = partial(lib.tp_gemv_q8, ptr(q), ptr(module.block_sums), ptr(scales), ptr(self.x), ptr(out), q.shape[1], q.shape[0], ybf)
            if self.call(rows):  # sizes the kernel's activation buffer now, not in a token step
                raise MemoryError("int8 GEMV: the activation buffer could not be allocated")
        else:
            w = module.weight
            kind = cpu_decode.gemv_kind(w)
            self.x = torch.zeros(rows, w.shape[1], dtype=torch.bfloat16 if kind == 2 else torch.float32)
            self.call = partial(lib.tp_gemv, ptr(w), ptr(self.x), ptr(out), w.shape[1], w.shape[0], kind, ybf)
        self.x_bf16 = int(self.x.dtype == torch.bfloat16)


class _Layer:
    """Decoder layer i's calls, in order, and its collectives' sites and biases. Every call takes
    the number of sequences nb as its last argument."""

    def __init__(self, lib, layer: nn.Module, i: int, step: FusedDecodeStep, cache: KVCache) -> None:
        attn, mlp, dtype, ptr = layer.attn, layer.mlp, step.dtype, step.ptr
        mbf = int(dtype == torch.bfloat16)
        rows, hidden = step.res.shape
        self.qkv = _Gemv(lib, attn.qkv_proj, torch.zeros(rows, attn.qkv_proj.out_features_local, dtype=dtype), dtype, ptr)
        self.o = _Gemv(lib, attn.o_proj, step.h, dtype, ptr)
        self.gate_up = _Gemv(lib, mlp.gate_up_proj, torch.zeros(rows, 2 * mlp.inter_local, dtype=dtype), dtype, ptr)
        self.down = _Gemv(lib, mlp.down_proj, step.h, dtype, ptr)
        norm_in, norm_post = layer.input_layernorm, layer.post_attention_layernorm
        # layer 0's input is the embedding, already in the residual buffer: no add
        self.norm_in = partial(lib.tp_rmsnorm, ptr(step.h), ptr(step.res), ptr(norm_in.weight), ptr(self.qkv.x), hidden, norm_in.eps, int(i > 0), self.qkv.x_bf16, mbf)
        self.norm_post = partial(lib.tp_rmsnorm, ptr(step.h), ptr(step.res), ptr(norm_post.weight), ptr(self.gate_up.x), hidden, norm_post.eps, 1, self.gate_up.x_bf16, mbf)
        k, v = cache.layer(attn.layer, rows)  # [rows, kv_local, max_seq, hd]
        hd, nq, nkv = attn.head_dim, attn.q_heads_local, attn.kv_heads_local
        rotary = step.rotary
        # q and k rotated at each sequence's position (step.positions), k and v into that slot
        self.rope = partial(
            lib.tp_qkv_rope, ptr(self.qkv.out), ptr(attn.qkv_proj.bias), ptr(rotary.cos), ptr(rotary.sin), ptr(k), ptr(v), k.stride(1), k.stride(0), nq, nkv, hd, mbf,
        )
        kv_map = attn.kv_head_of_q if attn._kv_of_q else None
        # each sequence over its first step.lengths[b] cached keys
        self.attend = partial(
            lib.tp_decode_attn, ptr(self.qkv.out), self.qkv.out.shape[1], ptr(k), ptr(v), ptr(self.o.x), ptr(kv_map),
            ptr(step.scratch), step.scratch.shape[1], k.stride(1), k.stride(0), hd**-0.5, nq, nkv, hd, self.o.x_bf16, mbf,
        )
        self.silu_mul = partial(lib.tp_silu_mul, ptr(self.gate_up.out), ptr(mlp.gate_up_proj.bias), ptr(self.down.x), mlp.inter_local, self.down.x_bf16, mbf)
        self.attn_site, self.attn_bias = attn.o_proj.site, attn.o_proj.bias
        self.mlp_site, self.mlp_bias = mlp.down_proj.site, mlp.down_proj.bias


class FusedDecodeStep:
    """step(tokens, positions) -> float32 logits [nb, vocab] for nb <= the cache's batch
    sequences, sequence b's token at position positions[b] (its k/v written to that cache slot,
    its attention over the slots up to it). The logits are a view of the same buffer every step."""

    # the whole [vocab, hidden] embedding (any float dtype, e.g. a view of the mapped checkpoint),
    # set by the engine when every rank has one: each rank then looks a token's row up itself,
    # and a step issues no embedding all-reduce (2 all-reduces per layer + 1 all-gather per token)
    embedding_table: torch.Tensor | None = None

    def __init__(self, model: nn.Module, cache: KVCache) -> None:
        why = unsupported(model, cache.k.device)
        if why:
            raise ValueError(f"fused decode step: {why}")
        lib = cpu_decode.lib()
        cfg = model.cfg
        self._bound: list[torch.Tensor] = []  # every tensor whose address a call holds, kept alive here
        self.dtype = dtype = model.norm.weight.dtype
        self.comm = model.embed_tokens.comm
        self.embed, self.head = model.embed_tokens, model.lm_head
        self.rotary = model.rotary
        rows = self.max_batch = cache.max_batch
        self.max_seq_len = cache.max_seq_len
        self.res = torch.zeros(rows, cfg.hidden_size, dtype=dtype)  # the residual stream
        self.h = torch.zeros(rows, cfg.hidden_size, dtype=dtype)  # each block's output, all-reduced in place
        self.scratch = torch.zeros(rows * model.heads.num_q_local, cache.max_seq_len, dtype=torch.float32)  # attention scores
        # per-sequence positions and key counts, read by the bound calls (filled every step)
        self.positions, self.lengths = (ctypes.c_int64 * rows)(), (ctypes.c_int64 * rows)()
        self.layers = [_Layer(lib, layer, i, self, cache) for i, layer in enumerate(model.layers)]
        mbf = int(dtype == torch.bfloat16)
        w = self.head.weight
        tp = self.comm.world_size
        self.lm = _Gemv(lib, self.head, torch.zeros(rows, w.shape[0], dtype=dtype), dtype, self.ptr)
        self.norm = partial(lib.tp_rmsnorm, self.ptr(self.h), self.ptr(self.res), self.ptr(model.norm.weight), self.ptr(self.lm.x), cfg.hidden_size, model.norm.eps, 1, self.lm.x_bf16, mbf)
        self.pieces = torch.zeros(tp * rows, w.shape[0], dtype=dtype)  # the ranks' logits, rank after rank
        self.gathered = torch.zeros(rows, tp * w.shape[0], dtype=dtype)  # ... and sequence after sequence
        self.kept = torch.zeros(rows, cfg.vocab_size, dtype=dtype) if self.head.uneven else self.gathered
        self.logits = self.kept if dtype == torch.float32 else torch.zeros(rows, cfg.vocab_size, dtype=torch.float32)

    def ptr(self, t: torch.Tensor | None) -> int | None:
        """t's address for a bound call (None for no tensor); t stays alive as long as this step."""
        if t is None:
            return None
        self._bound.append(t)
        return t.data_ptr()

    def _embed(self, tokens: Sequence[int]) -> None:
        if self.embedding_table is not None:  # every rank has every row: no collective
            for b, token in enumerate(tokens):
                self.res[b].copy_(self.embedding_table[token])
            return
        e = self.embed
        for b, token in enumerate(tokens):
            if e.vocab_start <= token < e.vocab_stop:
                self.res[b].copy_(e.weight[token - e.vocab_start])
            else:
                self.res[b].zero_()
        if e.split:
            self.comm.all_reduce(self.res[: len(tokens)], site=e.site)  # vocab-parallel: one rank holds each row

    def _reduce(self, nb: int, site: str, bias: torch.Tensor | None) -> None:
        h = self.h[:nb]
        self.comm.all_reduce(h, site=site)  # row-parallel: partial sums -> full output
        if bias is not None:
            h.add_(bias)

    def _logits(self, nb: int) -> torch.Tensor:
        head, tp = self.head, self.comm.world_size
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
    def __call__(self, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        nb = len(tokens)
        if not 0 < nb <= self.max_batch or len(positions) != nb:
            raise ValueError(f"fused decode step: {nb} tokens and {len(positions)} positions for a cache of {self.max_batch} sequences")
        for b, pos in enumerate(positions):
            if not 0 <= pos < self.max_seq_len:
                raise ValueError(f"decode position {pos} is outside the KV cache (0..{self.max_seq_len - 1})")
            self.positions[b], self.lengths[b] = pos, pos + 1
        self._embed(tokens)
        for layer in self.layers:
            layer.norm_in(nb)
            layer.qkv.call(nb)
            layer.rope(nb, self.positions)
            layer.attend(nb, self.lengths)
            layer.o.call(nb)
            self._reduce(nb, layer.attn_site, layer.attn_bias)
            layer.norm_post(nb)
            layer.gate_up.call(nb)
            layer.silu_mul(nb)
            layer.down.call(nb)
            self._reduce(nb, layer.mlp_site, layer.mlp_bias)
        self.norm(nb)
        self.lm.call(nb)
        return self._logits(nb)
