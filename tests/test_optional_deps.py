"""The console scripts and benches where an optional package cannot be imported (a plain
`pip install tp-runtime`, without the `bench` / `test` extras): the work is done and one line says
what to install, or the run stops before it starts naming the extra; never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, block_packages

BIN = Path(sys.executable).parent


def run(tmp_path, argv, *blocked):
    env = dict(os.environ, PYTHONPATH=str(block_packages(tmp_path, *blocked)), XDG_CACHE_HOME=str(tmp_path / "cache"))
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def test_tp_bench_sol_without_matplotlib_writes_the_csv_and_says_what_to_install(tmp_path):
    r = run(tmp_path, [str(BIN / "tp-bench"), "sol", "--model", "kimi-k2.5", "--hardware", "h100", "--chips", "8..64", "--out", str(tmp_path / "sol")],
            "matplotlib")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sol" / "sol.csv").stat().st_size > 100
    assert not (tmp_path / "sol" / "sol.png").exists()
    assert "sol.png not drawn: matplotlib cannot be imported" in r.stderr and "pip install 'tp-runtime[bench]'" in r.stderr
    assert "Traceback" not in r.stderr
    assert f"wrote {tmp_path / 'sol' / 'sol.csv'}" in r.stdout and "sol.png" not in r.stdout


def test_blocked_package_really_is_missing(tmp_path):
    r = run(tmp_path, [sys.executable, "-c", "import matplotlib"], "matplotlib")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr


def test_peer_benches_without_transformers_stop_before_any_work(tmp_path):
    for bench in ("peers.py", "batch.py"):
        out = tmp_path / bench
        r = run(tmp_path, [sys.executable, str(REPO / "bench" / bench), "--quick", "--out", str(out)], "transformers")
        assert r.returncode == 2, (bench, r.stdout, r.stderr)
        assert f"bench/{bench}: error: bench/{bench} (transformers is the peer it measures) needs transformers" in r.stderr
        assert "pip install 'tp-runtime[test]'" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "cache" / "tp-runtime" / "dummy").exists()  # no checkpoint written first
