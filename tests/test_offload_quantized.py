"""Streamed layers with quantized weights: a GGUF's own blocks (a Q4_K_M-like file whose
layers mix Q4_K, Q6_K and Q8_0), and --quantize int8 / int4 of a float checkpoint; from the
checkpoint, or from an --offload-dir written once in the runtime's layout. Each gives exactly
the resident run's logits and tokens (the same kernels on the same bytes)."""

import pytest
import torch
from conftest import last_json, run_cli

from tp_runtime import placement
from tp_runtime.checkpoint.model_files import open_model
from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint
from tp_runtime.checkpoint.synthetic_gguf import write_gguf
from tp_runtime.config import ParallelConfig, RuntimeConfig
from tp_runtime.engine.llm import LLM
from tp_runtime.engine.sampling import SamplingParams

CFG = llama_config_dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=512, vocab_size=500)
# what a Q4_K_M file does: some layers' v and down in Q6_K, one more type for good measure
MIXED = {"blk.1.ffn_down.weight": "Q6_K", "blk.2.attn_v.weight": "Q6_K", "blk.3.attn_q.weight": "Q8_0", "blk.3.ffn_up.weight": "Q6_K"}
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7]]
PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True)
CASES = {  # name -> (checkpoint kind, --quantize)
    "gguf-q4_0": ("Q4_0", None),
    "gguf-mixed-k": ("Q4_K", None),
    "int8": ("safetensors", "int8"),
    "int4": ("safetensors", "int4"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload_quantized")
    return {
        "Q4_0": write_gguf(root / "q4_0" / "m.gguf", CFG, weight_type="Q4_0", seed=1),
        "Q4_K": write_gguf(root / "q4_k" / "m.gguf", CFG, weight_type="Q4_K", seed=2, tensor_types=MIXED),
        "safetensors": write_checkpoint(root / "st", CFG, seed=3),
    }


def _load(path, quantize, budget=None, offload_dir=None) -> LLM:
    # the eager decode step on both sides: a streamed layer declines the fused one, and where the
    # int8 GEMV runs (AVX512-VNNI) the fused step rounds a batch's activations to int8 where the
    # eager batch multiplies them in bfloat16, which may flip a near tie
    runtime = RuntimeConfig(max_seq_len=128, max_batch_size=2, quantize=quantize, max_host_memory=budget, offload_dir=offload_dir, show_progress=False,
                            decode_step="eager")
    return LLM.load(path, ParallelConfig(), runtime)


def _run(llm: LLM):
    return llm.prompt_logits(PROMPTS), [e.token_id for e in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("offload", [False, True], ids=["from-checkpoint", "offload-dir"])
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_quantized_layers_give_the_resident_logits_and_tokens(models, case, offload, tmp_path):
    kind, quantize = CASES[case]
    resident = _load(models[kind], quantize)
    want_logits, want_tokens = _run(resident)
    s = resident.plan.sizes
    resident.close()
    # the vocab tables, in the fixed part of the budget, at the size the model holds them: the
    # file's blocks, or int8 rows with a float32 scale each, or Q8_0 blocks (int4)
    vocab, hidden = CFG["vocab_size"], CFG["hidden_size"]
    row = {"Q4_0": hidden // 32 * 18, "Q4_K": hidden // 256 * 144, "safetensors": {"int8": hidden + 4, "int4": hidden // 32 * 34}.get(quantize)}[kind]
    table = vocab * row
    assert s.embedding == s.lm_head == table
    budget = s.kv_cache + s.activations + s.embedding + s.lm_head + s.norm + max(s.layers) + s.layers[0] + 1
    offload_dir = str(tmp_path / "off") if offload else None
    for attempt in range(2 if offload else 1):  # an offload folder is written once, then read
        streamed = _load(models[kind], quantize, budget, offload_dir)
        assert streamed.plan.streamed == [1, 2, 3]
        got_logits, got_tokens = _run(streamed)
        for a, b in zip(want_logits, got_logits):
            assert torch.equal(a, b), (case, attempt, (a - b).abs().max())
        assert got_tokens == want_tokens
        steps = 1 + 1 + 7  # prompt_logits, prefill, 7 decode steps
        stats = streamed.streamer.stats
        assert stats.copies == 3 * steps
        # what a pass reads (and the memory report says): the quantized layers (GGUF blocks, or
        # the offload folder's), or the float values --quantize turns into int8/int4 every use
        per_pass = streamed.memory()["weights_disk"]
        assert stats.bytes == per_pass * steps
        if offload or quantize is None:
            assert per_pass == sum(s.layers[1:])
        else:  # float32 values: 4 bytes a weight against int8's 1 (+ scales) or int4's 18/32
            assert per_pass > 3 * sum(s.layers[1:])
        streamed.close()
    if offload:
        (folder,) = (tmp_path / "off").iterdir()
        assert sorted(f.name for f in folder.glob("layer*.safetensors")) == ["layer0001.safetensors", "layer0002.safetensors", "layer0003.safetensors"]
        assert folder.name.endswith({"int8": "-int8", "int4": "-int4"}.get(quantize, "-blocks"))


def test_streamed_mixed_gguf_at_tp2_matches_resident(models, tmp_path):
    """Through the CLI on two ranks, each streaming its own slices of layers stored three ways."""
    base = ["generate", "--model", str(models["Q4_K"]), "--tp", "2", "--prompt-ids", "5,17,3,99,42,7", "--max-new-tokens", "8", "--ignore-eos",
            "--max-seq-len", "128", "--quiet", "--json"]
    resident = run_cli(base, timeout=300)
    assert resident.returncode == 0, resident.stderr
    files = open_model(models["Q4_K"])
    sizes = [placement.shard_bytes(files.cfg, 2, r, "float32", 128, 1, blocks=placement.stored_blocks(files.index)) for r in (0, 1)]
    budget = max(s.kv_cache + s.activations + s.embedding + s.lm_head + s.norm + 2 * max(s.layers) + 1 for s in sizes)  # one layer resident
    streamed = run_cli(base + ["--max-host-memory", str(budget), "--offload-dir", str(tmp_path / "off")], timeout=300)
    assert streamed.returncode == 0, streamed.stderr
    r, s = last_json(resident.stdout), last_json(streamed.stdout)
    assert s["output_ids"] == r["output_ids"]
    assert s["memory"]["streamed_layers"] == 3 and r["memory"]["streamed_layers"] == 0
    for m in s["memory"]["ranks"]:
        assert m["weights_disk"] > 0 and m["stream_bytes_per_step"] == m["weights_disk"]
