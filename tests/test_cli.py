"""The user-facing commands: generate's JSON and batch output, and the demo."""

import ast
import re

import torch

from conftest import SMOLLM2_TIE, last_json, run_cli
from tp_runtime.cli.run import DEMO_QUESTION


def test_generate_json_fields_and_streamed_text(small_model):
    r = run_cli(["generate", "--model", str(small_model), "--prompt", "Hello", "--max-new-tokens", "10", "--ignore-eos", "--json"])
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    assert len(out["output_ids"]) == 10 and out["tp"] == 1
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    assert out["huge_page_bytes"] >= 0  # the tiny model's tensors may hold no aligned 2 MB
    assert r.stdout.startswith("Hello" + out["text"])  # streamed before the JSON line


def test_generate_batch_of_prompt_ids_matches_single_runs(small_model):
    base = ["generate", "--model", str(small_model), "--max-new-tokens", "6", "--ignore-eos", "--json", "--quiet", "--tp", "2"]
    batch = last_json(run_cli([*base, "--prompt-ids", "1,5,9", "--prompt-ids", "1,7,3,8,2,6,4"]).stdout)
    single = [last_json(run_cli([*base, "--prompt-ids", ids]).stdout)["output_ids"] for ids in ("1,5,9", "1,7,3,8,2,6,4")]
    assert [o["output_ids"] for o in batch["outputs"]] == single


def test_demo_asks_the_real_model_and_compares(smollm2, smollm2_oracle):
    """The README's first command: SmolLM2 (fetched into the user's cache once) answers through
    its chat template at tp=1 and tp=2, with the same tokens, or parting only at a token where
    transformers' top two logits are the two answers' within a near tie."""
    r = run_cli(["demo", "--max-new-tokens", "16"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Paris" in r.stdout and r.stdout.count("> What is the capital of France") == 2
    if "tp=1 and tp=2 produced identical tokens (16 generated)" in r.stdout:
        return
    # parted: only where transformers' own top two are the two answers' tokens, within a near tie
    m = re.search(r"They agree on the first (\d+) tokens and part at token \d+: (.+?) at tp=1, (.+?) at tp=2\.", r.stdout)
    assert m, r.stdout
    n, ours = int(m.group(1)), {ast.literal_eval(m.group(2)), ast.literal_eval(m.group(3))}
    model, tok = smollm2_oracle
    ids = tok.apply_chat_template([{"role": "user", "content": DEMO_QUESTION}], add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n + 1, do_sample=False)
        logits = model(out).logits[0, ids.shape[1] - 1 + n]
    answer = r.stdout.split("=== tp=1 ===")[1].split("\n")[2]
    assert answer.startswith(tok.decode(out[0, ids.shape[1] : ids.shape[1] + n]))
    top = logits.topk(2)
    assert {tok.decode([int(t)]) for t in top.indices} == ours, (top, ours)
    assert (top.values[0] - top.values[1]).item() <= SMOLLM2_TIE


def test_demo_with_the_random_model(tmp_path):
    r = run_cli(["demo", "--random", "--cache-dir", str(tmp_path / "demo"), "--max-new-tokens", "12"], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tp=1 and tp=2 produced identical tokens (12 generated)" in r.stdout
    assert (tmp_path / "demo" / "demo-llama-v1" / "tokenizer.json").is_file()


def test_demo_explains_where_two_answers_part(small_model):
    from tp_runtime.cli.run import _parting

    text = _parting(small_model, [1, 2], [5, 6, 7, 8], [5, 6, 9], 2)
    assert "first 2 tokens" in text and "token 2:" in text and "near tie" in text
    # how close the two choices were: tp=1's logits of both tokens after the shared context
    m = re.search(r"they score (-?\d+\.\d+) and (-?\d+\.\d+), (\d+\.\d+) apart", text)
    assert m, text
    from tp_runtime.config import ParallelConfig, RuntimeConfig
    from tp_runtime.engine.llm import LLM

    llm = LLM.load(small_model, ParallelConfig(), RuntimeConfig(show_progress=False, max_seq_len=16))
    last = llm.prompt_logits([[1, 2, 5, 6]])[0][-1]
    llm.close()
    assert abs(float(m.group(1)) - last[7].item()) < 2e-3 and abs(float(m.group(2)) - last[9].item()) < 2e-3
    assert "one answer ends there" in _parting(small_model, [1, 2], [5, 6], [5, 6, 7], 2)
