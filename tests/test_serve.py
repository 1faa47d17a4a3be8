"""tp-run serve through the `openai` client: completions and chat, streamed and whole, against
the same request run alone in this process; concurrent requests each as if alone; every error
code; cancellation; metrics. The server runs at tp=2 (rank 1 follows rank 0's plans)."""

import copy
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint
from tp_runtime.config import ParallelConfig, RuntimeConfig
from tp_runtime.engine.llm import LLM
from tp_runtime.engine.sampling import SamplingParams

openai = pytest.importorskip("openai")

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MAX_LEN = 256


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    cfg = llama_config_dict(hidden_size=128, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=256, vocab_size=300)
    path = write_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-chat", cfg, seed=5, tokenizer_vocab=300)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _post(url: str, body, headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


class Server:
    def __init__(self, model: Path, *flags: str, env: dict | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tp_runtime", "serve", "--model", str(model), "--port", str(self.port), "--quiet", "--max-seq-len", str(MAX_LEN), *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}: {self.proc.stderr.read()[-3000:]}")
            try:
                if _get(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError("the server did not become healthy in 180 s")

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def metric(self, name: str, headers: dict | None = None) -> float:
        status, text = _get(self.url + "/metrics", headers)
        assert status == 200, text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(chat_model):
    s = Server(chat_model, "--tp", "2", "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--served-model-name", "tiny")
    yield s
    assert s.stop() == 0, s.proc.stderr.read()[-3000:]


@pytest.fixture(scope="module")
def alone(chat_model):
    """The same requests run alone, in this process at tp=1 (the reference)."""
    llm = LLM.load(chat_model, ParallelConfig(), RuntimeConfig(show_progress=False, max_seq_len=MAX_LEN, max_batch_size=1))

    def run(ids, **kw):
        params = SamplingParams(**{"max_new_tokens": 12, "ignore_eos": True, **kw})
        tokens = [e.token_id for e in llm.generate([ids], params)]
        return tokens, llm.tokenizer.decode(tokens, skip_special_tokens=True)

    run.llm = llm
    yield run
    llm.close()


PROMPT = "the quick brown fox jumps over"


def _concurrently(n: int, request) -> list:
    """request(i) for i < n, all at once, each in its own thread; their results in order."""
    got = [None] * n

    def one(i):
        got[i] = request(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return got


def test_completion_equals_the_request_run_alone_streamed_or_not(server, alone):
    c = server.client()
    ids = alone.llm.encode(PROMPT)
    _, want = alone(ids, max_new_tokens=12)
    whole = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert whole.choices[0].text == want and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), 12)
    chunks = list(c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    # token ids as the prompt
    by_ids = c.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == want


def test_chat_goes_through_the_template_and_streams_with_the_role_first(server, alone):
    c = server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    ids = alone.llm.chat_ids(messages)
    _, want = alone(ids, max_new_tokens=10, temperature=0.7, seed=42)
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.7, seed=42, extra_body={"ignore_eos": True})
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == want
    assert whole.usage.prompt_tokens == len(ids)
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.7, seed=42, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_requests_each_get_what_they_get_alone(server, alone):
    """Batch invariance: 6 seeded sampled requests at once (over 4 slots: some wait), each equal
    to itself run alone; their prompts differ in length, so prefill chunks interleave."""
    prompts = [PROMPT[: 5 + 4 * i] for i in range(6)]
    want = [alone(alone.llm.encode(p), max_new_tokens=10, temperature=0.9, top_p=0.95, seed=i)[1] for i, p in enumerate(prompts)]
    got = _concurrently(len(prompts), lambda i: server.client().completions.create(
        model="tiny", prompt=prompts[i], max_tokens=10, temperature=0.9, top_p=0.95, seed=i, extra_body={"ignore_eos": True}).choices[0].text)
    assert got == want


def test_a_late_request_is_answered_while_an_earlier_stream_goes_on(server):
    """Continuous admission: a short request sent after a long stream started finishes first."""
    c = server.client()
    long = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, temperature=0, stream=True, extra_body={"ignore_eos": True})
    it = iter(long)
    next(it)
    short = c.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3
    rest = list(it)  # the long one was still running: most of its tokens came after the short answer
    assert len(rest) > 100 and rest[-1].choices[0].finish_reason == "length"


def test_stop_strings_end_the_text_before_them(server, alone):
    c = server.client()
    _, full = alone(alone.llm.encode(PROMPT), max_new_tokens=12)
    stop = full[4:7]
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == full[: full.index(stop)]


def _quiet_steps(server) -> float:
    """The step count once the engine has nothing left to run (an aborted request may still
    be finishing its step)."""
    deadline = time.time() + 10
    while time.time() < deadline:
        steps = server.metric("tp_runtime:engine_steps_total")
        time.sleep(0.3)
        if server.metric("vllm:num_requests_running") == 0 and server.metric("tp_runtime:engine_steps_total") == steps:
            return steps
    raise AssertionError("the engine did not go quiet")


def test_bad_requests_get_openai_errors_and_never_reach_the_ranks(server):
    steps = _quiet_steps(server)
    url = server.url + "/v1/completions"
    cases = [
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"prompt": "x", "n": 2}, 400, "n"),
        ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": [1, 2, 99999]}, 400, "prompt"),
        ({"prompt": ["a", "b"]}, 400, "prompt"),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": "x", "model": "other"}, 404, "model"),
        ({"prompt": list(range(1, 200)) * 2}, 400, "prompt"),
        ({"prompt": list(range(1, 200)), "max_tokens": 100}, 400, "max_tokens"),
    ]
    for body, status, param in cases:
        code, err, _ = _post(url, body)
        assert code == status and set(err["error"]) == {"message", "type", "param", "code"}, (body, code, err)
        assert err["error"]["param"] == param, (body, err)
    code, err, _ = _post(url, {"prompt": list(range(1, 200)) * 2})
    assert "256" in err["error"]["message"] and "398" in err["error"]["message"]  # both numbers
    code, err, _ = _post(url, b"{not json")
    assert code == 400 and "JSON" in err["error"]["message"]
    code, err, _ = _post(url, b"[1, 2]")
    assert code == 400
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # a body announced over the limit: refused unread
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(1 << 30))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "limit" in json.loads(resp.read())["error"]["message"]
    conn.close()
    code, err, _ = _post(server.url + "/v1/nothing", {})
    assert code == 404 and "error" in err
    assert server.metric("tp_runtime:engine_steps_total") == steps  # none of them ran a step
    assert _get(server.url + "/health")[0] == 200


def test_a_client_that_leaves_mid_stream_is_aborted_and_the_slot_freed(server, alone):
    c = server.client()
    stream = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, temperature=0, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.time() + 10
    while time.time() < deadline and server.metric("vllm:num_requests_running") > 0:
        time.sleep(0.1)
    assert server.metric("vllm:num_requests_running") == 0
    assert server.metric('vllm:request_success_total{finished_reason="abort"') >= 1
    _, want = alone(alone.llm.encode(PROMPT), max_new_tokens=12)
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].text == want


def test_a_client_that_leaves_a_whole_request_is_aborted_too(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 220, "temperature": 0, "ignore_eos": True}),
                 {"Content-Type": "application/json"})
    deadline = time.time() + 10
    while time.time() < deadline and server.metric("vllm:num_requests_running") < 1:
        time.sleep(0.02)
    aborted = server.metric('vllm:request_success_total{finished_reason="abort"')
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    while time.time() < deadline and server.metric("vllm:num_requests_running") > 0:
        time.sleep(0.05)
    assert server.metric("vllm:num_requests_running") == 0
    assert server.metric('vllm:request_success_total{finished_reason="abort"') == aborted + 1


def test_models_health_and_metrics(server):
    status, body = _get(server.url + "/v1/models")
    data = json.loads(body)["data"]
    assert status == 200 and data[0]["id"] == "tiny" and data[0]["max_model_len"] == MAX_LEN
    server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "tp_runtime:schedule_bytes_total"):
        assert server.metric(name) > 0, name
    # the plan broadcast is a timed collective like the others, under its own site
    assert server.metric('tp_runtime:collective_calls_total{op="broadcast",phase="prefill",site="schedule"}') > 0


def test_api_key_and_a_full_queue(chat_model):
    s = Server(chat_model, "--api-key", "sekret", "--max-num-seqs", "1", "--max-queue", "1", "--max-seq-len", "2048")
    try:
        assert _get(s.url + "/health")[0] == 200  # health is open
        code, err, _ = _post(s.url + "/v1/completions", {"prompt": "x"})
        assert code == 401 and err["error"]["type"] == "authentication_error"
        assert _get(s.url + "/metrics")[0] == 401
        auth = {"Authorization": "Bearer sekret"}
        # one runs, one waits; the third finds the queue full
        long = {"prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
        results = []
        threads = [threading.Thread(target=lambda: results.append(_post(s.url + "/v1/completions", long, auth)[0])) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while time.time() < deadline and s.metric("vllm:num_requests_waiting", auth) < 1:
            time.sleep(0.05)
        code, err, headers = _post(s.url + "/v1/completions", {"prompt": "x", "max_tokens": 2}, auth)
        assert code == 429 and headers.get("retry-after") == "1" and err["error"]["type"] == "rate_limit_error"
        running, waiting = set(), set()
        while any(t.is_alive() for t in threads):  # the gauges while the two run one after the other
            running.add(s.metric("vllm:num_requests_running", auth))
            waiting.add(s.metric("vllm:num_requests_waiting", auth))
        for t in threads:
            t.join(120)
        assert max(running) == 1 and 1 in waiting
        assert results == [200, 200]
        ok = s.client(api_key="sekret").completions.create(model=s_model_name(chat_model), prompt="x", max_tokens=2)
        assert ok.usage.completion_tokens >= 1
    finally:
        assert s.stop() == 0


def s_model_name(path: Path) -> str:
    return path.name


def test_a_repeated_prefix_is_served_from_the_slot_cache(server, alone):
    """A chat resending its history prefills only the new tokens, and answers as if alone."""
    c = server.client()
    history = [{"role": "user", "content": "tell me about the quick brown fox"}]
    first = c.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    history += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "and then?"}]
    before = server.metric("tp_runtime:prefix_reused_tokens_total")
    second = c.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    reused = server.metric("tp_runtime:prefix_reused_tokens_total") - before
    assert reused >= first.usage.prompt_tokens  # at least the first turn's prompt came from the cache
    assert second.choices[0].message.content == alone(alone.llm.chat_ids(history), max_new_tokens=8)[1]


def _rank_pid(launcher: int, rank: int) -> int:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == launcher and f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                return int(d.name)
        except (OSError, IndexError, ValueError):
            continue
    raise AssertionError(f"no rank {rank} under {launcher}")


def test_a_rank_that_dies_ends_open_streams_with_an_error_and_the_server_exits_naming_it(chat_model):
    s = Server(chat_model, "--tp", "2")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 220, "temperature": 0, "stream": True, "ignore_eos": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: {")  # the stream is running
        os.kill(_rank_pid(s.proc.pid, 1), signal.SIGKILL)
        t0 = time.time()
        events = [line for line in resp.read().decode().splitlines() if line.startswith("data: ")]
        # the open stream ends with an error event, then [DONE]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["type"] == "server_error"
        s.proc.wait(timeout=10)
        assert time.time() - t0 < 10
        assert s.proc.returncode not in (0, None)
        assert "rank 1" in s.proc.stderr.read()
    finally:
        s.stop()


def test_serve_over_two_tp_workers(chat_model, alone, tmp_path):
    """Hand-started tp-worker daemons as ranks 1 and 2 (pyzmq): the same answers; they go back to
    waiting for the next job when the server stops."""
    from test_workers import ENV, WorkerProc

    workers = [WorkerProc(tmp_path, f"w{i}") for i in range(2)]
    try:
        s = Server(chat_model, "--workers", ",".join(w.addr for w in workers), "--threads", "1", env=ENV)
        try:
            c = s.client()
            _, want = alone(alone.llm.encode(PROMPT), max_new_tokens=12)
            r = c.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
            assert r.choices[0].text == want
            chunks = list(c.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}))
            assert "".join(ch.choices[0].text for ch in chunks) == want
            assert s.metric('tp_runtime:collective_calls_total{op="broadcast",phase="prefill",site="schedule"}') > 0
        finally:
            assert s.stop() == 0, s.proc.stderr.read()[-3000:]
        assert all(w.proc.poll() is None for w in workers)  # daemons outlive the job
        deadline = time.time() + 10
        while time.time() < deadline and not all("job done" in w.log.read_text() for w in workers):
            time.sleep(0.2)
        assert all("job done" in w.log.read_text() for w in workers)
    finally:
        for w in workers:
            w.stop()


def test_chat_in_the_terminal_keeps_the_history(chat_model, alone):
    p = subprocess.run([sys.executable, "-m", "tp_runtime", "chat", "--model", str(chat_model), "--max-new-tokens", "8", "--max-seq-len", str(MAX_LEN)],
                       input="hello there\n/clear\nhello there\nand then\n", capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    first = [{"role": "user", "content": "hello there"}]
    a1 = alone(alone.llm.chat_ids(first), max_new_tokens=8, ignore_eos=False)[1]
    second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "and then"}]
    a2 = alone(alone.llm.chat_ids(second), max_new_tokens=8, ignore_eos=False)[1]
    # /clear: the second "hello there" answers as the first did (tp=1 here: the tp=2 server is tested above)
    assert p.stdout.splitlines() == [a1, a1, a2]


def test_the_load_generator_measures_a_running_server(server, tmp_path):
    from tp_runtime.cli.bench import main as bench

    out = tmp_path / "bench"
    assert bench(["serve", "--url", f"ours={server.url}", "--request-rate", "20,inf", "--num-prompts", "6", "--input-len", "8", "--output-len", "6",
                  "--out", str(out)]) == 0
    import csv as _csv

    rows = list(_csv.DictReader(open(out / "serve.csv")))
    assert [r["request_rate"] for r in rows] == ["20.0", "inf"]
    for r in rows:
        assert int(r["completed"]) == 6 and int(r["failed"]) == 0
        assert float(r["output_throughput"]) > 0 and 0 < float(r["median_ttft_ms"]) <= float(r["median_e2el_ms"])
        assert float(r["engine_steps"]) >= 6 and float(r["host_ms_per_step"]) > 0 and float(r["plan_bytes_per_step"]) > 10  # from our /metrics
    lines = [json.loads(x) for x in open(out / "serve.jsonl")]
    assert sum("summary" in x for x in lines) == 2 and sum(x.get("ok", False) for x in lines) == 12
    assert (out / "serve.png").stat().st_size > 0


def test_followers_that_hold_other_sequences_stop_naming_their_rank(small_model, monkeypatch):
    from tp_runtime.config import ParallelConfig, RuntimeConfig
    from tp_runtime.engine.llm import LLM
    from tp_runtime.engine.sampling import SamplingParams
    from tp_runtime.engine.scheduler import Request, Scheduler
    from tp_runtime.errors import LaunchError
    from tp_runtime.serve import engine_loop, plan_wire

    llm = LLM.load(small_model, ParallelConfig(), RuntimeConfig(show_progress=False, max_batch_size=2, max_seq_len=64))
    try:
        s = Scheduler(llm.engine)
        s.add(Request(0, [1, 2, 3], SamplingParams(max_new_tokens=4, ignore_eos=True), 0))
        _, changes = s.schedule()
        llm.engine.abort(llm.engine.running[0])  # undo: the follower below applies the same admission
        wrong = plan_wire.digest(llm.engine) + 1
        messages = iter([plan_wire.decode(plan_wire.encode(plan_wire.STEP, changes, wrong))])
        monkeypatch.setattr(plan_wire, "receive", lambda comm: next(messages))
        with pytest.raises(LaunchError, match="rank 0 holds other sequences than rank 0"):  # (this follower is rank 0 of a world of 1)
            engine_loop.follow(llm)
    finally:
        llm.close()
    assert json.loads(plan_wire.encode(plan_wire.IDLE)) == {"op": "idle"}


class _Wire:
    """rank 0's and a follower's ends of the plan broadcasts: what rank 0 sends, the follower gets
    (each broadcast must have the same size on both ends, as a real collective needs)."""

    def __init__(self):
        self.sent = []
        self.world_size = 2

    def broadcast(self, t, src=0, *, site):
        assert site == "schedule"
        if self.rank == 0:
            self.sent.append(t.clone())
            return t
        got = self.sent.pop(0)
        assert got.shape == t.shape and got.dtype == t.dtype
        return t.copy_(got)

    def end(self, rank):
        e = copy.copy(self)
        e.rank = rank
        return e


@pytest.mark.parametrize("prompts", [1, 12])
def test_a_step_plan_is_one_broadcast_unless_it_is_long(prompts):
    from tp_runtime.engine.sampling import SamplingParams
    from tp_runtime.engine.scheduler import Admission, StepChanges
    from tp_runtime.serve import plan_wire

    changes = StepChanges([Admission(i, i, 0, list(range(1000 + i, 1100 + i)), SamplingParams(max_new_tokens=9, seed=i, stop_token_ids=(5,)), i)
                           for i in range(prompts)], [77], [(i, 100) for i in range(prompts)], [90, 91])
    wire = _Wire()
    nbytes = plan_wire.send(wire.end(0), plan_wire.STEP, changes, 1234)
    assert len(wire.sent) == (1 if nbytes <= plan_wire.FRAME_BYTES - 8 else 2) and len(wire.sent) == (1 if prompts == 1 else 2)
    assert plan_wire.receive(wire.end(1)) == (plan_wire.STEP, changes, 1234)
    assert not wire.sent
    plan_wire.send(wire.end(0), plan_wire.IDLE)
    assert plan_wire.receive(wire.end(1)) == (plan_wire.IDLE, None, None) and not wire.sent


def test_a_steps_events_reach_each_stream_in_order_in_one_wake_up():
    import asyncio

    from tp_runtime.engine.sampling import SamplingParams
    from tp_runtime.engine.scheduler import Request
    from tp_runtime.serve.engine_loop import Stream, hand_out

    async def main():
        loop = asyncio.get_running_loop()
        streams = [Stream(Request(i, [1], SamplingParams(), 0), loop) for i in range(3)]
        calls = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (calls.append(a), real(*a))
        items = [(s, (s.request.req_id, k)) for k in range(2) for s in streams]
        engine = threading.Thread(target=hand_out, args=(items,))  # from another thread, as the engine loop does
        engine.start()
        engine.join()
        await asyncio.sleep(0)
        assert len(calls) == 1
        return [[s.events.get_nowait() for _ in range(s.events.qsize())] for s in streams]

    assert asyncio.run(main()) == [[(i, 0), (i, 1)] for i in range(3)]


def test_fuzzed_bodies_get_an_answer_and_leave_the_server_healthy(server):
    """Random JSON, wrong types, huge numbers, deep nesting: always a status with a JSON body
    (an OpenAI error unless it is a valid request), never a 5xx, and /health stays 200."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
    fields = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "n", "model", "stream_options", "logprobs", "stop_token_ids"]
    bodies = st.dictionaries(st.sampled_from(fields), values, max_size=6) | values
    deep = st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, nested=deep, route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    def one(body, nested, route):
        if isinstance(body, dict) and "max_tokens" not in body:
            body["max_tokens"] = 2  # a valid one finishes quickly
        raw = json.dumps(body, allow_nan=True).encode()
        for payload in (raw, nested.encode()):
            code, answer, _ = _post(server.url + route, payload)
            assert code in (200, 400, 404, 413, 429), (body, code, answer)
            assert code == 200 or set(answer["error"]) == {"message", "type", "param", "code"}

    one()
    assert _get(server.url + "/health")[0] == 200


def test_serve_under_plain_torchrun(chat_model, alone):
    """torchrun starts the ranks (rank 0 serves, the other follows); its SIGTERM reaches both,
    rank 0 stops the other, and they end without an error (torchrun itself reports the signal
    it got and exits non-zero: its own habit)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tp_runtime", "serve", "--model", str(chat_model),
           "--port", str(port), "--quiet", "--max-seq-len", str(MAX_LEN)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.poll() is not None else "not healthy in time"
            try:
                if _get(url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        _, want = alone(alone.llm.encode(PROMPT), max_new_tokens=12)
        r = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).completions.create(
            model=chat_model.name, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].text == want
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert "tp-run: error" not in err and "RuntimeError" not in err and "LaunchError" not in err, err[-3000:]


def test_a_repeated_long_prefix_answers_measurably_sooner(tmp_path):
    """TTFT with prefix reuse: a 480-token prompt seen before (its slot kept the K/V) prefills only
    its new tail; against the same prompts cold, the time to the first token drops several-fold."""
    cfg = llama_config_dict(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=1536, vocab_size=300)
    model = write_checkpoint(tmp_path / "prefill-heavy", cfg, seed=9, tokenizer_vocab=300)
    s = Server(model, "--max-num-seqs", "4", "--max-seq-len", "1024", "--max-num-batched-tokens", "1024")
    try:
        import numpy as np

        rng = np.random.default_rng(0)
        prompts = [[int(t) for t in rng.integers(3, 300, 480)] for _ in range(3)]

        def first_token_seconds(ids):
            t0 = time.perf_counter()
            code, body, _ = _post(s.url + "/v1/completions", {"prompt": ids, "max_tokens": 1, "temperature": 0})
            assert code == 200, body
            return time.perf_counter() - t0

        cold = [first_token_seconds(p) for p in prompts]
        warm = [first_token_seconds(p + [5, 6, 7, 8]) for p in prompts]
        assert s.metric("tp_runtime:prefix_reused_tokens_total") >= 3 * 479
        assert statistics.median(warm) < 0.4 * statistics.median(cold), (cold, warm)
    finally:
        assert s.stop() == 0


def test_serve_attention_dp_spreads_requests_over_the_ranks(tmp_path):
    """--moe ep --attention dp: each rank runs the requests of its own slots (the DeepSeek/Kimi
    serving layout), their tokens shared each step: concurrent greedy requests over a Mixtral-
    shaped model each equal the request run alone at tp=1 (float32), and the experts' all-to-
    alls and the token all-gather ran."""
    import hf_models
    from tp_runtime.checkpoint.synthetic import train_byte_tokenizer

    path, _ = hf_models.build("mixtral", tmp_path)
    train_byte_tokenizer(300, path / "tokenizer.json")
    llm = LLM.load(path, ParallelConfig(), RuntimeConfig(show_progress=False, max_seq_len=MAX_LEN, max_batch_size=1, dtype="float32"))
    prompts = [PROMPT[: 6 + 5 * i] for i in range(5)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    want = [llm.tokenizer.decode([e.token_id for e in llm.generate([llm.encode(p)], params)], skip_special_tokens=True) for p in prompts]
    llm.close()
    s = Server(path, "--tp", "2", "--moe", "ep", "--attention", "dp", "--max-num-seqs", "4", "--dtype", "float32")
    try:
        got = _concurrently(len(prompts), lambda i: s.client().completions.create(
            model="mixtral", prompt=prompts[i], max_tokens=12, temperature=0, extra_body={"ignore_eos": True}).choices[0].text)
        assert got == want
        assert s.metric('tp_runtime:collective_calls_total{op="all_gather",phase="decode",site="dp.step"}') > 0
        assert s.metric('tp_runtime:collective_calls_total{op="all_to_all",phase="decode",site="layer.1.moe_dispatch"}') > 0
    finally:
        assert s.stop() == 0, s.proc.stderr.read()[-3000:]
