"""Process management: failures bring the job down fast, name the rank, and leave nothing behind."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from conftest import REPO, last_json, run_cli


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries our marker (every rank inherits it)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if f"TP_TEST_MARKER={marker}".encode() in (d / "environ").read_bytes():
                found.append(int(d.name))
        except OSError:
            continue
    return found


def _wait_gone(marker: str, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = _marked_pids(marker)
        if not left:
            return []
        time.sleep(0.1)
    return _marked_pids(marker)


def _start(args, marker, **kw):
    env = dict(os.environ, TP_TEST_MARKER=marker)
    return subprocess.Popen([sys.executable, "-m", "tp_runtime", *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _rank_pid(marker: str, rank: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in _marked_pids(marker):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} never started")


# a run that outlasts every test below: the small model decodes 4000 tokens in about a second,
# so each collective waits an injected 5 ms (about 25 ms a token, 100 s in all)
LONG_RUN = ["--max-new-tokens", "4000", "--max-seq-len", "4096", "--ignore-eos", "--quiet", "--prompt-ids", "1,2,3", "--inject-latency", "5ms"]


def test_rank_raising_mid_generation_ends_job_naming_rank(small_model):
    marker = uuid.uuid4().hex
    t0 = time.monotonic()
    p = _start(["generate", "--model", str(small_model), "--tp", "2", *LONG_RUN, "--debug-fail-rank", "1", "--debug-fail-step", "3"], marker)
    _, err = p.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    assert p.returncode == 1, err
    assert "rank 1 failed: RuntimeError: injected fault on rank 1 at decode step 3" in err
    # start-up (two ranks importing torch, loading) is ~5 s here; the fault itself must end the
    # job within 10 s, far below the 120 s collective timeout a hung peer would otherwise wait
    assert elapsed < 25, f"took {elapsed:.1f} s"
    assert _wait_gone(marker) == []


def test_rank_killed_by_signal_is_named(small_model):
    marker = uuid.uuid4().hex
    p = _start(["generate", "--model", str(small_model), "--tp", "2", *LONG_RUN], marker)
    pid = _rank_pid(marker, 1)
    time.sleep(3)  # let it load and start generating
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 10
    assert p.returncode == 1
    assert "rank 1 failed: killed by SIGKILL" in err
    assert _wait_gone(marker) == []


def test_ctrl_c_leaves_no_process(small_model):
    marker = uuid.uuid4().hex
    # SIGINT as a terminal leaves it: a suite started in the background (`cmd &` in a script)
    # runs with SIGINT ignored, which every child would inherit, and Python would then keep
    p = _start(["generate", "--model", str(small_model), "--tp", "2", *LONG_RUN], marker, start_new_session=True,
               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _rank_pid(marker, 1)
    time.sleep(3)
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    p.communicate(timeout=30)
    assert p.returncode == 130
    assert _wait_gone(marker) == []


def test_launcher_killed_hard_takes_its_ranks_along(small_model):
    marker = uuid.uuid4().hex
    p = _start(["generate", "--model", str(small_model), "--tp", "2", *LONG_RUN], marker)
    _rank_pid(marker, 1)
    p.kill()
    p.communicate(timeout=30)
    assert _wait_gone(marker) == []


def test_two_torchrun_nodes_on_loopback_match_single_rank(small_model):
    """Multi-node is plain torchrun; shards are chosen by RANK (LOCAL_RANK is 0 on both nodes)."""
    common = ["-m", "tp_runtime", "generate", "--model", str(small_model), "--prompt", "Tensor parallel", "--max-new-tokens", "12", "--ignore-eos", "--json", "--quiet"]
    port = str(__import__("tp_runtime.launch.spawn", fromlist=["free_port"]).free_port())
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port, *common],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for n in (0, 1)
    ]
    outs = [n.communicate(timeout=120) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    two = last_json(outs[0][0])
    assert two["tp"] == 2
    one = last_json(run_cli(["generate", "--model", str(small_model), "--prompt", "Tensor parallel", "--max-new-tokens", "12", "--ignore-eos", "--json", "--quiet"]).stdout)
    assert two["output_ids"] == one["output_ids"] and len(one["output_ids"]) == 12


def test_ranks_get_disjoint_cores_when_they_fit(monkeypatch):
    from tp_runtime.launch import spawn as sp

    monkeypatch.setattr(sp.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert sp.core_sets(2, 2) == [{0, 1}, {2, 3}]
    assert sp.core_sets(4, 1) == [{0}, {1}, {2}, {3}]
    assert sp.core_sets(3, 2) is None  # 6 threads on 4 cores: let the OS share them


def test_spawned_ranks_are_pinned(small_model):
    """Two ranks with one thread each on a machine with >= 2 cores run on different cores."""
    marker = uuid.uuid4().hex
    p = _start(["generate", "--model", str(small_model), "--tp", "2", "--threads", "1", *LONG_RUN], marker)
    try:
        allowed = []
        for rank in (0, 1):
            pid = _rank_pid(marker, rank)
            status = Path(f"/proc/{pid}/status").read_text()
            allowed.append(next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list")))
        if len(os.sched_getaffinity(0)) >= 2:
            assert allowed[0] != allowed[1] and "," not in allowed[0] and "-" not in allowed[0], allowed
    finally:
        p.kill()
        p.communicate(timeout=30)
        assert _wait_gone(marker) == []
