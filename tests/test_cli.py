"""The user-facing commands: generate's JSON and batch output, and the demo."""

from conftest import last_json, run_cli


def test_generate_json_fields_and_streamed_text(small_model):
    r = run_cli(["generate", "--model", str(small_model), "--prompt", "Hello", "--max-new-tokens", "10", "--ignore-eos", "--json"])
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    assert len(out["output_ids"]) == 10 and out["tp"] == 1
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    assert r.stdout.startswith("Hello" + out["text"])  # streamed before the JSON line


def test_generate_batch_of_prompt_ids_matches_single_runs(small_model):
    base = ["generate", "--model", str(small_model), "--max-new-tokens", "6", "--ignore-eos", "--json", "--quiet", "--tp", "2"]
    batch = last_json(run_cli([*base, "--prompt-ids", "1,5,9", "--prompt-ids", "1,7,3,8,2,6,4"]).stdout)
    single = [last_json(run_cli([*base, "--prompt-ids", ids]).stdout)["output_ids"] for ids in ("1,5,9", "1,7,3,8,2,6,4")]
    assert [o["output_ids"] for o in batch["outputs"]] == single


def test_demo_asks_the_real_model_and_compares(smollm2):
    """The README's first command: SmolLM2 (fetched into the user's cache once) answers through
    its chat template at tp=1 and tp=2, with the same tokens."""
    r = run_cli(["demo", "--max-new-tokens", "16"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Paris" in r.stdout and r.stdout.count("> What is the capital of France") == 2
    assert "tp=1 and tp=2 produced identical tokens (16 generated)" in r.stdout


def test_demo_with_the_random_model(tmp_path):
    r = run_cli(["demo", "--random", "--cache-dir", str(tmp_path / "demo"), "--max-new-tokens", "12"], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tp=1 and tp=2 produced identical tokens (12 generated)" in r.stdout
    assert (tmp_path / "demo" / "demo-llama-v1" / "tokenizer.json").is_file()


def test_demo_explains_where_two_answers_part(small_model):
    from tp_runtime.cli.run import _parting

    text = _parting(small_model, [5, 6, 7, 8], [5, 6, 9], 2)
    assert "first 2 tokens" in text and "token 2:" in text and "near tie" in text
    assert "one answer ends there" in _parting(small_model, [5, 6], [5, 6, 7], 2)
