"""Decode GEMV on GGML block-quantized weights (kernels/cpu_quant.c) on this CPU.

    python bench/qgemv.py [--n 8192] [--k 8192] [--types Q4_0,Q4_0x8,Q8_0,Q4_K,Q6_K] [--repeats 9]

Times y = W x for one activation row (nb = 1) with W [n, k] stored as each GGML type (or its
8-row interleaved layout, "Q4_0x8", which the block linears load into where it is faster), by the
C call the fused decode step makes (kernels/cpu_quant.c tp_qgemv, its arguments checked once
by kernels/cpu_quant.py gemv_; x float32, quantised to int8 inside the call; rows split over the
kernel's pool, started at torch's thread count), beside the project's float32 and bfloat16
GEMV (kernels/cpu_decode.py gemv_) on the same shape. Each weight is held in enough copies
that together they are larger than the L3 cache, and the calls cycle through them, so every
call reads its weight from memory. Prints ms per call (median of --repeats after a warm-up)
and GB/s of weight bytes read, with the machine's read bandwidth (sum of a 1 GiB tensor).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gemv import median_seconds  # noqa: E402
from tp_runtime.kernels import cpu_decode, cpu_gemv, cpu_quant  # noqa: E402


def l3_bytes() -> int:
    try:
        for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (idx / "level").read_text().strip() == "3":
                s = (idx / "size").read_text().strip()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
                return int(s.rstrip("KMG")) * mult
    except OSError:
        pass
    return 32 << 20


def random_blocks(type_name: str, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Random payload bytes with finite float16 scales (speed does not depend on the values)."""
    block, nbytes = cpu_quant.BLOCKS[type_name]
    b = rng.integers(0, 256, (n, k // block, nbytes), dtype=np.uint8)
    scale = np.full((n, k // block), 0.01, dtype=np.float16).view(np.uint8).reshape(n, k // block, 2)
    if type_name == "Q6_K":
        b[..., 208:210] = scale
    else:
        b[..., 0:2] = scale
        if type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
            b[..., 2:4] = scale
    return torch.from_numpy(b.reshape(n, -1))


def cycled(calls):
    """A function that runs the next call of the list each time (a different weight copy)."""
    state = {"i": 0}

    def run():
        calls[state["i"] % len(calls)]()
        state["i"] += 1

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--k", type=int, default=8192)
    p.add_argument("--types", default="Q4_0,Q4_0x8,Q4_1,Q4_1x8,Q8_0,Q8_0x8,Q4_K,Q6_K")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--no-float", action="store_true", help="skip the float32 / bfloat16 reference")
    a = p.parse_args(argv)
    if not cpu_gemv.available():
        print("the C kernel library could not be built here (no C compiler?)", file=sys.stderr)
        return 1
    n, k = a.n, a.k
    l3 = l3_bytes()
    lib = cpu_gemv.load()
    x_sum = torch.ones(2**28)
    bw = x_sum.numel() * 4 / median_seconds(lambda: x_sum.sum(), 7)
    del x_sum
    print(f"W [{n}, {k}], nb = 1, {torch.get_num_threads()} thread(s) (pool: {cpu_gemv._pool_threads}), VNNI int8 dot: {cpu_quant.has_int8_dot()}, "
          f"L3 {l3 / 2**20:.0f} MiB, read bandwidth (torch sum) {bw / 1e9:.1f} GB/s")
    print(f"{'weight':<9} {'MB':>8} {'copies':>6} {'ms/call':>9} {'GB/s':>7}")
    rng = np.random.default_rng(0)
    x = torch.randn(1, k)
    rows = []

    def report(name, nbytes, copies, fn):
        sec = median_seconds(fn, a.repeats, warmup=max(3, copies))
        rows.append((name, nbytes, sec))
        print(f"{name:<9} {nbytes / 1e6:>8.1f} {copies:>6} {sec * 1e3:>9.3f} {nbytes / sec / 1e9:>7.1f}", flush=True)

    qlib = cpu_quant.lib()
    for type_name in a.types.split(","):
        base = cpu_quant.base_type(type_name)
        one = random_blocks(base, n, k, rng)
        if base != type_name:
            one = cpu_quant.pack(one, base)
        copies = max(2, -(-int(1.5 * l3) // one.numel()))
        ws = [one] + [one.clone() for _ in range(copies - 1)]
        outs = [torch.empty(1, n) for _ in ws]
        cpu_quant.gemv_(one, type_name, x, outs[0])  # the checks, once
        tid = cpu_quant.type_id(type_name)
        # no Python per call: at K = 576 the checks cost as much as the multiply
        calls = [lambda w=w.data_ptr(), o=o.data_ptr(): qlib.tp_qgemv(tid, w, x.data_ptr(), o, k, n, 0, 1) for w, o in zip(ws, outs)]
        report(type_name, one.numel(), copies, cycled(calls))
        del ws, outs, one
    if not a.no_float:
        for dtype in (torch.float32, torch.bfloat16):
            one = torch.randn(n, k).to(dtype)
            nbytes = one.numel() * one.element_size()
            copies = max(2, -(-int(1.5 * l3) // nbytes))
            ws = [one] + [one.clone() for _ in range(copies - 1)]
            xd = x.to(torch.bfloat16) if cpu_decode.gemv_kind(one) == 2 else x
            outs = [torch.empty(1, n) for _ in ws]
            report(str(dtype).replace("torch.", ""), nbytes, copies, cycled([lambda w=w, o=o: cpu_decode.gemv_(w, xd, o) for w, o in zip(ws, outs)]))
            del ws, outs, one
    del lib
    return 0


if __name__ == "__main__":
    sys.exit(main())
