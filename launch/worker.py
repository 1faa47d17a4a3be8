"""`tp-worker`: a long-lived daemon that serves one job at a time as a rank of a coordinator's job.

    tp-worker --keygen ~/.tp-keys                         # once per machine: a CURVE keypair
    # put each coordinator's public key in ~/.tp-keys/authorized_keys, then:
    tp-worker --listen tcp://0.0.0.0:7340 --keys ~/.tp-keys [--model-dir /models/llama]

Security (like sshd): with --keys every socket is CURVE-encrypted and only the coordinators whose
keys are authorized get in; the job then names every rank's key, and the peer-to-peer sockets
admit exactly those. Without keys a worker listens only on loopback, unless --insecure says
otherwise. A shared secret (--secret-file, HMAC on every message) may be added to either. Each
session and job has fresh nonces and every frame a counter: replays are dropped (protocol.py).

A job: HELLO (version, session nonce; under --shares auto the coordinator asks for this machine's
GEMV rate and memory budget, measured then and sent in the WELCOME) -> JOB (model fingerprint, rank, prompts, the job's
nonce and keys) -> weights from a local copy with the same fingerprint, else from this worker's
cache of its slices, else streamed by the coordinator and cached -> READY (data port) ->
START (every rank's data endpoint) -> the same sharded model and generate loop as every other
rank, over the pyzmq communicator (the collectives' payloads on its TCP links unless the job says
--data-path zmq) -> DONE. Whatever goes wrong inside a job (the coordinator
vanishing, a bad message, an exception) ends that job only; the daemon waits for the next.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tp_runtime import placement, sharding
from tp_runtime.checkpoint.index import SLICES_FILE, SLICES_META, fingerprint
from tp_runtime.checkpoint.names import expected_tensors, held_by
from tp_runtime.checkpoint.safetensors_reader import BLOCKS_KEY
from tp_runtime.comm.control import ControlServer
from tp_runtime.comm.keys import (AUTHORIZED_FILE, CONTROL_DOMAIN, DATA_DOMAIN, AuthorizedKeys, Gate, JobKeys, Keypair, is_loopback,
                                  load_keypair, parse_key)
from tp_runtime.comm.keys import keygen as make_keypair
from tp_runtime.comm.sockets import new_context
from tp_runtime.comm.protocol import PROTOCOL_VERSION, Kind
from tp_runtime.comm.timing import wrap
from tp_runtime.comm.zmq_transport import ZmqCommunicator
from tp_runtime.config import ModelConfig, ParallelConfig, RuntimeConfig
from tp_runtime.engine import shares
from tp_runtime.engine.llm import LLM
from tp_runtime.engine.sampling import SamplingParams
from tp_runtime.errors import ConfigError, TPRuntimeError, WorkerError

log = logging.getLogger("tp_runtime.worker")

DEFAULT_LISTEN = "tcp://127.0.0.1:7340"
SECRET_ENV = "TP_RUNTIME_SECRET"
START_TIMEOUT_S = 60.0
WEIGHTS_TIMEOUT_S = 120.0


def load_secret(path: str | None) -> bytes | None:
    """The shared secret from a file (hex, as --keygen writes it) or $TP_RUNTIME_SECRET."""
    text = Path(path).read_text().strip() if path else os.environ.get(SECRET_ENV, "").strip()
    if not text:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise WorkerError(f"secret {'in ' + path if path else 'in $' + SECRET_ENV} is not hex; make one with `tp-worker --new-secret FILE`") from None


def new_secret(path: str) -> None:
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    print(f"wrote a new shared secret to {p} (mode 600); copy it to every worker and the coordinator")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tp-runtime" / "worker-cache"


class Worker:
    def __init__(self, listen: str, secret: bytes | None, model_dirs: list[str], cache_dir: Path, threads: int | None,
                 keys: Keypair | None = None, authorized: AuthorizedKeys | None = None) -> None:
        self.ctx = new_context()
        self.gate = None
        if keys is not None:  # before the socket binds: no client may arrive ahead of its gate
            self.gate = Gate(self.ctx)
            self.gate.admit(CONTROL_DOMAIN, authorized.current)
            self.gate.admit(DATA_DOMAIN, ())  # a job's peers, while it runs
        self.server = ControlServer(self.ctx, listen, secret, keys=keys)
        self.secret, self.keys, self.cache_dir, self.threads = secret, keys, cache_dir, threads
        self.host = listen.split("://", 1)[-1].rsplit(":", 1)[0]
        self.models = {fingerprint(d): str(Path(d).resolve()) for d in model_dirs}
        self.jobs_done = 0

    # -- the daemon loop --
    def serve(self, max_jobs: int | None = None) -> None:
        auth = ([f"CURVE, public key {self.keys.public_text}"] if self.keys else []) + (["shared secret"] if self.secret else [])
        log.warning("tp-worker listening on %s (protocol %d, %s, %d local model(s))", self.server.endpoint, PROTOCOL_VERSION,
                    " + ".join(auth) or "NO auth, NO encryption", len(self.models))
        while max_jobs is None or self.jobs_done < max_jobs:
            got = self.server.recv(timeout_s=1.0)
            if got is None:
                continue
            peer, msg = got
            if msg.kind is Kind.HELLO:
                about = {"version": PROTOCOL_VERSION, "host": socket.gethostname(), "models": sorted(self.models)}
                if isinstance(msg.obj, dict) and msg.obj.get("measure"):  # --shares auto: measured now, as the coordinator measures its own
                    about.update(self.measure())
                self.server.welcome(peer, about)
            elif msg.kind is Kind.JOB:
                self._run_job(peer, msg.obj or {})
                self.jobs_done += 1
            else:
                log.warning("ignored %s outside a job", msg.kind.name)

    def measure(self) -> dict[str, Any]:
        """This machine's speed and room for `--shares auto`: the GEMV rate (bytes of weights
        read per second, engine/shares.py) with the threads its jobs use, and the host memory a
        job's rank may take (what the machine has available now, as a rank's default budget)."""
        if self.threads:
            torch.set_num_threads(self.threads)
        rate = shares.gemv_rate(torch.device("cpu"))
        budget = placement.default_host_budget(1)
        log.warning("measured for --shares auto: GEMV %.1f GB/s, memory budget %.1f GB", rate / 1e9, budget / 1e9)
        return {"gemv_rate": rate, "memory_budget": budget}

    def _run_job(self, peer: bytes, job: dict[str, Any]) -> None:
        comm = llm = None
        self.server.held = peer
        try:
            runtime = RuntimeConfig.from_job(job["runtime"], num_threads=self.threads, show_progress=False)
            keys = self._job_keys(job)
            log.warning("job: rank %s of %s over %s, settings %s", job.get("rank"), job.get("tp"), "CURVE" if keys else "plain TCP", runtime.describe())
            if keys is not None:  # before the inbox binds: the peers' keys and no others
                self.gate.admit(DATA_DOMAIN, keys.others(job["rank"]))
            source = self._weights(peer, job)
            inbox, port = self.server.bind_data(self.host, keys)
            self.server.send(peer, Kind.READY, {"data_port": port})
            start = self._await(peer, Kind.START, START_TIMEOUT_S)
            rank, peers = job["rank"], start.obj["peers"]
            raw = ZmqCommunicator(self.ctx, rank, peers, inbox, secret=self.secret, names=job.get("names"), job=int(job["job"]), keys=keys,
                                  data_path=runtime.comm.data_path)
            comm = wrap(raw, runtime.comm, device=torch.device("cpu"))
            parallel = ParallelConfig(world_size=len(peers), rank=rank, local_rank=0, local_world_size=1)
            llm = LLM.load(source, parallel, runtime, comm=comm)
            if job.get("mode") == "serve":  # a server's rank: rank 0's steps until it stops
                from tp_runtime.serve.engine_loop import follow

                follow(llm)
            else:
                for _ in llm.generate(job["prompts"], SamplingParams(**job["sampling"])):
                    pass
                llm.gather_memory()  # rank 0 collects every rank's memory report
                if llm.cfg.moe is not None:
                    llm.expert_load()  # and the routed-token counts (under --attention dp: summed over the ranks)
            self.server.send(peer, Kind.DONE, {})
            log.warning("job done: rank %d of %d, %d prompt(s)", rank, len(peers), len(job["prompts"]))
        except Exception as e:  # a job's failure must never take the daemon down
            log.warning("job failed: %s: %s", type(e).__name__, e)
            try:
                self.server.send(peer, Kind.ERROR, {"message": f"{type(e).__name__}: {e}"})
            except Exception:
                pass
        finally:
            if llm is not None:  # the daemon outlives jobs: each one's mappings and files go with it
                llm.close()
            if comm is not None:
                comm.close()
            if self.gate is not None:
                self.gate.admit(DATA_DOMAIN, ())
            self.server.held = None

    def _job_keys(self, job: dict[str, Any]) -> JobKeys | None:
        """The job's keys by rank, checked against this worker's own (a keyed worker runs only keyed jobs)."""
        named = job.get("keys")
        if self.keys is None:
            if named:
                raise WorkerError("the coordinator sent a keyed job, but this worker has no keys (start it with --keys DIR)")
            return None
        if not isinstance(named, list) or len(named) != job["tp"] or not all(isinstance(k, str) for k in named):
            raise WorkerError("this worker has keys, and the job does not name one public key per rank (a coordinator of an older version?)")
        try:
            ranks = tuple(parse_key(k, f"the job's key of rank {r}") for r, k in enumerate(named))
        except ConfigError as e:
            raise WorkerError(str(e)) from None
        if ranks[job["rank"]] != self.keys.public:
            raise WorkerError(f"the job names key {ranks[job['rank']].decode()} for this worker (rank {job['rank']}), which holds {self.keys.public_text}")
        return JobKeys(self.keys, ranks)

    def _await(self, peer: bytes, kind: Kind, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.server.recv(max(0.0, deadline - time.monotonic()))
            if got is None:
                raise WorkerError(f"the coordinator sent no {kind.name} within {timeout_s:.0f} s")
            sender, msg = got
            if sender != peer:  # another coordinator: one job at a time
                self.server.send(sender, Kind.REJECT, {"reason": "busy with another job; try again when it ends"})
                continue
            if msg.kind is not kind:
                raise WorkerError(f"expected {kind.name} from the coordinator, got {msg.kind.name}")
            return msg

    # -- weights: local copy, cache, or streamed --
    def _weights(self, peer: bytes, job: dict[str, Any]) -> str:
        fp = job["fingerprint"]
        if fp in self.models:
            return self.models[fp]
        # a MoE model's slices differ with the split (--moe ep: whole experts; --attention dp: whole dense parts)
        run = job.get("runtime") or {}
        split = "".join(f"-{k}-{run[k]}" for k in ("moe", "attention") if run.get(k, "tp") != "tp")
        split += _uneven_split_key(job)
        slot = self.cache_dir / fp / f"tp{job['tp']}-rank{job['rank']}{split}"
        if (slot / SLICES_META).is_file():
            return str(slot)
        self.server.send(peer, Kind.NEED_WEIGHTS, {})
        begin = self._await(peer, Kind.WEIGHTS_BEGIN, WEIGHTS_TIMEOUT_S)
        names = begin.obj["names"]
        blocks = begin.obj.get("blocks") or {}  # GGUF slices, kept as their blocks: name -> GGML type
        tensors = {}
        for i, name in enumerate(names):
            msg = self._await(peer, Kind.WEIGHTS, WEIGHTS_TIMEOUT_S)
            if msg.seq != i or msg.tensor is None:
                raise WorkerError(f"weights arrived out of order: got #{msg.seq}, expected #{i} ({name})")
            tensors[name] = msg.tensor
        slot.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=slot.parent, prefix=slot.name + "."))
        try:
            save_file(tensors, str(tmp / SLICES_FILE), metadata={BLOCKS_KEY: json.dumps(blocks)} if blocks else None)
            (tmp / "config.json").write_text(json.dumps(job["config"]))
            if job.get("generation_config"):
                (tmp / "generation_config.json").write_text(json.dumps(job["generation_config"]))
            (tmp / SLICES_META).write_text(json.dumps({"fingerprint": fp, "tp": job["tp"], "rank": job["rank"]}))
            os.replace(tmp, slot)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.warning("cached %d slices (%.1f MB) for %s", len(names), sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6, slot)
        return str(slot)

    def close(self) -> None:
        self.server.close()
        if self.gate is not None:
            self.gate.stop()
        self.ctx.term()


def _uneven_split_key(job: dict[str, Any]) -> str:
    """Under --shares a rank's slices depend on the weights: the cache slot is named after the
    ranges this rank holds (a digest), so measured shares that round to the same split reuse it."""
    run = job.get("runtime") or {}
    if not run.get("shares"):
        return ""
    tp, rank = job["tp"], job["rank"]
    cfg = RuntimeConfig.from_job(run).split_config(ModelConfig.from_dict(job["config"]))
    specs = [(e.hf_name, sharding.spec(e.role, e.kind, cfg, tp, rank)) for e in held_by(expected_tensors(cfg), cfg, tp, rank)]
    return "-split-" + hashlib.sha256(repr(specs).encode()).hexdigest()[:12]


def _listen_host(listen: str) -> str:
    return listen.split("://", 1)[-1].rsplit(":", 1)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tp-worker", description="Serve jobs of a tp-run coordinator as one tensor-parallel rank.")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help=f"ZeroMQ endpoint to listen on (default {DEFAULT_LISTEN}: this machine only)")
    p.add_argument("--keys", metavar="DIR", default=None, help="this worker's CURVE keypair (made by --keygen DIR): every socket encrypted, only authorized coordinators admitted")
    p.add_argument("--authorized-keys", metavar="FILE", default=None,
                   help=f"public keys of the coordinators this worker admits, one a line, re-read when it changes (default DIR/{AUTHORIZED_FILE})")
    p.add_argument("--insecure", action="store_true", help="allow listening beyond loopback without keys: anyone who reaches the port can run jobs and read what passes")
    p.add_argument("--keygen", metavar="DIR", default=None, help="write a new keypair to DIR (the secret key mode 600), print its public key and exit")
    p.add_argument("--show-key", action="store_true", help="print the public key of --keys DIR and exit")
    p.add_argument("--secret-file", default=None, help=f"shared secret (hex) that coordinator and workers hold, an extra HMAC on every message; default ${SECRET_ENV}")
    p.add_argument("--new-secret", metavar="FILE", default=None, help="write a new shared secret to FILE (mode 600) and exit")
    p.add_argument("--model-dir", action="append", default=[], help="a local copy of a checkpoint (matched by content fingerprint); repeatable")
    p.add_argument("--cache-dir", default=None, help="where streamed slices are kept (default: the user's cache folder)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-jobs", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="tp-worker %(levelname)s %(message)s")
    try:
        if args.new_secret:
            new_secret(args.new_secret)
            return 0
        if args.keygen:
            pair = make_keypair(args.keygen)
            print(f"wrote a new keypair to {args.keygen} (tp-runtime.key_secret, mode 600: never copy it; tp-runtime.key: public)\n"
                  f"public key: {pair.public_text}\n"
                  f"  on a worker: start it with --keys {args.keygen}; put each coordinator's public key in {args.keygen}/{AUTHORIZED_FILE}\n"
                  f"  on a coordinator: pass --worker-keys {args.keygen}; put `HOST:PORT WORKER-KEY` for every worker in "
                  f"{args.keygen}/known_workers, and this key in every worker's authorized keys")
            return 0
        if args.show_key:
            if not args.keys:
                raise ConfigError("--show-key prints the public key of --keys DIR: name the DIR")
            print(load_keypair(args.keys).public_text)
            return 0
        secret = load_secret(args.secret_file)
        keys = load_keypair(args.keys) if args.keys else None
        if args.authorized_keys and keys is None:
            raise ConfigError("--authorized-keys needs --keys DIR (this worker's own keypair): without keys no client key is checked")
        authorized = AuthorizedKeys(args.authorized_keys or Path(args.keys).expanduser() / AUTHORIZED_FILE) if keys else None
        if authorized is not None and not authorized.current():
            print(f"tp-worker: WARNING: {authorized.path} lists no key: no coordinator can connect until one is added", file=sys.stderr)
        host = _listen_host(args.listen)
        if keys is None and not is_loopback(host):
            if not args.insecure:
                raise ConfigError(f"refusing to listen on {args.listen} without keys: anyone who can reach it could run jobs on this machine "
                                  f"and read the prompts and activations. Make a keypair (`tp-worker --keygen DIR`) and start with "
                                  f"--keys DIR (the coordinators' public keys in DIR/{AUTHORIZED_FILE}), or pass --insecure on a network you trust")
            print(f"tp-worker: WARNING: listening on {args.listen} without keys (--insecure): anyone who can reach this port can run jobs "
                  f"and read activations{'' if secret else ', and nothing authenticates the coordinator'}.", file=sys.stderr)
        worker = Worker(args.listen, secret, args.model_dir, Path(args.cache_dir) if args.cache_dir else default_cache_dir(), args.threads,
                        keys=keys, authorized=authorized)
        try:
            worker.serve(args.max_jobs)
        finally:
            worker.close()
        return 0
    except TPRuntimeError as e:
        print(f"tp-worker: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
