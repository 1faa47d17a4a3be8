"""`tp-run plan`: where every rank's bytes would live, before loading anything.

    tp-run plan --model DIR --tp 2 [--max-host-memory 8GiB] [--device cuda --max-device-memory 24GiB]

Prints, per rank, a table of tiers (capacity, bytes used, layers, KV cache, headroom; a
mixture-of-experts model's also where each layer's routed experts live: they stream first), the
decode tokens/s the tiers' bandwidths allow, the smallest tp whose shards fit entirely in the
fastest memory, and the model's size in every sense (parameters, FLOPs and KV bytes per token,
Chinchilla-optimal training tokens). Reads config.json only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from tp_runtime import placement, sharding, sol
from tp_runtime.checkpoint.gguf_reader import gguf_files
from tp_runtime.checkpoint.model_files import load_config, open_model
from tp_runtime.config import DTYPE_NAMES, ModelConfig, RuntimeConfig
from tp_runtime.units import format_bytes, parse_bandwidth


def add_offload_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload-dir", default=None, metavar="DIR", help="write each rank's streamed layers here once, in the runtime's dtype and merged layout, and stream them from here (default: stream from the checkpoint itself)")


def add_memory_flags(p: argparse.ArgumentParser, size_type) -> None:
    p.add_argument("--max-device-memory", type=size_type, default=None, metavar="SIZE", help="per-rank GPU memory budget, e.g. 20GiB (default: 90%% of what the GPU reports free)")
    p.add_argument("--max-host-memory", type=size_type, default=None, metavar="SIZE", help="per-rank host RAM budget, e.g. 8GiB (default: 85%% of available RAM / local ranks); layers beyond it are read from the mmap'd checkpoint on every token")


def add_plan_parser(sub, size_type) -> None:
    p = sub.add_parser("plan", help="show where each rank's weights, KV cache and activations would live, without loading")
    p.add_argument("--model", required=True, help="folder with config.json (weights are not read)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: the checkpoint's")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None)
    p.add_argument("--moe", choices=("tp", "ep"), default="tp", help="a mixture-of-experts model's experts: sliced over the ranks (tp) or whole per rank (ep), as generate's flag")
    p.add_argument("--attention", choices=("tp", "dp"), default="tp", help="a mixture-of-experts model's dense parts: split by heads (tp) or whole on every rank (dp, with --moe ep)")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--max-batch-size", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="plan for this kind of device (default: cuda if visible, else cpu)")
    add_memory_flags(p, size_type)
    p.add_argument("--local-ranks", type=int, default=None, help="ranks sharing this host's RAM for the default host budget (default: --tp)")
    p.add_argument("--hardware", default=None, help="bandwidth preset for the estimate (%s; default h100 for cuda, this-cpu for cpu)" % ", ".join(sol.HARDWARE))
    p.add_argument("--disk-bandwidth", type=parse_bandwidth, default=placement.DISK_READ_Bps, help="disk read bandwidth for the estimate (default 3GB)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def plan_all_ranks(cfg: ModelConfig, args: argparse.Namespace, blocks: dict[str, tuple[int, int]] | None = None) -> tuple[list[placement.RankPlan], dict[str, Any]]:
    import torch

    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    runtime = RuntimeConfig(dtype=args.dtype, max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size, quantize=args.quantize)
    dtype = runtime.resolve_dtype(cfg, device_type)
    max_seq_len = runtime.resolve_max_seq_len(cfg)
    sharding.check_tp(cfg, args.tp)
    device_bytes = args.max_device_memory
    if device_bytes is not None and device_type == "cpu":
        print("tp-run plan: --max-device-memory is ignored for a CPU plan (host RAM is the fastest tier; add --device cuda to plan for a GPU)", file=sys.stderr)
    if device_type == "cuda" and device_bytes is None and torch.cuda.is_available():
        device_bytes = int(torch.cuda.mem_get_info()[0] * placement.DEVICE_SHARE)
    host_bytes = args.max_host_memory if args.max_host_memory is not None else placement.default_host_budget(args.local_ranks or args.tp)
    hardware = sol.load_hardware(args.hardware or ("h100" if device_type == "cuda" else "this-cpu"))
    disk_Bps = args.disk_bandwidth
    if device_type == "cpu":  # ranks on one host share its memory bandwidth and its disk
        local = args.local_ranks or args.tp
        hardware = dataclasses.replace(hardware, mem_bandwidth_Bps=hardware.mem_bandwidth_Bps / local)
        disk_Bps /= local
    tiers = placement.make_tiers(device_type, device_bytes, host_bytes, hardware, disk_Bps)
    plans = [placement.plan_rank(cfg, args.tp, r, dtype, max_seq_len, args.max_batch_size, device_type, tiers, args.quantize, cfg.checkpoint_dtype, blocks) for r in range(args.tp)]
    context = {"device": device_type, "dtype": dtype, "max_seq_len": max_seq_len, "max_batch_size": args.max_batch_size, "hardware": hardware.name}
    return plans, context


def estimate(plans: list[placement.RankPlan]) -> dict[str, Any]:
    """Decode tokens/s the slowest rank's tiers allow; streamed layers from the page cache when
    the whole model fits in this machine's RAM beside the budgets, else from the disk."""
    streamed = sum(p.disk_read_bytes for p in plans)
    page_cache = streamed <= placement.host_memory_available() - sum(p.used(p.tiers[-2].name) for p in plans)
    seconds = max(p.decode_seconds(page_cache) for p in plans)
    return {"decode_tokens_per_s": 1.0 / seconds if seconds else 0.0, "streamed_from": ("page cache" if page_cache else "disk") if streamed else None}


def run_plan(args: argparse.Namespace) -> int:
    import torch

    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    blocks = None
    if gguf_files(args.model) is not None or any(Path(args.model).glob("*.safetensors")):
        from tp_runtime.engine.llm import _keeps_blocks

        files = open_model(args.model)
        cfg = files.cfg
        # on CPU a GGUF's quantized linears stay blocks and F16 matrices float16, as LLM.load keeps them
        if _keeps_blocks(files, RuntimeConfig(quantize=args.quantize), torch.device(device_type)):
            blocks = placement.stored_blocks(files.index)
    else:
        cfg = load_config(args.model)  # a config alone plans a model not yet downloaded
    cfg = RuntimeConfig(quantize=args.quantize, moe=args.moe, attention=args.attention).split_config(cfg)
    plans, context = plan_all_ranks(cfg, args, blocks)
    est = estimate(plans)
    fast = plans[0].fast
    budget = fast.capacity
    if fast.name == "host" and args.max_host_memory is None and args.local_ranks is None:
        budget = placement.default_host_budget  # per rank: this machine's RAM shared by tp ranks
    fit_tp = placement.smallest_tp(cfg, context["dtype"], context["max_seq_len"], context["max_batch_size"], budget, args.quantize, blocks) if fast.capacity else 1
    facts = placement.model_facts(cfg, context["dtype"])
    if args.json:
        out = {
            **context,
            "tp": args.tp,
            "ranks": [placement.plan_rows(p) for p in plans],
            "fixed": [p.fixed for p in plans],
            "layer_tier": [p.layer_tier for p in plans],
            "expert_tier": [p.expert_tier for p in plans],  # per layer: where its routed experts live (a dense layer: its tier)
            "experts_streamed": [p.experts_streamed for p in plans],
            "estimate": est,
            "smallest_tp_fitting": fit_tp,
            "model": facts,
        }
        print(json.dumps(out))
        return 0
    print(f"{cfg.architecture}: {cfg.num_layers} layers, tp={args.tp}, {context['dtype']}{f' {args.quantize} weights' if args.quantize else ''}, "
          f"KV cache for {context['max_batch_size']} x {context['max_seq_len']} tokens, on {context['device']}")
    print(placement.format_plan(plans))
    where = f", streamed layers read from the {est['streamed_from']}" if est["streamed_from"] else ""
    shared = ", shared by the ranks of this host" if context["device"] == "cpu" and args.tp > 1 else ""
    print(f"\nestimated decode: {est['decode_tokens_per_s']:.3g} tokens/s ({context['hardware']} bandwidths{shared}{where}; communication not counted: see tp-bench sol)")
    per_rank = "this machine's RAM shared by tp ranks" if callable(budget) else f"{format_bytes(fast.capacity)} per rank"
    if fit_tp is None:
        print(f"no tp up to {cfg.num_heads} fits the whole model in {fast.label} ({per_rank})")
    else:
        print(f"smallest tp with every shard entirely in {fast.label} ({per_rank}): {fit_tp}")
    print(format_facts(facts))
    return 0


def format_facts(f: dict[str, float]) -> str:
    return "\n".join([
        "model size, every sense:",
        f"  parameters            {f['parameters'] / 1e9:.3g} B ({format_bytes(f['weight_bytes'])} of weights)",
        f"  FLOPs per token       {f['flops_per_token']:.3g} (2 per weight a token multiplies by; the embedding lookup not counted)",
        f"  KV cache per token    {format_bytes(f['kv_bytes_per_token'])}",
        f"  Chinchilla tokens     {f['chinchilla_tokens']:.3g} (~20 per parameter), ~{f['chinchilla_training_flops']:.3g} training FLOPs (6 N D)",
    ])


def print_rank_load(rank: int, plan: placement.RankPlan, memory: dict[str, int], verbose: bool, file=sys.stderr) -> None:
    """Every rank, at load: one line of what it allocated where (llama.cpp prints its buffer
    sizes the same way); with `generate --verbose` its plan first, as `tp-run plan` prints it."""
    used = ", ".join(f"{k.replace('_', ' ')} {format_bytes(memory[k])}" for k in ("weights_device", "weights_host", "weights_disk", "kv_cache", "staging") if memory[k])
    peak = f"peak allocated {format_bytes(memory['peak_allocated'])}" if memory["peak_allocated"] else f"peak RSS {format_bytes(memory['peak_rss'])}"
    streamed = f", {len(plan.streamed)} of {len(plan.layer_tier)} layers streamed" if plan.streamed else ""
    if plan.experts_streamed:
        streamed += f", the routed experts of {len(plan.experts_streamed)} layers streamed ({format_bytes(memory['weights_experts_streamed'])})"
    head = f"[rank {rank}] placement:\n{placement.format_plan([plan])}\n" if verbose else ""
    print(f"{head}[rank {rank}] loaded: {used}{streamed}; {peak}", file=file, flush=True)
