"""Mixture-of-Experts MLP, one shard of it: router, routed experts, shared expert, one all-reduce.

Routing needs no communication: the router's weights are replicated, so every rank scores
every token alike and knows where each token goes.
- softmax (Mixtral, Qwen2-MoE, Qwen3-MoE): p = softmax(x Wr^T) in float32, the top-k of p,
  renormalised to sum 1 where `norm_topk_prob` (Mixtral always).
- sigmoid (DeepSeek-V3, Kimi K2): s = sigmoid(x Wr^T); experts are *chosen* by s + bias (the
  checkpoint's e_score_correction_bias) among the `topk_group` best of `n_group` groups (a
  group's score: the sum of its two best biased scores), and *weighted* by s alone,
  renormalised where `norm_topk_prob`, times `routed_scaling_factor`.

Split over ranks (ModelConfig.moe.parallel, `--moe`):
- "tp": every expert's intermediate features are split like the dense MLP's; a rank holds a
  slice of every expert.
- "ep": whole experts per rank (sharding.expert_range: E/world each, uneven counts allowed);
  a rank runs only its own experts, on the tokens routed to them.
Either way a rank's output is a partial sum (its experts or slices, plus its slice of the shared
expert), and one all-reduce under the layer's `mlp_out` site completes it: the same collective
count as a dense block. Tokens routed to the rank's experts are gathered per expert (one sort of
the top-k choices), so a decode step multiplies only the chosen experts' weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tp_runtime import sharding
from tp_runtime.communicator import Communicator
from tp_runtime.config import ModelConfig, MoeConfig
from tp_runtime.model.linear import FLOAT, LinearKinds
from tp_runtime.model.step import StepInfo

PREFILL, DECODE = 0, 1  # rows of a layer's routed-token counts


def route(logits: torch.Tensor, moe: MoeConfig, correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [n, k] float32, expert ids [n, k] int64) for router logits [n, E] (any float dtype)."""
    logits = logits.float()
    k = moe.top_k
    if moe.scoring == "softmax":
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, k, dim=-1)
        if moe.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids
    scores = torch.sigmoid(logits)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if moe.n_group > 1:
        n, e = choice.shape
        grouped = choice.view(n, moe.n_group, e // moe.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [n, n_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, torch.topk(group_scores, moe.topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(n, e)
    ids = torch.topk(choice, k, dim=-1).indices
    weights = scores.gather(1, ids)
    if moe.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * moe.routed_scaling_factor, ids


class Router(nn.Module):
    """The replicated gate: logits in float32 whatever the model's dtype (routing decisions are
    discrete; a bf16 router would move tokens between experts)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        moe = cfg.moe
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, cfg.hidden_size, dtype=torch.float32), requires_grad=False)
        self.correction_bias = nn.Parameter(torch.empty(moe.num_experts, dtype=torch.float32), requires_grad=False) if moe.correction_bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [n, hidden] -> weights [n, k] float32, ids [n, k]
        return route(F.linear(x.float(), self.weight), self.moe, self.correction_bias)


class ExpertMLP(nn.Module):
    """One SwiGLU expert (or this rank's slice of its features), without communication: its down
    projection's output is a partial sum that the MoE layer reduces once for all experts."""

    def __init__(self, hidden: int, inter_local: int, dtype: torch.dtype, linears: LinearKinds) -> None:
        super().__init__()
        self.inter_local = inter_local
        self.gate_up_proj = linears.column(hidden, [("gate", inter_local), ("up", inter_local)], False, dtype)
        self.down_proj = linears.column(inter_local, [("down", hidden)], False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter_local, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoe(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, comm: Communicator, linears: LinearKinds = FLOAT) -> None:
        super().__init__()
        moe = cfg.moe
        tp, rank = comm.world_size, comm.rank
        self.comm, self.site, self.moe = comm, f"layer.{layer}.mlp_out", moe
        self.router = Router(cfg)
        lo, hi = sharding.expert_range(cfg, tp, rank)
        i_lo, i_hi = sharding.expert_intermediate_range(cfg, tp, rank)
        self.local_experts = range(lo, hi)
        # keyed by the global expert id, as the checkpoint names them
        self.experts = nn.ModuleDict({str(e): ExpertMLP(cfg.hidden_size, i_hi - i_lo, dtype, linears) for e in self.local_experts})
        self.shared = None
        if moe.shared_intermediate_size:
            s_lo, s_hi = sharding.shared_expert_range(cfg, tp, rank)
            self.shared = ExpertMLP(cfg.hidden_size, s_hi - s_lo, dtype, linears)
        self.shared_gate = nn.Parameter(torch.empty(1, cfg.hidden_size, dtype=dtype), requires_grad=False) if moe.shared_expert_gate else None
        # tokens routed to each expert (every rank counts all of them alike), prefill and decode apart
        self.register_buffer("routed", torch.zeros(2, moe.num_experts, dtype=torch.int64), persistent=False)

    def init_buffers(self) -> None:
        self.routed.zero_()

    def retarget(self, layer: int) -> None:
        self.site = f"layer.{layer}.mlp_out"

    def forward(self, x: torch.Tensor, step: StepInfo | None = None) -> torch.Tensor:
        # x: [batch, seq, hidden] -> [batch, seq, hidden] (complete: reduced over ranks)
        xf = x.reshape(-1, x.shape[-1])  # [n, hidden]
        real = None if step is None else step.real_rows  # a padded prefill batch: route real tokens only
        xr = xf if real is None else xf.index_select(0, real)
        out = self._experts(xr, PREFILL if step is None or step.prefill else DECODE)
        if real is not None:
            out = torch.zeros_like(xf).index_copy_(0, real, out)
        out = self.comm.all_reduce(out, site=self.site)  # experts' partial sums -> the layer's output
        return out.view_as(x)

    def _experts(self, x: torch.Tensor, phase: int) -> torch.Tensor:
        """This rank's part of the layer for tokens x [n, hidden]: its experts' (or slices')
        weighted outputs plus its slice of the shared expert, a partial sum [n, hidden]."""
        weights, ids = self.router(x)  # [n, k] each
        flat = ids.flatten()
        counts = torch.bincount(flat, minlength=self.moe.num_experts)
        self.routed[phase] += counts
        order = torch.argsort(flat, stable=True)  # choices grouped by expert, token order kept within
        rows_of = order // self.moe.top_k  # the token of each sorted choice
        w_sorted = weights.flatten()[order]
        out = torch.zeros_like(x)
        starts = torch.cumsum(counts, 0) - counts
        lo, hi = self.local_experts.start, self.local_experts.stop
        for e, n in enumerate(counts[lo:hi].tolist(), start=lo):
            if n == 0:
                continue
            s = int(starts[e])
            rows = rows_of[s : s + n]
            y = self.experts[str(e)](x.index_select(0, rows))  # [n_e, hidden] partial
            out.index_add_(0, rows, (y.float() * w_sorted[s : s + n, None]).to(out.dtype))
        if self.shared is not None:
            y = self.shared(x)
            if self.shared_gate is not None:
                y = y * torch.sigmoid(F.linear(x, self.shared_gate))
            out += y
        return out

    def fused_problem(self) -> str | None:
        return "a mixture-of-experts layer has no fused decode binding yet"


def load_table(model: nn.Module, world: int) -> dict:
    """The routed-token counts of every MoE layer of `model` (see LLM.expert_load)."""
    cfg = model.cfg
    layers = []
    for i, layer in enumerate(model.layers):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, SparseMoe):
            continue
        prefill, decode = (row.tolist() for row in mlp.routed)
        total = [p + d for p, d in zip(prefill, decode)]
        per_rank = []
        for r in range(world):
            lo, hi = sharding.expert_range(cfg, world, r)
            per_rank.append(sum(total[lo:hi]) if cfg.moe.parallel == "ep" else sum(total))
        mean = sum(per_rank) / world
        layers.append({"layer": i, "prefill": prefill, "decode": decode, "rank_tokens": per_rank,
                       "imbalance": max(per_rank) / mean if mean else 1.0})
    return {"parallel": cfg.moe.parallel, "top_k": cfg.moe.top_k, "layers": layers}
