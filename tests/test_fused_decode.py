"""The fused CPU decode step (model/fused_decode.py) and its C ops (kernels/cpu_decode.py).

Every op against its torch reference; the whole step against the eager step on the same
model and cache (logits every step); and the claim it exists for: after warm-up a decode step
creates no tensor storage (every aten op it runs writes into an existing buffer), at tp=1 and
at tp=2 over shared memory. Tokens against transformers, and the collectives per token, are
checked by test_parity.py (each prompt alone there takes this step).
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tp_runtime.config import ParallelConfig, RuntimeConfig
from tp_runtime.engine.llm import LLM
from tp_runtime.engine.sampling import Sampler, SamplingParams
from tp_runtime.kernels import cpu_decode, cpu_gemv, reference
from tp_runtime.model import fused_decode
from tp_runtime.model.step import StepInfo

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler: the fused step needs the CPU kernel")

# float32: the ops sum in another order than torch (a few ulp); bfloat16: the same roundings
# as the eager ops, so at most one bfloat16 ulp apart (attention sums many products: 2)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def _rand(g, *shape, dtype):
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_the_residual_add(dtype):
    g = torch.Generator().manual_seed(0)
    h, res, w = (_rand(g, 200, dtype=dtype) for _ in range(3))
    want, want_res = reference.rms_norm_residual(h[None], res[None], w, 1e-5)
    for out_dtype in (dtype, torch.float32):  # the next GEMV's input format
        r = res.clone()
        out = cpu_decode.rms_norm_(r, w, 1e-5, torch.empty(200, dtype=out_dtype), h)
        assert torch.equal(r, want_res[0])  # h + res, rounded as torch rounds
        torch.testing.assert_close(out.to(dtype), want[0], **TOL[dtype])
    alone = cpu_decode.rms_norm_(res.clone(), w, 1e-6, torch.empty(200, dtype=dtype))
    torch.testing.assert_close(alone, reference.rms_norm(res[None], w, 1e-6)[0], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_qkv_rope_rotates_q_in_place_and_writes_k_v_to_the_cache_slot(dtype, with_bias):
    g = torch.Generator().manual_seed(1)
    nq, nkv, hd, max_seq, pos = 6, 2, 16, 12, 5
    qkv = _rand(g, (nq + 2 * nkv) * hd, dtype=dtype)
    bias = _rand(g, qkv.numel(), dtype=dtype) if with_bias else None
    cos, sin = torch.randn(max_seq, hd, generator=g), torch.randn(max_seq, hd, generator=g)
    k_cache, v_cache = torch.zeros(nkv, max_seq, hd, dtype=dtype), torch.zeros(nkv, max_seq, hd, dtype=dtype)

    x = qkv + bias if with_bias else qkv
    q = x[: nq * hd].view(1, nq, 1, hd).clone()
    k = x[nq * hd : (nq + nkv) * hd].view(1, nkv, 1, hd).clone()
    c, s = (t[pos].to(dtype)[None, None, None] for t in (cos, sin))
    reference.apply_rope_qk_(q, k, c, s)

    got = qkv.clone()
    cpu_decode.qkv_rope_(got, bias, cos, sin, k_cache, v_cache, [pos], nq, nkv)
    torch.testing.assert_close(got[: nq * hd], q.flatten(), **TOL[dtype])
    torch.testing.assert_close(k_cache[:, pos], k.view(nkv, hd), **TOL[dtype])
    assert torch.equal(v_cache[:, pos], x[(nq + nkv) * hd :].view(nkv, hd))
    others = [p for p in range(max_seq) if p != pos]
    assert not k_cache[:, others].any() and not v_cache[:, others].any()  # only slot pos written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_map", [None, [1, 0, 1, 1, 0]])  # equal groups, or a split-cut group
@pytest.mark.parametrize("length", [1, 9, 40])
def test_decode_attention_over_the_first_length_keys(dtype, kv_map, length):
    g = torch.Generator().manual_seed(length)
    nq, nkv, hd, max_seq = len(kv_map) if kv_map else 6, 2, 32, 40
    q = _rand(g, nq * hd, dtype=dtype)
    k_cache, v_cache = _rand(g, nkv, max_seq, hd, dtype=dtype), _rand(g, nkv, max_seq, hd, dtype=dtype)
    m = None if kv_map is None else torch.tensor(kv_map)
    got = cpu_decode.decode_attention_(q, k_cache, v_cache, [length], m, torch.empty(nq * hd, dtype=dtype), torch.empty(nq, max_seq))
    want = reference.decode_attention(q.view(1, nq, hd), k_cache[None], v_cache[None], torch.tensor([length]), m, length)
    torch.testing.assert_close(got, want.flatten(), rtol=TOL[dtype]["rtol"], atol=2 * TOL[dtype]["atol"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_rope_and_attention_each_sequence_at_its_own_position(dtype):
    """Three sequences' qkv rows: RoPE + cache write at positions 2, 9, 5, then attention of each
    q (read from its qkv row) over its own cache rows up to its position."""
    g = torch.Generator().manual_seed(4)
    nb, nq, nkv, hd, max_seq = 3, 4, 2, 16, 12
    positions = [2, 9, 5]
    qkv = _rand(g, nb, (nq + 2 * nkv) * hd, dtype=dtype)
    cos, sin = torch.randn(max_seq, hd, generator=g), torch.randn(max_seq, hd, generator=g)
    k_cache, v_cache = _rand(g, nb, nkv, max_seq, hd, dtype=dtype), _rand(g, nb, nkv, max_seq, hd, dtype=dtype)
    k_want, v_want, q_want = k_cache.clone(), v_cache.clone(), []
    for b, pos in enumerate(positions):
        q = qkv[b, : nq * hd].view(1, nq, 1, hd).clone()
        k = qkv[b, nq * hd : (nq + nkv) * hd].view(1, nkv, 1, hd).clone()
        reference.apply_rope_qk_(q, k, cos[pos].to(dtype)[None, None, None], sin[pos].to(dtype)[None, None, None])
        k_want[b, :, pos], v_want[b, :, pos] = k.view(nkv, hd), qkv[b, (nq + nkv) * hd :].view(nkv, hd)
        q_want.append(q.view(nq, hd))

    got = qkv.clone()
    cpu_decode.qkv_rope_(got, None, cos, sin, k_cache, v_cache, positions, nq, nkv)
    torch.testing.assert_close(k_cache, k_want, **TOL[dtype])
    assert torch.equal(v_cache, v_want)
    out = cpu_decode.decode_attention_(got, k_cache, v_cache, [p + 1 for p in positions], None, torch.empty(nb, nq * hd, dtype=dtype), torch.empty(nb * nq, max_seq))
    for b, pos in enumerate(positions):
        torch.testing.assert_close(got[b, : nq * hd], q_want[b].flatten(), **TOL[dtype])
        want = reference.decode_attention(q_want[b][None], k_want[b : b + 1], v_want[b : b + 1], torch.tensor([pos + 1]), None, pos + 1)
        torch.testing.assert_close(out[b], want.flatten(), rtol=TOL[dtype]["rtol"], atol=2 * TOL[dtype]["atol"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_attention_address_the_cache_by_slot(dtype):
    """Sequences in cache rows 3 and 1 of 4: the write lands in those rows only, and attention
    reads them, exactly as for the same rows gathered into a cache of their own."""
    g = torch.Generator().manual_seed(6)
    nb, nq, nkv, hd, max_seq, slots, positions = 2, 4, 2, 16, 10, [3, 1], [4, 7]
    qkv = _rand(g, nb, (nq + 2 * nkv) * hd, dtype=dtype)
    cos, sin = torch.randn(max_seq, hd, generator=g), torch.randn(max_seq, hd, generator=g)
    k_cache, v_cache = _rand(g, 4, nkv, max_seq, hd, dtype=dtype), _rand(g, 4, nkv, max_seq, hd, dtype=dtype)
    k_own, v_own = k_cache[slots].clone(), v_cache[slots].clone()
    untouched = (k_cache[[0, 2]].clone(), v_cache[[0, 2]].clone())
    got, want = qkv.clone(), qkv.clone()
    cpu_decode.qkv_rope_(got, None, cos, sin, k_cache, v_cache, positions, nq, nkv, slots)
    cpu_decode.qkv_rope_(want, None, cos, sin, k_own, v_own, positions, nq, nkv)
    assert torch.equal(got, want) and torch.equal(k_cache[slots], k_own) and torch.equal(v_cache[slots], v_own)
    assert torch.equal(k_cache[[0, 2]], untouched[0]) and torch.equal(v_cache[[0, 2]], untouched[1])
    lengths = [p + 1 for p in positions]
    out = cpu_decode.decode_attention_(got, k_cache, v_cache, lengths, None, torch.empty(nb, nq * hd, dtype=dtype), torch.empty(nb * nq, max_seq), slots)
    own = cpu_decode.decode_attention_(want, k_own, v_own, lengths, None, torch.empty(nb, nq * hd, dtype=dtype), torch.empty(nb * nq, max_seq))
    assert torch.equal(out, own)
    with pytest.raises(ValueError, match="cache slots"):
        cpu_decode.decode_attention_(got, k_cache, v_cache, lengths, None, torch.empty(nb, nq * hd, dtype=dtype), torch.empty(nb * nq, max_seq), [4, 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_silu_mul(dtype, with_bias):
    g = torch.Generator().manual_seed(2)
    gu = _rand(g, 2 * 300, dtype=dtype)
    bias = _rand(g, 2 * 300, dtype=dtype) if with_bias else None
    got = cpu_decode.silu_mul_(gu, torch.empty(300, dtype=dtype), bias)
    x = gu + bias if with_bias else gu
    torch.testing.assert_close(got, F.silu(x[:300]) * x[300:], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_into_a_buffer_of_the_model_dtype(dtype):
    g = torch.Generator().manual_seed(3)
    w, x = _rand(g, 70, 128, dtype=dtype), _rand(g, 128, dtype=dtype)
    xin = x if cpu_decode.gemv_kind(w) == 2 else x.float()
    got = cpu_decode.gemv_(w, xin, torch.empty(70, dtype=dtype))
    assert torch.equal(got, cpu_gemv.cpu_linear(x[None], w)[0])  # the eager decode GEMV, bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", [(70, 128), (3000, 64), (40, 4096), (33, 100)])  # one tile; many tiles; 4-row tiles; tails
def test_gemv_of_several_rows_gives_each_row_alone(dtype, n, k):
    g = torch.Generator().manual_seed(n + k)
    w, x = _rand(g, n, k, dtype=dtype), _rand(g, 5, k, dtype=dtype)
    xin = x if cpu_decode.gemv_kind(w) == 2 else x.float()
    got = cpu_decode.gemv_(w, xin, torch.empty(5, n, dtype=dtype))
    for i in range(5):
        assert torch.equal(got[i], cpu_decode.gemv_(w, xin[i], torch.empty(n, dtype=dtype)))


@pytest.mark.skipif(not cpu_gemv.has_int8_dot(), reason="the int8 GEMV needs AVX512-VNNI")
def test_int8_gemv_of_several_rows_gives_each_row_alone():
    from tp_runtime.model.quant import quantize_per_channel

    g = torch.Generator().manual_seed(6)
    q, scales = quantize_per_channel(torch.randn(300, 256, generator=g))
    sums, x = cpu_gemv.int8_block_sums(q), torch.randn(4, 256, generator=g)
    got = cpu_decode.int8_gemv_(q, sums, scales, x, torch.empty(4, 300))
    for i in range(4):
        assert torch.equal(got[i], cpu_gemv.int8_linear(x[i : i + 1], q, sums, scales)[0])


def _load(model_dir, **kw):
    runtime = RuntimeConfig(**{"max_seq_len": 64, "max_batch_size": 1, "show_progress": False, **kw})
    return LLM.load(model_dir, ParallelConfig(), runtime)


@pytest.fixture(scope="module")
def biased_model(tmp_path_factory):
    """Every linear with a bias (Llama's attention_bias and mlp_bias), 6 q over 2 kv heads."""
    from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint

    cfg = llama_config_dict(hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=128, vocab_size=300, attention_bias=True, mlp_bias=True)
    return write_checkpoint(tmp_path_factory.mktemp("biased") / "llama", cfg, seed=5, tokenizer_vocab=300)


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    """Tied embeddings, hidden 128 and head_dim 32: int8's and int4's kernels both apply."""
    from test_quant import SHAPE, conditioned_checkpoint

    return conditioned_checkpoint(tmp_path_factory.mktemp("tied") / "llama", tie_word_embeddings=True, **SHAPE)


CASES = {  # model, runtime flags -> logits tolerance against the eager step (same weights, same cache)
    "float32": ("small", dict(dtype="float32"), 1e-4),
    "bfloat16": ("small", dict(dtype="bfloat16"), 0.05),
    "int8": ("small", dict(dtype="float32", quantize="int8"), 1e-4),  # the int8 LM head and embedding too
    "biases float32": ("biased", dict(dtype="float32"), 1e-4),
    "biases bfloat16": ("biased", dict(dtype="bfloat16"), 0.05),
    # one quantized table for the embedding and the head; float32 logits from it either way
    "int8 tied bfloat16": ("tied", dict(dtype="bfloat16", quantize="int8"), 0.05),
    "int4 tied float32": ("tied", dict(dtype="float32", quantize="int4"), 1e-4),
    "int4 tied bfloat16": ("tied", dict(dtype="bfloat16", quantize="int4"), 0.05),
}


@pytest.mark.parametrize("case", CASES)
def test_fused_step_gives_the_eager_step_logits(small_model, biased_model, tied_model, case):
    model, flags, atol = CASES[case]
    if flags.get("quantize") == "int8" and not cpu_gemv.has_int8_dot():
        pytest.skip("the int8 GEMV needs AVX512-VNNI")
    llm = _load({"small": small_model, "biased": biased_model, "tied": tied_model}[model], **flags)
    eng = llm.engine
    assert eng.fused_decode is not None
    if flags.get("quantize"):  # the quantized head's logits are gathered as it gives them
        assert eng.fused_decode.pieces.dtype == torch.float32
    prompt = [5, 9, 2, 7, 11]
    tok, pos = int(eng.prompt_logits([prompt])[0][-1].argmax()), len(prompt)
    for _ in range(10):
        step = StepInfo(torch.tensor([[pos]]), prefill=False, cache_lens=torch.tensor([pos + 1]), max_len=pos + 1)
        eager = eng.model(torch.tensor([[tok]]), step, eng.cache).float()  # writes cache slot pos ...
        fused = eng.fused_decode([tok], [pos])  # ... and so does this, with the same k, v
        assert fused.shape == eager.shape == (1, llm.cfg.vocab_size) and fused.dtype == torch.float32
        err = (fused - eager).abs().max().item()
        assert err < atol, f"{case}: step at {pos}: max |logit diff| {err:.2e}"
        assert int(fused.argmax()) == int(eager.argmax())
        tok, pos = int(eager.argmax()), pos + 1
    llm.close()


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-4), ("bfloat16", 0.05)])
def test_fused_step_over_a_batch_gives_the_eager_batch_logits(small_model, dtype, atol):
    """Three sequences at different positions (prompts of different lengths), one step each
    way, as the engine's batched decode runs them."""
    llm = _load(small_model, dtype=dtype, max_batch_size=3)
    eng = llm.engine
    prompts = [[5, 9, 2, 7, 11], [3, 4], [8, 1, 6]]
    last = eng.prompt_logits(prompts)
    toks, pos = [int(lg[-1].argmax()) for lg in last], [len(p) for p in prompts]
    for _ in range(6):
        step = StepInfo(torch.tensor(pos)[:, None], prefill=False, cache_lens=torch.tensor(pos) + 1, max_len=max(pos) + 1)
        eager = eng.model(torch.tensor(toks)[:, None], step, eng.cache).float()
        fused = eng.fused_decode(toks, pos)
        assert fused.shape == eager.shape == (3, llm.cfg.vocab_size)
        err = (fused - eager).abs().max().item()
        assert err < atol, f"positions {pos}: max |logit diff| {err:.2e}"
        assert fused.argmax(-1).tolist() == eager.argmax(-1).tolist()
        toks, pos = eager.argmax(-1).tolist(), [p + 1 for p in pos]
    llm.close()


class NewStorages(TorchDispatchMode):
    """Counts the aten ops whose output tensors have storage none of their inputs had: the
    allocations a step makes (views, in-place and out= ops reuse an input's storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        made = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen]
        if made:
            self.ops.append(str(func))
        return out


def assert_stored_rows_give_the_loaded_rows(embedding_cls, values: torch.Tensor, stored: dict, model_dtype: torch.dtype) -> None:
    """A quantising embedding: each row as the checkpoint stores it (stored: what -> (rows,
    storage type or None for floats)) looked up as the fused step does gives the loaded row bit
    for bit, allocating nothing."""
    from types import SimpleNamespace

    from tp_runtime.kernels import cpu_quant

    n, hidden = values.shape
    for what, (rows, storage) in stored.items():
        table = rows if storage is None else cpu_quant.dequantize_(rows, storage, torch.empty(n, hidden))  # what the loader hands over
        embed = embedding_cls([(0, n), (n, n + 23)], n, 0, hidden, model_dtype, SimpleNamespace(rank=0, world_size=2), "embed")
        embed.init_buffers()
        embed.load_weight("weight", table, None)
        want, got = torch.empty(1, hidden, dtype=model_dtype), torch.empty(1, hidden, dtype=model_dtype)
        for i in range(n):
            embed.row_into_(i, want[0])
            mode = NewStorages()
            with mode:
                embed.stored_row_into_(rows[i : i + 1], storage, got)
            assert torch.equal(got, want) and torch.equal(want[0], embed.lookup(torch.tensor([i]))[0]), (what, i)
            assert mode.ops == [], (what, mode.ops)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_decode_step_allocates_nothing_after_warm_up(small_model, tied_model, quantize):
    """Float; int8 and int4, whose embedding rows are int8 (dequantised through a scratch row)
    or Q8_0 blocks, and whose LM head writes float32 logits."""
    if quantize == "int8" and not cpu_gemv.has_int8_dot():
        pytest.skip("the int8 GEMV needs AVX512-VNNI")
    llm = _load(tied_model if quantize else small_model, dtype="bfloat16", quantize=quantize)
    eng = llm.engine
    sampler, params = Sampler(), SamplingParams()
    prompt = [5, 9, 2, 7]
    eng.prompt_logits([prompt])
    tok, pos = 3, len(prompt)
    ptrs = set()
    for i in range(6):
        mode = NewStorages()
        with mode:
            logits = eng.fused_decode([tok], [pos])
            tok = sampler(logits, [(params, params.seed, i)])[0]
        if i >= 1:  # the first step is warm-up (the sampler's token buffer)
            assert mode.ops == [], f"step {i} allocated in {mode.ops}"
            ptrs.add(logits.data_ptr())
        pos += 1
    assert len(ptrs) == 1  # the same logits buffer every step
    # the checker sees allocations where there are some: the eager step makes plenty
    mode = NewStorages()
    with mode:
        step = StepInfo(torch.tensor([[pos]]), prefill=False, cache_lens=torch.tensor([pos + 1]), max_len=pos + 1)
        eng.model(torch.tensor([[tok]]), step, eng.cache)
    assert len(mode.ops) > 10
    llm.close()


def test_generate_decodes_through_the_fused_step_without_allocating(small_model):
    llm = _load(small_model, dtype="float32", max_batch_size=2)
    eng = llm.engine
    step, calls, made, slots_seen = eng.fused_decode, [], [], []

    def watched(tokens, positions, slots=None):
        mode = NewStorages()
        with mode:
            logits = step(tokens, positions, slots)
        calls.append(list(positions))
        slots_seen.append(slots)
        made.extend(mode.ops)
        return logits

    eng.fused_decode = watched
    prompt, params = [5, 9, 2, 7], SamplingParams(max_new_tokens=8, ignore_eos=True)
    tokens = [ev.token_id for ev in llm.generate([prompt], params)]
    assert calls == [[p] for p in range(len(prompt), len(prompt) + 7)]  # every decode step, at its position
    calls.clear()
    two = list(llm.generate([prompt, prompt[:2]], params))  # a batch: each sequence at its own position
    assert calls == [[len(prompt) + i, 2 + i] for i in range(7)]
    assert made == []
    assert [ev.token_id for ev in two if ev.seq == 0] == tokens
    # a sequence that finishes leaves the batch: the context (64) ends a 60-token prompt after 4
    # tokens, and the other goes on alone in its slot (1)
    calls.clear()
    mixed = list(llm.generate([list(range(1, 61)), prompt], params))
    assert calls == [[60 + i, len(prompt) + i] for i in range(3)] + [[len(prompt) + i] for i in range(3, 7)]
    assert slots_seen[-1] == [1] and [ev.token_id for ev in mixed if ev.seq == 1] == tokens
    assert made == []
    llm.close()


def test_a_forked_child_does_not_take_the_fused_step():
    """The kernel's pool threads do not survive fork: the child must not call into it (it would
    wait for them forever), so the fused step says it cannot run there."""
    from tp_runtime.model import fused_decode

    assert cpu_decode.lib() is not None
    pid = os.fork()
    if pid == 0:
        why = fused_decode.unsupported_setup(torch.device("cpu"), torch.float32)
        os._exit(0 if cpu_decode.lib() is None and why and "forked" in why else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_decode_step_allocates_nothing_at_tp2_over_shared_memory(small_model, tmp_path):
    from tp_runtime.launch.spawn import spawn

    spawn([str(small_model), str(tmp_path)], 2, threads=1, program=[sys.executable, str(Path(__file__).with_name("fused_rank.py"))])
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["transport"] == "shm"
        assert got["new_storages"] == [], f"rank {rank}: {got['new_storages']}"
        assert got["logits_buffers"] == 1
        assert got["tokens"] == got["eager_tokens"]


def test_a_batch_where_sequences_finish_at_different_steps_decodes_as_the_eager_step(small_model):
    """Prompts of 3, 12 and 7 tokens in a 20-token context with 12 new tokens: the 12-token one
    reaches the context end after 8 and keeps its (clamped) slot while the others go on."""
    from conftest import last_json, run_cli

    base = ["generate", "--model", str(small_model), "--prompt-ids", "5,9,2", "--prompt-ids", ",".join(["7"] * 12), "--prompt-ids", "1,2,3,4,5,6,8",
            "--max-new-tokens", "12", "--max-seq-len", "20", "--max-batch-size", "4", "--ignore-eos", "--quiet", "--json"]
    outs = {}
    for step in ("fused", "eager"):
        p = run_cli([*base, "--decode-step", step])
        assert p.returncode == 0, p.stderr
        outs[step] = last_json(p.stdout)["outputs"]
    lengths = [len(o["output_ids"]) for o in outs["fused"]]
    assert lengths == [12, 8, 12]
    assert [o["finish_reason"] for o in outs["fused"]] == ["length"] * 3
    assert [o["output_ids"] for o in outs["fused"]] == [o["output_ids"] for o in outs["eager"]]


def test_the_tensor_entry_points_refuse_buffers_the_c_ops_would_overrun():
    with pytest.raises(ValueError, match="positions"):  # two sequences, a one-sequence cache
        cpu_decode.qkv_rope_(torch.zeros(2, 128), None, torch.zeros(12, 16), torch.zeros(12, 16), torch.zeros(2, 12, 16), torch.zeros(2, 12, 16), [1, 2], 4, 2)
    with pytest.raises(ValueError, match="lengths"):  # past the cache
        cpu_decode.decode_attention_(torch.zeros(64), torch.zeros(2, 12, 16), torch.zeros(2, 12, 16), [13], None, torch.zeros(64), torch.zeros(4, 12))
    with pytest.raises(ValueError, match="scratch"):
        cpu_decode.decode_attention_(torch.zeros(64), torch.zeros(2, 12, 16), torch.zeros(2, 12, 16), [5], None, torch.zeros(64), torch.zeros(2, 12))
    with pytest.raises(ValueError, match="buffer"):  # an output of one row for two
        cpu_decode.gemv_(torch.zeros(8, 16), torch.zeros(2, 16), torch.zeros(8))
    with pytest.raises(ValueError, match="contiguous"):
        cpu_decode.silu_mul_(torch.zeros(8, 2).t(), torch.zeros(4))


@pytest.mark.parametrize(
    "flags, why",
    [
        (["--gemv", "blas"], "--gemv blas"),
        (["--dtype", "float16"], "float16"),
    ],
)
def test_forcing_the_fused_step_where_it_cannot_run_names_why(small_model, flags, why):
    from conftest import run_cli

    p = run_cli(["generate", "--model", str(small_model), "--prompt-ids", "5,9", "--max-new-tokens", "2", "--quiet", "--decode-step", "fused", *flags])
    assert p.returncode == 1
    assert "--decode-step fused" in p.stderr and why in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_every_layer_answers_whether_it_can_bind(small_model):
    """'Can this model be fused' is 'can every layer bind', with the layer and the reason."""
    from tp_runtime.model.offload import StreamedLayer

    llm = _load(small_model, dtype="float32")
    model = llm.engine.model
    assert fused_decode.unsupported(model, torch.device("cpu")) is None
    layers = list(model.layers)
    try:
        model.layers[1] = StreamedLayer(1, None)
        assert fused_decode.unsupported(model, torch.device("cpu")) == "layer 1 is streamed (not resident)"
        model.layers[1] = torch.nn.Identity()
        assert fused_decode.unsupported(model, torch.device("cpu")) == "layer 1 is a Identity, which has no fused binding"
        model.layers[1] = layers[1]
        down = layers[0].mlp.down_proj
        weight = down.weight
        down.weight = torch.nn.Parameter(weight.t().contiguous().t(), requires_grad=False)
        assert fused_decode.unsupported(model, torch.device("cpu")) == "layer 0 MLP RowParallelLinear has a weight that is not row-major"
        down.weight = weight
    finally:
        for i, layer in enumerate(layers):
            model.layers[i] = layer
    assert fused_decode.unsupported(model, torch.device("cpu")) is None
    llm.close()


def test_exp_keeps_silu_at_float32_accuracy_over_the_whole_range():
    """SiLU through the kernel's own exp (cpu_decode.c exp_fast) against float64, from where e^-g
    overflows to where it underflows: within 2 float32 ulp, and exactly 0 / g at the ends."""
    g = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([-87.5, -30.0, 0.0, 30.0, 88.5])])
    gu = torch.cat([g, torch.ones_like(g)])
    got = cpu_decode.silu_mul_(gu, torch.empty(g.numel()))
    want = (g.double() * torch.sigmoid(g.double())).float()
    assert torch.allclose(got, want, rtol=2.4e-7, atol=1e-36), (got - want).abs().max()


@pytest.mark.parametrize("case", ["float32", "int8", "int4 tied bfloat16"])
def test_the_recorded_program_is_the_whole_token_at_tp1_and_gives_the_python_calls_logits(small_model, tied_model, case):
    """At tp=1 the first step records every layer, the norm and the head into one run of ops (one
    C call a token, no collective); its logits are those of the same bound calls made from
    Python, bit for bit (the same kernels on the same buffers)."""
    model, flags, _ = CASES[case]
    if flags.get("quantize") == "int8" and not cpu_gemv.has_int8_dot():
        pytest.skip("the int8 GEMV needs AVX512-VNNI")
    llm = _load({"small": small_model, "tied": tied_model}[model], **flags)
    eng, step = llm.engine, llm.engine.fused_decode
    prompt = [5, 9, 2, 7, 11]
    eng.prompt_logits([prompt])
    cache = (eng.cache.k.clone(), eng.cache.v.clone())
    recorded = [step([3 + i], [len(prompt) + i]).clone() for i in range(4)]
    assert list(step.programs) == [(1, False)] and step.programs[(1, False)].calls == 1
    eng.cache.k.copy_(cache[0])
    eng.cache.v.copy_(cache[1])
    step.record = False
    called = [step([3 + i], [len(prompt) + i]).clone() for i in range(4)]
    for a, b in zip(recorded, called):
        assert torch.equal(a, b)
    llm.close()


def test_a_unit_with_a_torch_op_runs_as_python_between_recorded_ops(small_model):
    """A layer whose bound run does a torch op (as a MoE layer's router does) cannot be recorded:
    it stays a Python item of the program, the layers around it are still recorded ops, and the
    logits are unchanged."""
    llm = _load(small_model, dtype="float32")
    eng, step = llm.engine, llm.engine.fused_decode
    eng.prompt_logits([[5, 9, 2]])
    cache = (eng.cache.k.clone(), eng.cache.v.clone())
    want = step([4], [3]).clone()
    eng.cache.k.copy_(cache[0])
    eng.cache.v.copy_(cache[1])
    inner, touched = step.units[1], []

    def with_torch_op(nb):
        touched.append(step.res[:nb].sum())  # a torch op: not recordable
        inner(nb)

    step.units[1] = with_torch_op
    step.programs.clear()
    got = step([4], [3])
    prog = step.programs[(1, False)]
    assert prog.calls == 3 and len(touched) == 1  # ops | layer 1 as Python | ops; its op raised while recording, so it ran once
    assert torch.equal(got, want)
    llm.close()


def test_local_tp_note_for_a_small_model_only():
    """tp=2 on one host: a note where the collectives (2 a layer + 1, ~25 us each) reach a quarter
    of a token's weight reads (SmolLM2 in int8 or Q4_1), none for SmolLM2 in 16 or 32 bits (where
    tp=2 measured as fast as tp=1), a 1B model or tp=1."""
    from tp_runtime import placement
    from tp_runtime.config import ModelConfig

    def cfg(**kw):
        base = dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5, rope_theta=1e5, max_position_embeddings=2048, torch_dtype="bfloat16")
        return ModelConfig.from_dict({**base, **kw})

    smol = cfg(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
    tiny = cfg(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632, vocab_size=32000)
    note = placement.local_tp_note(smol, 2, "bfloat16", "int8")
    assert note and "--tp 1" in note and "61 collectives" in note and "135 MB" in note
    assert placement.local_tp_note(smol, 2, "bfloat16") is None and placement.local_tp_note(smol, 2, "float32") is None
    assert placement.local_tp_note(tiny, 2, "bfloat16", "int8") is None
    assert placement.local_tp_note(smol, 1, "bfloat16", "int8") is None
    e = placement.local_tp_estimate(smol, "bfloat16")
    assert e["collectives_per_token"] == 61 and 268e6 < e["weight_bytes"] < 271e6  # SmolLM2's 134.5M parameters, the tied head read once


def test_a_moe_layer_is_run_from_python_without_a_recording_attempt(tmp_path):
    """A MoE layer says it runs torch ops every step (its router): the fused step never tries to
    record it (the try, a torch op under the recording's dispatch mode, costs a one-time ~1.3 s
    import that a short run paid as decode time), runs it as a Python item between the recorded
    ops, and gives the logits of the same bound calls made from Python."""
    from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint

    raw = llama_config_dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, vocab_size=300,
                            architecture="MixtralForCausalLM", num_local_experts=3, num_experts_per_tok=2)
    llm = _load(write_checkpoint(tmp_path / "mixtral", raw, seed=3), dtype="float32")
    eng, step = llm.engine, llm.engine.fused_decode
    assert step.unrecorded == {0, 1}
    eng.prompt_logits([[5, 9, 2]])
    cache = (eng.cache.k.clone(), eng.cache.v.clone())
    recorded = step([4], [3]).clone()
    prog = step.programs[(1, False)]
    assert [item.func for item in prog.items if getattr(item, "func", None) in step.units] == step.units[:2]  # the two layers, as Python
    eng.cache.k.copy_(cache[0])
    eng.cache.v.copy_(cache[1])
    step.record = False
    assert torch.equal(recorded, step([4], [3]))
    llm.close()
