"""tp-bench sweep end to end on small grids: JSON lines, CSV, plot and validation table written;
the calibration measured in the run by default, a cached one used only while a probe agrees with it;
a MoE model in one parallel mode with its collective counts, predictions and expert load."""

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, block_packages

REQUIRED = {"git_sha", "host", "torch", "transport", "tp", "latency_us", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_min", "decode_max",
            "predicted_decode_tokens_per_s", "comm_share", "collectives_per_token", "bytes_per_token",
            "calibration", "calibration_measured_at", "calibration_git_sha"}
TINY = ["--dummy", "tiny", "--tp", "1", "--repeats", "1", "--new-tokens", "4", "--prompt-len", "8"]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """One folder of built C kernels for the module's caches (each test has its own calibration
    and models, but the kernels need building once, not once per test: ~2 s each)."""
    return tmp_path_factory.mktemp("kernels")


def own_cache(tmp_path, kernels) -> str:
    cache = tmp_path / "cache"
    if not (cache / "tp-runtime" / "kernels").exists():
        (cache / "tp-runtime").mkdir(parents=True, exist_ok=True)
        (cache / "tp-runtime" / "kernels").symlink_to(kernels, target_is_directory=True)
    return str(cache)


def sweep(tmp_path, kernels, out_name, *extra, env=None):
    out = tmp_path / out_name
    env = dict(os.environ, XDG_CACHE_HOME=own_cache(tmp_path, kernels), **(env or {}))  # its own calibration and dummy model
    r = subprocess.run([sys.executable, "-m", "tp_runtime.cli.bench", "sweep", *TINY, *extra, "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    return r, out, rows


def preset_path(tmp_path):
    (path,) = (tmp_path / "cache" / "tp-runtime" / "presets").glob("this-cpu-shm-*.json")
    return path


def test_sweep_calibrates_in_the_run_then_checks_a_cached_calibration(tmp_path, kernels):
    # 1. default: the calibration is measured in this run, and every output says so
    r, out, rows = first = sweep(tmp_path, kernels, "fresh", "--latency", "0,1ms")
    assert len(rows) == 2 and REQUIRED <= set(rows[0])
    assert [row["latency_us"] for row in rows] == [0.0, 1000.0]
    assert all(row["decode_tokens_per_s"] > 0 and row["predicted_decode_tokens_per_s"] > 0 for row in rows)
    assert rows[0]["collectives_per_token"] == 0  # tp=1 issues none
    assert {row["calibration"] for row in rows} == {"measured"}
    assert rows[0]["calibration_git_sha"] == rows[0]["git_sha"]
    assert (out / "sweep.png").stat().st_size > 10_000
    assert (out / "sweep.csv").read_text().count("\n") == 3
    validation = (out / "validation.txt").read_text()
    assert "prediction error: median" in validation and "calibration: measured," in validation
    preset = json.loads(preset_path(tmp_path).read_text())
    assert preset["measured"]["measured_at"] == rows[0]["calibration_measured_at"]

    # 2. a cached calibration that is wrong (as if measured on a busy machine: 1/50 of the
    # bandwidth) is caught by the probe and measured again; its predictions are not used
    poisoned = json.loads(json.dumps(preset))
    poisoned["measured"]["local_ranks"]["1"]["mem_bandwidth_Bps"] /= 50
    poisoned["measured"]["measured_at"] = "2020-01-01T00:00:00"
    preset_path(tmp_path).write_text(json.dumps(poisoned))
    r, out, rows = sweep(tmp_path, kernels, "drifted", "--latency", "0", "--cached-calibration")
    assert "has drifted: mem_bandwidth_Bps at p=1" in r.stderr, r.stderr[-2000:]
    assert rows[0]["calibration"] == "measured (cached one drifted)"
    assert rows[0]["calibration_measured_at"] != "2020-01-01T00:00:00"
    assert rows[0]["calibration_drift"]["mem_bandwidth_Bps"] > 10  # the probe saw ~49x
    assert "calibration: measured (cached one drifted)" in (out / "validation.txt").read_text()
    # the poisoned bandwidth would predict ~1/40 of the fresh calibration's figure (weight reads
    # dominate the tiny model's token); the recalibrated one is the fresh one within host noise
    fresh_prediction = first[2][0]["predicted_decode_tokens_per_s"]
    assert fresh_prediction / 2 < rows[0]["predicted_decode_tokens_per_s"] < fresh_prediction * 2
    assert json.loads(preset_path(tmp_path).read_text())["measured"]["measured_at"] != "2020-01-01T00:00:00"


def test_cached_calibration_within_tolerance_is_used_and_the_sweep_runs_without_matplotlib(tmp_path, kernels):
    sweep(tmp_path, kernels, "first", "--latency", "0")
    measured_at = json.loads(preset_path(tmp_path).read_text())["measured"]["measured_at"]
    # a tolerance no probe can exceed: the cached preset is used as it is (and the run finishes
    # without matplotlib: data and table written, one line on what to install for the plot)
    r, out, rows = sweep(tmp_path, kernels, "cached", "--latency", "0", "--cached-calibration", "--calibration-tolerance", "1000",
                         env={"PYTHONPATH": str(block_packages(tmp_path, "matplotlib"))})
    assert "using the cached calibration" in r.stderr
    assert rows[0]["calibration"] == "cached" and rows[0]["calibration_measured_at"] == measured_at
    assert "calibration: cached" in (out / "validation.txt").read_text()
    assert not (out / "sweep.png").exists() and (out / "sweep.csv").is_file()
    assert "sweep.png not drawn: matplotlib cannot be imported" in r.stderr and "tp-runtime[bench]" in r.stderr
    assert "Traceback" not in r.stderr



def test_moe_sweep_runs_a_mode_against_its_prediction(tmp_path, kernels):
    # a MoE model under --moe ep --attention dp, 2 sequences, world 2, two latencies (world 1 as
    # well would double the time: a calibration and a sweep process more)
    out = tmp_path / "moe"
    env = dict(os.environ, XDG_CACHE_HOME=own_cache(tmp_path, kernels))
    r = subprocess.run([sys.executable, "-m", "tp_runtime.cli.bench", "sweep", "--dummy", "moe-tiny", "--tp", "2", "--moe-modes", "dp",
                        "--batch", "2", "--latency", "0,1ms", "--repeats", "1", "--new-tokens", "4", "--prompt-len", "8", "--threads", "1",
                        "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert [(row["tp"], row["moe_mode"], row["batch"], row["latency_us"]) for row in rows] == [(2, "dp", 2, 0.0), (2, "dp", 2, 1000.0)]
    moe_fields = {"moe", "moe_mode", "batch", "predicted_collectives_per_token", "predicted_memory_s", "predicted_comm_s", "predicted_host_s",
                  "predicted_dominant_collective", "host_calibration", "calibration_model_1l_step_s", "calibration_model_3l_step_s"}
    assert REQUIRED | moe_fields <= set(rows[0])
    assert all(row["moe"] and row["decode_tokens_per_s"] > 0 and row["predicted_decode_tokens_per_s"] > 0 for row in rows)
    for row in rows:
        # under dp: per step 1 all-gather (the step's tokens) + 3 all-to-alls per MoE layer (2
        # layers), measured as predicted
        assert row["predicted_collectives_per_token"] == row["collectives_per_token"] == 1 + 3 * 2
        assert row["predicted_dominant_collective"].startswith("all_to_all")
    # 1 ms more per collective: the prediction's step grows by its 7 collectives' worth
    slow, fast = (2 / row["predicted_decode_tokens_per_s"] for row in reversed(rows))
    assert abs(slow - fast - 7e-3) < 1e-6
    validation = (out / "validation.txt").read_text()
    assert "mode dp (tp >= 2)" in validation and "batch 2: median" in validation
    # the expert load of the run: every (layer, expert), 2 sequences x (8 prompt + 3 decode tokens) x top-2 a layer
    with (out / "experts.csv").open() as f:
        load = list(csv.DictReader(f))
    assert len(load) == 2 * 4 and {row["rank"] for row in load} == {"0", "1"}
    for layer in ("0", "1"):
        assert sum(int(row["tokens"]) for row in load if row["layer"] == layer) == 2 * (8 + 3) * 2
    assert (out / "experts.png").stat().st_size > 10_000 and (out / "sweep.png").stat().st_size > 10_000
