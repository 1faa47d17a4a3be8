"""The CPU decode GEMV kernel (kernels/cpu_gemv.c) against F.linear and a float64 reference."""

import os
import time

import pytest
import torch
import torch.nn.functional as F

from tp_runtime.kernels import cpu_gemv

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler: the kernel is optional, F.linear stands in")


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("n, k", [(1, 1), (3, 5), (4, 16), (7, 33), (1280, 768), (130, 2049), (4097, 64)])
def test_single_row_matches_float64(dtype, rtol, n, k):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(1, k, generator=g).to(dtype)
    y = cpu_gemv.cpu_linear(x, w)
    want = (w.double() @ x.double()[0])[None]
    assert y.shape == (1, n) and y.dtype == dtype
    # fp32: the kernel accumulates in float32 in another order than BLAS; bf16: output rounding
    scale = (w.double().abs() @ x.double().abs()[0]).max()
    assert ((y.double() - want).abs().max() / scale) < rtol


@pytest.mark.parametrize("n, k", [(5, 63), (300, 768), (64, 2048)])
def test_bfloat16_weight_with_float32_row(n, k):
    """The path for CPUs without AVX512-BF16 (bfloat16 weight, float32 x), taken on any CPU when
    x is float32."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(1, k, generator=g)
    y = cpu_gemv.cpu_linear(x, w)
    want = (w.double() @ x.double()[0])[None]
    scale = (w.double().abs() @ x.double().abs()[0]).max()
    assert y.dtype == torch.float32 and ((y.double() - want).abs().max() / scale) < 1e-5


def test_batched_leading_dims_and_fallbacks_agree_with_f_linear():
    w = torch.randn(64, 48)
    x = torch.randn(1, 1, 48)
    torch.testing.assert_close(cpu_gemv.cpu_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    # several rows, a non-contiguous weight, float16: F.linear itself
    rows = torch.randn(3, 48)
    assert torch.equal(cpu_gemv.cpu_linear(rows, w), F.linear(rows, w))
    wt = torch.randn(48, 64).t()
    assert torch.equal(cpu_gemv.cpu_linear(x, wt), F.linear(x, wt))
    h = torch.randn(1, 48, dtype=torch.float16)
    assert torch.equal(cpu_gemv.cpu_linear(h, w.half()), F.linear(h, w.half()))


def test_decode_threads_hands_torch_threads_back():
    n = torch.get_num_threads()
    with cpu_gemv.decode_threads():
        inside = torch.get_num_threads()
    assert torch.get_num_threads() == n
    assert inside == (1 if cpu_gemv._pool_threads > 1 and n > 1 else n)



def test_every_gemv_path_generates_the_same_tokens(small_model):
    """The kernel (default) and BLAS: one greedy continuation."""
    from conftest import last_json, run_cli

    base = ["generate", "--model", str(small_model), "--prompt-ids", "5,9,2,7", "--max-new-tokens", "12", "--ignore-eos", "--quiet", "--json", "--dtype", "float32"]
    outs = []
    for extra in ([], ["--gemv", "blas"]):
        p = run_cli(base + extra)
        assert p.returncode == 0, p.stderr
        outs.append(last_json(p.stdout)["output_ids"])
    assert outs[0] == outs[1]


@pytest.mark.skipif(not cpu_gemv.has_int8_dot(), reason="the int8 path needs AVX512-VNNI")
@pytest.mark.parametrize("n, k", [(5, 64), (1280, 768), (131, 2048)])
def test_int8_row_with_block_quantised_activations(n, k):
    from tp_runtime.model.quant import quantize_per_channel

    g = torch.Generator().manual_seed(n + k)
    q, scales = quantize_per_channel(torch.randn(n, k, generator=g))
    x = torch.randn(1, k, generator=g)
    y = cpu_gemv.int8_linear(x, q, cpu_gemv.int8_block_sums(q), scales)
    want = (q.double() * scales.double()[:, None]) @ x.double()[0]
    # int8 activations per 64 values: ~0.6% relative error (bf16 activations: ~0.3%)
    assert ((y[0].double() - want).norm() / want.norm()) < 1.5e-2
    assert cpu_gemv.int8_block_sums(q[:, :-1].contiguous()) is None  # in % 64 != 0: not this path
    assert cpu_gemv.int8_linear(torch.randn(2, k), q, cpu_gemv.int8_block_sums(q), scales) is None  # several rows


@pytest.mark.skipif(not cpu_gemv.has_int8_dot(), reason="the int8 path needs AVX512-VNNI")
def test_int8_decode_follows_the_int8_prefill(tmp_path):
    """Decode (one row: int8 activations, VNNI) against prefill (many rows: bf16 GEMM) on the
    same int8 model: at >= 90% of 64 positions the decoded token is the prefill's argmax, and
    where not, the prefill's best leads by under 1% of max |logit| (this random model's
    near-ties; the int8 LM head rounds the activations in both, another rounding to part on)."""
    from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint
    from tp_runtime.config import ParallelConfig, RuntimeConfig
    from tp_runtime.engine.llm import LLM
    from tp_runtime.engine.sampling import SamplingParams

    cfg = llama_config_dict(hidden_size=256, num_layers=3, num_heads=8, num_kv_heads=4, intermediate_size=512, vocab_size=1000)
    model = write_checkpoint(tmp_path / "m", cfg, seed=4)
    llm = LLM.load(model, ParallelConfig(), RuntimeConfig(quantize="int8", max_seq_len=128, max_batch_size=1, show_progress=False))
    layer = llm.engine.model.layers[0].mlp.down_proj
    assert layer.block_sums is not None  # the kernel path is live
    prompt = [3, 14, 15, 92, 65]
    out = [e.token_id for e in llm.generate([prompt], SamplingParams(max_new_tokens=64, ignore_eos=True))]
    logits = llm.prompt_logits([prompt + out[:-1]])[0]
    scored = logits[len(prompt) - 1 :]
    agree = (scored.argmax(-1) == torch.tensor(out)).float().mean().item()
    assert agree >= 0.9, f"{agree:.1%}"
    lead = scored.max(-1).values - scored.gather(-1, torch.tensor(out)[:, None])[:, 0]
    assert lead.max().item() <= 0.01 * scored.abs().max().item()


def test_kernels_refuse_bad_sizes_instead_of_trusting_the_caller():
    """K <= 0 (tp_gemv divided by it), a zero batch, int8 K not a multiple of 64 (tp_gemv_q8 read
    past each row): an error code, nothing computed, and a ValueError from the wrappers."""
    from tp_runtime.kernels import cpu_decode

    lib = cpu_gemv.load()
    w, x, y = torch.randn(4, 64), torch.randn(64), torch.full((4,), 7.0)
    for k, n, nb in ((0, 4, 1), (-64, 4, 1), (64, 0, 1), (64, 4, 0)):
        assert lib.tp_gemv(w.data_ptr(), x.data_ptr(), y.data_ptr(), k, n, 0, 0, nb) == cpu_gemv.BAD_SIZE
    assert lib.tp_gemv(w.data_ptr(), x.data_ptr(), y.data_ptr(), 64, 4, 7, 0, 1) == cpu_gemv.BAD_SIZE  # no such kind
    q = torch.zeros(4, 65, dtype=torch.int8)
    sums, sc = torch.zeros(4, 2, dtype=torch.int16), torch.ones(4)
    assert lib.tp_gemv_q8(q.data_ptr(), sums.data_ptr(), sc.data_ptr(), torch.randn(65).data_ptr(), y.data_ptr(), 65, 4, 0, 1) == cpu_gemv.BAD_SIZE
    assert torch.equal(y, torch.full((4,), 7.0))  # untouched
    with pytest.raises(ValueError, match="refused in=0"):
        cpu_decode.gemv_(torch.zeros(4, 0), torch.zeros(1, 0), y)


def test_two_callers_at_once_each_get_their_own_product():
    """ctypes releases the GIL: a second thread calling the kernel (a server thread beside the
    decode loop) must wait for the pool, not run on the first caller's job."""
    import threading

    g = torch.Generator().manual_seed(11)
    jobs = [(torch.randn(n, k, generator=g), torch.randn(1, k, generator=g)) for n, k in ((301, 640), (517, 128))]
    errors = []

    def hammer(w, x):
        want = torch.nn.functional.linear(x, w)
        for _ in range(300):
            got = cpu_gemv.cpu_linear(x, w)
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                errors.append(float((got - want).abs().max()))
                return

    threads = [threading.Thread(target=hammer, args=job, daemon=True) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors, f"a caller got another job's rows (max error {errors})"


def test_a_thread_added_to_the_pool_does_not_rerun_the_last_job():
    """A pool thread created after jobs have run starts at the current generation: it used to start
    at 0, see a 'new' job at once and compute its share of the previous one again (into memory
    that may be gone)."""
    import subprocess
    import sys

    script = """
import torch
torch.set_num_threads(1)
from tp_runtime.kernels import cpu_gemv
lib = cpu_gemv.load()
w, x = torch.randn(4096, 64), torch.randn(1, 64)
y = cpu_gemv.cpu_linear(x, w)     # one thread: the generation moves on
lib.tp_gemv(w.data_ptr(), x.reshape(-1).data_ptr(), y.data_ptr(), 64, 4096, 0, 0, 1)
y.zero_()
assert lib.tp_gemv_start(2) == 2  # a second thread, created now
import time; time.sleep(0.3)
print(int((y != 0).sum()))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0", "the new thread wrote rows of the previous job"


def _anon_huge_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages"))


@pytest.mark.skipif(not cpu_gemv.available() or not os.path.exists("/proc/self/smaps_rollup"), reason="Linux with the kernel library")
def test_weights_move_onto_huge_pages_with_their_values():
    """onto_huge_pages collapses a tensor's 2 MB-aligned inside into transparent huge pages (where
    the kernel has MADV_COLLAPSE; elsewhere it reports 0), values untouched; small tensors and a
    range without an aligned 2 MB are left alone."""
    w = torch.randn(24 << 20 >> 2)  # 24 MB of float32
    want = w.clone()
    before = _anon_huge_kb()
    done = cpu_gemv.onto_huge_pages([w, torch.randn(1000)])
    assert done >= 0 and torch.equal(w, want)
    if done:
        assert done % (2 << 20) == 0 and 20 << 20 <= done <= 24 << 20
        assert _anon_huge_kb() - before >= (done >> 10) - 4096
    assert cpu_gemv.onto_huge_pages([torch.randn(1000)]) == 0  # below the size worth it
    assert cpu_gemv.load().tp_huge_pages(w.data_ptr() + 1, 1 << 20) == 0  # no whole aligned 2 MB inside


@pytest.mark.parametrize("n, k", [(100, 2048), (7, 37)])
def test_float16_weight_is_read_as_stored_and_widened_exactly(n, k):
    """A float16 weight (a GGUF F16 tensor) through the kernel's float16 kind: the product of its
    values widened to float32, as the float32 kernel gives on the same values (only the order
    of the float32 sums differs), for one row and a batch."""
    torch.manual_seed(1)
    w = torch.randn(n, k).half()
    for rows in (1, 3):
        x = torch.randn(rows, k)
        want = x.double() @ w.double().T
        got = cpu_gemv.cpu_linear(x, w) if rows == 1 else cpu_gemv.gemm(x, w.float())
        assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    from tp_runtime.kernels import cpu_decode

    out = torch.empty(3, n)
    cpu_decode.gemv_(w, x, out)
    assert (out.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_a_slower_machine_is_emulated_per_rank(monkeypatch):
    """TP_EMULATE_SLOWER=RANK:PASSES names the rank whose every GEMV takes PASSES times as long
    (bench/shares.py): the product is the same, the call about that much slower; a malformed
    value is refused."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(cpu_gemv.EMULATE_SLOWER_ENV, "0:4,1:3")
    assert cpu_gemv.emulated_slowness() == 3
    monkeypatch.setenv("RANK", "2")
    assert cpu_gemv.emulated_slowness() == 1
    monkeypatch.setenv(cpu_gemv.EMULATE_SLOWER_ENV, "1:x")
    with pytest.raises(ValueError, match="RANK:PASSES"):
        cpu_gemv.emulated_slowness()
    lib = cpu_gemv.load()
    if lib is None:
        pytest.skip("no C compiler: the kernel could not be built")
    w, x = torch.randn(2048, 2048), torch.randn(1, 2048)
    once = cpu_gemv.cpu_linear(x, w)

    def fastest() -> float:
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            cpu_gemv.cpu_linear(x, w)
            best = min(best, time.perf_counter() - t)
        return best

    plain = fastest()
    lib.tp_gemv_emulate_slower(3)
    try:
        assert lib.tp_gemv_passes() == 3
        assert torch.equal(cpu_gemv.cpu_linear(x, w), once)
        assert fastest() >= 2.0 * plain  # 3x the product's own time (its fastest of 5: scheduling noise only adds)
    finally:
        lib.tp_gemv_emulate_slower(1)
