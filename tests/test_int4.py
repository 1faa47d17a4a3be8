"""--quantize int4: float checkpoints quantised at load into GGML Q4_0 blocks (per 32 values,
round to nearest) and multiplied by the native block kernels; the embedding and LM head into
Q8_0 blocks (8 bits, as llama.cpp keeps them)."""

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import assert_greedy_agrees_up_to_a_near_tie, last_json, run_cli
from tp_runtime import placement, sharding
from tp_runtime.checkpoint.synthetic import llama_config_dict
from tp_runtime.config import ModelConfig, ParallelConfig, RuntimeConfig
from tp_runtime.engine.llm import LLM
from tp_runtime.engine.sampling import SamplingParams
from tp_runtime.errors import ConfigError
from tp_runtime.kernels import cpu_quant
from tp_runtime.model import int4
from tp_runtime.model.int4 import Int4ColumnParallelLinear, Int4ParallelLMHead, Int4RowParallelLinear, Int4VocabParallelEmbedding, quantize_q4_0, quantize_q8_0

pytestmark = pytest.mark.skipif(not cpu_quant.supported("Q4_0"), reason="the block kernels need a C compiler")

MODEL = "llama3_rope"  # head_dim 32, intermediate 128: every linear input is whole groups at tp 1..4
GAP = 2e-2  # of max |logit|: decode's int8 activations (kernels/cpu_quant.py), as for native GGUF


def _q4_0_reference(w: torch.Tensor) -> np.ndarray:
    return gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType.Q4_0)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 4).map(lambda g: 32 * g)),
              elements=st.floats(-1e4, 1e4, width=32) | st.sampled_from([0.0, -0.0, 1e-30])))
def test_quantisation_is_gguf_s_q4_0_bit_for_bit(w):
    """Any values (zero blocks, a negative value of largest magnitude, ties at half steps)."""
    with np.errstate(all="ignore"):
        want = _q4_0_reference(torch.from_numpy(w))
    assert np.array_equal(quantize_q4_0(torch.from_numpy(w)).numpy(), want)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 4).map(lambda g: 32 * g)),
              elements=st.floats(-1e4, 1e4, width=32) | st.sampled_from([0.0, -0.0, 1e-30])))
def test_vocab_quantisation_is_gguf_s_q8_0_bit_for_bit(w):
    """The embedding's and LM head's Q8_0 (halves rounded away from zero, as gguf-py does)."""
    with np.errstate(all="ignore"):
        want = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(quantize_q8_0(torch.from_numpy(w)).numpy(), want)


def test_rows_of_partial_groups_are_refused():
    with pytest.raises(ValueError, match="whole 32-value groups; a row has 40"):
        quantize_q4_0(torch.zeros(2, 40))
    with pytest.raises(ValueError, match="whole 32-value groups; a row has 40"):
        quantize_q8_0(torch.zeros(2, 40))


def _load(path, **kw):
    return LLM.load(path, ParallelConfig(), RuntimeConfig(show_progress=False, max_seq_len=128, **kw))


def test_int4_holds_q4_0_blocks_of_each_slice_and_the_planner_counts_them(hf_checkpoints):
    path, _ = hf_checkpoints[MODEL]
    f32, i4 = _load(path), _load(path, quantize="int4")
    layers = {n: m for n, m in i4.engine.model.named_modules() if isinstance(m, (Int4ColumnParallelLinear, Int4RowParallelLinear))}
    assert len(layers) == 4 * i4.cfg.num_layers  # qkv, o, gate_up, down per layer
    held = 0
    for name, m in layers.items():
        assert not hasattr(m, "weight") and all(cpu_quant.base_type(p.storage) == "Q4_0" for p in m.parts), name
        want = torch.from_numpy(_q4_0_reference(f32.engine.model.get_submodule(name).weight))
        for p in m.parts:  # packed (8 rows interleaved) where this machine's kernel prefers it
            rows = want[p.lo : p.hi].contiguous()
            assert torch.equal(m.data(p), rows if p.storage == "Q4_0" else cpu_quant.pack(rows, "Q4_0")), name
            held += m.data(p).numel()
    plan = placement.shard_bytes(i4.cfg, 1, 0, "float32", 128, 8, "int4")
    norms = sum(p.numel() * 4 for layer in i4.engine.model.layers for n, p in layer.named_parameters() if "norm" in n)
    biases = sum(m.bias.numel() * 4 for m in layers.values() if m.bias is not None)
    assert sum(plan.layers) == held + norms + biases


def _round_through(w: torch.Tensor, qtype) -> None:
    """w <- its values quantised by gguf-py into `qtype` and decoded again."""
    blocks = gguf.quants.quantize(w.float().numpy(), qtype)
    w.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, qtype)).reshape(w.shape))


def test_int4_follows_its_dequantised_weights(hf_checkpoints, monkeypatch):
    """A float32 prefill multiplies the decoded blocks in float32: the logits of a float model
    holding the Q4_0-rounded linears and the Q8_0-rounded embedding and LM head; the bfloat16
    prefill (the default on AVX512-BF16) within GAP x max |logit| of them. Decode's native GEMVs
    round the activations to int8 per block: its greedy tokens may leave that model's only where
    its best leads by under GAP x max |logit|."""
    from tp_runtime.model import blocks

    path, _ = hf_checkpoints[MODEL]
    ref, i4 = _load(path), _load(path, quantize="int4")
    for name, m in i4.engine.model.named_modules():
        if isinstance(m, (Int4ColumnParallelLinear, Int4RowParallelLinear)):
            _round_through(ref.engine.model.get_submodule(name).weight.data, gguf.GGMLQuantizationType.Q4_0)
    for name in ("embed_tokens", "lm_head"):  # untied: two tables
        _round_through(ref.engine.model.get_submodule(name).weight.data, gguf.GGMLQuantizationType.Q8_0)
    prompt = [1, 17, 42, 7, 99, 3, 250]
    got = [e.token_id for e in i4.generate([prompt], SamplingParams(max_new_tokens=32, ignore_eos=True))]
    seq = prompt + got
    want_logits = ref.prompt_logits([seq])[0]
    monkeypatch.setattr(blocks, "prefill_bf16", False)
    assert (i4.prompt_logits([seq])[0] - want_logits).abs().max().item() <= 1e-4 * want_logits.abs().max().item()
    monkeypatch.setattr(blocks, "prefill_bf16", True)
    assert (i4.prompt_logits([seq])[0] - want_logits).abs().max().item() <= GAP * want_logits.abs().max().item()
    want = want_logits[len(prompt) - 1 : -1].argmax(-1).tolist()  # the reference's best after each of our tokens
    gap = want_logits[len(prompt) - 1 : -1].max(-1).values - want_logits[len(prompt) - 1 : -1].gather(-1, torch.tensor(got)[:, None])[:, 0]
    assert gap.max().item() <= GAP * want_logits.abs().max().item(), (got, want)


@pytest.mark.parametrize("tp", [3])  # uneven: the MLP's 4 groups split 2, 1, 1
def test_int4_at_tp_gives_the_tokens_of_tp1(hf_checkpoints, tp):
    """Every split falls on whole groups, so each rank holds exactly its rows of tp=1's blocks and
    rounds the same activation blocks: only the all-reduce's order of additions differs."""
    path, _ = hf_checkpoints[MODEL]
    base = ["generate", "--model", str(path), "--prompt-ids", "1,17,42,7", "--max-new-tokens", "16", "--ignore-eos", "--json", "--quiet", "--threads", "1", "--quantize", "int4"]
    one = _load(path, quantize="int4")
    want = [e.token_id for e in one.generate([[1, 17, 42, 7]], SamplingParams(max_new_tokens=16, ignore_eos=True))]
    got = last_json(run_cli([*base, "--tp", str(tp)]).stdout)["output_ids"]
    logits = one.prompt_logits([[1, 17, 42, 7, *want]])[0]
    assert_greedy_agrees_up_to_a_near_tie(logits, 3, got, want, 1e-3 * logits.abs().max().item())


def test_int4_refuses_what_it_cannot_split_in_groups(small_model):
    with pytest.raises(ConfigError, match=r"needs head_dim \(16\) a multiple of 32"):
        _load(small_model, quantize="int4")
    cfg = RuntimeConfig(quantize="int4").split_config(ModelConfig.from_dict(llama_config_dict(hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=4, intermediate_size=64, vocab_size=64)))
    assert cfg.mlp_unit == 32 and sharding.intermediate_range(cfg, 2, 1) == (32, 64)
    assert "too few for every rank; use a smaller tp" in int4.unsupported(cfg, sharding.mlp_unit(cfg, 3), "cpu")
    assert "runs on the CPU's block kernels" in int4.unsupported(cfg, 32, "cuda")
    with pytest.raises(ConfigError, match="--gguf-weights native keeps the file's blocks, and --quantize int4"):
        RuntimeConfig(quantize="int4", gguf_weights="native")


@pytest.mark.parametrize("tied", [True, False])
def test_int4_vocab_tables_are_q8_0_of_each_row(tmp_path, tied):
    """8 bits for the vocab rows, not 4: the embedding holds gguf-py's Q8_0 of each checkpoint
    row (the padding rows zero), tied the head multiplies that same table, untied its own. A
    looked-up row is its decoded row exactly; the head's logits are float32, several rows' the
    decoded table's to 1e-5, a decode row's (the native GEMV, activations rounded per 32
    values) within GAP. The planner counts 34 bytes per 32 values, and the memory report drops
    by what that saves against float32."""
    from test_quant import SHAPE, conditioned_checkpoint

    path = conditioned_checkpoint(tmp_path / "llama", tie_word_embeddings=tied, **SHAPE)
    f32, i4 = _load(path), _load(path, quantize="int4")
    embed, head = i4.engine.model.embed_tokens, i4.engine.model.lm_head
    assert type(embed) is Int4VocabParallelEmbedding and type(head) is Int4ParallelLMHead
    for name, m in [("embed_tokens", embed)] + ([] if tied else [("lm_head", head)]):
        want = torch.from_numpy(gguf.quants.quantize(f32.engine.model.get_submodule(name).weight.numpy(), gguf.GGMLQuantizationType.Q8_0))
        assert m.storage == "Q8_0" and torch.equal(m.table, want), name
    assert (head.state_dict() == {}) == tied and (head._source is embed) == tied

    vocab, hidden = SHAPE["vocab_size"], SHAPE["hidden_size"]
    decoded = embed.dense_rows(0, vocab, torch.float32)
    ids = torch.tensor([[0, 7, 1000, 7, 500]])
    assert torch.equal(embed(ids)[0], decoded[ids[0]])
    weight = decoded if tied else head.dense_rows(0, vocab, torch.float32)
    h = torch.randn(3, hidden, generator=torch.Generator().manual_seed(0))
    want = h @ weight.T
    several, one = head.local_logits(h), head.local_logits(h[:1])
    assert several.dtype == one.dtype == torch.float32
    assert (several - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert (one[0] - want[0]).abs().max().item() <= GAP * want[0].abs().max().item()

    planned = i4.plan.sizes
    assert planned.embedding == vocab * hidden // 32 * 34 == embed.table.numel() and planned.lm_head == (0 if tied else planned.embedding)
    saved = f32.plan.sizes.embedding + f32.plan.sizes.lm_head - planned.embedding - planned.lm_head
    assert saved == (1 if tied else 2) * vocab * hidden // 32 * (4 * 32 - 34)
    assert f32.memory()["weights_host"] - i4.memory()["weights_host"] >= saved
    for llm in (f32, i4):
        llm.close()


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_a_checkpoint_row_gives_the_q8_0_row_loading_gave(model_dtype):
    """The fused step at tp > 1 reads a token's row from the mapped checkpoint (float values, or a
    GGUF's blocks of another type) and quantises it as loading did: the loaded row, bit for bit,
    and no tensor allocated per row."""
    from test_fused_decode import assert_stored_rows_give_the_loaded_rows

    g = torch.Generator().manual_seed(3)
    values = torch.randn(37, 64, generator=g) * torch.logspace(-3, 1, 37)[:, None]
    values[5, :32] = 0  # a zero block: scale 0, its reciprocal taken as 0
    q4_1 = torch.from_numpy(gguf.quants.quantize(values.numpy(), gguf.GGMLQuantizationType.Q4_1))
    stored = {"float32": (values, None), "bfloat16": (values.bfloat16(), None), "Q4_1": (q4_1, "Q4_1")}
    assert_stored_rows_give_the_loaded_rows(Int4VocabParallelEmbedding, values, stored, model_dtype)
