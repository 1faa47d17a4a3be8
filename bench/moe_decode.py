"""MoE decode at batch 1: weight bytes actually read per second against the machine's read bandwidth.

    python bench/moe_decode.py [--dtype bfloat16] [--repeats 3] [--new-tokens 32] [--out bench/out/moe_decode]

A Mixtral-shaped random checkpoint scaled to this machine (hidden 1024, 8 layers, 16 q / 4 kv
heads, 8 experts of 3584 features, top-2, vocab 32000; written once under --out with
checkpoint/synthetic.py) decoded greedily at batch 1 by `tp-run generate` in fresh processes,
alternated within each repeat: tp=1, tp=2 --moe tp, tp=2 --moe ep. A decode step reads the
non-routed weights (attention, norms, router, LM head, one embedding row) and, per MoE layer,
the top-k experts the token chose: bytes per token below count exactly that (summed over the
ranks; under --moe ep each rank reads only its own chosen experts). GB/s = bytes per token x
decode tokens/s; the read-bandwidth probe is the torch sum of a 1 GiB tensor with every core,
measured before and after.

Writes OUT/moe_decode.jsonl (a line per run), OUT/moe_decode.csv (a row per configuration) and
prints the table (median of --repeats, [min-max]).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (REPO, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from peers import run_ours  # noqa: E402

SHAPE = dict(hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4, intermediate_size=3584, vocab_size=32000,
             architecture="MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2)
CONFIGS = (("tp=1", 1, []), ("tp=2 --moe tp", 2, ["--moe", "tp"]), ("tp=2 --moe ep", 2, ["--moe", "ep"]))
ELEMENT = {"float32": 4, "bfloat16": 2}


def checkpoint(out: Path, dtype: str) -> Path:
    from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint

    path = out / f"mixtral-shape-{dtype}"
    if not (path / "config.json").is_file():
        print(f"writing {path} (once) ...", flush=True)
        write_checkpoint(path, llama_config_dict(**SHAPE, dtype=dtype))
    return path


def bytes_per_token(dtype: str) -> float:
    """Weights one batch-1 decode step reads, summed over the ranks (any split reads each once)."""
    from tp_runtime.config import ModelConfig
    from tp_runtime.checkpoint.synthetic import llama_config_dict

    cfg = ModelConfig.from_dict(llama_config_dict(**SHAPE))
    h, e = cfg.hidden_size, ELEMENT[dtype]
    attn = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h
    expert = 3 * h * cfg.moe.intermediate_size
    per_layer = (attn + cfg.moe.top_k * expert + 2 * h) * e + cfg.moe.num_experts * h * 4  # the router is float32
    return cfg.num_layers * per_layer + (cfg.vocab_size * h + 2 * h) * e


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=tuple(ELEMENT), default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "moe_decode"))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from tp_runtime.cli.bench import measure_memory_bandwidth

    model = checkpoint(out, a.dtype)
    per_token = bytes_per_token(a.dtype)
    cores = os.cpu_count() or 1
    probes = [measure_memory_bandwidth()]
    prompt = [[1] + [(7 * i) % 31000 + 3 for i in range(63)]]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
    with open(out / "moe_decode.jsonl", "a") as log:
        for r in range(a.repeats):
            for name, tp, extra in CONFIGS:
                res = run_ours(model, tp, max(1, cores // tp), a.dtype, None, prompt, a.new_tokens, extra=extra)
                rates[name].append(res["decode_tokens_per_s"])
                log.write(json.dumps({"config": name, "repeat": r, "dtype": a.dtype, "decode_tokens_per_s": res["decode_tokens_per_s"],
                                      "bytes_per_token": per_token, "experts": res.get("experts", {}).get("layers", [])[:1]}) + "\n")
                print(f"  repeat {r + 1}/{a.repeats} {name}: {res['decode_tokens_per_s']:.1f} tok/s", flush=True)
    probes.append(measure_memory_bandwidth())
    probe = statistics.median(probes)
    rows = []
    for name, _, _ in CONFIGS:
        med = statistics.median(rates[name])
        rows.append({"config": name, "dtype": a.dtype, "tok_s": round(med, 2), "tok_s_min": round(min(rates[name]), 2), "tok_s_max": round(max(rates[name]), 2),
                     "MB_per_token": round(per_token / 1e6, 1), "GB_s": round(med * per_token / 1e9, 2), "share_of_probe": round(med * per_token / probe, 3)})
    with open(out / "moe_decode.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"Mixtral-shaped random model, {a.dtype}, batch 1, {a.new_tokens} new tokens, {per_token / 1e6:.0f} MB of weights read per token; "
          f"read probe {probe / 1e9:.1f} GB/s (before {probes[0] / 1e9:.1f}, after {probes[1] / 1e9:.1f})")
    print(f"{'config':16} {'tok/s [min-max]':>22} {'GB/s':>7} {'of probe':>9}")
    for row in rows:
        print(f"{row['config']:16} {row['tok_s']:>8.1f} [{row['tok_s_min']:.1f}-{row['tok_s_max']:.1f}] {row['GB_s']:>7.2f} {row['share_of_probe']:>8.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
