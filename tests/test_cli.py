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


def test_demo_runs_and_compares(tmp_path):
    r = run_cli(["demo", "--cache-dir", str(tmp_path / "demo"), "--max-new-tokens", "12"], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tp=1 and tp=2 produced identical tokens (12 generated)" in r.stdout
    assert (tmp_path / "demo" / "tokenizer.json").is_file()
