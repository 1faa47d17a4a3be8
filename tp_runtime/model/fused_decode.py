"""The decode step of one sequence on CPU as a fixed list of kernel calls on buffers allocated
once: no eager torch op and no allocation per token.

The eager model spends ~40 torch ops per layer on a decode token (norms, RoPE, views, casts,
attention, SiLU), each a few microseconds of dispatch plus a fresh tensor; on a small model
that host time is a third of the token. Here a layer is ten calls into the C kernels
(kernels/cpu_decode.py: norm, GEMV, RoPE + cache write, attention, GEMV, all-reduce, norm,
GEMV, SiLU * up, GEMV, all-reduce) with every pointer bound at build time; the collectives
are the model's own (same communicator, same sites: 2 all-reduces per layer, the embedding's
all-reduce and the LM head's all-gather per token, written into fixed buffers).

It reads the loaded model's weights and KV cache in place, so prefill (eager) and decode
share them. The numerics are the eager path's (see cpu_decode.c). Applies to one sequence
(batch 1) on CPU, float32 or bfloat16, resident layers, the kernel built; `unsupported` says
why not otherwise and the engine keeps the eager step.
"""

from __future__ import annotations

from functools import partial

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
                return "weights are column-major (--weight-layout col)"
    if not model.lm_head.weight.is_contiguous():
        return "the LM head weight is not row-major"
    return None


class _Gemv:
    """One linear layer's GEMV bound to its input and output buffers."""

    def __init__(self, lib, module: nn.Module, out: torch.Tensor, dtype: torch.dtype, ptr) -> None:
        self.out = out
        ybf = int(dtype == torch.bfloat16)
        if hasattr(module, "qweight"):
            q = module.qweight
            scales = module.scales.float()  # what the eager int8 path hands the kernel
            self.x = torch.zeros(q.shape[1], dtype=torch.float32)
            self.call = partial(lib.tp_gemv_q8, ptr(q), ptr(module.block_sums), ptr(scales), ptr(self.x), ptr(out), q.shape[1], q.shape[0], ybf)
            if self.call():  # sizes the kernel's activation buffer now, not in a token step
                raise MemoryError("int8 GEMV: the activation buffer could not be allocated")
        else:
            w = module.weight
            kind = cpu_decode.gemv_kind(w)
            self.x = torch.zeros(w.shape[1], dtype=torch.bfloat16 if kind == 2 else torch.float32)
            self.call = partial(lib.tp_gemv, ptr(w), ptr(self.x), ptr(out), w.shape[1], w.shape[0], kind, ybf)
        self.x_bf16 = int(self.x.dtype == torch.bfloat16)


class _Layer:
    """Decoder layer i's calls, in order, and its collectives' sites and biases."""

    def __init__(self, lib, layer: nn.Module, i: int, step: FusedDecodeStep, cache: KVCache) -> None:
        attn, mlp, dtype, ptr = layer.attn, layer.mlp, step.dtype, step.ptr
        mbf = int(dtype == torch.bfloat16)
        hidden = step.res.numel()
        self.qkv = _Gemv(lib, attn.qkv_proj, torch.zeros(attn.qkv_proj.out_features_local, dtype=dtype), dtype, ptr)
        self.o = _Gemv(lib, attn.o_proj, step.h, dtype, ptr)
        self.gate_up = _Gemv(lib, mlp.gate_up_proj, torch.zeros(2 * mlp.inter_local, dtype=dtype), dtype, ptr)
        self.down = _Gemv(lib, mlp.down_proj, step.h, dtype, ptr)
        norm_in, norm_post = layer.input_layernorm, layer.post_attention_layernorm
        # layer 0's input is the embedding, already in the residual buffer: no add
        self.norm_in = partial(lib.tp_rmsnorm, ptr(step.h), ptr(step.res), ptr(norm_in.weight), ptr(self.qkv.x), hidden, norm_in.eps, int(i > 0), self.qkv.x_bf16, mbf)
        self.norm_post = partial(lib.tp_rmsnorm, ptr(step.h), ptr(step.res), ptr(norm_post.weight), ptr(self.gate_up.x), hidden, norm_post.eps, 1, self.gate_up.x_bf16, mbf)
        k, v = cache.layer(attn.layer, 1)  # [1, kv_local, max_seq, hd]
        hd, nq, nkv = attn.head_dim, attn.q_heads_local, attn.kv_heads_local
        rotary = step.rotary
        # call with pos: q and k rotated, k and v into slot pos of this layer's cache
        self.rope = partial(lib.tp_qkv_rope, ptr(self.qkv.out), ptr(attn.qkv_proj.bias), ptr(rotary.cos), ptr(rotary.sin), ptr(k), ptr(v), k.stride(1), nq, nkv, hd, mbf)
        kv_map = attn.kv_head_of_q if attn._kv_of_q else None
        # call with the number of cached keys
        self.attend = partial(
            lib.tp_decode_attn, ptr(self.qkv.out), ptr(k), ptr(v), ptr(self.o.x), ptr(kv_map),
            ptr(step.scratch), step.scratch.shape[1], k.stride(1), hd**-0.5, nq, nkv, hd, self.o.x_bf16, mbf,
        )
        self.silu_mul = partial(lib.tp_silu_mul, ptr(self.gate_up.out), ptr(mlp.gate_up_proj.bias), ptr(self.down.x), mlp.inter_local, self.down.x_bf16, mbf)
        self.attn_site, self.attn_bias = attn.o_proj.site, attn.o_proj.bias
        self.mlp_site, self.mlp_bias = mlp.down_proj.site, mlp.down_proj.bias


class FusedDecodeStep:
    """step(token, pos) -> float32 logits [1, vocab] for one sequence's token at position pos,
    its k/v written to the cache; the logits tensor is the same buffer every step."""

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
        self.res = torch.zeros(cfg.hidden_size, dtype=dtype)  # the residual stream
        self.h = torch.zeros(cfg.hidden_size, dtype=dtype)  # each block's output, all-reduced in place
        self.scratch = torch.zeros(model.heads.num_q_local, cache.max_seq_len, dtype=torch.float32)  # attention scores
        self.max_seq_len = cache.max_seq_len
        self.layers = [_Layer(lib, layer, i, self, cache) for i, layer in enumerate(model.layers)]
        mbf = int(dtype == torch.bfloat16)
        w = self.head.weight
        self.lm = _Gemv(lib, self.head, torch.zeros(1, w.shape[0], dtype=dtype), dtype, self.ptr)
        self.norm = partial(lib.tp_rmsnorm, self.ptr(self.h), self.ptr(self.res), self.ptr(model.norm.weight), self.ptr(self.lm.x), cfg.hidden_size, model.norm.eps, 1, self.lm.x_bf16, mbf)
        self.gathered = torch.zeros(1, self.comm.world_size * w.shape[0], dtype=dtype)
        self.kept = torch.zeros(1, cfg.vocab_size, dtype=dtype) if self.head.uneven else self.gathered
        self.logits = self.kept if dtype == torch.float32 else torch.zeros(1, cfg.vocab_size, dtype=torch.float32)

    def ptr(self, t: torch.Tensor | None) -> int | None:
        """t's address for a bound call (None for no tensor); t stays alive as long as this step."""
        if t is None:
            return None
        self._bound.append(t)
        return t.data_ptr()

    def _embed(self, token: int) -> None:
        e = self.embed
        if e.vocab_start <= token < e.vocab_stop:
            self.res.copy_(e.weight[token - e.vocab_start])
        else:
            self.res.zero_()
        if e.split:
            self.comm.all_reduce(self.res, site=e.site)  # vocab-parallel: one rank holds the row

    def _reduce(self, site: str, bias: torch.Tensor | None) -> None:
        self.comm.all_reduce(self.h, site=site)  # row-parallel: partial sums -> full output
        if bias is not None:
            self.h.add_(bias)

    @torch.inference_mode()
    def __call__(self, token: int, pos: int) -> torch.Tensor:
        if not 0 <= pos < self.max_seq_len:
            raise ValueError(f"decode position {pos} is outside the KV cache (0..{self.max_seq_len - 1})")
        self._embed(token)
        for layer in self.layers:
            layer.norm_in()
            layer.qkv.call()
            layer.rope(pos)
            layer.attend(pos + 1)
            layer.o.call()
            self._reduce(layer.attn_site, layer.attn_bias)
            layer.norm_post()
            layer.gate_up.call()
            layer.silu_mul()
            layer.down.call()
            self._reduce(layer.mlp_site, layer.mlp_bias)
        self.norm()
        self.lm.call()
        head = self.head
        self.comm.all_gather(self.lm.out, dim=-1, site=head.site, out=self.gathered)  # vocab-parallel: shards -> full vocab
        if head.uneven:
            torch.index_select(self.gathered, -1, head.keep, out=self.kept)
        if self.logits is not self.kept:
            self.logits.copy_(self.kept)
        return self.logits
