"""Kernel sweep: Triton prefill/decode attention against torch SDPA (and flash-attn if installed).

    python bench/kernels.py [--dtype bf16] [--batch 1 8] [--lengths 1024 4096] \
        [--heads 32:8] [--head-dims 64 128] [--out-dir bench/out] [--quick]

For every (batch, length, q_heads:kv_heads, head_dim) point it times each implementation with
triton.testing.do_bench (median ms) and reports
    prefill: achieved TFLOP/s of causal attention (4 * b * hq * s^2 * d / 2 FLOPs);
    decode:  achieved GB/s of KV cache read (2 * b * hkv * len * d * element bytes),
beside the device's measured peak (a large matmul; a large device-to-device copy). Each
point also records the max abs difference to SDPA and the autotuned Triton config, so a GPU
run confirms (or corrects) the configs chosen for Hopper/Ampere in kernels/. Writes
kernels.csv (one row per point and implementation, with git sha and device) and
kernels.png. Without CUDA it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import time
from pathlib import Path

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="prefill: 1 4; decode: 1 16 64")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="prefill: 512..8192; decode cache: 1024..32768")
    p.add_argument("--heads", nargs="+", default=["32:8", "64:8"], help="q_heads:kv_heads per shard")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--max-tokens", type=int, default=1 << 18, help="skip points with batch * length above this")
    p.add_argument("--only", choices=["prefill", "decode"], default=None)
    p.add_argument("--quick", action="store_true", help="a few points only (a smoke run)")
    p.add_argument("--out-dir", type=Path, default=Path("bench/out"))
    return p.parse_args(argv)


def measured_peaks(dtype: torch.dtype, do_bench) -> tuple[float, float]:
    """(TFLOP/s of a large matmul in dtype, GB/s of a large device copy)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    del a, b
    src = torch.empty(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=200, return_mode="median")
    gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9  # read + write
    del src, dst
    torch.cuda.empty_cache()
    return tflops, gbps


def flash_attn_module():
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func, flash_attn_with_kvcache

        return flash_attn_func, flash_attn_with_kvcache
    except Exception:
        return None


def time_or_error(fn, do_bench) -> tuple[float, str]:
    try:
        return do_bench(fn, warmup=10, rep=50, return_mode="median"), ""
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan"), "out of memory"
    except Exception as e:  # a backend that refuses the shape
        return float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def bench_prefill(args, dtype, do_bench, flash, emit) -> None:
    from tp_runtime.kernels import flash_prefill, reference

    batches = args.batch or ([1] if args.quick else [1, 4])
    lengths = args.lengths or ([1024] if args.quick else [512, 1024, 2048, 4096, 8192])
    for b, s, heads, d in itertools.product(batches, lengths, args.heads, args.head_dims):
        hq, hkv = map(int, heads.split(":"))
        if b * s > args.max_tokens:
            continue
        q = torch.randn(b, hq, s, d, device="cuda", dtype=dtype)
        k = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype)
        v = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype)
        flops = 4 * b * hq * s * s * d / 2
        want = reference.prefill_attention(q, k, v)
        impls = {
            "triton": lambda: flash_prefill.prefill_attention(q, k, v),
            "sdpa": lambda: reference.prefill_attention(q, k, v),
        }
        if flash is not None:
            qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # flash-attn wants [b, s, h, d]
            impls["flash_attn"] = lambda: flash[0](qt, kt, vt, causal=True)
        for name, fn in impls.items():
            ms, err = time_or_error(fn, do_bench)
            diff = ""
            if not err:
                got = fn()
                got = got.transpose(1, 2) if name == "flash_attn" else got
                diff = f"{(got.float() - want.float()).abs().max().item():.3g}"
            config = str(flash_prefill._prefill_fwd.best_config) if name == "triton" and not err else ""
            emit("prefill", name, b, s, hq, hkv, d, ms, flops / (ms * 1e-3) / 1e12 if ms == ms else float("nan"), "TFLOP/s", diff, config, err)
        del q, k, v, want
        torch.cuda.empty_cache()


def bench_decode(args, dtype, do_bench, flash, emit) -> None:
    from tp_runtime.kernels import flash_decode, reference

    batches = args.batch or ([16] if args.quick else [1, 16, 64])
    lengths = args.lengths or ([4096] if args.quick else [1024, 4096, 16384, 32768])
    for b, n, heads, d in itertools.product(batches, lengths, args.heads, args.head_dims):
        hq, hkv = map(int, heads.split(":"))
        if b * n > args.max_tokens:
            continue
        q = torch.randn(b, hq, d, device="cuda", dtype=dtype)
        # the model's layout: a [:b] slice of a [layers, max_batch, kv, max_seq, d] buffer
        k = torch.randn(2, b, hkv, n, d, device="cuda", dtype=dtype)[1]
        v = torch.randn(2, b, hkv, n, d, device="cuda", dtype=dtype)[1]
        lens = torch.full((b,), n, device="cuda", dtype=torch.int64)
        kv_bytes = 2 * b * hkv * n * d * k.element_size()
        want = reference.decode_attention(q, k, v, lens, None, n)
        impls = {
            "triton": lambda: flash_decode.decode_attention(q, k, v, lens, None, n),
            "sdpa": lambda: reference.decode_attention(q, k, v, lens, None, n),
        }
        if flash is not None:
            kt, vt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [b, s, h, d]
            lens32 = lens.to(torch.int32)
            impls["flash_attn"] = lambda: flash[1](q[:, None], kt, vt, cache_seqlens=lens32)[:, 0]
        for name, fn in impls.items():
            ms, err = time_or_error(fn, do_bench)
            diff = ""
            if not err:
                diff = f"{(fn().float() - want.float()).abs().max().item():.3g}"
            config = ""
            if name == "triton" and not err:
                splits, chunk = flash_decode.split_plan(b, hkv, n, q.device)
                config = f"{flash_decode._decode_split.best_config}; splits {splits} x {chunk} keys"
            emit("decode", name, b, n, hq, hkv, d, ms, kv_bytes / (ms * 1e-3) / 1e9 if ms == ms else float("nan"), "GB/s", diff, config, err)
        del q, k, v, want
        torch.cuda.empty_cache()


def plot(rows: list[dict], peaks: tuple[float, float], path: Path) -> bool:
    from tp_runtime import optional

    plt = optional.pyplot(path.name)
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, kind, unit, peak in ((axes[0], "prefill", "TFLOP/s", peaks[0]), (axes[1], "decode", "GB/s", peaks[1])):
        pts = [r for r in rows if r["kernel"] == kind and r["throughput"] == r["throughput"]]
        series = sorted({(r["impl"], r["batch"], r["q_heads"], r["kv_heads"], r["head_dim"]) for r in pts})
        for impl, b, hq, hkv, d in series:
            sel = sorted((r for r in pts if (r["impl"], r["batch"], r["q_heads"], r["kv_heads"], r["head_dim"]) == (impl, b, hq, hkv, d)), key=lambda r: r["length"])
            ax.plot([r["length"] for r in sel], [r["throughput"] for r in sel], marker="o", linestyle="-" if impl == "triton" else "--", label=f"{impl} b{b} {hq}:{hkv} d{d}")
        ax.axhline(peak, color="black", linewidth=1, label=f"measured peak {peak:.0f}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length" if kind == "prefill" else "cache length")
        ax.set_ylabel(unit)
        ax.set_title(kind)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device on this machine; the kernel benchmark needs one, nothing done.")
        return 0
    try:
        from triton.testing import do_bench
    except ImportError as e:
        print(f"bench/kernels.py: triton is not importable ({e}); install triton to benchmark the kernels.", file=sys.stderr)
        return 1

    dtype = DTYPES[args.dtype]
    device = torch.cuda.get_device_name()
    cap = ".".join(map(str, torch.cuda.get_device_capability()))
    flash = flash_attn_module()
    peak_tflops, peak_gbps = measured_peaks(dtype, do_bench)
    print(f"{device} (sm_{cap.replace('.', '')}), {args.dtype}: measured peak {peak_tflops:.0f} TFLOP/s (matmul), {peak_gbps:.0f} GB/s (copy); flash-attn {'found' if flash else 'not installed'}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    from tp_runtime.cli.sweep import git_sha

    sha, stamp = git_sha(), time.strftime("%Y-%m-%dT%H:%M:%S")
    rows: list[dict] = []
    header = f"{'kernel':8} {'impl':10} {'b':>3} {'len':>6} {'hq:hkv':>7} {'d':>4} {'ms':>9} {'throughput':>16} {'of peak':>8} {'max diff':>9}  config"
    print(header)

    def emit(kernel, impl, b, length, hq, hkv, d, ms, throughput, unit, diff, config, err):
        peak = peak_tflops if unit == "TFLOP/s" else peak_gbps
        row = dict(time=stamp, git_sha=sha, device=device, capability=cap, dtype=args.dtype, kernel=kernel, impl=impl, batch=b, length=length,
                   q_heads=hq, kv_heads=hkv, head_dim=d, ms=ms, throughput=throughput, unit=unit, peak=peak, max_abs_diff_vs_sdpa=diff, config=config, error=err)
        rows.append(row)
        frac = f"{100 * throughput / peak:.0f}%" if throughput == throughput else "-"
        print(f"{kernel:8} {impl:10} {b:>3} {length:>6} {f'{hq}:{hkv}':>7} {d:>4} {ms:>9.4f} {throughput:>8.1f} {unit:<7} {frac:>8} {diff:>9}  {err or config}", flush=True)

    if args.only in (None, "prefill"):
        bench_prefill(args, dtype, do_bench, flash, emit)
    if args.only in (None, "decode"):
        bench_decode(args, dtype, do_bench, flash, emit)

    csv_path = args.out_dir / "kernels.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["kernel"])
        w.writeheader()
        w.writerows(rows)
    png_path = args.out_dir / "kernels.png"
    plotted = plot(rows, (peak_tflops, peak_gbps), png_path)
    print(f"wrote {csv_path}" + (f" and {png_path}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
