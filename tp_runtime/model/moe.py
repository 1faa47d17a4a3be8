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

Streamed experts (placement: the first weights to leave the fastest memory): a layer whose
experts are streamed holds none (`stream_experts`); each forward reads the experts its tokens
chose from an expert stream (model/offload.py ExpertStreamer) into a few staging experts, in
rounds when more are chosen than there are staging experts. The arithmetic is the resident one.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from tp_runtime import sharding
from tp_runtime.communicator import Communicator
from tp_runtime.config import ModelConfig, MoeConfig
from tp_runtime.model.linear import FLOAT, LinearKinds, linear_binding_problem
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


def bind_swiglu(binder, gate_up_proj: nn.Module, inter_local: int, down):
    """A SwiGLU MLP in the fused decode step: the gate|up GEMV into a buffer of its own,
    SiLU(gate) * up (plus the merged bias) into the input of `down` (the bound down projection,
    with or without its all-reduce), then `down`."""
    gate_up = gate_up_proj.bind_decode(binder, binder.buffer(2 * inter_local))
    silu_mul = partial(binder.lib.tp_silu_mul, binder.ptr(gate_up.out), binder.ptr(gate_up_proj.bias), binder.ptr(down.x), inter_local, int(down.x.dtype == torch.bfloat16), binder.mbf)

    def run(nb: int) -> None:
        gate_up(nb)
        silu_mul(nb)
        down(nb)

    return binder.bound(gate_up.x, run)


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

    def fused_problem(self) -> str | None:
        for m in (self.gate_up_proj, self.down_proj):
            if why := linear_binding_problem(m):
                return f"expert {why}"
        return None

    def bind_decode(self, binder, out: torch.Tensor):
        """The expert on the first n rows of its own input buffer (`.x`), its partial output in
        out[:n] (the MoE layer gathers rows in and weighs them out)."""
        return bind_swiglu(binder, self.gate_up_proj, self.inter_local, self.down_proj.bind_decode(binder, out))


class SparseMoe(nn.Module):
    # the router and the routing run in torch every decode step: the fused step runs the layer
    # from Python without trying to record it (the try, a torch op under a dispatch mode, costs
    # a one-time ~1.3 s import of torch._dynamo)
    decode_runs_torch_ops = True

    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, comm: Communicator, linears: LinearKinds = FLOAT) -> None:
        super().__init__()
        moe = cfg.moe
        tp, rank = comm.world_size, comm.rank
        self.comm, self.site, self.moe = comm, f"layer.{layer}.mlp_out", moe
        self.layer = layer
        self.expert_stream = None  # set by stream_experts: the experts are read per forward
        self.router = Router(cfg)
        lo, hi = sharding.expert_range(cfg, tp, rank)
        i_lo, i_hi = sharding.expert_intermediate_range(cfg, tp, rank)
        self.local_experts = range(lo, hi)
        # --attention dp: this rank's tokens travel to their experts' ranks and back (all-to-all)
        self.dispatch = moe.data_parallel and tp > 1
        self.owner_sizes = [b - a for a, b in (sharding.expert_range(cfg, tp, r) for r in range(tp))] if self.dispatch else []
        self.sites = tuple(f"layer.{layer}.{s}" for s in ("moe_counts", "moe_dispatch", "moe_combine"))
        # keyed by the global expert id, as the checkpoint names them
        self.experts = nn.ModuleDict({str(e): ExpertMLP(cfg.hidden_size, i_hi - i_lo, dtype, linears) for e in self.local_experts})
        self.shared = None
        if moe.shared_intermediate_size:
            s_lo, s_hi = sharding.shared_expert_range(cfg, *sharding.dense_split(cfg, tp, rank))
            self.shared = ExpertMLP(cfg.hidden_size, s_hi - s_lo, dtype, linears)
        self.shared_gate = nn.Parameter(torch.empty(1, cfg.hidden_size, dtype=dtype), requires_grad=False) if moe.shared_expert_gate else None
        # tokens routed to each expert (every rank counts all of them alike), prefill and decode apart
        self.register_buffer("routed", torch.zeros(2, moe.num_experts, dtype=torch.int64), persistent=False)

    def init_buffers(self) -> None:
        self.routed.zero_()

    def stream_experts(self, stream) -> None:
        """Hold no routed experts (call on the meta-built layer: they are never allocated); each
        forward reads the ones its tokens chose from `stream` (model/offload.py ExpertStreamer:
        `modules(layer, experts)` yields (expert, a module holding its weights) in order)."""
        self.experts = nn.ModuleDict()
        self.expert_stream = stream

    def _expert_modules(self, needed: list[int]):
        """(expert id, its module) for each of `needed` (this rank's), in order."""
        if self.expert_stream is None:
            return ((e, self.experts[str(e)]) for e in needed)
        return self.expert_stream.modules(self.layer, needed)

    def retarget(self, layer: int) -> None:
        self.layer = layer
        self.site = f"layer.{layer}.mlp_out"
        self.sites = tuple(f"layer.{layer}.{s}" for s in ("moe_counts", "moe_dispatch", "moe_combine"))

    def forward(self, x: torch.Tensor, step: StepInfo | None = None) -> torch.Tensor:
        # x: [batch, seq, hidden] -> [batch, seq, hidden] (complete: reduced over ranks)
        xf = x.reshape(-1, x.shape[-1])  # [n, hidden]
        real = None if step is None else step.real_rows  # a padded prefill batch: route real tokens only
        xr = xf if real is None else xf.index_select(0, real)
        phase = PREFILL if step is None or step.prefill else DECODE
        out = self.exchange(xr, phase) if self.dispatch else self._experts(xr, phase)
        if real is not None:
            out = torch.zeros_like(xf).index_copy_(0, real, out)
        if not self.dispatch:
            out = self.comm.all_reduce(out, site=self.site)  # experts' partial sums -> the layer's output
        return out.view_as(x)

    def exchange(self, x: torch.Tensor, phase: int = DECODE) -> torch.Tensor:
        """--attention dp: the layer's output for this rank's own tokens x [n, hidden] (n may be
        0: a rank with nothing to run still takes its part in every all-to-all). Three
        collectives: the per-expert token counts (to each rank, for its experts: a few bytes, so
        its time is mostly waiting for the slowest rank), the tokens' hidden states to their
        experts' ranks (dispatch), and the weighted-to-be outputs back (combine)."""
        weights, ids = self.router(x)  # [n, k]
        counts, order, rows_of = self._by_expert(ids, phase)  # each destination's rows contiguous
        world, mine = len(self.owner_sizes), len(self.local_experts)
        c_site, d_site, b_site = self.sites
        # counts[e] for each rank's own experts -> [world * mine]: from each source, per expert of mine
        got = self.comm.all_to_all(counts, self.owner_sizes, [mine] * world, site=c_site).view(world, mine)
        send = [int(c.sum()) for c in counts.split(self.owner_sizes)]
        recv = got.sum(dim=1).tolist()
        rows = self.comm.all_to_all(x.index_select(0, rows_of), send, recv, site=d_site)  # [sum(recv), hidden]
        # rows arrive by source, then by expert within a source: each expert runs on its rows from every source
        expert_of_row = torch.repeat_interleave(torch.arange(mine, device=x.device).repeat(world), got.flatten())
        by_expert = torch.argsort(expert_of_row, stable=True)
        y = torch.empty_like(rows)
        start, spans = 0, {}
        for e, n in zip(self.local_experts, got.sum(dim=0).tolist()):
            if n:
                spans[e] = by_expert[start : start + n]
                start += n
        for e, expert in self._expert_modules(list(spans)):
            sel = spans[e]
            y.index_copy_(0, sel, expert(rows.index_select(0, sel)).to(y.dtype))
        back = self.comm.all_to_all(y, recv, send, site=b_site)  # [n * k, hidden], in `order`'s order
        out = torch.zeros_like(x)
        out.index_add_(0, rows_of, (back.float() * weights.flatten()[order, None]).to(out.dtype))
        return self._add_shared(x, out)

    def _add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + the shared expert's output for x (this rank's slice of it; whole under dp)."""
        if self.shared is not None:
            y = self.shared(x)
            if self.shared_gate is not None:
                y = y * torch.sigmoid(F.linear(x, self.shared_gate))
            out += y
        return out

    def _by_expert(self, ids: torch.Tensor, phase: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k choices ids [n, k] grouped by expert: (choices per expert [E], the choices'
        order by expert, token order kept within, and each ordered choice's token); the counts
        are added to the routed-token counts of `phase`."""
        flat = ids.flatten()
        counts = torch.bincount(flat, minlength=self.moe.num_experts)
        self.routed[phase] += counts
        order = torch.argsort(flat, stable=True)
        return counts, order, order // self.moe.top_k

    def _experts(self, x: torch.Tensor, phase: int) -> torch.Tensor:
        """This rank's part of the layer for tokens x [n, hidden]: its experts' (or slices')
        weighted outputs plus its slice of the shared expert, a partial sum [n, hidden]."""
        weights, ids = self.router(x)  # [n, k] each
        counts, order, rows_of = self._by_expert(ids, phase)
        w_sorted = weights.flatten()[order]
        out = torch.zeros_like(x)
        starts = torch.cumsum(counts, 0) - counts
        lo, hi = self.local_experts.start, self.local_experts.stop
        chosen = {e: n for e, n in enumerate(counts[lo:hi].tolist(), start=lo) if n}
        for e, expert in self._expert_modules(list(chosen)):
            s, n = int(starts[e]), chosen[e]
            rows = rows_of[s : s + n]
            y = expert(x.index_select(0, rows))  # [n_e, hidden] partial
            out.index_add_(0, rows, (y.float() * w_sorted[s : s + n, None]).to(out.dtype))
        return self._add_shared(x, out)

    def fused_problem(self) -> str | None:
        if self.expert_stream is not None:
            return "a mixture-of-experts layer whose routed experts are streamed has no fused binding (they are read per forward, eagerly)"
        if self.dispatch:
            return "a mixture-of-experts layer under --attention dp has no fused binding (its all-to-alls run eagerly)"
        for m in [*self.experts.values(), *([self.shared] if self.shared is not None else [])]:
            if why := m.fused_problem():
                return f"MoE {why}"
        return None

    def bind_decode(self, binder):
        """The layer in the fused decode step: its input buffer (float32) written by the norm;
        per step the router and top-k in torch on those rows, each chosen local expert's bound
        GEMVs on the rows routed to it (gathered into its own buffers), their weighted sum plus
        the shared expert's into binder.h, and the one all-reduce. A step multiplies only the
        chosen experts' weights."""
        x, h = binder.buffer(self.router.weight.shape[1], torch.float32), binder.h
        outs = {e: binder.buffer(h.shape[1]) for e in self.local_experts}  # each expert's partial output rows
        bound = {e: self.experts[str(e)].bind_decode(binder, outs[e]) for e in self.local_experts}
        shared_out = binder.buffer(h.shape[1])
        shared = self.shared.bind_decode(binder, shared_out) if self.shared is not None else None
        reduce = binder.all_reduce(h, self.site, None)
        k, lo, hi = self.moe.top_k, self.local_experts.start, self.local_experts.stop

        def run(nb: int) -> None:
            xs, out = x[:nb], h[:nb]
            weights, ids = self.router(xs)  # [nb, k]
            flat = ids.flatten()
            self.routed[DECODE] += torch.bincount(flat, minlength=self.moe.num_experts)
            out.zero_()
            for e in torch.unique(flat).tolist():
                if not lo <= e < hi:
                    continue
                choice = (flat == e).nonzero().squeeze(1)  # its (token, slot) choices, by token
                rows = choice // k
                n = rows.numel()
                expert = bound[e]
                expert.x[:n].copy_(xs.index_select(0, rows))
                expert(n)
                out.index_add_(0, rows, (outs[e][:n].float() * weights.flatten()[choice, None]).to(out.dtype))
            if shared is not None:
                shared.x[:nb].copy_(xs)
                shared(nb)
                y = shared_out[:nb]
                if self.shared_gate is not None:
                    y = y * torch.sigmoid(F.linear(xs.to(y.dtype), self.shared_gate))
                out += y
            reduce(nb)

        return binder.bound(x, run)


def load_table(model: nn.Module, world: int, counts: list | None = None) -> dict:
    """The routed-token counts of every MoE layer of `model` (see LLM.expert_load); counts: the
    group's, [prefill, decode] rows per MoE layer (--attention dp), instead of this rank's."""
    cfg = model.cfg
    layers = []
    rows = iter(counts or ())
    for i, layer in enumerate(model.layers):
        mlp = getattr(layer, "mlp", None)
        # a streamed layer's placeholder keeps its layer's counts (its staging layer counts into them)
        routed = mlp.routed if isinstance(mlp, SparseMoe) else getattr(layer, "routed", None)
        if routed is None:
            continue
        prefill, decode = (next(rows), next(rows)) if counts else (row.tolist() for row in routed)
        total = [p + d for p, d in zip(prefill, decode)]
        per_rank = []
        for r in range(world):
            lo, hi = sharding.expert_range(cfg, world, r)
            per_rank.append(sum(total[lo:hi]) if cfg.moe.parallel == "ep" else sum(total))
        mean = sum(per_rank) / world
        layers.append({"layer": i, "prefill": prefill, "decode": decode, "rank_tokens": per_rank,
                       "imbalance": max(per_rank) / mean if mean else 1.0})
    return {"parallel": cfg.moe.parallel, "top_k": cfg.moe.top_k, "layers": layers}


def format_load(table: dict, comm: dict | None = None) -> str:
    """Aligned text of load_table's result: per MoE layer the tokens routed (prefill + decode),
    the busiest expert's share, each rank's tokens and the imbalance (max / mean over ranks);
    with the decode comm summary of an --attention dp run, the all-to-all time per token split
    into waiting for the slowest rank (the counts exchange: a few bytes, so its time is the
    wait) and transfer (dispatch + combine)."""
    wait: dict[int, float] = {}
    move: dict[int, float] = {}
    steps = max((comm or {}).get("decode_steps", 0), 1)
    for r in (comm or {}).get("sites", []):
        parts = r["site"].split(".")
        if len(parts) == 3 and parts[0] == "layer" and parts[2].startswith("moe_"):
            into = wait if parts[2] == "moe_counts" else move
            into[int(parts[1])] = into.get(int(parts[1]), 0.0) + (r["measured_s"] + r["injected_s"]) / steps
    head = f"{'layer':>5} {'tokens':>8} {'top expert':>10} {'per-rank tokens':<24} {'imbalance':>9}"
    if wait:
        head += f" {'a2a wait us':>11} {'transfer us':>11}"
    lines = [f"expert load (--moe {table['parallel']}, top-{table['top_k']}; tokens x top-k choices)", head, "-" * len(head)]
    for row in table["layers"]:
        total = [p + d for p, d in zip(row["prefill"], row["decode"])]
        n = sum(total)
        top = max(range(len(total)), key=total.__getitem__) if total else 0
        line = f"{row['layer']:>5} {n:>8} {f'{top}: {total[top] / n:.0%}' if n else '-':>10} {' '.join(map(str, row['rank_tokens'])):<24} {row['imbalance']:>9.2f}"
        if wait:
            line += f" {wait.get(row['layer'], 0.0) * 1e6:>11.0f} {move.get(row['layer'], 0.0) * 1e6:>11.0f}"
        lines.append(line)
    return "\n".join(lines)
