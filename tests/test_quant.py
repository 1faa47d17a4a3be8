"""--quantize int8: weight-only int8 per output channel, quantised per shard at load; the
embedding and LM head int8 per vocab row (one table when tied)."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_greedy_agrees_up_to_a_near_tie, last_json, run_cli
from tp_runtime.checkpoint.index import SINGLE_FILE
from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint
from tp_runtime.config import ParallelConfig, RuntimeConfig
from tp_runtime.engine.llm import LLM
from tp_runtime.engine.sampling import SamplingParams
from tp_runtime.kernels import cpu_gemv, cpu_quant
from tp_runtime.model.quant import Int8ColumnParallelLinear, Int8ParallelLMHead, Int8RowParallelLinear, Int8VocabParallelEmbedding, quantize_per_channel

NEW = 128
# hidden 128 (the int8 GEMV's 64-blocks), head_dim 32 (int4's groups), vocab 1001 (uneven at tp=2)
SHAPE = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256, vocab_size=1001)
PROMPT = [1, 17, 42, 7, 99, 3, 250]
# int8 against float32 on vocab_model, teacher-forced, of max |logit|: every weight rounded (~0.4%
# of its row's largest) and, in decode, the activations (per 64 values), grown through the random
# layers: measured 4.6% tied, 5.0% untied (the vocab table alone: within 2%, see the next test)
LOGIT_GAP = 0.06
TP_GAP = 0.02  # tp=2 against tp=1 under int8, of max |logit| (see the tp=2 test)


def conditioned_checkpoint(path, embedding_std: float = 0.3, gain: float = 1.5, seed: int = 11, **shape):
    """A random Llama (the runtime's writer) redrawn so that greedy decoding has winners:
    embedding rows N(0, embedding_std^2), every matrix N(0, gain^2 / inputs). The writer's 0.05
    leaves near-ties everywhere, and a tied model with N(0, 1) rows only repeats its last token
    (its own row dominates the logits); these give 17 distinct tokens in 32 (29 untied)."""
    write_checkpoint(path, llama_config_dict(**shape), seed=seed)
    state = load_file(path / SINGLE_FILE)
    g = torch.Generator().manual_seed(seed)
    for name, t in state.items():
        if t.dim() == 2:
            std = embedding_std if "embed_tokens" in name else gain * t.shape[1] ** -0.5
            state[name] = (std * torch.randn(t.shape, generator=g)).to(t.dtype)
    save_file(state, str(path / SINGLE_FILE), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def vocab_model(request, tmp_path_factory):
    tied = request.param
    return conditioned_checkpoint(tmp_path_factory.mktemp("int8_vocab") / "llama", tie_word_embeddings=tied, **SHAPE), tied


def _load(path, **kw):
    return LLM.load(path, ParallelConfig(), RuntimeConfig(show_progress=False, max_seq_len=256, **kw))


def test_quantize_per_channel_round_trip():
    w = torch.randn(64, 48) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different scale
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()  # at most half a step per channel


def test_int8_logits_and_tokens_follow_float(hf_checkpoints):
    path, _ = hf_checkpoints["llama_gqa"]
    f32, i8 = _load(path), _load(path, quantize="int8")
    layers = [m for m in i8.engine.model.modules() if isinstance(m, (Int8ColumnParallelLinear, Int8RowParallelLinear))]
    assert len(layers) == 2 * 2 * i8.cfg.num_layers and all(m.qweight.dtype == torch.int8 for m in layers)
    model = i8.engine.model
    assert type(model.embed_tokens) is Int8VocabParallelEmbedding and type(model.lm_head) is Int8ParallelLMHead
    prompt = [1, 17, 42, 7, 99, 3, 250]
    ref = [e.token_id for e in f32.generate([prompt], SamplingParams(max_new_tokens=NEW, ignore_eos=True))]
    # teacher forcing: both models score the float run's sequence
    seq = prompt + ref[:-1]
    a, b = f32.prompt_logits([seq])[0], i8.prompt_logits([seq])[0]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() >= 0.999, f"min cosine {cos.min():.5f}"
    agree = (b[len(prompt) - 1 :].argmax(-1) == torch.tensor(ref)).float().mean().item()
    assert agree >= 0.95, f"int8 picks the float token at {agree:.1%} of {NEW} positions"


def test_int8_runs_sharded(small_model):
    base = ["generate", "--model", str(small_model), "--prompt-ids", "1,2,3", "--max-new-tokens", "16", "--ignore-eos", "--json", "--quiet", "--threads", "1"]
    one, two = (last_json(run_cli([*base, "--tp", str(tp), "--quantize", "int8"]).stdout) for tp in (1, 2))
    assert len(two["output_ids"]) == 16
    # each rank quantises its own shard with per-output-channel scales: the column-parallel
    # weights get tp=1's scales, the row-parallel halves their own, and the int8 activations are
    # blocked per shard, so the sums round apart; this random model's near-tied logits then part
    # after 15 identical greedy tokens (deterministic: same shards, same order)
    assert two["output_ids"][:12] == one["output_ids"][:12]


def test_int8_linear_matches_dequantised_weights_at_every_shape():
    from tp_runtime import kernels

    for rows, k, n in [(1, 128, 192), (7, 128, 64), (1, 200, 128), (5, 200, 128), (3, 72, 40)]:  # odd K: aten's kernel crashed there
        x = torch.randn(rows, k)
        q, s = quantize_per_channel(torch.randn(n, k))
        want = x @ (q.float() * s[:, None]).T
        got = kernels.int8_linear(x, q, s)
        rel = ((got - want).norm() / want.norm()).item()
        assert got.shape == (rows, n) and rel < 1e-2, (rows, k, n, rel)  # bf16 activations: ~0.3% relative


def test_int8_layers_are_built_on_meta_and_quantise_each_slice_as_it_loads(hf_checkpoints):
    """The int8 classes are chosen when the model is built (no float weight is ever allocated
    for them) and each q/k/v or gate/up slice is quantised as it arrives: exactly what
    quantising the whole float shard gives, scale for scale."""
    path, _ = hf_checkpoints["llama_gqa"]
    f32, i8 = _load(path), _load(path, quantize="int8")
    for name, m in i8.engine.model.named_modules():
        if isinstance(m, (Int8ColumnParallelLinear, Int8RowParallelLinear)):
            assert not hasattr(m, "weight") and [n for n, _ in m.named_parameters()] in ([], ["bias"])
            float_weight = f32.engine.model.get_submodule(name).weight
            q, s = quantize_per_channel(float_weight)
            assert torch.equal(m.qweight, q) and torch.equal(m.scales, s.to(m.scales.dtype)), name


def test_int8_vocab_table_holds_each_row_once_and_the_planner_counts_it(vocab_model):
    """The embedding holds each vocab row as int8 with a float32 scale (exactly quantize_per_channel
    of the checkpoint's rows); tied, the head holds nothing of its own and multiplies that table.
    A looked-up row is its dequantised row exactly; the head's logits are float32: several rows'
    (dequantised tiles in a float32 GEMM) the dequantised table's to 1e-5, a decode row's (the
    int8 GEMV, activations rounded per 64 values) within 2% of max |logit|; both within 2% of
    the float table's. The planner counts the table at its int8 size, and the memory report
    drops by at least what it saves."""
    path, tied = vocab_model
    f32, i8 = _load(path), _load(path, quantize="int8")
    embed, head = i8.engine.model.embed_tokens, i8.engine.model.lm_head
    assert type(embed) is Int8VocabParallelEmbedding and type(head) is Int8ParallelLMHead
    tables = [("embed_tokens", embed)] + ([] if tied else [("lm_head", head)])
    for name, m in tables:
        q, scales = quantize_per_channel(f32.engine.model.get_submodule(name).weight)
        assert torch.equal(m.qweight, q) and torch.equal(m.scales, scales) and m.scales.dtype == torch.float32, name
    assert (head.state_dict() == {}) == tied and (head._source is embed) == tied  # tied: one table, read once a token, as the head

    deq = embed.dense_rows(0, embed.rows_padded)
    ids = torch.tensor([[0, 7, 1000, 7, 500]])
    assert torch.equal(embed(ids)[0], deq[ids[0]])
    weight = deq if tied else head.dense_rows(0, head.rows_padded)
    h = torch.randn(3, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(0))
    want = h @ weight.T
    several, one = head.local_logits(h), head.local_logits(h[:1])
    assert several.dtype == one.dtype == torch.float32
    assert (several - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert (one[0] - want[0]).abs().max().item() <= 2e-2 * want[0].abs().max().item()
    as_float = h @ f32.engine.model.lm_head.weight.T  # the table's own rounding too
    for got in (several, one):
        assert (got - as_float[: len(got)]).abs().max().item() <= 2e-2 * as_float.abs().max().item()

    vocab, hidden = SHAPE["vocab_size"], SHAPE["hidden_size"]
    planned, as_float = i8.plan.sizes, f32.plan.sizes
    held = sum(t.numel() * t.element_size() for m in (embed, head) for t in m.state_dict().values())
    assert planned.embedding == vocab * (hidden + 4) and planned.embedding + planned.lm_head == held
    assert planned.lm_head == (0 if tied else planned.embedding) and i8.plan.fixed["embedding"] == planned.embedding
    saved = as_float.embedding + as_float.lm_head - planned.embedding - planned.lm_head
    assert saved == len(tables) * vocab * (3 * hidden - 4)  # float32 tables: 4 bytes a value against 1, and 4 a row
    assert f32.memory()["weights_host"] - i8.memory()["weights_host"] >= saved
    for llm in (f32, i8):
        llm.close()


def test_int8_model_with_int8_vocab_follows_float(vocab_model):
    """Teacher-forced on the float run's tokens, int8 logits (linears, embedding and head) stay
    within LOGIT_GAP x max |logit| of float32's, and the 32 greedy tokens part from the float
    run's only where its best leads by less than twice that (what such errors can flip)."""
    path, tied = vocab_model
    f32, i8 = _load(path), _load(path, quantize="int8")
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    want = [e.token_id for e in f32.generate([PROMPT], params)]
    got = [e.token_id for e in i8.generate([PROMPT], params)]
    seq = PROMPT + want
    a, b = f32.prompt_logits([seq])[0], i8.prompt_logits([seq])[0]
    tol = LOGIT_GAP * a.abs().max().item()
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() >= 0.995
    assert (a - b).abs().max().item() <= tol
    assert_greedy_agrees_up_to_a_near_tie(a, len(PROMPT) - 1, got, want, 2 * tol)
    for llm in (f32, i8):
        llm.close()


@pytest.mark.skipif(not cpu_gemv.has_int8_dot(), reason="the fused step's int8 GEMV needs AVX512-VNNI")
def test_int8_head_at_tp2_fused_and_eager_give_the_tokens_of_tp1(vocab_model):
    """Vocab 1001 over 2 ranks: 501 and 500 rows, the second padded. Each rank holds exactly its
    rows of tp=1's table; the fused step looks a token's row up in the mapped checkpoint and
    quantises it as loading did (no embedding all-reduce: 2 collectives a layer + the gather),
    the eager step all-reduces its int8 rows. The vocab rows are tp=1's; what differs is the
    linears' rounding: a prompt's int8 products round each rank's partial sums to bfloat16
    (kernels/reference.py int8_linear) and the int8 GEMV quantises per-rank activations, which
    this random model grows to ~0.5% of max |logit| by the first token (TP_GAP)."""
    path, tied = vocab_model
    one = _load(path, quantize="int8")
    want = [e.token_id for e in one.generate([PROMPT], SamplingParams(max_new_tokens=16, ignore_eos=True))]
    logits = one.prompt_logits([PROMPT + want])[0]
    one.close()
    base = ["generate", "--model", str(path), "--tp", "2", "--quantize", "int8", "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "16",
            "--ignore-eos", "--json", "--quiet", "--threads", "1"]
    outputs = {}
    for step, collectives in (("fused", 2 * SHAPE["num_layers"] + 1), ("eager", 2 * SHAPE["num_layers"] + 2)):
        run = run_cli([*base, "--decode-step", step], timeout=300)
        assert run.returncode == 0, run.stderr
        out = last_json(run.stdout)
        assert out["comm"]["collectives_per_token"] == collectives, step
        gather = next(s for s in out["comm"]["sites"] if s["site"] == "lm_head")
        assert gather["bytes_per_call"] == 501 * 4  # float32 logits of the padded shard
        assert_greedy_agrees_up_to_a_near_tie(logits, len(PROMPT) - 1, out["output_ids"], want, TP_GAP * logits.abs().max().item())
        outputs[step] = out["output_ids"]
    assert outputs["fused"] == outputs["eager"]  # the same int8 rows, whichever way they are looked up


@pytest.mark.skipif(not cpu_quant.supported("Q8_0"), reason="the GGUF row below needs the block kernels")
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_a_checkpoint_row_gives_the_row_loading_gave(model_dtype):
    """The fused step at tp > 1 reads a token's row from the mapped checkpoint (values of any
    float dtype, or a GGUF's blocks) and quantises it as loading quantised the table: the same
    values as the loaded row, bit for bit, and no tensor allocated per row."""
    from test_fused_decode import assert_stored_rows_give_the_loaded_rows
    from tp_runtime.model.int4 import quantize_q8_0

    g = torch.Generator().manual_seed(2)
    values = torch.randn(37, 128, generator=g) * torch.logspace(-3, 1, 37)[:, None]
    values[5] = 0  # a zero row: the clamped scale
    stored = {"float32": (values, None), "bfloat16": (values.bfloat16(), None), "Q8_0": (quantize_q8_0(values), "Q8_0")}
    assert_stored_rows_give_the_loaded_rows(Int8VocabParallelEmbedding, values, stored, model_dtype)
