"""Offload benchmark: decode tokens/s with a share of the decoder layers streamed from disk.

    python bench/offload.py [--shape tiny|small|tinyllama] [--fractions 0,0.25,0.5,1.0]
        [--tp 1[,2...]] [--dtype float32] [--repeats 3] [--new-tokens 32] [--prompt-len 16]
        [--out bench/out/offload] [--quick]

On a CPU a rank's tiers are host RAM (layers loaded once) and the mmap'd checkpoint (the
"disk" tier: a streamed layer is copied from the mapping into one staging layer every time it
runs). `tp-run generate --max-host-memory SIZE` plans per rank: the fixed items (KV cache,
activations, embedding, LM head, norm, and one staging layer once anything streams) first,
then whole decoder layers in order while they fit; the rest are streamed. So to stream
exactly s of the L layers this script asks the pure planner (`placement.shard_bytes`) for
the bytes and passes

    budget = fixed items + staging (the largest layer) + the first L - s layers (+ slack)

(no budget flag at all for 0 streamed layers: the default, everything resident), then checks
with `placement.plan_rank` that every rank streams what was asked and records the fraction
it actually streams (`RankPlan.streamed_fraction`, by bytes; s = round(fraction x L)). One
streamed layer cannot be planned when the layers are equal (its staging layer takes the room
it frees): such a point streams the next count the planner gives, and says so.

Measured, per (tp, fraction) and repeat, in a fresh `python -m tp_runtime generate ... --json`
process (the CLI starts the ranks; greedy, --ignore-eos, batch 1, a fixed random prompt):
    decode / prefill tokens/s   as the CLI reports them
    peak RSS over start         memory.ranks[r].peak_rss - rss_at_start (max over ranks):
                                what the model, KV cache, staging and touched mapped pages
                                added to the process
    streamed MiB/step           memory.ranks[r].stream_bytes_per_step (max over ranks),
                                checked against the plan's disk bytes
Within a repeat every fraction runs once (A/B interleaving, so drift in the machine's load
hits all fractions alike), starting one point later each repeat; the table shows the median
of the repeats with [min-max].

Estimated, per point: 1 / max over ranks of RankPlan.decode_seconds(page_cache=True), the
plan's own arithmetic at the "this-cpu" bandwidths the runtime plans with: every weight read
once from RAM per token, plus each streamed byte copied out of the page cache at half the RAM
bandwidth (a copy reads and writes). The checkpoint is read once before the runs so that it
is in the page cache, which is where the model (far smaller than RAM) streams from.
page_cache=False (streamed bytes at placement.DISK_READ_Bps, a cold NVMe read) is recorded for
reference. Neither counts communication, and at tp > 1 each rank is charged the whole
machine's bandwidth, so the tp > 1 estimates are upper bounds on a shared host.

Writes OUT/offload.jsonl (one record per run, as runs finish, and one summary per point, each
with git sha, host, torch version and the settings), OUT/offload.csv (the summaries) and
OUT/offload.png (decode tokens/s vs % streamed: measured markers with min-max whiskers, the
estimate as a line, one colour per tp). --quick: tiny shape, 1 repeat, 8 new tokens.
"""

from __future__ import annotations

import argparse
import csv
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (REPO, HERE):  # the package, and the sibling benchmark whose helpers are shared
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from peers import _last_json, open_jsonl, summarise  # noqa: E402

from tp_runtime import optional, placement, sol  # noqa: E402
from tp_runtime.cli.sweep import DUMMY_SHAPES, dummy_checkpoint  # noqa: E402
from tp_runtime.config import ModelConfig  # noqa: E402

SHAPES = ("tiny", "small", "tinyllama")
RUN_TIMEOUT_S = 900
MiB = 2**20
# the runtime plans CPU ranks with this preset (engine/llm.py: plan_for); placement does not
# depend on it, the estimate does
HARDWARE = "this-cpu"
# a little headroom over the exact byte count: far below a layer, so it never admits one
BUDGET_SLACK = 4096
# a streamed-bytes count further than this from the plan's disk bytes is reported
STREAM_TOLERANCE = 0.01


@dataclass
class Point:
    """One (tp, streamed layers) configuration: its budget and the plan it must produce."""

    tp: int
    requested: float  # fraction asked for
    streamed_layers: int
    budget: int | None  # --max-host-memory; None: no flag (everything resident)
    plans: list[placement.RankPlan]

    @property
    def actual(self) -> float:
        return max(p.streamed_fraction for p in self.plans)

    @property
    def disk_bytes(self) -> int:  # per step, the rank that streams most
        return max(p.disk_read_bytes for p in self.plans)

    def estimate(self, page_cache: bool) -> float:
        seconds = max(p.decode_seconds(page_cache) for p in self.plans)  # the slowest rank sets the pace
        return 1.0 / seconds if seconds else 0.0

    @property
    def label(self) -> str:
        return f"tp={self.tp} streamed {100 * self.actual:.0f}% ({self.streamed_layers} layers)"


# ---------------------------------------------------------------------------------------------
# planning


def plan_points(cfg: ModelConfig, tp: int, fractions: list[float], dtype: str, max_seq_len: int) -> list[Point]:
    """A budget per fraction that streams round(fraction x layers) layers on every rank, with
    the plans the runtime will make from it (checked here, before anything runs)."""
    n = cfg.num_layers
    points: dict[int, Point] = {}
    for f in fractions:
        want = round(f * n)
        streamed, budget, plans = want, None, rank_plans(cfg, tp, dtype, max_seq_len, None)
        # Streaming costs a staging layer: with equal layers, a budget that keeps all but one
        # resident keeps them all (the staging layer is the room the streamed one would
        # free), so one streamed layer cannot be had; take the next count the planner gives.
        while streamed:
            budget = host_budget(cfg, tp, dtype, max_seq_len, n - streamed)
            plans = rank_plans(cfg, tp, dtype, max_seq_len, budget)
            if {len(p.streamed) for p in plans} == {streamed} or streamed == n:
                break
            streamed += 1
        got = sorted({len(p.streamed) for p in plans})
        if got != [streamed]:
            print(f"warning: tp={tp} fraction {f:g}: the plan streams {got} layers per rank, not {streamed}", file=sys.stderr)
        elif streamed != want:
            print(f"tp={tp} fraction {f:g}: {want} streamed layer(s) cannot be planned (a streamed layer needs a staging "
                  f"layer as large); streaming {streamed}", file=sys.stderr)
        point = Point(tp, f, streamed, budget, plans)
        if streamed in points:  # two fractions come to the same layer count: run it once,
            other = points[streamed]  # labelled with the fraction nearer what it streams
            print(f"tp={tp}: fractions {other.requested:g} and {f:g} both stream {streamed} layers; measured once", file=sys.stderr)
            if abs(other.requested - point.actual) <= abs(f - point.actual):
                continue
        points[streamed] = point
    return sorted(points.values(), key=lambda p: p.streamed_layers)


def host_budget(cfg: ModelConfig, tp: int, dtype: str, max_seq_len: int, resident: int) -> int:
    """--max-host-memory that keeps the first `resident` layers (and streams the rest) on the
    rank that needs most: fixed items, one staging layer, those layers."""
    need = []
    for rank in range(tp):
        s = placement.shard_bytes(cfg, tp, rank, dtype, max_seq_len, 1)
        # CPU: one staging layer, as large as the largest layer (placement._staging_layers)
        fixed = s.kv_cache + s.activations + s.embedding + s.lm_head + s.norm + max(s.layers)
        need.append(fixed + sum(s.layers[:resident]))
    # one flag for all ranks: a rank that needs less could keep a layer more, which
    # plan_points sees in the plans
    return max(need) + BUDGET_SLACK


def rank_plans(cfg: ModelConfig, tp: int, dtype: str, max_seq_len: int, budget: int | None) -> list[placement.RankPlan]:
    """Every rank's plan as `generate` makes it (engine/llm.py: plan_for) under this budget;
    None: the default budget, the share of available RAM the CLI gives a rank."""
    host = budget if budget is not None else placement.default_host_budget(tp)
    tiers = placement.make_tiers("cpu", None, host, sol.HARDWARE[HARDWARE])
    return [placement.plan_rank(cfg, tp, r, dtype, max_seq_len, 1, "cpu", tiers, disk_dtype=cfg.checkpoint_dtype) for r in range(tp)]


def warm_page_cache(model_dir: Path) -> int:
    """Read the checkpoint once, so that streamed layers come from the page cache in every run
    (the first run would otherwise pay the disk, and the estimate assumes the page cache)."""
    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with f.open("rb") as fh:
            while chunk := fh.read(16 * MiB):
                total += len(chunk)
    return total


# ---------------------------------------------------------------------------------------------
# running


def run_generate(model: Path, point: Point, dtype: str, prompt: list[int], new: int, max_seq_len: int) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "tp_runtime", "generate", "--model", str(model), "--tp", str(point.tp),
        "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(new), "--ignore-eos",
        "--quiet", "--json", "--dtype", dtype, "--max-seq-len", str(max_seq_len), "--max-batch-size", "1",
    ]
    if point.budget is not None:
        cmd += ["--max-host-memory", str(point.budget)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=REPO)
    out = _last_json(proc, "tp_runtime generate")
    for k in ("output_ids", "text", "outputs"):  # tokens of a random model: noise in the record
        out.pop(k, None)
    return out


def check_run(point: Point, r: dict[str, Any]) -> list[str]:
    """What the run did that the plan did not say it would."""
    problems = []
    mem = r["memory"]
    if mem["streamed_layers"] != point.streamed_layers:
        problems.append(f"streamed {mem['streamed_layers']} layers, planned {point.streamed_layers}")
    got = max(m["stream_bytes_per_step"] for m in mem["ranks"])
    want = point.disk_bytes
    if abs(got - want) > STREAM_TOLERANCE * max(want, 1):
        problems.append(f"streamed {got / MiB:.1f} MiB/step, planned {want / MiB:.1f} MiB")
    return problems


# ---------------------------------------------------------------------------------------------
# driver


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="small", help="random dummy checkpoint (default small: hidden 768, 12 layers)")
    p.add_argument("--fractions", default="0,0.25,0.5,1.0", help="shares of the decoder layers streamed, comma list in [0, 1]")
    p.add_argument("--tp", default="1", help="tensor-parallel sizes, comma list (local ranks)")
    p.add_argument("--dtype", choices=sorted(placement.DTYPE_BYTES), default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "offload"), help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny shape, 1 repeat, 8 new tokens")
    a = p.parse_args(argv)
    if a.quick:
        a.shape, a.repeats, a.new_tokens = "tiny", 1, 8
    try:
        a.fractions = [float(f) for f in a.fractions.split(",") if f.strip()]
        a.tp = sorted({int(t) for t in str(a.tp).split(",") if t.strip()})
    except ValueError as e:
        p.error(str(e))
    if not a.fractions or any(not 0.0 <= f <= 1.0 for f in a.fractions):
        p.error("--fractions needs values in [0, 1]")
    if not a.tp or min(a.tp) < 1:
        p.error("--tp needs values >= 1")
    if a.repeats < 1 or a.prompt_len < 1 or a.new_tokens < 1:
        p.error("--repeats, --prompt-len and --new-tokens must be >= 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    out_dir = Path(a.out)
    jsonl = out_dir / "offload.jsonl"
    settings = {k: getattr(a, k) for k in ("shape", "fractions", "tp", "dtype", "repeats", "new_tokens", "prompt_len", "quick")}
    emit = open_jsonl(out_dir, "offload", settings)

    start = time.perf_counter()
    model = dummy_checkpoint(DUMMY_SHAPES[a.shape], a.shape)
    cfg = ModelConfig.from_model_dir(model)
    max_seq_len = a.prompt_len + a.new_tokens + 8  # what the run needs, so the KV cache stays small
    points = {tp: plan_points(cfg, tp, a.fractions, a.dtype, max_seq_len) for tp in a.tp}
    for tp, pts in points.items():
        for pt in pts:
            emit({"kind": "plan", "tp": tp, "fraction_requested": pt.requested, "fraction_actual": pt.actual,
                  "streamed_layers": pt.streamed_layers, "budget": pt.budget, "layer_tier": [p.layer_tier for p in pt.plans],
                  "estimate_page_cache": pt.estimate(True), "estimate_disk": pt.estimate(False)})
    warmed = warm_page_cache(model)
    available = placement.host_memory_available()
    if warmed > available / 2:  # then the page cache may not hold it beside the resident layers
        print(f"warning: the checkpoint ({warmed / MiB:.0f} MiB) is large beside {available / MiB:.0f} MiB available: "
              "streamed reads may hit the disk, which the page-cache estimate does not expect", file=sys.stderr)

    rng = random.Random(0)
    prompt = [rng.randrange(3, cfg.vocab_size) for _ in range(a.prompt_len)]
    order = [pt for tp in a.tp for pt in points[tp]]
    total = a.repeats * len(order)
    print(f"offload: {a.shape} ({cfg.num_layers} layers) {a.dtype}, {len(order)} points x {a.repeats} repeats, "
          f"{a.new_tokens} new tokens", file=sys.stderr, flush=True)
    runs: dict[int, list[dict[str, Any]]] = {id(pt): [] for pt in order}
    done = 0
    for rep in range(a.repeats):
        shift = rep % len(order)  # each repeat starts one point later: no point is always first
        for pt in order[shift:] + order[:shift]:
            rec = {"kind": "run", "tp": pt.tp, "fraction_requested": pt.requested, "fraction_actual": pt.actual,
                   "streamed_layers": pt.streamed_layers, "budget": pt.budget, "repeat": rep}
            try:
                r = run_generate(model, pt, a.dtype, prompt, a.new_tokens, max_seq_len)
                rec["result"] = r
                rec["problems"] = check_run(pt, r)
                runs[id(pt)].append(r)
                msg = f"decode {r['decode_tokens_per_s']:.1f} tok/s (estimate {pt.estimate(True):.1f})"
                if rec["problems"]:
                    msg += "; " + "; ".join(rec["problems"])
            except Exception as e:
                rec["error"] = str(e)
                msg = f"failed: {e}"
            emit(rec)
            done += 1
            print(f"[{done}/{total}] {pt.label} rep {rep + 1}: {msg} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    rows = [summary_row(pt, runs[id(pt)], cfg.num_layers) for pt in order]
    for tp in a.tp:  # against the same tp with nothing streamed
        ref = next((r for r in rows if r["tp"] == tp and r["streamed_layers"] == 0 and r["decode"]), None)
        for r in rows:
            if r["tp"] == tp:
                r["ratio_vs_resident"] = r["decode"]["median"] / ref["decode"]["median"] if (ref and r["decode"]) else None
    for row in rows:
        emit({"kind": "summary", **row})
    print_table(rows, a, cfg)
    write_csv(rows, out_dir / "offload.csv", a)
    png = out_dir / "offload.png"
    try:
        if not plot(rows, png, a, cfg):
            png = None
    except Exception as e:  # the numbers are already written
        print(f"chart failed: {e}", file=sys.stderr)
        png = None
    print(f"\nwrote {jsonl}, {out_dir / 'offload.csv'}" + (f" and {png}" if png else "") + f" in {time.perf_counter() - start:.0f} s")
    return 0 if rows and all(r["decode"] for r in rows) else 1


def summary_row(pt: Point, runs: list[dict[str, Any]], num_layers: int) -> dict[str, Any]:
    def per_run(field) -> list[float]:  # max over ranks, one value per run
        return [max(field(m) for m in r["memory"]["ranks"]) for r in runs]

    decode = summarise([r["decode_tokens_per_s"] for r in runs])
    est = pt.estimate(True)
    rss = summarise(per_run(lambda m: m["peak_rss"] - m["rss_at_start"]))
    stream = summarise(per_run(lambda m: m["stream_bytes_per_step"]))
    return {
        "tp": pt.tp,
        "fraction_requested": pt.requested,
        "fraction_actual": pt.actual,
        "fraction_per_rank": [p.streamed_fraction for p in pt.plans],
        "streamed_layers": pt.streamed_layers,
        "num_layers": num_layers,
        "budget": pt.budget,
        "decode": decode,
        "prefill": summarise([r["prefill_tokens_per_s"] for r in runs]),
        "estimate_page_cache": est,
        "estimate_disk": pt.estimate(False),
        "ratio_estimate": decode["median"] / est if (decode and est) else None,
        "ratio_vs_resident": None,  # filled in once every point of this tp is summarised
        "peak_rss_over_start": rss["median"] if rss else None,
        "stream_bytes_per_step": stream["median"] if stream else None,
        "plan_stream_bytes_per_step": pt.disk_bytes,
    }


def print_table(rows: list[dict[str, Any]], a: argparse.Namespace, cfg: ModelConfig) -> None:
    print(f"\n{a.shape} ({cfg.num_layers} layers) {a.dtype}, batch 1, prompt {a.prompt_len}, {a.new_tokens} new tokens, "
          f"{a.repeats} repeat(s); estimate: plan at {HARDWARE} bandwidths, streamed from the page cache")
    head = ["tp", "streamed req", "actual", "layers", "decode tok/s [min-max]", "estimate", "x est", "x 0%", "peak RSS-start MiB", "streamed MiB/step"]
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    mib = lambda x: None if x is None else x / MiB  # noqa: E731
    table = [head]
    for r in rows:
        d = r["decode"]
        table.append([
            str(r["tp"]), f"{100 * r['fraction_requested']:.0f}%", f"{100 * r['fraction_actual']:.1f}%",
            f"{r['streamed_layers']}/{r['num_layers']}",
            f"{d['median']:.1f} [{d['min']:.1f}-{d['max']:.1f}]" if d else "failed",
            f(r["estimate_page_cache"], ".1f"), f(r["ratio_estimate"], ".2f"), f(r["ratio_vs_resident"], ".2f"),
            f(mib(r["peak_rss_over_start"]), ".0f"), f(mib(r["stream_bytes_per_step"]), ".1f"),
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for k, row in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print("peak RSS-start and streamed MiB/step: the rank with most, median of the repeats; "
          "x est: measured / estimate; x 0%: measured / the same tp with nothing streamed")


def write_csv(rows: list[dict[str, Any]], path: Path, a: argparse.Namespace) -> None:
    cols = ["shape", "dtype", "tp", "fraction_requested", "fraction_actual", "streamed_layers", "num_layers", "budget",
            "decode_median", "decode_min", "decode_max", "repeats", "prefill_median", "estimate_page_cache", "estimate_disk",
            "ratio_estimate", "ratio_vs_resident", "peak_rss_over_start", "stream_bytes_per_step", "plan_stream_bytes_per_step"]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            d, p = r["decode"] or {}, r["prefill"] or {}
            w.writerow({
                **{k: r[k] for k in cols if k in r},
                "shape": a.shape, "dtype": a.dtype, "decode_median": d.get("median"), "decode_min": d.get("min"),
                "decode_max": d.get("max"), "repeats": d.get("n", 0), "prefill_median": p.get("median"),
            })


def plot(rows: list[dict[str, Any]], path: Path, a: argparse.Namespace, cfg: ModelConfig) -> bool:
    plt = optional.pyplot(path.name)
    if plt is None:
        return False
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, tp in enumerate(sorted({r["tp"] for r in rows})):
        c = colors[j % len(colors)]
        mine = sorted((r for r in rows if r["tp"] == tp), key=lambda r: r["fraction_actual"])
        xs = [100 * r["fraction_actual"] for r in mine]
        ax.plot(xs, [r["estimate_page_cache"] for r in mine], "-", color=c, label=f"tp={tp} estimate (page cache)")
        ax.plot(xs, [r["estimate_disk"] for r in mine], ":", color=c, linewidth=1, label=f"tp={tp} estimate (cold disk, {placement.DISK_READ_Bps / 1e9:g} GB/s)")
        meas = [r for r in mine if r["decode"]]
        ax.errorbar(
            [100 * r["fraction_actual"] for r in meas], [r["decode"]["median"] for r in meas],
            yerr=[[r["decode"]["median"] - r["decode"]["min"] for r in meas], [r["decode"]["max"] - r["decode"]["median"] for r in meas]],
            fmt="o", color=c, capsize=3, label=f"tp={tp} measured (median, min-max)",
        )
    ax.set_xlabel("% of decoder layer bytes streamed from the mmap'd checkpoint")
    # log scale: the measured points and the estimates can be an order of magnitude apart
    # (small models are bound by per-layer host cost, not bandwidth), and ratios read as gaps
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 3, 30, 300 rather than 3 x 10^0
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel("decode tokens/s (log scale)")
    ax.set_title(f"decode with layers streamed: {a.shape} ({cfg.num_layers} layers) {a.dtype}, batch 1, {a.new_tokens} new tokens", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
