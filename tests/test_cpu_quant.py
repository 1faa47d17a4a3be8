"""The GGML block kernels (kernels/cpu_quant.c): decoding bit-exact with the gguf package's
codecs, the GEMV equal to float64 on the int8-rounded activations, and its error against the
exact activations within the stated bound."""

import threading

import gguf
import numpy as np
import pytest
import torch
from gguf import quants
from hypothesis import given, settings
from hypothesis import strategies as st

from tp_runtime.kernels import cpu_quant

pytestmark = pytest.mark.skipif(cpu_quant.lib() is None, reason="no C compiler: GGUF weights are decoded to floats at load instead")

TYPES = list(cpu_quant.TYPES)
# where each type keeps its float16 scales inside a block: (d offset, dmin/m offset or None)
SCALES = {"Q4_0": (0, None), "Q4_1": (0, 2), "Q5_0": (0, None), "Q5_1": (0, 2), "Q8_0": (0, None), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208, None)}


def random_blocks(name: str, rows: int, k: int, rng: np.random.Generator, scale: float = 0.01) -> np.ndarray:
    """Random payload bytes with finite float16 scales of either sign (some zero)."""
    block, nbytes = cpu_quant.BLOCKS[name]
    raw = rng.integers(0, 256, size=(rows, k // block, nbytes), dtype=np.uint8)
    for off in SCALES[name]:
        if off is None:
            continue
        d = rng.normal(0, scale, (rows, k // block)).astype(np.float16)
        d[rng.random(d.shape) < 0.05] = 0
        raw[..., off : off + 2] = d.view(np.uint8).reshape(rows, k // block, 2)
    return raw.reshape(rows, -1).copy()


def reference(raw: np.ndarray, name: str) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float64))


def int8_rounded(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the kernel sees it: symmetric int8 per `block` values, d = amax / 127."""
    xs = x.double().reshape(x.shape[0], -1, block)
    d = xs.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xs / torch.where(d > 0, d, 1)), 0)
    return (q * d).reshape(x.shape)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(TYPES), rows=st.integers(1, 9), nblocks=st.integers(1, 4), data=st.binary(min_size=64, max_size=64))
def test_dequantize_is_bit_exact_with_the_gguf_codecs_on_any_bytes(name, rows, nblocks, data):
    """Any bytes at all, non-finite scales and extreme nibbles included."""
    block, nbytes = cpu_quant.BLOCKS[name]
    rng = np.random.default_rng(list(data))
    raw = rng.integers(0, 256, size=(rows, nblocks * nbytes), dtype=np.uint8)
    raw[0, :] = 0xFF if data[0] & 1 else 0x00  # all-ones / all-zero payloads and scales
    out = torch.empty(rows, nblocks * block)
    cpu_quant.dequantize_(torch.from_numpy(raw), name, out)
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 in the reference, as in ours
        want = quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float32)
    assert np.array_equal(out.numpy(), want, equal_nan=True)
    bf = torch.empty(rows, nblocks * block, dtype=torch.bfloat16)
    cpu_quant.dequantize_(torch.from_numpy(raw), name, bf)
    assert torch.equal(bf.float().nan_to_num(7.0), torch.from_numpy(want).bfloat16().float().nan_to_num(7.0))


# K values of 32-value blocks that leave a row tail after the kernel's 16-block chunks (576:
# SmolLM2's hidden, 18 blocks; 96: 3 blocks only; 1568: 49)
_TAILS = [(name, n, k, nb) for name in TYPES if cpu_quant.BLOCKS[name][0] == 32 for n, k, nb in [(9, 576, 2), (3, 96, 1), (17, 1568, 1)]]


# the 8-row interleaved layouts: whole groups of 8 rows, the same tails of blocks
_PACKED_SHAPES = [(name, *shape) for name in cpu_quant.PACKED.values() for shape in [(8, 256, 1), (64, 512, 1), (128, 2048, 3), (1024, 4096, 1), (8, 768, 8), (16, 576, 2), (8, 96, 1)]]


def _blocks(name: str, n: int, k: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weight as `name` holds it, its values in float64) for a GGML type or a packed layout."""
    base = cpu_quant.base_type(name)
    raw = random_blocks(base, n, k, rng)
    blocks = torch.from_numpy(raw)
    return (cpu_quant.pack(blocks, base) if name != base else blocks), reference(raw, base)


@pytest.mark.parametrize(("name", "n", "k", "nb"), [(name, *shape) for name in TYPES for shape in [(1, 256, 1), (67, 512, 1), (130, 2048, 3), (1031, 4096, 1), (5, 768, 8)]] + _TAILS + _PACKED_SHAPES)
def test_gemv_is_float64_on_the_int8_rounded_activations(name, n, k, nb):
    rng = np.random.default_rng(n * 7 + k)
    blocks, w = _blocks(name, n, k, rng)
    block = cpu_quant.BLOCKS[cpu_quant.base_type(name)][0]
    x = torch.from_numpy(rng.normal(0, 1, (nb, k)).astype(np.float32))
    x[0, : k // 4] *= 50  # an outlier block: its own scale
    y = torch.empty(nb, n)
    cpu_quant.gemv_(blocks, name, x, y)
    want = int8_rounded(x, block) @ w.T
    # only float32 summation order differs from the float64 product of the same integers
    size = int8_rounded(x, block).abs() @ w.abs().T
    assert ((y.double() - want).abs() <= 1e-5 * size + 1e-30).all()
    # against the exact activations: at most amax/254 per value of its block
    amax = x.double().reshape(nb, -1, block).abs().amax(-1).repeat_interleave(block, dim=1)
    bound = (amax / 254) @ w.abs().T
    exact = x.double() @ w.T
    assert ((y.double() - exact).abs() <= bound * (1 + 1e-4) + 1e-5 * size).all()


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(cpu_quant.PACKED)), groups=st.integers(1, 3), nblocks=st.integers(1, 5), data=st.binary(min_size=16, max_size=16))
def test_packed_layout_decodes_as_the_rows_it_came_from(name, groups, nblocks, data):
    """Any bytes (non-finite scales included): packing moves bytes, it changes no value; row
    ranges on whole groups of 8 are slices of the packed weight."""
    rng = np.random.default_rng(list(data))
    n, nbytes = 8 * groups, cpu_quant.BLOCKS[name][1]
    raw = torch.from_numpy(rng.integers(0, 256, size=(n, nblocks * nbytes), dtype=np.uint8))
    packed = cpu_quant.pack(raw, name)
    k = nblocks * 32
    a, b = torch.empty(n, k), torch.empty(n, k)
    cpu_quant.dequantize_(raw, name, a)
    cpu_quant.dequantize_(packed, cpu_quant.PACKED[name], b)
    assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    assert torch.equal(cpu_quant.pack(raw[8:].contiguous(), name), packed[8:]) if groups > 1 else True


def test_packed_layout_refuses_rows_outside_whole_groups():
    raw = torch.from_numpy(random_blocks("Q4_0", 12, 64, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="groups of 8"):
        cpu_quant.pack(raw, "Q4_0")
    with pytest.raises(ValueError, match="groups of 8"):
        cpu_quant.gemv_(raw, "Q4_0x8", torch.randn(64), torch.empty(12))
    with pytest.raises(ValueError, match="no packed layout"):
        cpu_quant.pack(raw[:8].contiguous(), "Q4_K")


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K", "Q4_0x8", "Q8_0x8"])
def test_bfloat16_output_and_one_dimensional_rows(name):
    rng = np.random.default_rng(3)
    raw, _ = _blocks(name, 304, 1024, rng)
    x = torch.randn(1024)
    y32 = torch.empty(304)
    cpu_quant.gemv_(raw, name, x, y32)
    ybf = torch.empty(1, 304, dtype=torch.bfloat16)
    cpu_quant.gemv_(raw, name, x[None], ybf)
    assert torch.equal(ybf[0], y32.bfloat16())


def test_calls_from_several_threads_give_each_its_own_result():
    rng = np.random.default_rng(5)
    raws = {t: torch.from_numpy(random_blocks(t, 257, 2048, rng)) for t in ("Q4_0", "Q8_0", "Q5_K")}
    xs = {t: torch.randn(2, 2048) for t in raws}
    alone = {}
    for t in raws:
        alone[t] = torch.empty(2, 257)
        cpu_quant.gemv_(raws[t], t, xs[t], alone[t])
    bad = []

    def worker(t):
        for _ in range(20):
            y = torch.empty(2, 257)
            cpu_quant.gemv_(raws[t], t, xs[t], y)
            if not torch.equal(y, alone[t]):
                bad.append(t)

    threads = [threading.Thread(target=worker, args=(t,)) for t in raws for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not bad


def test_bad_arguments_are_refused_naming_the_problem():
    raw = torch.zeros(4, 18, dtype=torch.uint8)
    x = torch.zeros(32)
    with pytest.raises(ValueError, match="unknown block type 'Q3_K'"):
        cpu_quant.gemv_(raw, "Q3_K", x, torch.empty(4))
    with pytest.raises(ValueError, match="not rows of whole Q4_0 blocks"):
        cpu_quant.gemv_(torch.zeros(4, 19, dtype=torch.uint8), "Q4_0", x, torch.empty(4))
    with pytest.raises(ValueError, match="rows of 32 values"):
        cpu_quant.gemv_(raw, "Q4_0", torch.zeros(64), torch.empty(4))
    with pytest.raises(ValueError, match="x must be a CPU float32"):
        cpu_quant.gemv_(raw, "Q4_0", x.double(), torch.empty(4))
    with pytest.raises(ValueError, match="out of shape"):
        cpu_quant.gemv_(raw, "Q4_0", x, torch.empty(5))
    with pytest.raises(ValueError, match="blocks must be a CPU uint8"):
        cpu_quant.dequantize_(raw.float(), "Q4_0", torch.empty(4, 32))
    with pytest.raises(ValueError, match="not contiguous"):
        cpu_quant.dequantize_(torch.zeros(18, 8, dtype=torch.uint8).t(), "Q4_0", torch.empty(8, 32))
