"""Llama-family decoder (Llama 2/3, Mistral, Qwen2; Mixtral, Qwen2-MoE, Qwen3-MoE with
model/moe.py's expert layers; DeepSeek-V3 / Kimi K2 with those and model/mla.py's latent
attention), one tensor-parallel shard of it.

Per block: attention (column-parallel qkv, row-parallel o_proj -> 1 all-reduce) and MLP
(column-parallel merged gate/up, row-parallel down_proj -> 1 all-reduce; a MoE layer's experts
end in one all-reduce too). The embedding is vocab-parallel (1 all-reduce per step) and the LM
head ends in one all-gather of logits.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from tp_runtime import sharding
from tp_runtime.communicator import Communicator
from tp_runtime.config import ModelConfig
from tp_runtime.model.attention import ParallelAttention
from tp_runtime.model.kv_cache import KVCache
from tp_runtime.model.linear import FLOAT, LinearKinds, linear_binding_problem
from tp_runtime.model.mla import MlaAttention
from tp_runtime.model.moe import SparseMoe, bind_swiglu
from tp_runtime.model.norm import RMSNorm
from tp_runtime.model.rope import RotaryTable
from tp_runtime.model.step import StepInfo


class ParallelMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, inter_local: int, layer: int, dtype: torch.dtype, comm: Communicator, linears: LinearKinds = FLOAT) -> None:
        super().__init__()
        self.inter_local = inter_local
        self.gate_up_proj = linears.column(cfg.hidden_size, [("gate", inter_local), ("up", inter_local)], cfg.mlp_bias, dtype)
        self.down_proj = linears.row(inter_local, cfg.hidden_size, cfg.mlp_bias, dtype, comm, site=f"layer.{layer}.mlp_out")

    def forward(self, x: torch.Tensor, step: StepInfo | None = None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter_local, dim=-1)  # [batch, seq, inter_local] each
        return self.down_proj(F.silu(gate) * up)

    def retarget(self, layer: int) -> None:
        self.down_proj.site = f"layer.{layer}.mlp_out"

    def fused_problem(self) -> str | None:
        for m in (self.gate_up_proj, self.down_proj):
            if why := linear_binding_problem(m):
                return f"MLP {why}"
        return None

    def bind_decode(self, binder):
        """gate|up GEMV, SiLU(gate) * up (plus bias), down GEMV + all-reduce into binder.h."""
        return bind_swiglu(binder, self.gate_up_proj, self.inter_local, self.down_proj.bind_decode(binder, binder.h))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, heads: sharding.HeadLayout, inter_local: int, layer: int, dtype: torch.dtype, comm: Communicator, linears: LinearKinds = FLOAT,
                 expert_comm: Communicator | None = None) -> None:
        """comm: the group the dense parts are split over; expert_comm: the one the experts are
        (the same but under --attention dp, where the dense parts are whole on every rank)."""
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        attention = MlaAttention if cfg.mla is not None else ParallelAttention  # DeepSeek-V3 / Kimi K2: latent attention
        self.attn = attention(cfg, heads, layer, dtype, comm, linears)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.moe is not None and cfg.moe.sparse_layers[layer]:
            self.mlp = SparseMoe(cfg, layer, dtype, expert_comm or comm, linears)
        else:
            self.mlp = ParallelMLP(cfg, inter_local, layer, dtype, comm, linears)

    def retarget(self, layer: int) -> None:
        """Make this module act as decoder layer `layer` (a staging layer of streamed weights):
        the KV cache layer it reads and writes, and the sites its collectives are timed under."""
        self.attn.layer = layer
        self.attn.o_proj.site = f"layer.{layer}.attn_out"
        self.mlp.retarget(layer)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, step: StepInfo):
        """(block output, residual stream); the residual add is fused into the next norm."""
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        x, residual = self.post_attention_layernorm(self.attn(x, cos, sin, cache, step), residual)
        return self.mlp(x, step), residual

    def fused_problem(self) -> str | None:
        return self.attn.fused_problem() or self.mlp.fused_problem()

    def bind_decode(self, binder, first: bool):
        """The layer in the fused step, in its forward's order; the residual add is fused into
        each norm (layer 0's input is the embedding, already in the residual buffer: no add)."""
        attn, mlp = self.attn.bind_decode(binder), self.mlp.bind_decode(binder)
        norm_in = self.input_layernorm.bind_decode(binder, attn.x, add=not first)
        norm_post = self.post_attention_layernorm.bind_decode(binder, mlp.x, add=True)

        def run(nb: int) -> None:
            norm_in(nb)
            attn(nb)
            norm_post(nb)
            mlp(nb)

        return run


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: Communicator, dtype: torch.dtype, max_seq_len: int, linears: LinearKinds = FLOAT,
                 dense_comm: Communicator | None = None) -> None:
        """linears: the linear classes of the weights' format (model/linear.py FLOAT, model/quant.py INT8).
        dense_comm: a world-1 communicator for the dense parts under --attention dp (each rank
        holds them whole and runs its own sequences; only the experts use `comm`)."""
        super().__init__()
        if cfg.moe is not None and cfg.moe.data_parallel:
            if dense_comm is None or dense_comm.world_size != 1:
                raise ValueError("--attention dp: the model needs a world-1 communicator for its dense parts")
            comm, self._expert_comm = dense_comm, comm
        else:
            self._expert_comm = comm
        tp, rank = comm.world_size, comm.rank
        self.cfg = cfg
        self.heads = sharding.head_layout(cfg, tp, rank)
        lo, hi = sharding.intermediate_range(cfg, tp, rank)
        vocab_ranges = sharding.vocab_ranges(cfg, tp)
        self.embed_tokens = linears.embedding(vocab_ranges, sharding.vocab_shard_padded(cfg, tp), rank, cfg.hidden_size, dtype, comm, site="embed")
        self._layer_args = (cfg, self.heads, hi - lo)
        self._dtype, self._comm, self._linears = dtype, comm, linears
        self.layers = nn.ModuleList(self.make_layer(i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = linears.head(self.embed_tokens, vocab_ranges, cfg.tie_word_embeddings, comm, site="lm_head")
        self.rotary = RotaryTable(cfg.rope, cfg.rope_head_dim, max_seq_len)

    def make_layer(self, i: int) -> DecoderLayer:
        """A fresh decoder layer i of this shard (on the current default device)."""
        return DecoderLayer(*self._layer_args, i, self._dtype, self._comm, self._linears, self._expert_comm)

    def init_buffers(self) -> None:
        """Fill the non-persistent buffers after the meta-built model is materialised."""
        if self.cfg.tie_word_embeddings:  # materialising allocates shared parameters separately
            self.lm_head.tie_(self.embed_tokens)
        for m in self.modules():
            if m is not self and hasattr(m, "init_buffers"):
                m.init_buffers()

    @torch.inference_mode()
    def idle_pass(self) -> None:
        """--attention dp, a forward this rank has no tokens for: its (empty) part in every MoE
        layer's all-to-alls, so that the ranks that do have tokens meet it."""
        w = self.norm.weight
        x = torch.empty(0, self.cfg.hidden_size, dtype=w.dtype, device=w.device)
        for layer in self.layers:
            if not hasattr(layer, "mlp"):  # a streamed layer (model/offload.py StreamedLayer)
                layer.idle_pass(x)
            elif getattr(layer.mlp, "dispatch", False):
                layer.mlp.exchange(x)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, step: StepInfo, cache: KVCache) -> torch.Tensor:
        # ids: [batch, seq] -> logits [n, vocab] for the rows step.logit_rows of the flattened [batch*seq]
        h = self.embed_tokens(ids)  # [batch, seq, hidden]
        cos, sin = self.rotary(step.positions, h.dtype)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin, cache, step)
        h, residual = h.flatten(0, 1), residual.flatten(0, 1)
        if step.logit_rows is not None and step.logit_rows.numel() == 0:  # a mid-prompt chunk: no head (every rank alike)
            return torch.empty(0, self.cfg.vocab_size, dtype=torch.float32, device=h.device)
        if step.logit_rows is not None:  # only the rows that need logits
            h, residual = h.index_select(0, step.logit_rows), residual.index_select(0, step.logit_rows)
        h, _ = self.norm(h, residual)
        return self.lm_head(h)
