"""Parity with transformers: every architecture, tp = 1..4, real ranks on gloo.

Tolerances: float32 logits within 1e-4 absolute of transformers float32 (logits are O(1) by
construction, see hf_models.py); 32 greedy tokens identical. bfloat16: see its test.
"""

import json
import sys

import pytest
import torch

import hf_models
from tp_runtime.kernels import cpu_gemv
from tp_runtime.launch.spawn import spawn

PROMPTS = [[1, 17, 42, 7, 99], [1, *range(3, 19)], [1, 250, 3, 8, 5, 77, 31, 64, 2, 11, 13]]  # mixed lengths, one batch
NEW_TOKENS = 32
FP32_ATOL = 1e-4


def run_parity(tmp_path, dirs, tp, dtype=None):
    out = tmp_path / f"parity-tp{tp}-{dtype}.pt"
    spec = {"models": [str(d) for d in dirs], "prompts": PROMPTS, "new_tokens": NEW_TOKENS, "dtype": dtype}
    spawn([str(out), json.dumps(spec)], tp, threads=1, program=[sys.executable, str(hf_models.__file__).replace("hf_models.py", "parity_rank.py")])
    return torch.load(out)


@pytest.fixture(scope="module")
def references(hf_checkpoints):
    return {name: hf_models.reference(model, PROMPTS, NEW_TOKENS) for name, (_, model) in hf_checkpoints.items()}


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_float32_parity_with_transformers(tp, hf_checkpoints, references, tmp_path):
    dirs = {name: path for name, (path, _) in hf_checkpoints.items()}
    results = run_parity(tmp_path, dirs.values(), tp)
    for name, path in dirs.items():
        got = results[str(path)]
        ref_logits, ref_tokens = references[name]
        for i, (mine, ref) in enumerate(zip(got["logits"], ref_logits)):
            assert mine.shape == ref.shape, f"{name} tp={tp} prompt {i}: logits shape {mine.shape} vs {ref.shape}"
            err = (mine - ref).abs().max().item()
            assert err < FP32_ATOL, f"{name} tp={tp} prompt {i}: max |logit diff| {err:.2e} >= {FP32_ATOL}"
        assert got["tokens"] == ref_tokens, f"{name} tp={tp}: greedy tokens differ from transformers"
        # exactly what the math needs: per forward step 2 all-reduces per block + 1 for the
        # vocab-parallel embedding, and 1 all-gather of logits (none at all for tp=1)
        steps = NEW_TOKENS  # prefill + (NEW_TOKENS - 1) decode steps
        # the fused decode step looks embedding rows up itself: no embedding all-reduce past prefill
        embed_ar = 1 if tp > 1 and not got["fused"] else 0
        want_ar = 0 if tp == 1 else (2 * got["layers"] + 1) + (steps - 1) * (2 * got["layers"] + embed_ar)
        want_ag = 0 if tp == 1 else steps
        assert got["counts"]["all_reduce"] == want_ar, f"{name} tp={tp}: {got['counts']}"
        assert got["counts"]["all_gather"] == want_ag, f"{name} tp={tp}: {got['counts']}"
        assert got["counts"]["broadcast"] == 0 and got["counts"]["barrier"] == 0
        # the batch through the eager decode step, and each prompt alone: the same tokens; the
        # single prompts' collectives as the batch's
        assert got["fused"] == cpu_gemv.available(), f"{name} tp={tp}: fused decode step used: {got['fused']}"
        assert got["eager_tokens"] == ref_tokens, f"{name} tp={tp}: greedy tokens of the eager decode step differ from transformers"
        assert got["single_tokens"] == ref_tokens, f"{name} tp={tp}: greedy tokens of single prompts differ from transformers"
        for counts in got["single_counts"]:
            assert counts == {"all_reduce": want_ar, "all_gather": want_ag}, f"{name} tp={tp}: {counts}"


# bfloat16 rounds every activation to 8 bits of mantissa: logits (O(1)) stay within 0.25 of
# float32 transformers at every prompt position, and the tp=2 bf16 run stays within the same
# bound of the tp=1 bf16 run. Greedy decoding may leave the float32 path only where float32
# itself sees a near-tie: at the first differing token, the float32 logit gap between the two
# candidates is below 2 x 0.25.
BF16_ATOL = 0.25


def test_bfloat16_parity(hf_checkpoints, references, tmp_path):
    path, hf_model = hf_checkpoints["llama_gqa"]
    ref_logits, ref_tokens = references["llama_gqa"]
    runs = {tp: run_parity(tmp_path, [path], tp, dtype="bfloat16")[str(path)] for tp in (1, 2)}
    for tp, got in runs.items():
        for i, (mine, ref) in enumerate(zip(got["logits"], ref_logits)):
            err = (mine - ref).abs().max().item()
            assert err < BF16_ATOL, f"bf16 tp={tp} prompt {i}: max |logit diff| {err:.3f} vs fp32 transformers"
        # batched (fused and eager decode steps) and each prompt alone
        decodes = [got["tokens"], got["eager_tokens"], got["single_tokens"]]
        for i, (mine, ref) in enumerate(pair for run in decodes for pair in zip(run, ref_tokens)):
            i %= len(PROMPTS)
            j = next((j for j, (a, b) in enumerate(zip(mine, ref)) if a != b), None)
            if j is None:
                continue
            with torch.no_grad():
                fp32 = hf_model(torch.tensor([PROMPTS[i] + ref[:j]])).logits[0, -1]
            gap = (fp32[ref[j]] - fp32[mine[j]]).item()
            assert gap < 2 * BF16_ATOL, f"bf16 tp={tp} prompt {i}: token {j} differs although float32 prefers it by {gap:.3f}"
    for a, b in zip(runs[1]["logits"], runs[2]["logits"]):
        assert (a - b).abs().max().item() < BF16_ATOL


@pytest.mark.parametrize("tp", [1, 2])
def test_float16_checkpoint_keeps_float16_weights_and_float32_results(tp, hf_checkpoints, tmp_path):
    """A float16 checkpoint on CPU: the linears, embedding and LM head keep the file's float16
    values (half the bytes of the float32 copy it used to run as), each widened exactly in the
    products, so logits equal transformers' float32 run of the same float16 weights within the
    float32 tolerance, and the greedy tokens (fused and eager steps, batched and alone) are its."""
    import transformers

    from tp_runtime.config import ParallelConfig, RuntimeConfig
    from tp_runtime.engine.llm import LLM
    from tp_runtime.model.blocks import BlockColumnParallelLinear, BlockRowParallelLinear

    dirs, refs = [], {}
    for name in ("llama_gqa", "qwen2_tied"):
        path = tmp_path / f"{name}-f16"
        if not (path / "config.json").is_file():
            hf_checkpoints[name][1].half().save_pretrained(path)
            hf_checkpoints[name][1].float()
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            refs[str(path)] = hf_models.reference(hf, PROMPTS, NEW_TOKENS)
        dirs.append(path)
    if tp == 1 and cpu_gemv.available():
        llm = LLM.load(dirs[0], ParallelConfig(), RuntimeConfig(show_progress=False, max_seq_len=64))
        linears = [m for m in llm.engine.model.modules() if isinstance(m, (BlockColumnParallelLinear, BlockRowParallelLinear))]
        assert linears and {m.data(p).dtype for m in linears for p in m.parts} == {torch.float16}
        assert llm.engine.model.embed_tokens.table.dtype == torch.float16
        llm.close()
    results = run_parity(tmp_path, dirs, tp)
    for path in dirs:
        got, (ref_logits, ref_tokens) = results[str(path)], refs[str(path)]
        for i, (mine, ref) in enumerate(zip(got["logits"], ref_logits)):
            err = (mine - ref).abs().max().item()
            assert err < FP32_ATOL, f"{path.name} tp={tp} prompt {i}: max |logit diff| {err:.2e}"
        assert got["tokens"] == got["eager_tokens"] == got["single_tokens"] == ref_tokens, f"{path.name} tp={tp}"
