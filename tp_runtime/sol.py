"""Speed-of-light model: single-stream decode time versus parallelism and link latency.

Pure Python (math, json, os); it imports only tp_runtime.config and tp_runtime.errors, so the
bench sweep, the CLI and the tests can all call it without torch.

The model, for one decode step of `batch` sequences on p chips:

    seconds_per_token = max(memory_s, compute_s) + comm_s
    memory_s  = bytes the busiest chip reads        / mem_bandwidth
    compute_s = FLOPs the busiest chip performs     / peak_flops
    comm_s    = sum over the collectives of one step:  steps(kind, algorithm, p) * alpha
                                                     + bytes / link_bandwidth
    tokens_per_s = batch / seconds_per_token         (= 1 / seconds_per_token at batch 1)

Assumptions, all of them deliberate (speed of light: every choice is the optimistic one
unless the structure of the model forbids it):

Weights and memory traffic
- Decode reads every weight it uses once per step, from device memory (no cache reuse across
  steps). The embedding table is not read whole: a step reads one row per sequence. The LM head
  is read whole (with tied embeddings, the embedding table is read as the LM head).
- Under tensor parallelism (TP) every weight matrix is split evenly over the p chips: the
  bytes and FLOPs of the weights divide by p (but for the non-routed weights under
  parallel="dp", see Mixture of experts). Norm vectors (replicated in the runtime) are
  counted as split too: they are < 0.01% of the bytes. Attention heads are not a limit on the
  weight split (a projection can be split on any dimension); they do limit the KV cache and the
  attention arithmetic, see below.
- KV cache: GQA stores 2 x kv_heads x head_dim values per token and layer; TP splits it over at
  most kv_heads chips (beyond that a kv head is replicated on the chips whose q heads read it,
  as tp_runtime.sharding does). MLA stores one latent of kv_lora_rank + qk_rope_head_dim values
  per token and layer that every head reads: TP cannot split it, so every chip reads all of it
  (splitting it by sequence would need one more collective per layer; not modelled).
  `context_len` is the number of cached positions the step attends to; it is also what the
  capacity check stores.
- Attention arithmetic per token: GQA 4 x heads x head_dim x context per layer (QK^T and PV);
  MLA in the weight-absorbed decode form 2 x heads x context x (2 x kv_lora_rank +
  qk_rope_head_dim) per layer. It splits over at most `heads` chips.
- Matmul FLOPs are 2 per weight used per token.
- Mixture of experts: at batch b the number of distinct routed experts a layer uses is
  a = E x (1 - (1 - k/E)^b) (exactly k at batch 1; uniform routing). Three parallel modes, the
  runtime's (RuntimeConfig(moe=..., attention=...), `--moe tp|ep --attention tp|dp`):
  * parallel="tp" (`--moe tp`): every expert is split over all p chips (expert-internal TP); the
    busiest chip reads a/p of the routed bytes, like a dense model.
  * parallel="ep" (`--moe ep`, attention still TP): whole experts are spread over the chips (E/p
    each; when p > E each expert is itself split over p/E chips: the model's extrapolation, the
    runtime refuses more ranks than experts). A chip reads only the active experts it holds,
    and the active experts are placed as evenly as possible (best case, not typical routing):
    the busiest chip reads max(a/p, min(1, E/p)) experts' bytes per MoE layer. So between k and
    E chips the routed read stops shrinking at one whole expert per layer. Shared experts,
    dense layers and attention stay TP-split over all p chips. Routed FLOPs on the busiest
    chip: 2 x expert_params x b x k x max(1/p, min(1, E/p)/a).
  * parallel="dp" (`--moe ep --attention dp`, the DeepSeek / Kimi serving layout): every
    non-routed weight (attention, embedding, LM head, dense MLPs, shared experts) is whole on
    every chip and each chip runs its own sequences (the busiest ceil(b/p) of them): it reads
    all of those weights, attends over its own sequences' KV cache with every head (nothing of
    the cache or the attention arithmetic splits), and multiplies them for its ceil(b/p)
    sequences. The routed experts are whole per chip as under "ep", reading and multiplying as
    there for the whole group's b tokens (a from b, not from b/p). Stored per chip: every
    non-routed weight, 1/p of the routed ones, the KV cache of its own sequences.
  * Under this model "ep" never beats "tp" (the same collectives, never fewer bytes): what it
    buys (whole-expert GEMMs instead of thin slices of every expert, which a real chip runs
    far below its peak) is outside it. "dp" trades the whole non-routed read on every chip for
    fewer collectives (3 per MoE layer + 1 against 2 per layer + 2): it wins where they
    dominate.
  * parallel="auto" (the default, and what `tp-bench sol` draws unless --parallel says
    otherwise): "ep" for a MoE model, "tp" for a dense one. For Kimi K2.5's single-user figure
    "ep" is the layout a low-latency deployment runs (attention TP, experts whole): "tp" reads
    fewer bytes here only by slicing every expert into p pieces (one feature per chip at 2048
    chips), a GEMM no chip runs near its peak; "dp" has every chip read all 21 GB of non-routed
    weights for its one sequence (< 160 tok/s on an H100 whatever p). `tp-bench sol` prints
    every mode's tokens/s beside the drawn one at each point.
  * Routed experts may be stored at their own precision (`expert_bytes_per_param`, e.g. the
    INT4 experts Kimi K2.5 ships); group-quantisation scales are not counted.

Collectives (what this runtime issues; see tp_runtime/model/ and tp_runtime/engine/engine.py)
- p = 1: none (every mode).
- parallel="tp" and "ep", per step: 1 all-reduce after the vocab-parallel embedding lookup
  ("embed"), per layer 2 all-reduces (after o_proj "attn_out" and after the MLP "mlp_out": a
  dense MLP's down_proj, or a MoE layer's combine of its experts' partial sums and the
  TP-split shared expert), and 1 all-gather of the vocab-parallel logits ("lm_head"). That is
  2 x layers + 2 collectives; 2 x layers + 1 with `embedding_all_reduce=False` (every chip looks
  the token's row up in the whole table itself: the runtime's fused CPU decode step, dense or
  MoE, reads it from the mapped checkpoint; the eager step all-reduces). The two modes differ
  only in what a chip reads and multiplies, not in what it sends.
- parallel="dp", per step: 1 all-gather ("dp.step": each chip's sampled tokens, one int64
  per sequence slot of the batch, so that every chip holds every sequence as it is) and,
  per MoE layer, 3 all-to-alls: "moe_counts" (each chip's per-expert token counts to the
  experts' chips, int64), "moe_dispatch" (each routed token's hidden state to its expert's
  chip) and "moe_combine" (the expert outputs back). No all-reduce, no logit all-gather (each
  chip samples its own sequences from its whole LM head). A chip with no sequence still takes
  part in every all-to-all (empty), so the counts do not depend on b.
- Bytes of each collective (per link, what one chip sends): one hidden vector per sequence
  (hidden x act_bytes x b) for the all-reduces; the whole logit row (vocab x logit_bytes x b;
  the runtime gathers float32 logits) for the "lm_head" all-gather; under "dp", for the
  dispatch and the combine, the busiest chip's routed rows that leave it: ceil(b/p) x k x
  hidden x act_bytes x (p-1)/p (uniform routing: 1/p of them stay on the chip), for
  "moe_counts" 8 x E x (p-1)/p and for "dp.step" 8 x b x p. It matters at small models and slow
  links.
- Time of one collective: steps x alpha + bytes / link_bandwidth. The bandwidth term is the
  message size over the link, the lower bound of every algorithm: ring's 2(p-1)/p factor and
  one-shot's (p-1)-fold fan-in (unless the switch reduces in-network, as NVLink SHARP does)
  are not charged. At batch 1 this term is small next to alpha on NVLink / InfiniBand.
  `links={kind: Link}` gives one kind of collective its own alpha and bandwidth (e.g. the
  all-to-all at this machine's measured figures, `tp-bench sol --a2a-link measured`); the
  swept alpha then applies to the other kinds only.
- Steps per algorithm, p > 1:
      all-reduce   ring 2(p-1)   tree 2 ceil(log2 p)   oneshot 1
      all-gather   ring  (p-1)   tree   ceil(log2 p)   oneshot 1
      all-to-all   ring  (p-1)   tree   ceil(log2 p)   oneshot 1
  "tree" is recursive doubling (Bruck for the all-to-all); "oneshot" sends every message
  directly and at once (all in flight in one step). alpha is the latency of one step: for a
  one-shot collective, the whole collective's fixed cost.
- No overlap of communication with memory traffic or compute (decode at batch 1 has no
  independent work to overlap with), no kernel launch or framework overhead, no pipeline
  parallelism.

Capacity
- shard_bytes = all stored weight bytes / p + the KV cache of `context_len` x batch positions
  on the chip (split as above); under "dp" every non-routed weight whole + the routed ones / p +
  the KV cache of the chip's own ceil(b/p) sequences. A point fits when shard_bytes <=
  memory_bytes (no headroom for activations or the runtime is reserved).

Presets carry their sources in comments. Calibrated presets (`tp-bench calibrate`) are JSON
files in $XDG_CACHE_HOME/tp-runtime/presets (default ~/.cache/tp-runtime/presets); a file
there wins over a built-in preset of the same name.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from tp_runtime.errors import ConfigError

if TYPE_CHECKING:  # annotation only: sol stays importable without building a config
    from tp_runtime.config import ModelConfig

ALGORITHMS = ("ring", "tree", "oneshot")
PARALLEL = ("tp", "ep", "dp")  # dp: --moe ep --attention dp
KINDS = ("all_reduce", "all_gather", "all_to_all")

GB = 1e9
GiB = 2**30

# ---------------------------------------------------------------------------------------------
# what the model is made of


@dataclass(frozen=True)
class Hardware:
    """One chip: memory bandwidth (bytes/s), peak dense FLOP/s at the weights' precision, memory."""

    name: str
    mem_bandwidth_Bps: float
    peak_flops: float
    memory_bytes: float
    source: str = ""


@dataclass(frozen=True)
class Link:
    """The interconnect: alpha = latency of one collective step (s), bandwidth per chip per
    direction (bytes/s)."""

    name: str
    alpha_s: float
    bandwidth_Bps: float
    source: str = ""


@dataclass(frozen=True)
class ModelShape:
    """Every number the model needs. Build with `dense(...)`, `from_config(cfg)` or directly.

    MoE fields are zero for a dense model. `dense_layers` is the number of leading layers that
    use the dense MLP (DeepSeek's first_k_dense_replace); it is ignored when experts == 0.
    """

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    bytes_per_param: float = 2.0
    tie_word_embeddings: bool = False
    attention: str = "gqa"  # "gqa" | "mla"
    # MLA (DeepSeek-V2/V3 naming)
    q_lora_rank: int = 0  # 0: q is a plain hidden -> heads x (nope + rope) projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # MoE
    experts: int = 0
    active_experts: int = 0
    shared_experts: float = 0  # the shared expert's size in routed experts (Qwen2-MoE's need not be whole)
    expert_intermediate: int = 0
    dense_layers: int = 0
    expert_bytes_per_param: float | None = None  # None: bytes_per_param
    kv_bytes: float = 2.0  # bytes per cached KV value
    source: str = ""

    def __post_init__(self) -> None:
        where = f"model shape {self.name!r}"
        for f in ("layers", "hidden", "heads", "vocab"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{where}: {f} must be positive, got {getattr(self, f)}")
        if self.attention not in ("gqa", "mla"):
            raise ConfigError(f"{where}: attention must be 'gqa' or 'mla', got {self.attention!r}")
        if self.attention == "gqa" and (self.kv_heads < 1 or self.head_dim < 1):
            raise ConfigError(f"{where}: GQA needs kv_heads and head_dim >= 1")
        if self.attention == "mla" and (self.kv_lora_rank < 1 or self.v_head_dim < 1 or self.qk_nope_head_dim + self.qk_rope_head_dim < 1):
            raise ConfigError(f"{where}: MLA needs kv_lora_rank, qk_nope/rope head dims and v_head_dim")
        if self.experts:
            if not 1 <= self.active_experts <= self.experts or self.expert_intermediate < 1:
                raise ConfigError(f"{where}: MoE needs 1 <= active_experts <= experts and expert_intermediate >= 1")
            if not 0 <= self.dense_layers <= self.layers:
                raise ConfigError(f"{where}: dense_layers {self.dense_layers} is outside 0..{self.layers}")
        if self.bytes_per_param <= 0 or (self.expert_bytes_per_param is not None and self.expert_bytes_per_param <= 0):
            raise ConfigError(f"{where}: bytes per parameter must be positive")

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def dense(
        cls,
        name: str,
        *,
        layers: int,
        hidden: int,
        heads: int,
        kv_heads: int | None = None,
        intermediate: int,
        vocab: int,
        head_dim: int | None = None,
        bytes_per_param: float = 2.0,
        tie_word_embeddings: bool = False,
        source: str = "",
    ) -> ModelShape:
        """A Llama-style dense decoder from its explicit numbers (head_dim defaults to hidden/heads)."""
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"model shape {name!r}: hidden {hidden} is not a multiple of heads {heads}; give head_dim")
            head_dim = hidden // heads
        return cls(
            name=name, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads or heads, head_dim=head_dim,
            intermediate=intermediate, vocab=vocab, bytes_per_param=bytes_per_param,
            tie_word_embeddings=tie_word_embeddings, source=source,
        )

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, bytes_per_param: float | None = None, name: str | None = None) -> ModelShape:
        """The shape of a checkpoint this runtime loads: Llama family (GQA), mixture-of-experts
        (Mixtral, Qwen-MoE: routed experts, a shared expert counted in routed experts' sizes, a
        fraction where it is no multiple of one), MLA (DeepSeek-V3 / Kimi K2).

        Bytes per parameter: the given value, else the checkpoint dtype's (float32 4, 16-bit 2).
        Biases (qwen2's qkv), a router's correction bias and a shared expert's gate vector are
        not counted (ModelConfig.num_params counts the last two: E and hidden values a layer).
        A MoE config's dense layers are counted as `dense_layers` wherever they sit (only their
        number matters here). MLA's KV cache is counted as the latent the model describes; this
        runtime caches each head's full key and value (docs/ARCHITECTURE.md), many times more.
        """
        if bytes_per_param is None:
            bytes_per_param = 4.0 if cfg.checkpoint_dtype == "float32" else 2.0
        kw: dict[str, Any] = {}
        moe = cfg.moe
        if moe is not None:
            shared = moe.shared_intermediate_size / moe.intermediate_size
            kw.update(experts=moe.num_experts, active_experts=moe.top_k, shared_experts=shared, expert_intermediate=moe.intermediate_size,
                      dense_layers=sum(1 for sparse in moe.sparse_layers if not sparse))
        mla = getattr(cfg, "mla", None)
        if mla is not None:
            kw.update(attention="mla", q_lora_rank=mla.q_lora_rank or 0, kv_lora_rank=mla.kv_lora_rank, qk_nope_head_dim=mla.qk_nope_head_dim,
                      qk_rope_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim)
        return cls(
            name=name or cfg.architecture, layers=cfg.num_layers, hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, intermediate=cfg.intermediate_size, vocab=cfg.vocab_size,
            bytes_per_param=bytes_per_param, tie_word_embeddings=cfg.tie_word_embeddings,
            source="ModelConfig", **kw,
        )

    # -- parameter counts ---------------------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.is_moe else 0

    @property
    def num_dense_mlp_layers(self) -> int:
        return self.dense_layers if self.is_moe else self.layers

    @property
    def attention_params(self) -> int:
        """Per layer, norms inside the attention (MLA's q/kv latent norms) included."""
        h = self.hidden
        if self.attention == "gqa":
            q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
            return h * (q + 2 * kv) + q * h
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.q_lora_rank:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.heads * qk
        else:
            q = h * self.heads * qk
        kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv_b = self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim)
        o = self.heads * self.v_head_dim * h
        return q + kv_a + kv_b + o

    @property
    def expert_params(self) -> int:
        """One routed (or shared) expert: gate, up and down projections."""
        return 3 * self.hidden * self.expert_intermediate

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def routed_params(self) -> int:
        return self.moe_layers * self.experts * self.expert_params

    @property
    def params_total(self) -> int:
        h = self.hidden
        per_layer = self.attention_params + 2 * h
        total = self.layers * per_layer + self.num_dense_mlp_layers * 3 * h * self.intermediate
        total += self.moe_layers * (self.experts * h + self.shared_experts * self.expert_params) + self.routed_params
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + total + h + head

    @property
    def params_active(self) -> int:
        """Parameters one token uses (all but the routed experts it does not pick)."""
        return self.params_total - self.moe_layers * (self.experts - self.active_experts) * self.expert_params

    @property
    def expert_bpp(self) -> float:
        return self.bytes_per_param if self.expert_bytes_per_param is None else self.expert_bytes_per_param

    @property
    def weight_bytes(self) -> float:
        """Every stored weight byte."""
        return (self.params_total - self.routed_params) * self.bytes_per_param + self.routed_params * self.expert_bpp

    # -- per-step traffic (whole model, one chip) ---------------------------------------------

    def distinct_experts(self, batch: int = 1) -> float:
        """Expected distinct routed experts one MoE layer uses for `batch` tokens (uniform routing)."""
        if not self.is_moe:
            return 0.0
        e, k = self.experts, self.active_experts
        if batch == 1:
            return float(k)  # exactly, not through the rounding of the formula
        return e * (1.0 - (1.0 - k / e) ** batch)

    def nonrouted_read_bytes(self, batch: int = 1) -> float:
        """Bytes of non-routed weights one decode step reads: all of them but the embedding
        table, of which one row per sequence (the LM head reads it whole when tied)."""
        params = self.params_total - self.routed_params - self.embedding_params
        if self.tie_word_embeddings:
            params += self.embedding_params  # the LM head is the embedding table
        rows = min(batch, self.vocab) * self.hidden
        return (params + rows) * self.bytes_per_param

    def nonrouted_matmul_params(self) -> int:
        params = self.params_total - self.routed_params - self.embedding_params
        return params + (self.embedding_params if self.tie_word_embeddings else 0)

    @property
    def kv_values_per_token(self) -> int:
        """Cached values per token and layer."""
        if self.attention == "gqa":
            return 2 * self.kv_heads * self.head_dim
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def kv_max_shards(self) -> int:
        """How many chips the KV cache can be split over by TP (MLA's latent: one)."""
        return self.kv_heads if self.attention == "gqa" else 1

    def kv_bytes_total(self, context_len: int, batch: int = 1) -> float:
        return self.layers * self.kv_values_per_token * self.kv_bytes * context_len * batch

    def attention_flops(self, context_len: int, batch: int = 1) -> float:
        if self.attention == "gqa":
            per = 4 * self.heads * self.head_dim
        else:
            per = 2 * self.heads * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        return float(self.layers * per * context_len * batch)

    def decode_bytes(self, context_len: int = 0, batch: int = 1) -> float:
        """Bytes one decode step reads on one chip (weights used + KV cache)."""
        routed = self.moe_layers * self.distinct_experts(batch) * self.expert_params * self.expert_bpp
        return self.nonrouted_read_bytes(batch) + routed + self.kv_bytes_total(context_len, batch)

    def decode_flops(self, context_len: int = 0, batch: int = 1) -> float:
        """FLOPs of one decode step on one chip."""
        routed = self.moe_layers * self.active_experts * self.expert_params
        return 2.0 * batch * (self.nonrouted_matmul_params() + routed) + self.attention_flops(context_len, batch)

    def summary(self) -> str:
        kind = f"MoE {self.experts}x{self.active_experts} active" if self.is_moe else "dense"
        return (
            f"{self.name}: {kind}, {self.layers} layers, hidden {self.hidden}, {self.attention.upper()}, "
            f"{self.params_total / 1e9:.1f}B params ({self.params_active / 1e9:.1f}B active), "
            f"{self.weight_bytes / GB:.1f} GB of weights"
        )


# ---------------------------------------------------------------------------------------------
# presets: every number from a cited source (or marked as an assumption)

HARDWARE: dict[str, Hardware] = {
    # NVIDIA H100 SXM5 80GB datasheet: HBM3 3.35 TB/s; BF16 Tensor Core 1,979 TFLOPS *with
    # sparsity* -> 989 TFLOPS dense; 80 GB.
    "h100": Hardware("H100 SXM", 3.35e12, 989e12, 80e9, "NVIDIA H100 datasheet (SXM5): 3.35 TB/s, 989 TFLOP/s dense BF16, 80 GB"),
    # NVIDIA H200 SXM datasheet: HBM3e 4.8 TB/s, 141 GB; same Hopper tensor cores as H100 SXM
    # (1,979 TFLOPS BF16 with sparsity -> 989 dense).
    "h200": Hardware("H200 SXM", 4.8e12, 989e12, 141e9, "NVIDIA H200 datasheet: 4.8 TB/s, 989 TFLOP/s dense BF16, 141 GB"),
    # NVIDIA A100 80GB SXM datasheet: HBM2e 2,039 GB/s; BF16 Tensor Core 312 TFLOPS (dense).
    "a100": Hardware("A100 80GB SXM", 2.039e12, 312e12, 80e9, "NVIDIA A100 datasheet (80GB SXM): 2,039 GB/s, 312 TFLOP/s dense BF16, 80 GB"),
    # NVIDIA Ada (AD102) whitepaper, GeForce RTX 4090: 1,008 GB/s GDDR6X; "Peak BF16 Tensor
    # TFLOPS with FP32 Accumulate" 165.2 dense (330.4 with sparsity); 24 GB.
    "rtx4090": Hardware("RTX 4090", 1.008e12, 165.2e12, 24e9, "NVIDIA Ada whitepaper: 1,008 GB/s, 165.2 TFLOP/s BF16 w/ FP32 acc. dense, 24 GB"),
    # shared/MEASURED.md (2 vCPU EPYC Zen 4, measured 2026-11-23): ~34 GB/s read with 2
    # threads; fp32 GEMM ~155 GFLOP/s (the runtime computes in fp32 on CPU); 24 GiB. A
    # `tp-bench calibrate` run saves "this-cpu" to the cache folder, which then wins.
    "this-cpu": Hardware("this CPU (MEASURED.md)", 34e9, 155e9, 24 * GiB, "shared/MEASURED.md: 34 GB/s read (2 threads), fp32 GEMM 155 GFLOP/s, 24 GiB"),
}

LINKS: dict[str, Link] = {
    # NVLink 4 (H100 SXM): 18 links, 900 GB/s bidirectional per GPU -> 450 GB/s per direction
    # (NVIDIA H100 datasheet). alpha: NCCL's own cost model (src/graph/tuning.cc) charges
    # ~0.5 us per ring/tree step on NVLink (hwLat LL) plus a 3.6-6.8 us base per collective;
    # 2 us per step is a round "a few us" figure for one-shot small-message collectives, an
    # assumption, not a measurement.
    "nvlink4": Link("NVLink 4", 2e-6, 450e9, "H100 datasheet 900 GB/s bidir.; alpha ~2 us assumed (NCCL tuning.cc: ~0.5 us/step + 4-7 us base)"),
    # InfiniBand NDR: 400 Gb/s per port = 50 GB/s per direction (one NIC per GPU). alpha: RDMA
    # small-message latency is 1-2 us; with the NCCL proxy path ~3 us per step (assumption
    # inside the usual 2-5 us range).
    "ib-ndr": Link("InfiniBand NDR", 3e-6, 50e9, "NDR 400 Gb/s = 50 GB/s; alpha ~3 us per step assumed (typ. 2-5 us)"),
    # PCIe 4.0 x16: 32 GB/s per direction raw, ~25 GB/s achievable; consumer GPUs (RTX 4090)
    # have no P2P, so a message goes through host memory: alpha ~10 us assumed.
    "pcie4": Link("PCIe 4.0 x16", 10e-6, 25e9, "PCIe 4.0 x16 ~25 GB/s achievable per direction; alpha ~10 us assumed (no P2P on GeForce)"),
    # 10 Gigabit Ethernet: 1.25 GB/s line rate; kernel TCP one-way small-message latency
    # 20-50 us (assumption: 30 us).
    "10gbe": Link("10 GbE", 30e-6, 1.25e9, "10 Gb/s line rate; alpha ~30 us assumed (TCP, typ. 20-50 us)"),
    # 1 Gigabit Ethernet: 125 MB/s line rate; one-way TCP latency 50-100 us (assumption: 75 us).
    "1gbe": Link("1 GbE", 75e-6, 0.125e9, "1 Gb/s line rate; alpha ~75 us assumed (TCP, typ. 50-100 us)"),
    # shared/MEASURED.md, 2 local processes: gloo all_reduce of 1 float 254 us, of 4 MiB 4.1 ms
    # -> (4.1 ms - 0.254 ms) / 4 MiB = ~1.09 GB/s effective. These are per collective at p=2:
    # use with algorithm="oneshot" (1 step) to reproduce the 2-rank numbers.
    "loopback": Link("loopback gloo (MEASURED.md)", 254e-6, 1.09e9, "shared/MEASURED.md: gloo all_reduce 254 us (1 float), 4.1 ms (4 MiB), 2 ranks"),
    # shared/MEASURED.md: shared memory + spin flags, plain Python/torch, 13 us p50 for 2048
    # floats between 2 processes. Bandwidth was not measured: half the CPU's 34 GB/s read
    # bandwidth (a copy reads and writes) is an assumption.
    "loopback-shm": Link("loopback shm (MEASURED.md)", 13e-6, 17e9, "shared/MEASURED.md: 13 us p50 (2048 floats); bandwidth 17 GB/s assumed"),
}

MODELS: dict[str, ModelShape] = {
    # meta-llama/Meta-Llama-3-8B config.json: hidden 4096, 32 layers, 32 heads, 8 kv heads,
    # intermediate 14336, vocab 128256, untied; bf16. (Llama numbers checked against public
    # copies of the configs.)
    "llama-3-8b": ModelShape.dense(
        "Llama-3-8B", layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
        source="meta-llama/Meta-Llama-3-8B config.json",
    ),
    # meta-llama/Meta-Llama-3-70B config.json: hidden 8192, 80 layers, 64 heads, 8 kv heads,
    # intermediate 28672, vocab 128256, untied; bf16.
    "llama-3-70b": ModelShape.dense(
        "Llama-3-70B", layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=128256,
        source="meta-llama/Meta-Llama-3-70B config.json",
    ),
    # meta-llama/Llama-3.1-405B config.json: hidden 16384, 126 layers, 128 heads, 8 kv heads,
    # head_dim 128, intermediate 53248, vocab 128256, untied; bf16 (confirmed against several
    # public mirrors of the config).
    "llama-3.1-405b": ModelShape.dense(
        "Llama-3.1-405B", layers=126, hidden=16384, heads=128, kv_heads=8, intermediate=53248, vocab=128256,
        source="meta-llama/Llama-3.1-405B config.json",
    ),
    # moonshotai/Kimi-K2.5 config.json, text_config (model_type kimi_k2, the DeepSeek-V3
    # architecture), as mirrored in public test fixtures: hidden_size 7168, intermediate_size
    # 18432 (dense MLP), moe_intermediate_size 2048, num_hidden_layers 61,
    # first_k_dense_replace 1, num_attention_heads 64, q_lora_rank 1536, kv_lora_rank 512,
    # qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128, n_routed_experts 384,
    # n_shared_experts 1, num_experts_per_tok 8, vocab_size 163840, tie_word_embeddings false.
    # Counted here: 1.026e12 params, 32.9e9 active (Moonshot states ~1T total / 32B active;
    # a public parameter counter's fixture for this config expects 1026B / 33B).
    # Precision: its quantization_config is compressed-tensors INT4 weights for every Linear
    # except lm_head, self_attn.* and shared_experts.* -> routed experts 0.5 byte/param, the
    # rest bf16 (layer 0's dense MLP is INT4 too but counted as bf16 here: +0.6 GB of 531 GB).
    # The INT4 group size was not confirmed, so the scales are not counted. (Kimi K2 itself
    # ships FP8 weights: not this preset.) kv_heads/head_dim are unused under MLA.
    "kimi-k2.5": ModelShape(
        name="Kimi K2.5", layers=61, hidden=7168, heads=64, kv_heads=64, head_dim=192,
        intermediate=18432, vocab=163840, bytes_per_param=2.0, attention="mla",
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        experts=384, active_experts=8, shared_experts=1, expert_intermediate=2048, dense_layers=1,
        expert_bytes_per_param=0.5,
        source="moonshotai/Kimi-K2.5 config.json (text_config), INT4 routed experts",
    ),
}

_ALIASES = {
    "h100-sxm": "h100", "h200-sxm": "h200", "a100-80gb": "a100", "4090": "rtx4090", "rtx-4090": "rtx4090",
    "nvlink": "nvlink4", "ib": "ib-ndr", "infiniband": "ib-ndr", "pcie": "pcie4",
    "llama3-8b": "llama-3-8b", "llama3-70b": "llama-3-70b", "llama-3.1-8b": "llama-3-8b", "llama-3.1-70b": "llama-3-70b",
    "llama3.1-405b": "llama-3.1-405b", "llama-405b": "llama-3.1-405b", "kimi": "kimi-k2.5",
}


def preset_dir() -> Path:
    """$XDG_CACHE_HOME/tp-runtime/presets, ~/.cache/tp-runtime/presets without it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tp-runtime" / "presets"


def save_preset(name: str, *, hardware: Hardware | None = None, link: Link | None = None, model: ModelShape | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write NAME.json into preset_dir(); returns its path."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ConfigError(f"preset name {name!r} is not a plain file name")
    data: dict[str, Any] = {"name": name, "version": 1}
    for key, obj in (("hardware", hardware), ("link", link), ("model", model)):
        if obj is not None:
            data[key] = asdict(obj)
    if extra:
        data["measured"] = extra
    folder = preset_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def _preset_file(name: str) -> dict[str, Any] | None:
    path = preset_dir() / f"{name}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read preset ({e}); rerun `tp-bench calibrate --name {name}` or delete the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset file holds a JSON object")
    return data


def _from_dict(cls: type, raw: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown {cls.__name__} field(s) {', '.join(unknown)}")
    try:
        return cls(**raw)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _lookup(kind: str, key: str, name: str, table: dict[str, Any], cls: type) -> Any:
    data = _preset_file(name)
    if data is not None and key in data:
        return _from_dict(cls, data[key], f"{preset_dir() / (name + '.json')} [{key}]")
    norm = name.lower()
    norm = _ALIASES.get(norm, norm)
    if norm in table:
        return table[norm]
    if data is not None:
        raise ConfigError(
            f"{preset_dir() / (name + '.json')} has no {key!r} section"
            + (" (rerun `tp-bench calibrate` with --alpha-us and --beta-gbps to save a link)" if key == "link" else "")
        )
    saved = sorted(p.stem for p in preset_dir().glob("*.json")) if preset_dir().is_dir() else []
    known = ", ".join(sorted(table))
    more = f"; saved presets: {', '.join(saved)}" if saved else ""
    raise ConfigError(f"unknown {kind} {name!r}; built-in: {known}{more} (saved presets live in {preset_dir()})")


def load_hardware(name: str) -> Hardware:
    return _lookup("hardware", "hardware", name, HARDWARE, Hardware)


def load_link(name: str) -> Link:
    return _lookup("link", "link", name, LINKS, Link)


def load_model(name: str) -> ModelShape:
    """A preset name, a saved preset, or a Hugging Face model folder (config.json)."""
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        from tp_runtime.config import ModelConfig

        return ModelShape.from_config(ModelConfig.from_model_dir(path), name=path.name)
    return _lookup("model", "model", name, MODELS, ModelShape)


# ---------------------------------------------------------------------------------------------
# the prediction


def steps(kind: str, algorithm: str, p: int) -> int:
    """Latency-bound steps of one collective of `kind` over p chips."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"collective algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if kind not in KINDS:
        raise ConfigError(f"collective kind {kind!r} is not one of {', '.join(KINDS)}")
    if p <= 1:
        return 0
    if algorithm == "oneshot":
        return 1
    log = math.ceil(math.log2(p))
    if kind == "all_reduce":
        return 2 * (p - 1) if algorithm == "ring" else 2 * log
    return p - 1 if algorithm == "ring" else log


@dataclass(frozen=True)
class Collective:
    """`count` collectives of one kind at one site per decode step."""

    site: str  # as the runtime tags them (without "layer.N."): embed, attn_out, mlp_out, lm_head; dp.step, moe_counts, moe_dispatch, moe_combine
    kind: str
    count: int
    steps: int  # per collective
    bytes: float  # per collective, per link
    seconds: float  # per collective: steps * alpha + bytes / bandwidth


@dataclass(frozen=True)
class Prediction:
    model: str
    hardware: str
    link: str
    p: int
    algorithm: str
    parallel: str
    alpha_s: float
    context_len: int
    batch: int
    seconds_per_token: float  # one decode step (every sequence of the batch gets one token)
    memory_s: float
    compute_s: float
    comm_s: float
    collectives_per_token: int
    steps_per_token: int  # alpha-steps per decode step: comm_s = steps_per_token * alpha + bytes term (a kind given its own link: at its alpha)
    bytes_per_collective: float  # one hidden vector all-reduce (hidden x act_bytes x batch)
    comm_bytes_per_token: float
    bytes_per_chip: float  # read by the busiest chip per step
    flops_per_chip: float
    shard_bytes: float  # stored per chip (weights + KV cache)
    memory_bytes: float
    fits: bool
    bound: str  # "memory" | "compute" | "comm": the largest of the three terms
    tokens_per_s: float  # batch / seconds_per_token
    dominant_collective: str = ""  # the kind of collective taking most of comm_s, with its share ("all_to_all 71%"); "" without any
    collectives: tuple[Collective, ...] = ()

    def comm_by_kind(self) -> dict[str, float]:
        """Seconds of comm_s per kind of collective (all_reduce, all_gather, all_to_all)."""
        out: dict[str, float] = {}
        for c in self.collectives:
            out[c.kind] = out.get(c.kind, 0.0) + c.count * c.seconds
        return out

    def row(self) -> dict[str, Any]:
        """Flat dict for CSV / JSON lines (the per-site breakdown left out)."""
        d = asdict(self)
        d.pop("collectives")
        return d


CSV_COLUMNS = tuple(f.name for f in fields(Prediction) if f.name != "collectives")


def modes_for(model: ModelShape) -> tuple[str, ...]:
    """The parallel modes that apply to `model`: tp for a dense model, tp / ep / dp for MoE."""
    return PARALLEL if model.is_moe else ("tp",)


def resolve_parallel(model: ModelShape, parallel: str) -> str:
    """`parallel` checked against `model`; "auto": ep for a MoE model, tp for a dense one."""
    if parallel == "auto":
        return "ep" if model.is_moe else "tp"
    if parallel not in PARALLEL:
        raise ConfigError(f"parallel mode {parallel!r} is not one of auto, {', '.join(PARALLEL)}")
    if parallel != "tp" and not model.is_moe:
        raise ConfigError(f"{model.name} has no experts: {parallel} (experts whole per chip) needs an MoE model (use --parallel tp)")
    return parallel


def predict(
    model: ModelShape,
    hardware: Hardware,
    link: Link,
    p: int,
    *,
    algorithm: str = "ring",
    context_len: int = 0,
    batch: int = 1,
    parallel: str = "auto",
    alpha_s: float | None = None,
    act_bytes: float = 2.0,
    logit_bytes: float = 4.0,
    embedding_all_reduce: bool = True,
    links: dict[str, Link] | None = None,
) -> Prediction:
    """Speed-of-light decode step of `model` on p chips of `hardware` joined by `link`.

    alpha_s overrides link.alpha_s (the latency sweep); links={kind: Link} gives a kind of
    collective its own alpha and bandwidth (alpha_s does not apply to it). Everything else is
    in the module docstring.
    """
    if p < 1 or int(p) != p:
        raise ConfigError(f"chip count must be a positive integer, got {p}")
    if batch < 1 or context_len < 0:
        raise ConfigError(f"batch must be >= 1 and context_len >= 0, got batch {batch}, context_len {context_len}")
    mode = resolve_parallel(model, parallel)
    alpha = link.alpha_s if alpha_s is None else alpha_s
    if alpha < 0:
        raise ConfigError(f"alpha must be >= 0, got {alpha}")
    steps("all_reduce", algorithm, 2)  # validates the algorithm name
    for kind, own in (links or {}).items():
        if kind not in KINDS:
            raise ConfigError(f"links: {kind!r} is not a kind of collective ({', '.join(KINDS)})")
        if own.alpha_s < 0 or own.bandwidth_Bps <= 0:
            raise ConfigError(f"links[{kind!r}] ({own.name}): alpha must be >= 0 and bandwidth > 0")
    links = links or {}
    p = int(p)
    dp = mode == "dp"
    local = -(-batch // p) if dp else batch  # sequences on the busiest chip
    split = 1 if dp else p  # chips the non-routed weights are split over
    # --- memory and compute on the busiest chip
    kv_split = 1 if dp else min(p, model.kv_max_shards)
    kv = model.kv_bytes_total(context_len, local) / kv_split
    nonrouted = model.nonrouted_read_bytes(local) / split
    routed_one = model.expert_params * model.expert_bpp  # bytes of one expert
    a = model.distinct_experts(batch)  # the group's tokens reach the experts, under dp too
    e, k = model.experts, model.active_experts
    if not model.is_moe:
        routed_bytes = routed_flops = 0.0
    elif mode == "tp" or p == 1:
        routed_bytes = model.moe_layers * a * routed_one / p
        routed_flops = 2.0 * model.moe_layers * model.expert_params * batch * k / p
    else:  # ep, dp: whole experts (or slices when p > E) on chips; a chip reads its active ones
        held = min(1.0, e / p)
        routed_bytes = model.moe_layers * routed_one * max(a / p, held)
        routed_flops = 2.0 * model.moe_layers * model.expert_params * batch * k * max(1.0 / p, held / a)
    bytes_per_chip = nonrouted + routed_bytes + kv
    flops_per_chip = (
        2.0 * local * model.nonrouted_matmul_params() / split
        + routed_flops
        + model.attention_flops(context_len, local) / (1 if dp else min(p, model.heads))
    )
    memory_s = bytes_per_chip / hardware.mem_bandwidth_Bps
    compute_s = flops_per_chip / hardware.peak_flops

    # --- collectives of one step
    vec = model.hidden * act_bytes * batch
    plan: list[tuple[str, str, int, float]] = []  # site, kind, count, bytes
    if p > 1 and dp:
        leave = (p - 1) / p
        rows = local * k * model.hidden * act_bytes * leave
        plan += [
            ("dp.step", "all_gather", 1, 8.0 * batch * p),
            ("moe_counts", "all_to_all", model.moe_layers, 8.0 * e * leave),
            ("moe_dispatch", "all_to_all", model.moe_layers, rows),
            ("moe_combine", "all_to_all", model.moe_layers, rows),
        ]
    elif p > 1:  # tp, ep: the dense TP collectives
        if embedding_all_reduce:
            plan.append(("embed", "all_reduce", 1, vec))
        plan += [("attn_out", "all_reduce", model.layers, vec), ("mlp_out", "all_reduce", model.layers, vec)]
        plan.append(("lm_head", "all_gather", 1, model.vocab * logit_bytes * batch))
    collectives = []
    for site, kind, count, nbytes in plan:
        if count == 0:
            continue
        own = links.get(kind)
        a_k, bw = (own.alpha_s, own.bandwidth_Bps) if own is not None else (alpha, link.bandwidth_Bps)
        s = steps(kind, algorithm, p)
        t = s * a_k + (nbytes / bw if bw != math.inf else 0.0)
        collectives.append(Collective(site, kind, count, s, nbytes, t))
    comm_s = sum(c.count * c.seconds for c in collectives)
    by_kind: dict[str, float] = {}
    for c in collectives:
        by_kind[c.kind] = by_kind.get(c.kind, 0.0) + c.count * c.seconds
    top = max(by_kind, key=by_kind.__getitem__) if comm_s > 0 else ""
    dominant = f"{top} {by_kind[top] / comm_s:.0%}" if top else ""

    seconds = max(memory_s, compute_s) + comm_s
    terms = {"memory": memory_s, "compute": compute_s, "comm": comm_s}
    if dp:
        routed_stored = model.routed_params * model.expert_bpp
        shard = model.weight_bytes - routed_stored + routed_stored / p + model.kv_bytes_total(context_len, local)
    else:
        shard = model.weight_bytes / p + model.kv_bytes_total(context_len, batch) / kv_split
    return Prediction(
        model=model.name, hardware=hardware.name, link=link.name, p=p, algorithm=algorithm, parallel=mode,
        alpha_s=alpha, context_len=context_len, batch=batch,
        seconds_per_token=seconds, memory_s=memory_s, compute_s=compute_s, comm_s=comm_s,
        collectives_per_token=sum(c.count for c in collectives),
        steps_per_token=sum(c.count * c.steps for c in collectives),
        bytes_per_collective=vec,
        comm_bytes_per_token=sum(c.count * c.bytes for c in collectives),
        bytes_per_chip=bytes_per_chip, flops_per_chip=flops_per_chip,
        shard_bytes=shard, memory_bytes=hardware.memory_bytes, fits=shard <= hardware.memory_bytes,
        bound=max(terms, key=terms.__getitem__),
        tokens_per_s=batch / seconds if seconds > 0 else math.inf,
        dominant_collective=dominant,
        collectives=tuple(collectives),
    )


# ---------------------------------------------------------------------------------------------
# sweeps and the tables built on them (the CLI and bench/ format these)


def sweep(
    model: ModelShape,
    hardware: Hardware,
    link: Link,
    chips: Iterable[int],
    alphas: Sequence[float | None] = (None,),
    **kw: Any,
) -> dict[float, list[Prediction]]:
    """alpha -> predictions over `chips` (None in `alphas`: the link's own alpha)."""
    chips = list(chips)
    out: dict[float, list[Prediction]] = {}
    for a in alphas:
        alpha = link.alpha_s if a is None else a
        out[alpha] = [predict(model, hardware, link, p, alpha_s=alpha, **kw) for p in chips]
    return out


def best(preds: Sequence[Prediction], *, fitting: bool = True) -> Prediction | None:
    """The point with the most tokens/s (among those that fit, by default); ties: fewer chips."""
    cands = [q for q in preds if q.fits or not fitting]
    if not cands:
        return None
    return max(cands, key=lambda q: (q.tokens_per_s, -q.p))


@dataclass(frozen=True)
class LatencyScaling:
    """How tokens/s responds when alpha drops from alpha_hi to alpha_lo."""

    alpha_hi: float
    alpha_lo: float
    alpha_ratio: float
    p_fixed: int  # the largest chip count that fits (most comm-dominated point)
    ratio_fixed: float  # tokens/s(alpha_lo) / tokens/s(alpha_hi) at p_fixed
    comm_share_fixed: float  # comm_s / seconds at p_fixed, alpha_hi
    comm_share_fixed_lo: float  # the same at alpha_lo: the claim needs this one near 1
    p_best_hi: int
    ratio_at_best_hi: float  # both at the chip count that is best for alpha_hi
    p_best_lo: int
    ratio_reoptimised: float  # best(alpha_lo) / best(alpha_hi), each at its own best chip count

    def holds(self, ratio: float, tolerance: float = 0.1) -> bool:
        return abs(ratio / self.alpha_ratio - 1.0) <= tolerance


def latency_scaling(curves: dict[float, list[Prediction]]) -> list[LatencyScaling]:
    """For each pair of consecutive alphas (largest first): the tokens/s ratios that test the
    claim "k x lower latency gives k x tokens/s", at a fixed chip count and re-optimised."""
    alphas = sorted(curves, reverse=True)
    rows = []
    for hi, lo in zip(alphas, alphas[1:]):
        by_p_hi = {q.p: q for q in curves[hi]}
        by_p_lo = {q.p: q for q in curves[lo]}
        common = sorted(p for p in by_p_hi if p in by_p_lo and by_p_hi[p].fits)
        b_hi, b_lo = best(curves[hi]), best(curves[lo])
        if not common or b_hi is None or b_lo is None:
            continue
        pf = common[-1]
        qh, ql = by_p_hi[pf], by_p_lo[pf]
        rows.append(
            LatencyScaling(
                alpha_hi=hi, alpha_lo=lo, alpha_ratio=hi / lo if lo > 0 else math.inf,
                p_fixed=pf, ratio_fixed=ql.tokens_per_s / qh.tokens_per_s,
                comm_share_fixed=qh.comm_s / qh.seconds_per_token,
                comm_share_fixed_lo=ql.comm_s / ql.seconds_per_token,
                p_best_hi=b_hi.p, ratio_at_best_hi=by_p_lo[b_hi.p].tokens_per_s / b_hi.tokens_per_s,
                p_best_lo=b_lo.p, ratio_reoptimised=b_lo.tokens_per_s / b_hi.tokens_per_s,
            )
        )
    return rows
