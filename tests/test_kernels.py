"""Triton kernels against a float64 torch reference.

Runs the kernels in Triton's CPU interpreter when there is no GPU (TRITON_INTERPRET=1 is set
here, before the kernel modules are imported), on CUDA otherwise. Every case draws fresh
random inputs (the seed is in the failure message; TP_KERNEL_TEST_SEED pins it) and every
buffer a kernel allocates is NaN-filled first, so an element the kernel forgets to write
fails the comparison. The interpreter is slow: shapes are small on purpose.
"""

from __future__ import annotations

import os
import secrets

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when the kernel modules load
DEVICE = "cpu" if INTERPRET else "cuda"

pytest.importorskip("triton")

from tp_runtime import kernels  # noqa: E402
from tp_runtime.kernels import flash_decode, flash_prefill, norm_rope, reference  # noqa: E402

if INTERPRET and not flash_prefill.INTERPRET:
    pytest.skip("the kernel modules were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

# (rtol, atol) per input dtype, output against the float64 reference. fp32: IEEE products,
# only the summation order differs. fp16/bf16: P is rounded to the input dtype before P @ V
# and the output is rounded once more (the interpreter's bf16 casts truncate, too).
TOL = {
    torch.float32: (1e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every allocation inside the kernel wrappers comes back NaN-filled (ints: -1)."""

    def nan_empty(*shape, dtype=None, device=None, **kw):
        t = torch.empty(*shape, dtype=dtype, device=device, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    for mod in (flash_prefill, flash_decode, norm_rope):
        monkeypatch.setattr(mod, "_empty", nan_empty)


@pytest.fixture
def gen():
    seed = int(os.environ.get("TP_KERNEL_TEST_SEED", secrets.randbits(31)))
    return torch.Generator().manual_seed(seed)


def rand(g, *shape, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape, generator=g)).to(dtype).to(DEVICE)


def rand_bhsd(g, b, h, s, d, dtype):
    """[b, h, s, d] as the model makes it: a transposed view of [b, s, h, d]."""
    return rand(g, b, s, h, d, dtype=dtype).transpose(1, 2)


def assert_close(out, ref, dtype, g, what=""):
    rtol, atol = TOL[dtype]
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out64).all(), f"{what}: non-finite output (an element left unwritten?), seed {g.initial_seed()}"
    err = (out64 - ref64).abs()
    bad = err > atol + rtol * ref64.abs()
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements off, max abs err {err.max().item():.3g} "
        f"(rtol {rtol}, atol {atol}), seed {g.initial_seed()}"
    )


def ref_prefill(q, k, v, kv_map=None, q_offset=0, seq_lens=None):
    return reference.prefill_attention(q.double(), k.double(), v.double(), kv_map, q_offset, seq_lens)


def ref_decode(q, k, v, lens, kv_map=None):
    return reference.decode_attention(q.double(), k.double(), v.double(), lens, kv_map)


# ---------------------------------------------------------------- prefill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("seq", [1, 17, 127, 128, 129, 300])
def test_prefill_lengths_and_gqa(gen, seq, group, head_dim, dtype):
    # one kv head for the longer lengths keeps the interpreter quick; two otherwise
    kv_heads = 1 if seq >= 127 else 2
    q = rand_bhsd(gen, 1, kv_heads * group, seq, head_dim, dtype)
    k = rand_bhsd(gen, 1, kv_heads, seq, head_dim, dtype)
    v = rand_bhsd(gen, 1, kv_heads, seq, head_dim, dtype)
    out = flash_prefill.prefill_attention(q, k, v)
    assert_close(out, ref_prefill(q, k, v), dtype, gen, f"prefill seq {seq} group {group} hd {head_dim} {dtype}")


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_prefill_dtypes_and_head_dims(gen, dtype, head_dim):
    b, kv_heads, group, seq = 2, 1, 2, 70
    q = rand_bhsd(gen, b, kv_heads * group, seq, head_dim, dtype)
    k = rand_bhsd(gen, b, kv_heads, seq, head_dim, dtype)
    v = rand_bhsd(gen, b, kv_heads, seq, head_dim, dtype)
    out = flash_prefill.prefill_attention(q, k, v)
    assert out.dtype == dtype
    assert_close(out, ref_prefill(q, k, v), dtype, gen, f"prefill {dtype} hd {head_dim}")


@pytest.mark.parametrize(("seq", "q_offset"), [(1, 0), (1, 130), (17, 111), (64, 64), (40, 300)])
def test_prefill_offset(gen, seq, q_offset):
    """A prompt continued after q_offset cached tokens: query i sees keys <= q_offset + i."""
    dtype, head_dim, kv_heads, group = torch.float32, 64, 1, 4
    q = rand_bhsd(gen, 1, kv_heads * group, seq, head_dim, dtype)
    k = rand(gen, 1, kv_heads, q_offset + seq, head_dim, dtype=dtype)
    v = rand(gen, 1, kv_heads, q_offset + seq, head_dim, dtype=dtype)
    out = flash_prefill.prefill_attention(q, k, v, q_offset=q_offset)
    assert_close(out, ref_prefill(q, k, v, q_offset=q_offset), dtype, gen, f"prefill seq {seq} offset {q_offset}")


@pytest.mark.parametrize("kv_map", [(0, 1, 1), (0, 0, 1), (1, 0, 2, 2, 0)], ids=str)
def test_prefill_uneven_kv_map(gen, kv_map):
    """A tensor-parallel split that cuts a GQA group: each q head names its kv head."""
    dtype, seq, q_offset, head_dim = torch.float16, 45, 20, 64
    mapping = torch.tensor(kv_map, dtype=torch.int64, device=DEVICE)
    kv_heads = max(kv_map) + 1
    q = rand_bhsd(gen, 2, len(kv_map), seq, head_dim, dtype)
    k = rand(gen, 2, kv_heads, q_offset + seq, head_dim, dtype=dtype)
    v = rand(gen, 2, kv_heads, q_offset + seq, head_dim, dtype=dtype)
    out = flash_prefill.prefill_attention(q, k, v, mapping, q_offset)
    assert_close(out, ref_prefill(q, k, v, mapping, q_offset), dtype, gen, f"prefill map {kv_map}")


@pytest.mark.parametrize("q_offset", [0, 33])
def test_prefill_mixed_lengths(gen, q_offset):
    """Right-padded batch with seq_lens: each sequence equals its own unpadded attention,
    padded rows are zeros, and padded keys (NaN here) are never read."""
    dtype, head_dim, kv_heads, group = torch.float32, 64, 2, 2
    lens = [1, 77, 129]
    seq = max(lens)
    b = len(lens)
    q = rand_bhsd(gen, b, kv_heads * group, seq, head_dim, dtype)
    k = rand(gen, b, kv_heads, q_offset + seq, head_dim, dtype=dtype)
    v = rand(gen, b, kv_heads, q_offset + seq, head_dim, dtype=dtype)
    for i, n in enumerate(lens):  # padding keys: reading one would spread NaN
        k[i, :, q_offset + n :] = float("nan")
        v[i, :, q_offset + n :] = float("nan")
    seq_lens = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    out = flash_prefill.prefill_attention(q, k, v, q_offset=q_offset, seq_lens=seq_lens)
    for i, n in enumerate(lens):
        kn, vn = k[i : i + 1, :, : q_offset + n], v[i : i + 1, :, : q_offset + n]
        want = ref_prefill(q[i : i + 1, :, :n], kn, vn, q_offset=q_offset)
        assert_close(out[i : i + 1, :, :n], want, dtype, gen, f"sequence {i} of lengths {lens}")
        assert (out[i, :, n:] == 0).all(), f"padded rows of sequence {i} are not zero"
    # and the reference's seq_lens agrees on a NaN-free copy
    k0, v0 = k.nan_to_num(0.0), v.nan_to_num(0.0)
    assert_close(out, ref_prefill(q, k0, v0, q_offset=q_offset, seq_lens=seq_lens), dtype, gen, "reference seq_lens")


def test_prefill_rejects_bad_shapes():
    q = torch.zeros(1, 2, 5, 64)
    k = torch.zeros(1, 1, 6, 64)
    with pytest.raises(ValueError, match="6 keys for 5 queries"):
        flash_prefill.prefill_attention(q, k, k)
    with pytest.raises(ValueError, match="head_dim"):
        flash_prefill.prefill_attention(torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8))


# ---------------------------------------------------------------- decode


def make_cache(g, b, kv_heads, max_seq, head_dim, dtype, lens):
    """A [:b] slice of a [layer, b + 1, ...] buffer, NaN past each sequence's length
    (the kernel must not read there), plus a clean copy for the reference."""
    layers = rand(g, 2, b + 1, kv_heads, max_seq, head_dim, dtype=dtype)
    cache = layers[1, :b]
    clean = cache.clone()
    for i, n in enumerate(lens):
        cache[i, :, n:] = float("nan")
    return cache, clean


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_mixed_lengths_and_gqa(gen, head_dim, group, dtype):
    kv_heads = 1
    lens = [1, 17, 127, 128, 129, 300]
    b, max_seq = len(lens), 320
    q = rand(gen, b, kv_heads * group, head_dim, dtype=dtype)
    k, k0 = make_cache(gen, b, kv_heads, max_seq, head_dim, dtype, lens)
    v, v0 = make_cache(gen, b, kv_heads, max_seq, head_dim, dtype, lens)
    cache_lens = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    out = flash_decode.decode_attention(q, k, v, cache_lens, max_len=max(lens))
    assert_close(out, ref_decode(q, k0, v0, cache_lens), dtype, gen, f"decode hd {head_dim} group {group} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_decode_dtypes(gen, dtype):
    b, kv_heads, group, head_dim, max_seq = 3, 2, 2, 96, 200
    lens = [5, 200, 64]
    q = rand(gen, b, kv_heads * group, head_dim, dtype=dtype)
    k, k0 = make_cache(gen, b, kv_heads, max_seq, head_dim, dtype, lens)
    v, v0 = make_cache(gen, b, kv_heads, max_seq, head_dim, dtype, lens)
    cache_lens = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    out = flash_decode.decode_attention(q, k, v, cache_lens)  # max_len from cache_lens
    assert out.dtype == dtype
    assert_close(out, ref_decode(q, k0, v0, cache_lens), dtype, gen, f"decode {dtype}")


@pytest.mark.parametrize("kv_map", [(0, 1, 1), (0, 0, 0, 1), (2, 0, 1, 0)], ids=str)
def test_decode_uneven_kv_map(gen, kv_map):
    dtype, head_dim, max_seq = torch.float32, 64, 150
    lens = [150, 33]
    mapping = torch.tensor(kv_map, dtype=torch.int64, device=DEVICE)
    kv_heads, b = max(kv_map) + 1, len(lens)
    q = rand(gen, b, len(kv_map), head_dim, dtype=dtype)
    k, k0 = make_cache(gen, b, kv_heads, max_seq, head_dim, dtype, lens)
    v, v0 = make_cache(gen, b, kv_heads, max_seq, head_dim, dtype, lens)
    cache_lens = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    out = flash_decode.decode_attention(q, k, v, cache_lens, mapping, max(lens))
    assert_close(out, ref_decode(q, k0, v0, cache_lens, mapping), dtype, gen, f"decode map {kv_map}")


def test_decode_reads_each_sequence_from_its_cache_slot(gen):
    """Sequences in cache rows 4, 0, 2 of 5: the same result as those rows gathered in order."""
    dtype, head_dim, kv_heads, group, max_seq = torch.float32, 64, 1, 2, 80
    slots, lens = [4, 0, 2], [80, 3, 41]
    q = rand(gen, len(slots), kv_heads * group, head_dim, dtype=dtype)
    k = rand(gen, 5, kv_heads, max_seq, head_dim, dtype=dtype)
    v = rand(gen, 5, kv_heads, max_seq, head_dim, dtype=dtype)
    cache_lens = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    index = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    out = flash_decode.decode_attention(q, k, v, cache_lens, None, max(lens), slots=index)
    assert_close(out, ref_decode(q, k[index], v[index], cache_lens), dtype, gen, "decode by slot")
    ref = reference.decode_attention(q, k, v, cache_lens, None, max(lens), index)
    assert torch.equal(ref, reference.decode_attention(q, k[index], v[index], cache_lens, None, max(lens)))


def test_decode_split_plan_covers_every_key():
    for batch, kv_heads, max_len in [(1, 1, 1), (1, 1, 300), (8, 8, 4096), (1, 2, 100000), (64, 8, 17)]:
        splits, chunk = flash_decode.split_plan(batch, kv_heads, max_len, torch.device(DEVICE))
        assert splits >= 1 and chunk % flash_decode.CHUNK_QUANTUM == 0
        assert (splits - 1) * chunk < max_len <= splits * chunk


# ---------------------------------------------------------------- norms and RoPE


@pytest.mark.parametrize("hidden", [64, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rms_norm(gen, dtype, hidden):
    x = rand(gen, 2, 3, hidden, dtype=dtype)
    residual = rand(gen, 2, 3, hidden, dtype=dtype)
    weight = (1 + 0.1 * rand(gen, hidden)).to(dtype)
    eps = 1e-5
    out = norm_rope.rms_norm(x, weight, eps)
    assert out.dtype == dtype
    assert_close(out, reference.rms_norm(x.double(), weight.double(), eps), dtype, gen, "rms_norm")
    normed, new_res = norm_rope.rms_norm_residual(x, residual, weight, eps)
    want_normed, want_res = reference.rms_norm_residual(x.double(), residual.double(), weight.double(), eps)
    assert_close(new_res, want_res, dtype, gen, "rms_norm_residual: residual")
    assert_close(normed, want_normed, dtype, gen, "rms_norm_residual: normed")


def rope_tables(g, b, seq, head_dim, dtype):
    angles = rand(g, b, 1, seq, head_dim // 2, scale=3.0)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_apply_rope(gen, dtype):
    b, heads, seq, head_dim = 2, 3, 7, 64
    x = rand_bhsd(gen, b, heads, seq, head_dim, dtype)
    cos, sin = rope_tables(gen, b, seq, head_dim, dtype)
    out = norm_rope.apply_rope(x, cos, sin)
    assert_close(out, reference.apply_rope(x.double(), cos.double(), sin.double()), dtype, gen, "apply_rope")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_apply_rope_qk_in_place(gen, dtype):
    """q and k as views of one fused qkv projection output, rotated where they lie."""
    b, seq, q_heads, kv_heads, head_dim = 2, 5, 4, 2, 32
    qkv = rand(gen, b, seq, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(b, seq, q_heads, head_dim).transpose(1, 2)
    k = k.view(b, seq, kv_heads, head_dim).transpose(1, 2)
    v_before = v.clone()
    cos, sin = rope_tables(gen, b, seq, head_dim, dtype)
    want_q = reference.apply_rope(q.double(), cos.double(), sin.double())
    want_k = reference.apply_rope(k.double(), cos.double(), sin.double())
    q_out, k_out = norm_rope.apply_rope_qk_(q, k, cos, sin)
    assert q_out is q and k_out is k
    assert_close(q, want_q, dtype, gen, "apply_rope_qk_: q")
    assert_close(k, want_k, dtype, gen, "apply_rope_qk_: k")
    assert torch.equal(v, v_before), "v (beside q and k in the qkv buffer) was touched"


def test_reference_fused_variants_match_plain_ones(gen):
    x, r = rand(gen, 3, 32), rand(gen, 3, 32)
    w = rand(gen, 32)
    normed, h = reference.rms_norm_residual(x, r, w, 1e-6)
    assert torch.equal(h, x + r) and torch.equal(normed, reference.rms_norm(x + r, w, 1e-6))
    q, k = rand(gen, 1, 2, 4, 16), rand(gen, 1, 1, 4, 16)
    cos, sin = rope_tables(gen, 1, 4, 16, torch.float32)
    want_q, want_k = reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin)
    reference.apply_rope_qk_(q, k, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


# ---------------------------------------------------------------- dispatch


@pytest.fixture
def backend():
    saved = kernels.backend()
    yield kernels.set_backend
    kernels.set_backend(saved)


def test_dispatch_routes_by_backend(gen, backend, monkeypatch):
    calls = []
    real = flash_prefill.prefill_attention
    monkeypatch.setattr(flash_prefill, "prefill_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = rand(gen, 1, 2, 9, 64)
    k = rand(gen, 1, 1, 9, 64)
    v = rand(gen, 1, 1, 9, 64)
    backend("torch")
    torch_out = kernels.prefill_attention(q, k, v)
    assert not calls
    backend("triton")
    triton_out = kernels.prefill_attention(q, k, v)
    assert calls == [1]
    assert_close(triton_out, torch_out, torch.float32, gen, "dispatch triton vs torch")
    backend("auto")
    kernels.prefill_attention(q, k, v)
    assert calls == [1] if DEVICE == "cpu" else calls == [1, 1]


def test_dispatch_all_entry_points_under_triton(gen, backend):
    backend("triton")
    x, r, w = rand(gen, 2, 64), rand(gen, 2, 64), rand(gen, 64)
    assert_close(kernels.rms_norm(x, w, 1e-5), reference.rms_norm(x.double(), w.double(), 1e-5), torch.float32, gen, "rms_norm")
    normed, h = kernels.rms_norm_residual(x, r, w, 1e-5)
    assert_close(h, x.double() + r.double(), torch.float32, gen, "rms_norm_residual")
    q, k = rand(gen, 1, 2, 3, 16), rand(gen, 1, 1, 3, 16)
    cos, sin = rope_tables(gen, 1, 3, 16, torch.float32)
    want = reference.apply_rope(q.double(), cos.double(), sin.double())
    assert_close(kernels.apply_rope(q, cos, sin), want, torch.float32, gen, "apply_rope")
    kernels.apply_rope_qk_(q, k, cos, sin)
    assert_close(q, want, torch.float32, gen, "apply_rope_qk_")
    cache = rand(gen, 1, 1, 40, 16)
    lens = torch.tensor([33], device=DEVICE)
    out = kernels.decode_attention(q[:, :, 0], cache, cache, lens, None, 33)
    assert_close(out, ref_decode(q[:, :, 0], cache, cache, lens), torch.float32, gen, "decode_attention")


def test_forced_triton_on_cpu_without_interpreter_says_so(backend, monkeypatch):
    monkeypatch.setattr(flash_prefill, "INTERPRET", False)
    backend("triton")
    x = torch.zeros(2, 8)
    with pytest.raises(kernels.KernelBackendError, match="TRITON_INTERPRET=1"):
        kernels.rms_norm(x, torch.ones(8), 1e-5)


def test_set_backend_rejects_unknown(backend):
    with pytest.raises(ValueError, match="choose one of"):
        backend("cuda")
