"""tp-worker daemons on loopback driven by a coordinator (pyzmq transport), end to end."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import zmq
from safetensors import safe_open

from conftest import REPO, last_json, run_cli
from tp_runtime.checkpoint.safetensors_reader import BLOCKS_KEY
from tp_runtime.comm.protocol import Kind, encode
from tp_runtime.launch.spawn import free_port

SECRET = "5e" * 32
ENV = {"TP_RUNTIME_SECRET": SECRET}


class WorkerProc:
    def __init__(self, tmp_path, name, extra=()):
        self.port = free_port()
        self.log = tmp_path / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tp_runtime.launch.worker", "--listen", f"tcp://127.0.0.1:{self.port}", "--cache-dir", str(tmp_path / f"{name}-cache"), "--threads", "1", *extra],
            cwd=REPO, env=dict(os.environ, **ENV), stdout=subprocess.DEVNULL, stderr=open(self.log, "w"),
        )
        deadline = time.monotonic() + 60
        while "listening on" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.1)

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def workers(tmp_path):
    started = []

    def start(n, extra=()):
        new = [WorkerProc(tmp_path, f"w{len(started) + i}", extra) for i in range(n)]
        started.extend(new)
        return new

    yield start
    for w in started:
        w.stop()


def _generate(model, *extra, timeout=120):
    args = ["generate", "--model", str(model), "--prompt-ids", "1,5,9,13,2,7", "--max-new-tokens", "12", "--ignore-eos", "--json", "--quiet", "--threads", "1", *extra]
    return run_cli(args, timeout=timeout, env=ENV)


def test_workers_match_gloo_and_stream_then_cache_weights(small_model, workers):
    w1, w2 = workers(2)
    gloo2, gloo3 = (last_json(_generate(small_model, "--tp", str(tp)).stdout) for tp in (2, 3))
    first = _generate(small_model, "--workers", w1.addr)
    assert first.returncode == 0, first.stderr
    first = last_json(first.stdout)
    assert first["output_ids"] == gloo2["output_ids"] and first["tp"] == 2 and first["transport"] == "zmq+tcp"
    assert first["weights_streamed_bytes"] > 0  # w1 has no checkpoint: its slices were streamed
    again = last_json(_generate(small_model, "--workers", w1.addr).stdout)
    assert again["output_ids"] == gloo2["output_ids"] and again["weights_streamed_bytes"] == 0  # from its cache
    three = last_json(_generate(small_model, "--workers", f"{w1.addr},{w2.addr}").stdout)
    assert three["output_ids"] == gloo3["output_ids"] and three["tp"] == 3
    assert "cached" in w1.log.read_text()


def test_worker_with_its_own_checkpoint_needs_no_weights(small_model, workers):
    (w,) = workers(1, ["--model-dir", str(small_model)])
    out = last_json(_generate(small_model, "--workers", w.addr).stdout)
    assert out["weights_streamed_bytes"] == 0 and "cached" not in w.log.read_text()


def test_worker_survives_garbage_and_serves_a_real_job(small_model, workers):
    (w,) = workers(1)
    with socket.create_connection(("127.0.0.1", w.port)) as s:  # not even ZeroMQ
        s.sendall(os.urandom(4096))
    ctx = zmq.Context()
    try:
        for frames in (
            [os.urandom(64)],  # one random frame
            encode(Kind.HELLO, secret=bytes.fromhex(SECRET), obj={})[:2],  # truncated message
            encode(Kind.HELLO, secret=bytes.fromhex(SECRET), obj={}, version=99),  # wrong protocol version
            encode(Kind.HELLO, secret=b"wrong key", obj={}),  # wrong key
            encode(Kind.JOB, secret=None, obj={"rank": 1}),  # no key at all
        ):
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.connect(f"tcp://127.0.0.1:{w.port}")
            d.send_multipart(frames)
            assert not d.poll(300), "the worker must not answer a bad message"
            d.close()
    finally:
        ctx.term()
    time.sleep(0.3)
    assert w.proc.poll() is None
    log = w.log.read_text()
    assert log.count("dropped a message") >= 4 and "protocol version 99" in log and "not authenticated" in log
    r = _generate(small_model, "--workers", w.addr)
    assert r.returncode == 0, r.stderr
    assert len(last_json(r.stdout)["output_ids"]) == 12


def test_wrong_secret_and_absent_worker_fail_fast_with_names(small_model, workers):
    (w,) = workers(1)
    t0 = time.monotonic()
    r = run_cli(["generate", "--model", str(small_model), "--prompt-ids", "1,2", "--workers", w.addr], timeout=60, env={"TP_RUNTIME_SECRET": "ab" * 32})
    assert r.returncode == 1 and f"worker {w.addr} did not answer within 5 s" in r.stderr
    dead = f"127.0.0.1:{free_port()}"
    r = run_cli(["generate", "--model", str(small_model), "--prompt-ids", "1,2", "--workers", dead], timeout=60, env=ENV)
    assert r.returncode == 1 and f"worker {dead} did not answer" in r.stderr
    assert time.monotonic() - t0 < 30


def test_killed_worker_ends_job_naming_it_and_others_serve_again(small_model, workers):
    w1, w2 = workers(2)
    args = ["generate", "--model", str(small_model), "--prompt-ids", "1,2,3", "--max-new-tokens", "4000", "--max-seq-len", "4096",
            "--ignore-eos", "--quiet", "--threads", "1", "--workers", f"{w1.addr},{w2.addr}"]
    coord = subprocess.Popen([sys.executable, "-m", "tp_runtime", *args], cwd=REPO, env=dict(os.environ, **ENV), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while "cached" not in w2.log.read_text():  # the job has reached w2
        assert time.monotonic() < deadline and coord.poll() is None
        time.sleep(0.1)
    time.sleep(3)  # generating
    w2.proc.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    _, err = coord.communicate(timeout=30)
    assert time.monotonic() - t0 < 10, "the job must end within 10 s of the worker's death"
    assert coord.returncode == 1 and f"worker {w2.addr} (rank 2) stopped responding" in err
    deadline = time.monotonic() + 15
    while "job failed" not in w1.log.read_text():
        assert time.monotonic() < deadline, w1.log.read_text()
        time.sleep(0.1)
    r = _generate(small_model, "--workers", w1.addr)
    assert r.returncode == 0, r.stderr


def test_open_listen_without_keys_is_refused_unless_insecure_and_new_secret_is_private(tmp_path):
    """Beyond loopback a worker without keys refuses to start (like sshd without host keys); --insecure
    is the explicit way out, and it still warns."""
    env = {k: v for k, v in os.environ.items() if k != "TP_RUNTIME_SECRET"}
    port = free_port()
    cmd = [sys.executable, "-m", "tp_runtime.launch.worker", "--listen", f"tcp://0.0.0.0:{port}", "--max-jobs", "0"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "refusing to listen on" in r.stderr and "--keygen DIR" in r.stderr and "--insecure" in r.stderr, r.stderr
    r = subprocess.run([*cmd, "--insecure"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "without keys (--insecure)" in r.stderr, r.stderr
    key = tmp_path / "secret"
    r = subprocess.run([sys.executable, "-m", "tp_runtime.launch.worker", "--new-secret", str(key)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and len(bytes.fromhex(key.read_text().strip())) == 32
    assert key.stat().st_mode & 0o777 == 0o600


def test_workers_stream_layers_under_the_coordinators_memory_budget(tmp_path, workers):
    """--max-host-memory reaches the workers: every rank streams the same layers, same tokens."""
    from tp_runtime import placement
    from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint
    from tp_runtime.config import ModelConfig

    cfg_dict = llama_config_dict(hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=320, vocab_size=300)
    model = write_checkpoint(tmp_path / "llama4", cfg_dict, seed=9)
    cfg = ModelConfig.from_model_dir(model)
    s = placement.shard_bytes(cfg, 2, 0, "float32", 64, 1)
    budget = s.kv_cache + s.activations + s.embedding + s.lm_head + s.norm + max(s.layers) + s.layers[0] + 64
    (w1,) = workers(1)
    resident = last_json(_generate(model, "--tp", "2", "--max-seq-len", "64").stdout)
    p = _generate(model, "--workers", w1.addr, "--max-seq-len", "64", "--max-host-memory", str(budget))
    assert p.returncode == 0, p.stderr
    streamed = last_json(p.stdout)
    assert streamed["output_ids"] == resident["output_ids"]
    ranks = streamed["memory"]["ranks"]
    assert len(ranks) == 2 and all(r["weights_disk"] == sum(s.layers[1:]) for r in ranks)  # the worker (rank 1) streamed too


def test_workers_run_with_the_coordinators_settings(small_model, workers):
    """Every runtime flag reaches the workers (it once sent only dtype, context, batch and budgets:
    `--quantize int8` ran int8 on rank 0 and float on the worker, and crashed): the worker job
    gives the tokens of the local tp=2 run with the same flags, and the worker says what it ran."""
    (w,) = workers(1)
    flags = ["--quantize", "int8", "--decode-step", "eager", "--gemv", "blas"]
    local = last_json(_generate(small_model, "--tp", "2", *flags).stdout)
    r = _generate(small_model, "--workers", w.addr, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert last_json(r.stdout)["output_ids"] == local["output_ids"]
    log = w.log.read_text()
    assert all(f in log for f in ("quantize=int8", "decode_step=eager", "gemv=blas")), log[-2000:]


def test_workers_write_their_offload_dir(tmp_path, workers):
    """--offload-dir reaches the workers: the worker (rank 1) writes its streamed layers there too."""
    from tp_runtime import placement
    from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint
    from tp_runtime.config import ModelConfig

    model = write_checkpoint(tmp_path / "llama4", llama_config_dict(hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=2,
                                                                     intermediate_size=320, vocab_size=300), seed=9)
    s = placement.shard_bytes(ModelConfig.from_model_dir(model), 2, 0, "float32", 64, 1)
    budget = s.kv_cache + s.activations + s.embedding + s.lm_head + s.norm + max(s.layers) + s.layers[0] + 64
    offload = tmp_path / "offload"
    (w,) = workers(1)
    flags = ["--max-seq-len", "64", "--max-host-memory", str(budget), "--offload-dir", str(offload), "--dtype", "float32"]
    local = last_json(_generate(model, "--tp", "2", *flags).stdout)
    for d in offload.iterdir():
        shutil.rmtree(d)
    r = _generate(model, "--workers", w.addr, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert last_json(r.stdout)["output_ids"] == local["output_ids"]
    written = sorted(d.name.split("-", 1)[1] for d in offload.iterdir())
    assert written == ["tp2-rank0-float32", "tp2-rank1-float32"], written


def test_workers_take_a_gguf_file_as_blocks(tmp_path, workers):
    """A GGUF file over hand-started workers: each worker gets its slices as the file's blocks
    (a fraction of the file's bytes), caches them, and gives the tokens of the same file run on
    local ranks; a worker holding its own copy of the file (matched by its header) needs none."""
    pytest.importorskip("gguf")
    from tp_runtime.checkpoint.synthetic import llama_config_dict
    from tp_runtime.checkpoint.synthetic_gguf import write_gguf

    shape = dict(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512, vocab_size=300)
    # Q4_0: every rank's columns fall on its 32-value blocks, so all of the worker's half goes as blocks
    llama = write_gguf(tmp_path / "llama.gguf", llama_config_dict(**shape), "Q4_0", seed=5,
                       rope_freq_factors=[1.0 + (i % 7) / 3 for i in range(32)])  # travel in the job's config
    (w1,) = workers(1)
    local = last_json(_generate(llama, "--tp", "2").stdout)
    first = _generate(llama, "--workers", w1.addr)
    assert first.returncode == 0, first.stderr
    first = last_json(first.stdout)
    assert first["output_ids"] == local["output_ids"] and first["tp"] == 2
    assert 0 < first["weights_streamed_bytes"] < 0.6 * llama.stat().st_size  # its half, still 4-bit
    again = last_json(_generate(llama, "--workers", w1.addr).stdout)
    assert again["output_ids"] == local["output_ids"] and again["weights_streamed_bytes"] == 0
    # a text prompt: encoded with the file's own tokenizer (a GGUF has no tokenizer.json), as locally
    text = ["generate", "--model", str(llama), "--prompt", "hello tensor world", "--max-new-tokens", "6", "--ignore-eos", "--json", "--quiet", "--threads", "1"]
    local_text = last_json(run_cli([*text, "--tp", "2"], env=ENV).stdout)
    over = run_cli([*text, "--workers", w1.addr], env=ENV)
    assert over.returncode == 0, over.stderr[-2000:]
    over = last_json(over.stdout)
    assert over["prompt_ids"] == local_text["prompt_ids"] and over["output_ids"] == local_text["output_ids"]

    qwen = write_gguf(tmp_path / "qwen.gguf", llama_config_dict(**shape, architecture="Qwen2ForCausalLM"), "Q6_K", seed=6)
    w2, w3 = workers(2, ["--model-dir", str(qwen)])
    local4 = last_json(_generate(qwen, "--tp", "4").stdout)
    four = _generate(qwen, "--workers", f"{w1.addr},{w2.addr},{w3.addr}")
    assert four.returncode == 0, four.stderr
    four = last_json(four.stdout)
    assert four["output_ids"] == local4["output_ids"] and four["tp"] == 4
    # Q6_K's 256-value blocks: o_proj's head columns (64 each) and down_proj's 128 are not whole
    # blocks, so those go decoded to float32 (as local ranks hold them); the rest as blocks
    assert 0 < four["weights_streamed_bytes"] < 0.6 * qwen.stat().st_size
    (slices,) = (tmp_path / "w0-cache").glob("*/tp4-rank1/slices.safetensors")
    with safe_open(str(slices), "pt") as f:
        kept = json.loads(f.metadata()[BLOCKS_KEY])
    assert {kept[f"model.layers.1.{n}.weight"] for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")} == {"Q6_K"}
    assert "model.layers.1.self_attn.o_proj.weight" not in kept


def test_a_moe_model_over_a_worker_streams_it_only_its_experts(tmp_path, workers):
    """A Mixtral of 3 experts over one hand-started worker: under --moe ep the worker (rank 1) is
    sent its one whole expert per layer, under --moe tp half the features of all three, so ep
    streams it half an expert per layer less (computed from the config); each split gives the
    local --tp 2 tokens, --attention dp too (its all-to-alls over pyzmq, one prompt per rank)."""
    from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint

    raw = llama_config_dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, vocab_size=300,
                            architecture="MixtralForCausalLM", num_local_experts=3, num_experts_per_tok=2)
    model = write_checkpoint(tmp_path / "mixtral", raw, seed=3)
    (w,) = workers(1)
    streamed = {}
    for split in (["--moe", "tp"], ["--moe", "ep"], ["--moe", "ep", "--attention", "dp"]):
        flags = [*split, "--prompt-ids", "3,4,5"]
        local = last_json(_generate(model, "--tp", "2", *flags).stdout)
        r = _generate(model, "--workers", w.addr, *flags)
        assert r.returncode == 0, r.stderr[-3000:]
        got = last_json(r.stdout)
        assert [o["output_ids"] for o in got["outputs"]] == [o["output_ids"] for o in local["outputs"]], split
        streamed[split[1] + ("+dp" if len(split) > 2 else "")] = got["weights_streamed_bytes"]
    expert = 3 * 64 * 96 * 4  # one expert's float32 bytes
    assert streamed["tp"] - streamed["ep"] == 2 * (3 * expert // 2 - expert), streamed


def test_a_worker_whose_main_loop_hangs_is_named_and_a_slow_one_is_not(small_model, workers):
    """The worker's main loop stalls at decode step 3 (test hook) while its heartbeat thread
    lives: the coordinator names it as hung within seconds. A stall of 2 s (a slow step, inside
    the 4 s floor) is waited out: the tokens are the local tp=2 run's."""
    (w,) = workers(1)
    local = last_json(_generate(small_model, "--tp", "2").stdout)
    slow = _generate(small_model, "--workers", w.addr, "--debug-stall-rank", "1", "--debug-stall-step", "3", "--debug-stall-seconds", "2")
    assert slow.returncode == 0, slow.stderr[-3000:]
    assert last_json(slow.stdout)["output_ids"] == local["output_ids"]
    t0 = time.monotonic()
    r = _generate(small_model, "--workers", w.addr, "--debug-stall-rank", "1", "--debug-stall-step", "3")
    took = time.monotonic() - t0
    assert r.returncode == 1 and f"worker {w.addr} (rank 1) hung" in r.stderr, r.stderr[-3000:]
    assert "heartbeat still arrives" in r.stderr
    assert took < 30, took  # load (cached slices) + 3 steps + the 4 s floor
    stalled_for = float(re.search(r"has not reached collective #\d+ for ([\d.]+) s", r.stderr).group(1))
    assert 4.0 <= stalled_for < 6.0, stalled_for  # named within the floor and a heartbeat or so of the stall
    assert "stalls for 3600.0 s at decode step 3" in w.log.read_text()


def test_shares_auto_over_a_worker_gives_the_local_tokens_and_shows_the_shares(small_model, workers):
    """--shares auto over tp-workers: the worker measures its GEMV rate when the HELLO asks, the
    coordinator its own meanwhile; the shares are printed, travel in the job as explicit weights,
    the worker's slices are cut (and cached) by them, and the tokens are the local tp=2 run's."""
    (w,) = workers(1)
    local = last_json(_generate(small_model, "--tp", "2").stdout)
    r = _generate(small_model, "--workers", w.addr, "--shares", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    got = last_json(r.stdout)
    assert got["output_ids"] == local["output_ids"] and got["tp"] == 2
    s = got["shares"]
    assert len(s) == 2 and abs(sum(s) - 1) < 0.01 and min(s) > 0, s
    assert len(got["gemv_rates"]) == 2 and all(x > 0 for x in got["gemv_rates"]) and got["weights_streamed_bytes"] > 0
    assert "measured for --shares auto" in w.log.read_text()
    # explicit uneven weights over the worker: its slices for that split, in a cache slot of their own
    r = _generate(small_model, "--workers", w.addr, "--shares", "3,1")
    assert r.returncode == 0, r.stderr[-3000:]
    got = last_json(r.stdout)
    assert got["output_ids"] == local["output_ids"] and got["shares"] == [3.0, 1.0] and got["weights_streamed_bytes"] > 0
    again = last_json(_generate(small_model, "--workers", w.addr, "--shares", "3,1").stdout)
    assert again["output_ids"] == local["output_ids"] and again["weights_streamed_bytes"] == 0  # from its cache
    # the printed line (not --quiet)
    r = run_cli(["generate", "--model", str(small_model), "--prompt-ids", "1,5,9", "--max-new-tokens", "2", "--threads", "1",
                 "--workers", w.addr, "--shares", "auto"], timeout=120, env=ENV)
    assert r.returncode == 0 and "shares by rank (--shares auto" in r.stderr and f"worker {w.addr}" in r.stderr, r.stderr[-3000:]
