"""`tp-run serve --workers` outlives a lost worker: the open stream ends with an error event and
[DONE], /health says re-forming (naming the worker) and then degraded, requests meanwhile get 503
with Retry-After, the group is formed again at tp=2 within 30 s and answers as a local tp=2 run;
the worker restarted and POST /admin/rejoin (behind the API key) bring it back at tp=3; or, with
--rejoin-every, the server finds the restarted worker itself."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, last_json, run_cli
from test_serve import PROMPT, Server, _get, _post, chat_model  # noqa: F401  (chat_model: the fixture)
from test_workers import ENV, WorkerProc

KEY = "sk-reform"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _worker_at(tmp_path, name: str, port: int) -> WorkerProc:
    """A tp-worker on a given port (a restarted one comes back where --workers names it)."""
    w = WorkerProc.__new__(WorkerProc)
    w.port, w.log = port, tmp_path / f"{name}.log"
    w.proc = subprocess.Popen(
        [sys.executable, "-m", "tp_runtime.launch.worker", "--listen", f"tcp://127.0.0.1:{port}", "--cache-dir", str(tmp_path / f"{name}-cache"), "--threads", "1"],
        cwd=REPO, env=dict(os.environ, **ENV), stdout=subprocess.DEVNULL, stderr=open(w.log, "w"),
    )
    deadline = time.monotonic() + 60
    while "listening on" not in w.log.read_text():
        assert w.proc.poll() is None and time.monotonic() < deadline, w.log.read_text()
        time.sleep(0.1)
    return w


def _local(model, ids: list[int], tp: int) -> list[int]:
    p = run_cli(["generate", "--model", str(model), "--tp", str(tp), "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "12",
                 "--ignore-eos", "--json", "--quiet", "--threads", "1"], timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    return last_json(p.stdout)["output_ids"]


def _ask(s: Server, ids: list[int]) -> list[int]:
    status, body, _ = _post(s.url + "/v1/completions", {"prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": True}, AUTH)
    assert status == 200, body
    return body


def _health(s: Server):
    status, text = _get(s.url + "/health")
    return status, (json.loads(text) if text else {})


@pytest.fixture(scope="module")
def reference(chat_model):  # noqa: F811
    """The prompt's ids and its greedy text from a local run (no server, no worker) at each tp."""
    from tp_runtime.checkpoint.tokenizer import encode_prompt, load_tokenizer

    tok = load_tokenizer(chat_model)
    ids = encode_prompt(tok, PROMPT)
    return ids, {tp: tok.decode(_local(chat_model, ids, tp), skip_special_tokens=True) for tp in (1, 2, 3)}


def _until_healthy(s: Server, since: float, whole: bool, limit_s: float = 30.0) -> tuple[float, dict, list]:
    """Poll /health until 200, whole (no body) or degraded (a body saying so); the seconds since
    `since`, the body, and every 503 body seen meanwhile."""
    seen = []
    while True:
        status, body = _health(s)
        if status == 200 and whole != bool(body):
            return time.monotonic() - since, body, seen
        if status == 503:
            seen.append(body)
        assert time.monotonic() - since < limit_s, (status, body)
        time.sleep(0.1)


def test_a_lost_worker_is_left_out_and_a_restarted_one_rejoins(chat_model, reference, tmp_path):  # noqa: F811
    ids, want = reference
    w0, w1 = WorkerProc(tmp_path, "w0"), WorkerProc(tmp_path, "w1")
    workers = [w0, w1]
    s = Server(chat_model, "--workers", f"{w0.addr},{w1.addr}", "--threads", "1", "--api-key", KEY, "--rejoin-every", "0", env=ENV)
    try:
        assert _ask(s, ids)["choices"][0]["text"] == want[3]
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": ids, "max_tokens": 220, "temperature": 0, "stream": True, "ignore_eos": True}),
                     {"Content-Type": "application/json", **AUTH})
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: {")  # the stream is running
        whole = []  # and a whole (not streamed) request beside it
        t = threading.Thread(target=lambda: whole.append(_post(s.url + "/v1/completions", {"prompt": ids, "max_tokens": 220, "temperature": 0,
                                                                                          "ignore_eos": True}, AUTH)))
        t.start()
        time.sleep(0.3)
        w1.proc.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        events = [line for line in resp.read().decode().splitlines() if line.startswith("data: ")]
        # the open stream ends with an error event, then [DONE]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["type"] == "server_error", events[-3:]
        t.join(30)
        assert whole[0][0] >= 500 and whole[0][1]["error"]["type"] == "server_error", whole  # OpenAI's error JSON
        status, body = _health(s)
        assert status == 503 and body["status"] == "re-forming", body
        assert body["lost"] == [w1.addr], body
        status, err, headers = _post(s.url + "/v1/completions", {"prompt": ids, "max_tokens": 4}, AUTH)
        assert status == 503 and {k.lower(): v for k, v in headers.items()}.get("retry-after") and err["error"]["type"] == "server_error", (status, err)
        back, body, _ = _until_healthy(s, t_kill, whole=False)  # serving again within 30 s, at tp=2, without w1
        assert body == {"status": "degraded", "lost": [w1.addr], "tp": 2, "full_tp": 3}, body
        assert _ask(s, ids)["choices"][0]["text"] == want[2]
        measured = s.metric("tp_runtime:last_loss_to_serving_seconds", AUTH)
        assert 0 < measured < back and s.metric('tp_runtime:group_reforms_total{reason="lost"}', AUTH) == 1
        assert s.metric("tp_runtime:tensor_parallel_size", AUTH) == 2
        print(f"\nloss to serving: {back:.1f} s from the kill, {measured:.2f} s from the loss noticed")

        w1 = _worker_at(tmp_path, "w1-again", w1.port)
        workers.append(w1)
        assert _post(s.url + "/admin/rejoin", {})[0] == 401  # behind the API key
        status, body, _ = _post(s.url + "/admin/rejoin", {}, AUTH)
        assert status == 202, body
        _until_healthy(s, time.monotonic(), whole=True)
        assert _ask(s, ids)["choices"][0]["text"] == want[3]
        assert s.metric("tp_runtime:tensor_parallel_size", AUTH) == 3
        assert s.metric('tp_runtime:group_reforms_total{reason="rejoin"}', AUTH) == 1
    finally:
        code = s.stop()
        err = s.proc.stderr.read()
        for w in workers:
            w.stop()
    assert code == 0, err[-3000:]
    assert "serving again at tp=2" in err and "serving at tp=3" in err, err[-3000:]


def test_a_worker_lost_while_idle_leaves_rank_0_serving_alone_until_it_rejoins(chat_model, reference, tmp_path):  # noqa: F811
    """No request runs: the idle barrier notices the loss; the group left is rank 0 alone (tp=1);
    the worker restarted is found by the server's own asking (--rejoin-every) and taken back
    without a POST."""
    ids, want = reference
    w = WorkerProc(tmp_path, "w")
    workers = [w]
    s = Server(chat_model, "--workers", w.addr, "--threads", "1", "--rejoin-every", "1", env=ENV)
    try:
        assert _ask(s, ids)["choices"][0]["text"] == want[2]
        w.proc.send_signal(signal.SIGKILL)
        back, body, seen = _until_healthy(s, time.monotonic(), whole=False)
        assert all(b["status"] == "re-forming" and b["lost"] == [w.addr] for b in seen), seen  # (it may be over between two polls)
        assert s.metric('tp_runtime:group_reforms_total{reason="lost"}') == 1
        assert body == {"status": "degraded", "lost": [w.addr], "tp": 1, "full_tp": 2}, body
        assert _ask(s, ids)["choices"][0]["text"] == want[1]
        print(f"\nlost while idle: serving alone {back:.1f} s after the kill")
        assert _health(s)[1]["tp"] == 1  # asked every second meanwhile: nobody answered
        w = _worker_at(tmp_path, "w-again", w.port)
        workers.append(w)
        _until_healthy(s, time.monotonic(), whole=True)  # no POST: found by asking
        assert _ask(s, ids)["choices"][0]["text"] == want[2]
        assert s.metric("tp_runtime:tensor_parallel_size") == 2
        assert s.metric('tp_runtime:group_reforms_total{reason="rejoin"}') == 1
    finally:
        code = s.stop()
        err = s.proc.stderr.read()
        for x in workers:
            x.stop()
    assert code == 0, err[-3000:]
