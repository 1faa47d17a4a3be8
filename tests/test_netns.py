"""tp-worker daemons on separate "hosts": each in its own network namespace behind a veth pair
(tests/netns.py), bound to its own address, keyed (CURVE) as they must be off loopback. The
coordinator runs in the test's namespace. Tokens equal the local run; a worker killed mid-job,
and a worker whose link goes down mid-job, are named within 10 s. Where namespaces are not
permitted the same tests run on loopback, and say so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import pytest

import netns
from conftest import REPO, last_json, run_cli
from tp_runtime.comm.keys import keygen
from tp_runtime.launch.spawn import free_port
from test_workers import ENV

PORT = 7340
LONG = ["--max-new-tokens", "4000", "--ignore-eos", "--max-seq-len", "4096"]


@pytest.fixture(scope="module")
def hosts():
    with netns.rig(2) as made:
        if made is None:
            warnings.warn(f"network namespaces are not permitted here ({netns.unavailable()}): the separate-host worker tests run on loopback")
        yield made


class Worker:
    def __init__(self, tmp_path, name: str, host: netns.Host | None, coord_public: str) -> None:
        self.keys = tmp_path / f"{name}-keys"
        self.pair = keygen(self.keys)
        (self.keys / "authorized_keys").write_text(coord_public + "\n")
        addr, port = (host.addr, PORT) if host else ("127.0.0.1", free_port())
        self.addr = f"{addr}:{port}"
        self.log = tmp_path / f"{name}.log"
        argv = [sys.executable, "-m", "tp_runtime.launch.worker", "--listen", f"tcp://{self.addr}", "--keys", str(self.keys),
                "--cache-dir", str(tmp_path / f"{name}-cache"), "--threads", "1"]
        # `ip netns exec` execs the command: the pid is the worker's
        self.proc = subprocess.Popen(host.command(argv) if host else argv, cwd=REPO, env=dict(os.environ, **ENV),
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.monotonic() + 60
        while "listening on" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def rig(hosts, tmp_path):
    """Two keyed workers (one per host) and the coordinator's flags: its keys, the workers pinned."""
    coord = tmp_path / "coord-keys"
    pair = keygen(coord)
    workers = [Worker(tmp_path, f"w{i}", hosts[i] if hosts else None, pair.public_text) for i in range(2)]
    (coord / "known_workers").write_text("".join(f"{w.addr} {w.pair.public_text}\n" for w in workers))
    flags = ["--workers", ",".join(w.addr for w in workers), "--worker-keys", str(coord)]
    if hosts:
        flags += ["--advertise-addr", hosts[0].gateway]
    yield workers, flags
    for w in workers:
        w.stop()
    if hosts:
        for h in hosts:
            h.set_link(True)


def _generate(model, *extra, timeout=120):
    return run_cli(["generate", "--model", str(model), "--prompt-ids", "1,5,9,13,2,7", "--json", "--quiet", "--threads", "1", *extra], timeout=timeout, env=ENV)


def test_workers_on_separate_hosts_give_the_local_tokens(small_model, rig, hosts):
    workers, flags = rig
    want = last_json(_generate(small_model, "--tp", "3", "--max-new-tokens", "12", "--ignore-eos").stdout)["output_ids"]
    r = _generate(small_model, *flags, "--max-new-tokens", "12", "--ignore-eos")
    assert r.returncode == 0, r.stderr[-3000:]
    got = last_json(r.stdout)
    assert got["output_ids"] == want and got["tp"] == 3 and got["transport"] == "zmq+tcp"
    for w in workers:
        assert "over CURVE" in w.log.read_text()
        if hosts:
            assert f"listening on tcp://{w.addr}" in w.log.read_text() and not w.addr.startswith("127.")


def _mid_job(model, flags, worker: Worker, cut) -> tuple[subprocess.CompletedProcess, float]:
    """Start a long job, wait until it decodes, call cut(); (the finished job, seconds from cut to exit)."""
    proc = subprocess.Popen([sys.executable, "-m", "tp_runtime", "generate", "--model", str(model), "--prompt-ids", "1,5,9", "--quiet", "--threads", "1",
                             *LONG, *flags], cwd=REPO, env=dict(os.environ, **ENV), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while "over CURVE" not in worker.log.read_text():  # the worker took the job
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        time.sleep(3)  # loaded and decoding (4000 tokens take far longer)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        t = time.monotonic()
        cut()
        out, err = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_worker_killed_mid_job_is_named_within_10s(small_model, rig):
    workers, flags = rig
    r, seconds = _mid_job(small_model, flags, workers[1], lambda: workers[1].proc.send_signal(signal.SIGKILL))
    assert r.returncode != 0 and workers[1].addr in r.stderr, r.stderr[-2000:]
    assert seconds < 10, seconds


def test_a_link_taken_down_mid_job_is_named_within_10s(small_model, rig, hosts):
    if not hosts:
        pytest.skip("no namespaces: there is no link of its own to take down on loopback")
    workers, flags = rig
    r, seconds = _mid_job(small_model, flags, workers[1], lambda: hosts[1].set_link(False))
    assert r.returncode != 0 and workers[1].addr in r.stderr, r.stderr[-2000:]
    assert seconds < 10, seconds
