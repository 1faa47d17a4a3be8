"""tp-bench sweep end to end on a 2-point grid: JSON lines, CSV, plot and validation table written."""

import json
import os
import subprocess
import sys

from conftest import REPO

REQUIRED = {"git_sha", "host", "torch", "transport", "tp", "latency_us", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_min", "decode_max",
            "predicted_decode_tokens_per_s", "comm_share", "collectives_per_token", "bytes_per_token"}


def test_two_point_sweep_writes_data_plot_and_validation(tmp_path):
    out = tmp_path / "sweep"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))  # its own calibration and dummy model
    r = subprocess.run([sys.executable, "-m", "tp_runtime.bench_cli", "sweep", "--dummy", "tiny", "--tp", "1", "--latency", "0,1ms",
                        "--repeats", "1", "--new-tokens", "4", "--prompt-len", "8", "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and REQUIRED <= set(rows[0])
    assert [row["latency_us"] for row in rows] == [0.0, 1000.0]
    assert all(row["decode_tokens_per_s"] > 0 and row["predicted_decode_tokens_per_s"] > 0 for row in rows)
    assert rows[0]["collectives_per_token"] == 0  # tp=1 issues none
    assert (out / "sweep.png").stat().st_size > 10_000
    assert (out / "sweep.csv").read_text().count("\n") == 3
    assert "prediction error: median" in (out / "validation.txt").read_text()
    assert list((tmp_path / "cache" / "tp-runtime" / "presets").glob("this-cpu-shm-*.json"))
