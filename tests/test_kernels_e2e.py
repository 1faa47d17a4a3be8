"""End to end: the Triton kernels (in Triton's CPU interpreter) generate the same tokens as
the torch reference path, at tp=2, through the real CLI and its spawned ranks.

The model has 6 q heads over 3 kv heads, so at tp=2 each rank holds an uneven group
(q->kv (0,0,1) and (0,1,1)): the kernels' explicit kv_head_of_q path runs. Two prompts of
different lengths make decode run with per-sequence cache lengths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import block_packages

pytest.importorskip("triton")

from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint  # noqa: E402

PROMPTS = ["1,5,9,13", "7,3"]
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels_e2e") / "model"
    cfg = llama_config_dict(
        hidden_size=192, num_layers=2, num_heads=6, num_kv_heads=3, head_dim=32, intermediate_size=256, vocab_size=256
    )
    write_checkpoint(path, cfg, seed=3)
    return path


def generate(model_dir, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tp_runtime", "generate", "--model", str(model_dir), "--tp", "2"]
    for p in PROMPTS:
        cmd += ["--prompt-ids", p]
    cmd += ["--max-new-tokens", "8", "--ignore-eos", "--json", "--quiet", "--device", "cpu"]
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TP_RUNTIME_KERNELS")}
    full_env.update(env)  # the spawned ranks inherit it
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=TIMEOUT_S)


def outputs(proc: subprocess.CompletedProcess) -> list[list[int]]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return [o["output_ids"] for o in result["outputs"]]


def test_triton_interpreter_generates_the_torch_tokens(model_dir):
    want = outputs(generate(model_dir, TP_RUNTIME_KERNELS="torch"))
    got = outputs(generate(model_dir, TP_RUNTIME_KERNELS="triton", TRITON_INTERPRET="1"))
    assert [len(o) for o in want] == [8, 8]
    assert got == want, f"triton (interpreter) {got} != torch {want}"


def test_forced_triton_without_interpreter_fails_clearly(model_dir):
    """Proves the override reaches the ranks: forced Triton on CPU refuses to run silently as torch."""
    proc = generate(model_dir, TP_RUNTIME_KERNELS="triton")
    assert proc.returncode != 0
    assert "TRITON_INTERPRET=1" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr  # refused at load, as a ConfigError, by every rank


def test_forced_triton_without_triton_installed_fails_clearly(model_dir, tmp_path):
    proc = generate(model_dir, TP_RUNTIME_KERNELS="triton", TRITON_INTERPRET="1", PYTHONPATH=str(block_packages(tmp_path, "triton")))
    assert proc.returncode != 0
    assert "TP_RUNTIME_KERNELS=triton but triton cannot be imported" in proc.stderr and "Traceback" not in proc.stderr
