"""Single-row products (decode GEMVs) on this CPU: the C kernel against F.linear.

    python bench/gemv.py [--threads 1,2] [--dtypes float32,bfloat16,float16] [--repeats 40] [--out bench/out/gemv]
    python bench/gemv.py --gemm 16,64,128,512 [--dtypes float32,bfloat16]

For the weight shapes of the SMALL and TinyLlama-1.1B benchmarks (q/k/v merged, gate/up
merged, o_proj, down_proj, LM head) it times y = W x for one activation row with
    kernel     kernels.cpu_linear (kernels/cpu_gemv.c, row-major weight)
    blas-row   F.linear, weight [out, in] row-major (nn.Linear's layout)
    blas-col   F.linear, the same weight stored column-major (what the removed --weight-layout col did)
cycling through 6 copies of each weight so that every call reads from memory, not cache
(each copy set is larger than the L3 for the big shapes; small shapes partly fit and show it).
Prints GB/s of weight read (median of --repeats) per shape, dtype and thread count, and the
machine's read bandwidth (sum of a 1 GiB tensor) for scale; writes OUT/gemv.csv. (float16:
the kernel reads the weight as stored, F.linear multiplies float16 rows.)

--gemm ROWS: the prefill products instead, several rows against the same shapes, GFLOPS of
F.linear (x @ w^T) against kernels.cpu_gemv.gemm (float32: (w @ x^T)^T, see its docstring);
writes OUT/gemm.csv.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tp_runtime.kernels import cpu_gemv  # noqa: E402

SHAPES = {  # (out, in)
    "small qkv": (1280, 768), "small gate_up": (4096, 768), "small down": (768, 2048), "small lm_head": (32000, 768),
    "tinyllama qkv": (2560, 2048), "tinyllama o": (2048, 2048), "tinyllama gate_up": (11264, 2048),
    "tinyllama down": (2048, 5632), "tinyllama lm_head": (32000, 2048),
}
COPIES = 6


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def read_bandwidth() -> float:
    x = torch.ones(2**28)
    return x.numel() * 4 / median_seconds(lambda: x.sum(), 7)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "gemv"))
    p.add_argument("--gemm", default=None, help="rows per product, e.g. 16,64,128,512: time prefill GEMMs instead")
    a = p.parse_args(argv)
    if a.gemm:
        return gemm_main(a)
    threads = [int(t) for t in a.threads.split(",")]
    torch.set_num_threads(max(threads))
    if not cpu_gemv.available():
        print("the C kernel could not be built here (no compiler?): only F.linear is measured", file=sys.stderr)
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        cpu_gemv._lib and cpu_gemv._lib.tp_gemv_start(n_threads)  # the pool only grows: 1 thread runs first
        bw = read_bandwidth()
        print(f"\n{n_threads} thread(s): read bandwidth {bw / 1e9:.1f} GB/s")
        print(f"{'shape':<20} {'dtype':<9} {'kernel':>8} {'blas-row':>9} {'blas-col':>9}   GB/s")
        for dtype_name in a.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for name, (n, k) in SHAPES.items():
                ws = [torch.randn(n, k).to(dtype) for _ in range(COPIES)]
                cols = [w.t().contiguous().t() for w in ws]
                x = torch.randn(1, k).to(dtype)
                nbytes = n * k * ws[0].element_size()
                result = {}
                for label, weights, fn in (("kernel", ws, cpu_gemv.cpu_linear), ("blas-row", ws, F.linear), ("blas-col", cols, F.linear)):
                    i = iter(range(10**9))
                    result[label] = nbytes / median_seconds(lambda: fn(x, weights[next(i) % COPIES]), a.repeats) / 1e9
                print(f"{name:<20} {dtype_name:<9} {result['kernel']:>8.1f} {result['blas-row']:>9.1f} {result['blas-col']:>9.1f}")
                rows.append({"threads": n_threads, "shape": name, "out": n, "in": k, "dtype": dtype_name, "read_bandwidth_GBps": bw / 1e9, **{f"{k_}_GBps": v for k_, v in result.items()}})
    write_csv(Path(a.out) / "gemv.csv", rows)
    return 0


def gemm_main(a: argparse.Namespace) -> int:
    torch.set_num_threads(max(int(t) for t in a.threads.split(",")))
    print(f"{torch.get_num_threads()} thread(s); GFLOPS, median of {a.repeats}")
    print(f"{'shape':<20} {'dtype':<9} {'rows':>5} {'F.linear':>9} {'gemm':>7}  ratio")
    rows = []
    for dtype_name in a.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k).to(dtype)
            for m in (int(r) for r in a.gemm.split(",")):
                x = torch.randn(m, k).to(dtype)
                flops = 2 * m * n * k
                lin = flops / median_seconds(lambda: F.linear(x, w), a.repeats) / 1e9
                ours = flops / median_seconds(lambda: cpu_gemv.gemm(x, w), a.repeats) / 1e9
                print(f"{name:<20} {dtype_name:<9} {m:>5} {lin:>9.1f} {ours:>7.1f}  {ours / lin:.2f}x")
                rows.append({"threads": torch.get_num_threads(), "shape": name, "out": n, "in": k, "dtype": dtype_name, "rows": m, "linear_GFLOPS": lin, "gemm_GFLOPS": ours})
    write_csv(Path(a.out) / "gemm.csv", rows)
    return 0


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())
