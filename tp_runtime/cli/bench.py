"""`tp-bench`: the benchmark and speed-of-light commands.

    tp-bench sol --model kimi-k2.5 --hardware h100 --chips 1..2048 --alpha 10us,1us,0.1us --out DIR
    tp-bench calibrate [--name this-cpu] [--alpha-us A --beta-gbps B]

`sol` evaluates tp_runtime.sol over chip counts and latency assumptions, prints each curve's
best point and the "k x lower latency gives k x tokens/s" table, and with --out writes
DIR/sol.csv and DIR/sol.png. `calibrate` measures this machine's memory bandwidth and matmul
rate and saves them (with a link's alpha and bandwidth, given by flags for now) as a preset
that `sol --hardware NAME --link NAME` and the sweep's prediction lines load by name.

Subcommands register in COMMANDS (name -> (add_arguments, run)); `sweep` adds itself there.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tp_runtime import optional, sol, units
from tp_runtime.errors import ConfigError, TPRuntimeError

# ---------------------------------------------------------------------------------------------
# flag parsing

def parse_duration(text: str) -> float:
    """'10us' -> 1e-05 (units.parse_duration, as an argparse type)."""
    try:
        return units.parse_duration(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_durations(text: str) -> list[float]:
    vals = [parse_duration(t) for t in text.split(",") if t.strip()]
    if not vals:
        raise argparse.ArgumentTypeError("--alpha needs at least one value, e.g. 10us,1us,0.1us")
    return vals


def parse_chips(text: str) -> list[int]:
    """'1..2048' -> powers of two from 1 to 2048; '1,2,8' -> those counts."""
    text = text.strip()
    m = re.fullmatch(r"(\d+)\.\.(\d+)", text)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        out = [2**i for i in range(0, 64) if lo <= 2**i <= hi]
        if lo < 1 or not out:
            raise argparse.ArgumentTypeError(f"--chips {text}: no power of two between {lo} and {hi}")
        return out
    try:
        out = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--chips takes LO..HI (powers of two) or a comma list of integers, got {text!r}") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError(f"--chips {text}: chip counts must be positive")
    return out




def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# ---------------------------------------------------------------------------------------------
# sol


def _add_sol(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="kimi-k2.5", help="preset (%s), saved preset, or a Hugging Face model folder" % ", ".join(sol.MODELS))
    p.add_argument("--hardware", default="h100", help="preset (%s) or a saved preset from `tp-bench calibrate`" % ", ".join(sol.HARDWARE))
    p.add_argument("--link", default="nvlink4", help="interconnect preset (%s) or a saved preset; gives the bandwidth, and alpha when --alpha is not given" % ", ".join(sol.LINKS))
    p.add_argument("--chips", type=parse_chips, default=parse_chips("1..2048"), help="LO..HI for powers of two, or a comma list (default 1..2048)")
    p.add_argument("--alpha", type=parse_durations, default=None, help="per-step latencies to compare, e.g. 10us,1us,0.1us (default: the link's)")
    p.add_argument(
        "--algorithm", choices=sol.ALGORITHMS, default="tree",
        help="collective algorithm, which sets the steps per collective: ring 2(p-1), tree 2 log2 p, oneshot 1 "
        "(default tree, the latency-optimal choice of NCCL-like libraries at scale; with oneshot nothing grows with p, "
        "so every curve peaks at the largest chip count)",
    )
    p.add_argument("--parallel", choices=("auto", *sol.PARALLEL), default="auto",
                   help="tp (--moe tp: every expert sliced), ep (--moe ep: experts whole per chip, attention TP), dp (--moe ep --attention dp: "
                        "attention whole per chip, its own sequences, experts over all-to-all); auto: ep for MoE models, tp for dense")
    p.add_argument("--a2a-link", default=None, metavar="NAME|measured",
                   help="the all-to-all's alpha and bandwidth from this link preset instead of --link/--alpha; 'measured': this machine's, "
                        "from the newest sweep calibration (`tp-bench sweep`, `tp-bench calibrate --ranks`; its 2-rank all-to-all where measured). "
                        "Only --parallel dp issues all-to-alls")
    p.add_argument("--context", type=int, default=4096, help="cached positions each decode step attends to (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences per decode step (default 1: a single user)")
    p.add_argument("--out", type=Path, default=None, help="folder for sol.csv and sol.png (omit: tables only)")


def run_sol(args: argparse.Namespace) -> int:
    model = sol.load_model(args.model)
    hw = sol.load_hardware(args.hardware)
    link = sol.load_link(args.link)
    alphas = args.alpha or [link.alpha_s]
    a2a = None
    if args.a2a_link is not None:
        if args.a2a_link == "measured":
            from tp_runtime.cli.sweep import measured_a2a_link

            a2a = measured_a2a_link()
        else:
            a2a = sol.load_link(args.a2a_link)
    kw = dict(algorithm=args.algorithm, context_len=args.context, batch=args.batch, parallel=args.parallel, links={"all_to_all": a2a} if a2a else None)
    curves = sol.sweep(model, hw, link, args.chips, alphas, **kw)
    roof = sol.sweep(model, hw, sol.Link("no latency", 0.0, link.bandwidth_Bps), args.chips, [0.0], **dict(kw, links=None))[0.0]  # (every kind at alpha 0)
    mode = next(iter(curves.values()))[0].parallel

    print(model.summary())
    print(f"{hw.name}: {hw.mem_bandwidth_Bps / 1e12:.3g} TB/s, {hw.peak_flops / 1e12:.3g} TFLOP/s, {hw.memory_bytes / 1e9:.3g} GB  [{hw.source}]")
    print(f"{link.name}: {link.bandwidth_Bps / 1e9:.3g} GB/s, alpha {units.format_duration(link.alpha_s)}  [{link.source}]")
    if a2a is not None:
        print(f"all-to-all over {a2a.name}: {a2a.bandwidth_Bps / 1e9:.3g} GB/s, alpha {units.format_duration(a2a.alpha_s)} (every curve)  [{a2a.source}]")
    print(f"{mode.upper()}, {args.algorithm} collectives, context {args.context}, batch {args.batch}\n")

    rows = []
    for alpha, preds in curves.items():
        b = sol.best(preds)
        fit = [q.p for q in preds if q.fits]
        last = preds[-1]
        if b is None:
            rows.append([units.format_duration(alpha), "-", "-", "-", "-", "-", "-", "no chip count fits", ""])
            continue
        rows.append([
            units.format_duration(alpha), f"{b.tokens_per_s:,.0f}", str(b.p), b.bound,
            f"{b.memory_s * 1e6:,.1f}", f"{b.comm_s * 1e6:,.1f}", str(b.collectives_per_token),
            f"{fit[0]}" if fit else "-", f"{last.tokens_per_s:,.0f} @ {last.p}",
        ])
    print("Best point of each curve (the peak; only chip counts whose shard fits):")
    print(_table(["alpha", "peak tok/s", "at chips", "bound", "memory us", "comm us", "colls/token", "fits from", "at max chips"], rows))

    scaling = sol.latency_scaling(curves)
    if scaling:
        print('\nClaim "k x lower latency gives k x tokens/s" (holds: within 10% of k):')
        srows = []
        for s in scaling:
            srows.append([
                f"{units.format_duration(s.alpha_hi)} -> {units.format_duration(s.alpha_lo)}", f"{s.alpha_ratio:.3g}x",
                f"{s.ratio_fixed:.2f}x @ {s.p_fixed}", f"{s.comm_share_fixed:.0%} -> {s.comm_share_fixed_lo:.0%}", "yes" if s.holds(s.ratio_fixed) else "no",
                f"{s.ratio_at_best_hi:.2f}x @ {s.p_best_hi}",
                f"{s.ratio_reoptimised:.2f}x ({s.p_best_hi} -> {s.p_best_lo})", "yes" if s.holds(s.ratio_reoptimised) else "no",
            ])
        print(_table(["alpha", "k", "fixed chips", "comm share", "holds", "at best(hi)", "re-optimised", "holds"], srows))

    print("\nPer point (the drawn mode's figures; every mode's tokens/s; comm: which kind of collective takes most of it):")
    print(_table(*per_point_table(model, hw, link, args.chips, curves, kw)))
    if model.is_moe:
        print("(* the mode's shard does not fit)")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        csv_path = args.out / "sol.csv"
        with csv_path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(sol.CSV_COLUMNS))
            w.writeheader()
            for preds in curves.values():
                for q in preds:
                    w.writerow(q.row())
        png_path = args.out / "sol.png"
        drawn = plot_sol(curves, roof, model, hw, link, args, png_path, a2a)
        print(f"\nwrote {csv_path}" + (f" and {png_path}" if drawn else ""))
    return 0


def per_point_table(model: sol.ModelShape, hw: sol.Hardware, link: sol.Link, chips: list[int], curves: dict[float, list[sol.Prediction]],
                    kw: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    modes = sol.modes_for(model)
    header = ["alpha", "chips", "mode", "tok/s", "fits", "bound", "comm share", "comm: dominant"] + ([f"{m} tok/s" for m in modes] if len(modes) > 1 else [])
    rows = []
    for alpha, preds in curves.items():
        for q in preds:
            row = [units.format_duration(alpha), str(q.p), q.parallel, f"{q.tokens_per_s:,.0f}", "yes" if q.fits else "no", q.bound,
                   f"{q.comm_s / q.seconds_per_token:.0%}", q.dominant_collective or "-"]
            if len(modes) > 1:
                for m in modes:
                    other = q if m == q.parallel else sol.predict(model, hw, link, q.p, alpha_s=alpha, **dict(kw, parallel=m))
                    row.append(f"{other.tokens_per_s:,.0f}" + ("" if other.fits else "*"))
            rows.append(row)
    return header, rows


def plot_sol(curves: dict[float, list[sol.Prediction]], roof: list[sol.Prediction], model: sol.ModelShape, hw: sol.Hardware, link: sol.Link, args: argparse.Namespace, path: Path,
             a2a: sol.Link | None = None) -> bool:
    plt = optional.pyplot(path.name)
    if plt is None:
        return False
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    no_fit = [q.p for q in roof if not q.fits]
    if no_fit:
        lo = min(q.p for q in roof)
        ax.axvspan(lo / 1.3, max(no_fit) * 1.3, color="0.92", zorder=0, label=f"shard > {hw.memory_bytes / 1e9:.0f} GB: does not fit")
    rx = [q.p for q in roof]
    ax.plot(rx, [q.tokens_per_s for q in roof], "--", color="0.45", lw=1.3, label="alpha = 0 (memory / compute bound)", zorder=1)

    for i, (alpha, preds) in enumerate(curves.items()):
        c = colors[i % len(colors)]
        fit = [q for q in preds if q.fits]
        out = [q for q in preds if not q.fits]
        label = f"alpha = {alpha * 1e6:g} µs"
        if out:
            # dotted, hollow: predicted but the shard does not fit; joined to the first fitting point
            xs = [q.p for q in out] + ([fit[0].p] if fit else [])
            ys = [q.tokens_per_s for q in out] + ([fit[0].tokens_per_s] if fit else [])
            ax.plot(xs, ys, ":", color=c, alpha=0.6, lw=1.2, zorder=2)
            ax.plot([q.p for q in out], [q.tokens_per_s for q in out], "o", mfc="white", mec=c, alpha=0.7, ms=5, zorder=2)
        ax.plot([q.p for q in fit], [q.tokens_per_s for q in fit], "o-", color=c, lw=2, ms=4.5, label=label, zorder=3)
        b = sol.best(preds)
        if b is not None:
            ax.plot([b.p], [b.tokens_per_s], "*", color=c, mec="black", mew=0.7, ms=16, zorder=4)
            ax.annotate(
                f"{b.tokens_per_s:,.0f} tok/s\n@ {b.p} chips", (b.p, b.tokens_per_s), textcoords="offset points",
                xytext=(-8, -12), ha="right", va="top", fontsize=8.5, color=c, fontweight="bold",
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec=c, lw=0.6, alpha=0.85), zorder=5,
            )

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted({q.p for preds in curves.values() for q in preds}))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.set_xlabel("chips (p)")
    ax.set_ylabel("single-user decode tokens/s" if args.batch == 1 else f"tokens/s (batch {args.batch})")
    mode = next(iter(curves.values()))[0].parallel.upper()
    ax.set_title(
        f"{model.name} on {hw.name} + {link.name} ({link.bandwidth_Bps / 1e9:.3g} GB/s): tokens/s vs chips\n"
        f"{mode}, {args.algorithm} collectives, context {args.context}; speed-of-light model (tp_runtime.sol)"
        + (f"\nall-to-all at {a2a.name}: alpha {units.format_duration(a2a.alpha_s)}, {a2a.bandwidth_Bps / 1e9:.3g} GB/s (every curve)" if a2a else ""),
        fontsize=10,
    )
    ax.grid(True, which="major", color="0.85", lw=0.8)
    ax.grid(True, which="minor", axis="y", color="0.93", lw=0.5)
    ymin = min(q.tokens_per_s for preds in curves.values() for q in preds)
    ymax = max(q.tokens_per_s for q in roof)
    ax.set_ylim(ymin / 2, ymax * 3)
    ax.legend(loc="upper left", fontsize=8.5, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# calibrate


def _add_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="this-cpu", help="preset name (default this-cpu); saved as NAME.json in %s" % sol.preset_dir())
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="measure the CPU (default) or CUDA device 0")
    p.add_argument("--size-mib", type=int, default=1024, help="tensor read for the bandwidth test (default 1024 MiB)")
    p.add_argument("--matmul-n", type=int, default=2048, help="square fp32 matmul size (default 2048)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats; the median is kept (default 7)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--alpha-us", type=float, default=None, help="link latency per collective step, microseconds (until the transport is measured)")
    p.add_argument("--beta-gbps", type=float, default=None, help="link bandwidth, GB/s (until the transport is measured)")
    p.add_argument("--ranks", default=None, help="also measure p local ranks (e.g. 1,2,3,4): per-rank bandwidth, the transport's alpha/beta, host overhead; saved as this-cpu-TRANSPORT for the sweep")
    p.add_argument("--transport", choices=("shm", "gloo", "zmq"), default="shm", help="transport measured with --ranks")


def _timed(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_memory_bandwidth(size_mib: int = 1024, repeats: int = 7, device: str = "cpu") -> float:
    """Bytes/s reading a float32 tensor of size_mib MiB (torch sum; median of repeats)."""
    import torch

    n = size_mib * 2**20 // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = _timed(lambda: x.sum(), repeats, sync)
    del x
    return n * 4 / t


def measure_matmul_rate(n: int = 2048, repeats: int = 7, device: str = "cpu") -> float:
    """FLOP/s of an n x n x n float32 matmul (median of repeats)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = _timed(lambda: a @ b, repeats, sync)
    return 2.0 * n**3 / t


def _memory_capacity(device: str) -> float:
    if device == "cuda":
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def run_calibrate(args: argparse.Namespace) -> int:
    if args.ranks:
        from tp_runtime.cli.sweep import calibrate_local

        ranks = sorted({int(r) for r in args.ranks.split(",") if r.strip()})
        path = calibrate_local(args.transport, ranks, repeats=args.repeats)  # generic width; the sweep calibrates its model's
        print(f"saved local-ranks calibration to {path}")
        return 0
    if (args.alpha_us is None) != (args.beta_gbps is None):
        raise ConfigError("give both --alpha-us and --beta-gbps for the link, or neither")
    if args.size_mib < 1 or args.matmul_n < 1 or args.repeats < 1:
        raise ConfigError("--size-mib, --matmul-n and --repeats must be positive")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bw = measure_memory_bandwidth(args.size_mib, args.repeats, args.device)
    flops = measure_matmul_rate(args.matmul_n, args.repeats, args.device)
    mem = _memory_capacity(args.device)
    took = time.perf_counter() - t0
    when = _dt.datetime.now().isoformat(timespec="seconds")
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else (platform.processor() or platform.machine())
    threads = torch.get_num_threads()
    hw = sol.Hardware(
        name=args.name, mem_bandwidth_Bps=bw, peak_flops=flops, memory_bytes=mem,
        source=f"tp-bench calibrate {when} on {platform.node()} ({where}, {args.device}, {threads} threads): "
        f"sum of {args.size_mib} MiB fp32, {args.matmul_n}^3 fp32 matmul, median of {args.repeats}",
    )
    link = None
    if args.alpha_us is not None:
        if args.alpha_us < 0 or args.beta_gbps <= 0:
            raise ConfigError("--alpha-us must be >= 0 and --beta-gbps > 0")
        link = sol.Link(args.name, args.alpha_us * 1e-6, args.beta_gbps * 1e9, f"given by flags (--alpha-us {args.alpha_us} --beta-gbps {args.beta_gbps}) {when}; not measured")
    measured = {"device": args.device, "threads": threads, "size_mib": args.size_mib, "matmul_n": args.matmul_n, "repeats": args.repeats, "seconds": round(took, 2), "when": when}
    path = sol.save_preset(args.name, hardware=hw, link=link, extra=measured)
    print(f"memory bandwidth  {bw / 1e9:8.1f} GB/s   (sum of {args.size_mib} MiB fp32)")
    print(f"matmul rate       {flops / 1e9:8.1f} GFLOP/s ({args.matmul_n}^3 fp32)")
    print(f"memory            {mem / 2**30:8.1f} GiB")
    if link is not None:
        print(f"link              alpha {args.alpha_us:g} us, {args.beta_gbps:g} GB/s (from flags)")
    print(f"saved preset {args.name!r} to {path} ({took:.1f} s); use --hardware {args.name}" + (f" --link {args.name}" if link else ""))
    return 0


def _add_sweep_lazy(p: argparse.ArgumentParser) -> None:
    from tp_runtime.cli.sweep import _add_sweep

    _add_sweep(p)


def _run_sweep_lazy(args: argparse.Namespace) -> int:
    from tp_runtime.cli.sweep import run_sweep

    return run_sweep(args)


# ---------------------------------------------------------------------------------------------
# entry point

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "sol": ("speed-of-light tokens/s vs chips and link latency (CSV + PNG + tables)", _add_sol, run_sol),
    "calibrate": ("measure this machine's memory bandwidth and matmul rate; save as a preset", _add_calibrate, run_calibrate),
    "sweep": ("measured decode tokens/s vs tp and injected latency, beside the model's prediction", _add_sweep_lazy, _run_sweep_lazy),
    "serve": ("load an OpenAI-compatible server (ours, transformers serve, llama-server) like `vllm bench serve`: TTFT, TPOT, ITL, E2EL",
              lambda p: _serve_module()._add_serve(p), lambda a: _serve_module().run_serve_bench(a)),
}


def _serve_module():
    from tp_runtime.cli import bench_serve

    return bench_serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tp-bench", description="Benchmarks and the speed-of-light model of tp-runtime.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add, _run) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return COMMANDS[args.command][2](args)
    except TPRuntimeError as e:
        print(f"tp-bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tp-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
