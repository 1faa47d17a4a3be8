"""Decode GEMV on CPU through a small C kernel (cpu_gemv.c), built with the system C compiler
at first use and cached; F.linear wherever it cannot run.

One activation row against a row-major float32 or bfloat16 weight, accumulated in float32, the
rows split over `torch.get_num_threads()` threads of the kernel's own pool. Measured on the
project's 2-core Zen 4 (bench/gemv.py): float32 ~30-42 GB/s against F.linear's 14-27 (row- or
column-major), bfloat16 ~31-40 with AVX512-BF16 dot products (25-28 without) against 18-21. Anything else (several rows, other dtypes, a non-contiguous weight, a
GPU tensor, no compiler) goes to F.linear. Int8 weights (`int8_linear`) use AVX512-VNNI dot
products against activations quantised per 64 values, where the CPU has VNNI (a plain C
int8-to-float loop is compute-bound at 10-20 GB/s). The sums run in another order than BLAS: results
differ from F.linear by float rounding (~1e-6 relative).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess  # the C compiler: the one process kernels/ starts (tests/test_layering.py)
import sysconfig
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("tp_runtime")

# the GEMVs and their thread pool; the fused decode step's other ops (kernels/cpu_decode.py)
SOURCES = [Path(__file__).with_name("cpu_gemv.c"), Path(__file__).with_name("cpu_decode.c"), Path(__file__).with_name("cpu_quant.c")]
HEADERS = [Path(__file__).with_name("half.h")]  # included by the sources: part of the build's cache key
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fPIC", "-shared", "-pthread"]

_lib: ctypes.CDLL | None = None
_tried = False
_pool_threads = 1
_bf16_dot = False  # the library has the AVX512-BF16 path (bfloat16 x as is)
_int8_dot = False  # the library has the AVX512-VNNI int8 path


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tp-runtime" / "kernels"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()[0]
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("cc")


def _build() -> Path | None:
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found: decode GEMVs use F.linear (slower on CPU)")
        return None
    source = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + version.encode() + os.uname().machine.encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_gemv-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    proc = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        log.warning("building the CPU GEMV kernel failed (%s): decode GEMVs use F.linear\n%s", cc, proc.stderr[-2000:])
        return None
    os.replace(tmp, out)  # atomic: ranks building at once each get a whole file
    return out


EMULATE_SLOWER_ENV = "TP_EMULATE_SLOWER"


def emulated_slowness() -> int:
    """TP_EMULATE_SLOWER=RANK:PASSES[,RANK:PASSES]: the rank (the RANK variable the launcher and
    torchrun set) takes PASSES times as long for every GEMV, spinning out the difference (a
    machine with 1/PASSES of the memory bandwidth that does not share this host's memory bus:
    bench/shares.py, uneven machines on one host). 1 for every other rank."""
    spec = os.environ.get(EMULATE_SLOWER_ENV, "")
    rank = os.environ.get("RANK")
    for item in filter(None, spec.split(",")):
        who, _, passes = item.partition(":")
        if not (who.strip().isdigit() and passes.strip().isdigit() and int(passes) >= 1):
            raise ValueError(f"{EMULATE_SLOWER_ENV}={spec!r}: expected RANK:PASSES[,RANK:PASSES], e.g. 1:2")
        if who.strip() == rank:
            return int(passes)
    return 1


def load() -> ctypes.CDLL | None:
    """The kernel library with its pool started at this process's torch thread count, or None."""
    global _lib, _tried, _pool_threads, _bf16_dot, _int8_dot
    if _tried:
        return _lib
    _tried = True
    try:
        path = _build()
        if path is not None:
            lib = ctypes.CDLL(str(path))
            lib.tp_gemv_start.argtypes = [ctypes.c_int]
            lib.tp_gemv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
            _pool_threads = lib.tp_gemv_start(torch.get_num_threads())
            _bf16_dot = bool(lib.tp_gemv_has_bf16_dot())
            _int8_dot = bool(lib.tp_gemv_has_int8_dot())
            lib.tp_gemv_q8.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64]
            lib.tp_flag_store.argtypes, lib.tp_flag_store.restype = [ctypes.c_void_p, ctypes.c_int64], None
            lib.tp_flags_min.argtypes, lib.tp_flags_min.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64], ctypes.c_int64
            lib.tp_huge_pages.argtypes, lib.tp_huge_pages.restype = [ctypes.c_void_p, ctypes.c_int64], ctypes.c_int64
            if (passes := emulated_slowness()) > 1:
                log.warning("%s: every GEMV of this rank takes %d times as long (a slower machine, emulated)", EMULATE_SLOWER_ENV, passes)
                lib.tp_gemv_emulate_slower(passes)
            _lib = lib
    except OSError as e:
        log.warning("loading the CPU GEMV kernel failed (%s): decode GEMVs use F.linear", e)
    return _lib


HUGE_PAGE = 2 << 20


def onto_huge_pages(tensors, budget_s: float = 10.0, least: int = 256 << 10) -> int:
    """Back the CPU tensors of at least `least` bytes with transparent huge pages where the OS
    can (cpu_gemv.c tp_huge_pages: MADV_COLLAPSE on Linux): the decode GEMVs stream these every
    token, and a 4 KB page's TLB miss under a hypervisor is a two-level page walk (1.4-1.5x
    slower streams measured). Neighbouring tensors' ranges are joined across gaps under 2 MB
    (what lies between is in the same mappings: collapsing it is harmless), and the work goes
    64 MB at a time until `budget_s` (collapsing copies the pages: ~0.5-3 s per GB here).
    Returns the bytes collapsed; 0 without the library or where the OS does not do it."""
    if load() is None:
        return 0
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors
                   if t.device.type == "cpu" and t.numel() * t.element_size() >= least)
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1] + HUGE_PAGE:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    done, t0 = 0, time.perf_counter()
    for a, b in merged:
        for lo in range(a, b, 64 << 20):
            if time.perf_counter() - t0 > budget_s:
                log.info("huge pages: stopped after %.1f s with %.0f MB collapsed", budget_s, done / 1e6)
                return done
            rc = _lib.tp_huge_pages(lo, min(b, lo + (64 << 20) + HUGE_PAGE) - lo)
            if rc < 0:
                log.debug("huge pages: madvise failed (errno %d); the decode reads 4 KB pages", -rc)
                return done
            done += rc
    log.debug("huge pages: %.0f MB collapsed in %.2f s", done / 1e6, time.perf_counter() - t0)
    return done


def _forget_in_child() -> None:
    # a forked child has the library's state but not its pool threads: a call would wait forever
    global _lib, _tried
    _lib, _tried = None, True


os.register_at_fork(after_in_child=_forget_in_child)


def available() -> bool:
    return load() is not None


def has_int8_dot() -> bool:
    return load() is not None and _int8_dot


@contextmanager
def decode_threads():
    """For the decode loop: torch's own OpenMP threads down to one while the kernel's pool runs
    the GEMVs. OpenMP workers spin for a while after every parallel region; spinning on the
    cores the pool needs, they made decode 6x slower here (SMALL fp32: 56 -> 9 tok/s)."""
    n = torch.get_num_threads()
    if _lib is None or _pool_threads <= 1 or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 5}  # cpu_gemv.c tp_gemv kind


def cpu_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w[out, in]^T; the C kernel for a single row, `gemm` otherwise."""
    kind = _KINDS.get(w.dtype)
    if kind is None or x.device.type != "cpu" or x.shape[:-1].numel() != 1 or not w.is_contiguous() or _lib is None:
        return gemm(x, w)
    return _run(x, w, kind)


GEMM_NT_ROWS = 16  # from this many rows a float32 product on CPU runs as w @ x^T (`gemm`)


def gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) (x [..., in], w [out, in]), for several rows (a prefill). A float32 one on
    CPU runs as (w @ x^T)^T: MKL's sgemm with the weight as the left, untransposed operand ran
    1.04-1.9x faster here than F.linear's x @ w^T for 16-512 rows (bench/gemv.py --gemm:
    TinyLlama's prefill of 128 tokens 66 -> 78 tok/s); the transposed result is copied once
    into the row-major layout the next ops and the collectives want (under 2% of the GEMM).
    bfloat16 gains nothing from it (oneDNN's own kernels): F.linear there."""
    rows = x.shape[:-1].numel()
    if w.dtype != torch.float32 or x.dtype != torch.float32 or rows < GEMM_NT_ROWS or x.device.type != "cpu" or w.dim() != 2:
        return F.linear(x, w)
    y = torch.mm(w, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    return y.view(*x.shape[:-1], w.shape[0])


INT8_BLOCK = 64  # activations are quantised per this many values (cpu_gemv.c: rows_q8)


def int8_block_sums(qweight: torch.Tensor) -> torch.Tensor | None:
    """Per-row sums of each 64-block of an int8 weight [out, in] (int16), the table the int8
    path needs; None where it cannot run (in % 64 != 0)."""
    n, k = qweight.shape
    if k % INT8_BLOCK:
        return None
    return qweight.view(n, k // INT8_BLOCK, INT8_BLOCK).sum(-1, dtype=torch.int32).to(torch.int16).contiguous()


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, block_sums: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """One row against an int8 weight with per-row scales, activations quantised to int8 per
    64 values (llama.cpp's Q8 habit: ~0.6% relative error per product, against ~0.3% for
    bfloat16 activations); None where the kernel does not apply (the caller's path then)."""
    if not _int8_dot or x.device.type != "cpu" or x.shape[:-1].numel() != 1 or not qweight.is_contiguous():
        return None
    n, k = qweight.shape
    xf = x.reshape(-1).to(torch.float32).contiguous()
    sc = scales.to(torch.float32).contiguous()
    y = torch.empty(n, dtype=torch.float32)
    check_rc(_lib.tp_gemv_q8(qweight.data_ptr(), block_sums.data_ptr(), sc.data_ptr(), xf.data_ptr(), y.data_ptr(), k, n, 0, 1), "int8 GEMV", k, n, 1)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _run(x: torch.Tensor, w: torch.Tensor, kind: int) -> torch.Tensor:
    if kind == 1 and _bf16_dot and x.dtype == torch.bfloat16:
        kind, xf = 2, x.reshape(-1).contiguous()  # bf16 pairs straight into the dot product
    else:
        xf = x.reshape(-1).to(torch.float32).contiguous()
    y = torch.empty(w.shape[0], dtype=torch.float32)
    check_rc(_lib.tp_gemv(w.data_ptr(), xf.data_ptr(), y.data_ptr(), w.shape[1], w.shape[0], kind, 0, 1), "GEMV", w.shape[1], w.shape[0], 1)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


BAD_SIZE = -2  # cpu_gemv.c: a size the kernels refuse (nothing computed)


def check_rc(rc: int, what: str, k: int, n: int, rows: int) -> None:
    if rc == BAD_SIZE:
        raise ValueError(f"CPU {what} kernel: refused in={k}, out={n}, rows={rows} (each must be >= 1; int8 needs in % 64 == 0)")
    if rc:
        raise MemoryError(f"CPU {what} kernel: its activation buffer could not be allocated")
