"""Public API: load a sharded model on this rank and generate.

    llm = LLM.load("path/to/model", ParallelConfig(...), RuntimeConfig(...))
    for event in llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=16)): ...

Every rank of the job calls the same methods in the same order (SPMD).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import torch

from tp_runtime import placement, sharding, sol
from tp_runtime.checkpoint.chat import chat_prompt_ids
from tp_runtime.checkpoint.model_files import open_model
from tp_runtime.checkpoint.loader import load_shard, validate
from tp_runtime.checkpoint.mapped import MappedCheckpoint
from tp_runtime.checkpoint.names import EMBEDDING_NAME
from tp_runtime.checkpoint.tokenizer import encode_prompt
from tp_runtime.comm import LocalCommunicator
from tp_runtime.comm import create as create_communicator
from tp_runtime.communicator import Communicator
from tp_runtime.config import ModelConfig, ParallelConfig, RuntimeConfig
from tp_runtime.engine.engine import Engine
from tp_runtime.engine.generate import generate
from tp_runtime.engine.sequence import TokenEvent
from tp_runtime.engine.memory import FIELDS as MEMORY_FIELDS
from tp_runtime.engine.memory import rank_memory, rss_bytes
from tp_runtime.engine.offload import attach_streaming
from tp_runtime.engine import shares
from tp_runtime.engine.sampling import SamplingParams
from tp_runtime.errors import CheckpointError, ConfigError
from tp_runtime import kernels
from tp_runtime.kernels import cpu_gemv, cpu_quant
from tp_runtime.model import fused_decode
from tp_runtime.model.linear import use_cpu_gemv_
from tp_runtime.model import int4
from tp_runtime.model.registry import linear_kinds, model_class

log = logging.getLogger("tp_runtime")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(runtime: RuntimeConfig, parallel: ParallelConfig) -> torch.device:
    if runtime.device:
        return torch.device(runtime.device)
    if torch.cuda.is_available():
        # shard by RANK, place by LOCAL_RANK
        return torch.device("cuda", parallel.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def device_budget(runtime: RuntimeConfig, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    if runtime.max_device_memory is not None:
        return runtime.max_device_memory
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * placement.DEVICE_SHARE)


def decode_message_bytes(cfg: ModelConfig, tp: int, batch: int, dtype: torch.dtype) -> int:
    """The largest message a rank sends in a decode step of `batch` sequences: a row-parallel
    all-reduce of [batch, hidden] in the model's dtype, or its float32 logits [batch, padded vocab
    shard] all-gathered (the fused step gathers in float32)."""
    hidden = batch * cfg.hidden_size * torch.empty(0, dtype=dtype).element_size()
    if cfg.moe is not None and cfg.moe.data_parallel:  # the dispatch: each of a rank's tokens to its top-k experts
        return cfg.moe.top_k * hidden
    logits = batch * sharding.vocab_shard_padded(cfg, tp) * 4
    return max(hidden, logits)


def plan_for(cfg: ModelConfig, parallel: ParallelConfig, runtime: RuntimeConfig, device: torch.device, dtype_name: str, max_seq_len: int,
             blocks: dict[str, tuple[int, int]] | None = None) -> placement.RankPlan:
    """This rank's placement under the runtime's budgets (defaults: what the machine reports)."""
    if runtime.max_device_memory is not None and device.type != "cuda":
        log.warning("--max-device-memory is ignored on %s: host RAM is the fastest tier there (--max-host-memory)", device)
    host = runtime.max_host_memory if runtime.max_host_memory is not None else placement.default_host_budget(parallel.local_world_size)
    hardware = sol.HARDWARE["h100" if device.type == "cuda" else "this-cpu"]  # bandwidths matter only to estimates
    tiers = placement.make_tiers(device.type, device_budget(runtime, device), host, hardware)
    return placement.plan_rank(cfg, parallel.world_size, parallel.rank, dtype_name, max_seq_len, runtime.max_batch_size, device.type, tiers, runtime.quantize,
                               cfg.checkpoint_dtype, blocks, offloaded=bool(runtime.offload_dir))


def _choose_matmuls(model: torch.nn.Module, streamer, runtime: RuntimeConfig, device: torch.device, dtype: torch.dtype):
    """How the loaded model multiplies: the int8 kernel, the CPU GEMV kernel, or BLAS. Returns the
    context the decode loop runs in."""
    if runtime.quantize == "int8":
        if device.type == "cpu" and runtime.gemv != "blas" and cpu_gemv.available() and cpu_gemv.has_int8_dot():
            use_cpu_gemv_([model])  # any linear still in float
            return cpu_gemv.decode_threads
    elif device.type == "cpu" and runtime.gemv != "blas" and dtype in (torch.float32, torch.bfloat16) and cpu_gemv.available():
        use_cpu_gemv_([model, *(streamer.staging_modules() if streamer else [])])
        return cpu_gemv.decode_threads
    elif runtime.gemv == "kernel":
        raise ConfigError("--gemv kernel: the CPU GEMV kernel runs float32 and bfloat16 on CPU, and needs a C compiler (see the warning above)")
    return nullcontext


def _keeps_blocks(files, runtime: RuntimeConfig, device: torch.device) -> bool:
    """Whether a GGUF model's quantized weights stay blocks in memory (the native CPU kernels),
    and a dense model's F16 matrices float16 (model/blocks.py keeps_f16: a GGUF's, or a float16
    Hugging Face checkpoint's, which would otherwise run as float32 on CPU), rather than being
    decoded into the float dtype at load (--gguf-weights). The blocks may come from the file
    itself or from a worker's cache of its slices."""
    dense = files.cfg.moe is None and files.cfg.mla is None
    stored = any(r.storage.quantized or (dense and r.storage.name == "F16" and len(r.shape) == 2) for r in files.index.tensors.values())
    if not stored or runtime.gguf_weights == "dequantize" or runtime.quantize:
        return False
    why = None
    if device.type != "cpu":
        why = f"the native kernels for GGUF blocks run on CPU, and this rank runs on {device}"
    elif cpu_quant.lib() is None:
        why = "the native kernel for GGUF blocks could not be built (no C compiler, see above)"
    if why is None:
        return True
    if runtime.gguf_weights == "native":
        raise ConfigError(f"--gguf-weights native: {why}")
    log.info("%s: the weights are decoded to %s at load", why, runtime.dtype or "the float dtype")
    return False


def _fused_step(model: torch.nn.Module, cache, runtime: RuntimeConfig, device: torch.device):
    """The fused decode step (model/fused_decode.py) where --decode-step allows and it applies."""
    if runtime.decode_step == "eager" or runtime.gemv == "blas":
        return None  # (RuntimeConfig refuses these with "fused")
    why = fused_decode.unsupported(model, device)
    if why is None:
        return fused_decode.FusedDecodeStep(model, cache)
    if runtime.decode_step == "fused":
        raise ConfigError(f"--decode-step fused: the fused step cannot run here: {why}")
    log.debug("decode step: eager (the fused step does not apply: %s)", why)
    return None


def _embedding_lookup_(step, model: torch.nn.Module, comm: Communicator, index, device: torch.device) -> MappedCheckpoint | None:
    """Give the fused step the whole embedding table from the mapped checkpoint (each rank then
    looks a token's row up itself: a few KB of page cache per distinct token, shared by local
    ranks, instead of an all-reduce per token), if every rank can: all ranks must issue the same
    collectives, and a rank may be eager (no kernel, GPU) or a worker whose cached checkpoint
    holds only its own rows. One all-reduce at load decides. Returns the mapping to close."""
    mapped = table = None
    if step is not None:
        try:
            mapped = MappedCheckpoint(index)
        except (CheckpointError, OSError) as e:  # a file it cannot map: the vocab-parallel lookup then
            log.debug("embedding rows from the mapped checkpoint: not possible (%s)", e)
        else:
            table = mapped.view(EMBEDDING_NAME)
            stored = index.tensors[EMBEDDING_NAME].storage
            if stored.quantized and cpu_quant.supported(stored.name):  # GGML blocks: a row decoded per token
                storage, row_bytes = stored.name, model.cfg.hidden_size // stored.block * stored.block_bytes
            else:
                storage, row_bytes = None, model.cfg.hidden_size
            if tuple(table.shape) != (model.cfg.vocab_size, row_bytes) or (stored.quantized and storage is None):
                table = None
    votes = torch.tensor([float(table is not None)], device=device)
    with comm.stats.in_phase("load"):  # outside any generation's counts
        comm.all_reduce(votes, site="embedding_lookup")
    if table is not None and int(votes.item()) == comm.world_size:
        step.embedding_table, step.embedding_storage = table, storage
        return mapped
    del table
    if mapped is not None:
        mapped.close()
    return None


class LLM:
    def __init__(self, cfg: ModelConfig, engine: Engine, tokenizer, parallel: ParallelConfig, dtype: str, load_seconds: float, owns_comm: bool) -> None:
        self.cfg, self.engine, self.tokenizer, self.parallel = cfg, engine, tokenizer, parallel
        self.dtype, self.load_seconds = dtype, load_seconds
        self.owns_comm = owns_comm  # a communicator handed in outlives this model
        self.plan: placement.RankPlan | None = None
        self.streamer = None
        self.rss_at_start = 0
        self.embedding_map = None  # the mapped checkpoint the fused decode step reads embedding rows from
        self.memory_at_load: dict[str, int] = {}
        self.chat_template: str | None = None  # the model's own (tokenizer_config.json, or the GGUF's)
        self.format = "safetensors"
        self.bytes_read = 0  # of weights, from the checkpoint at load (this rank's slices only)

    @property
    def comm(self):
        return self.engine.comm

    @classmethod
    def load(cls, model_dir: str | Path, parallel: ParallelConfig, runtime: RuntimeConfig, comm: Communicator | None = None) -> LLM:
        """comm: an existing communicator to reuse (several models in one job); default: a new one."""
        t0 = time.perf_counter()
        files = open_model(model_dir)  # config, tensor records, tokenizer: headers only
        cfg = runtime.split_config(files.cfg)
        sharding.check_job(cfg, parallel.world_size)
        max_seq_len = runtime.resolve_max_seq_len(cfg)
        device = pick_device(runtime, parallel)
        if device.type == "cuda":  # pinned buffers and mem_get_info act on the current device
            torch.cuda.set_device(device)
        if why := kernels.backend_problem(device.type):
            raise ConfigError(why)
        dtype_name = runtime.resolve_dtype(cfg, device.type)
        if dtype_name == "float16" and device.type == "cpu":
            log.warning("float16 on CPU is slow and inexact in places; bfloat16 or float32 is the usual choice")
        dtype = DTYPES[dtype_name]
        if runtime.num_threads and device.type == "cpu":
            torch.set_num_threads(runtime.num_threads)
        # everything checkable is checked before a byte is allocated or a peer is contacted
        index, tokenizer = files.index, files.tokenizer
        entries = validate(index, cfg, parallel.world_size, parallel.rank)
        if runtime.decode_step == "fused" and (why := fused_decode.unsupported_setup(device, dtype)):
            raise ConfigError(f"--decode-step fused: the fused step cannot run here: {why}")
        if runtime.quantize == "int4" and (why := int4.unsupported(cfg, sharding.mlp_unit(cfg, parallel.world_size), device.type)):
            raise ConfigError(why)
        keeps_blocks = _keeps_blocks(files, runtime, device)
        plan = plan_for(cfg, parallel, runtime, device, dtype_name, max_seq_len, placement.stored_blocks(files.index) if keeps_blocks else None)

        owns_comm = comm is None
        auto_shares = runtime.shares == "auto" and parallel.world_size > 1
        if comm is None:
            # (under --shares auto a rank's vocabulary share is not known yet: room for all of it)
            comm = create_communicator(parallel, device, runtime.comm, decode_message_bytes(cfg, 1 if auto_shares else parallel.world_size, runtime.max_batch_size, dtype))
        if auto_shares:
            cfg = replace(cfg, shares=shares.measured(comm, device))
            sharding.check_job(cfg, parallel.world_size)
            entries = validate(index, cfg, parallel.world_size, parallel.rank)
            plan = plan_for(cfg, parallel, runtime, device, dtype_name, max_seq_len, placement.stored_blocks(files.index) if keeps_blocks else None)
        if cfg.shares is not None and parallel.rank == 0:
            log.info("shares of the split by rank: %s", shares.describe(cfg.shares, parallel.world_size))
        # --attention dp: the dense parts are whole on every rank, their "collectives" a world of 1
        dense_comm = LocalCommunicator() if cfg.moe is not None and cfg.moe.data_parallel else None
        with torch.device("meta"):
            model = model_class(cfg)(cfg, comm, dtype, max_seq_len, linear_kinds(runtime.quantize, blocks=keeps_blocks), dense_comm=dense_comm)
        # the runtime before any weight (interpreter, torch and what the meta build imports,
        # tokenizer, transport buffers): what a memory budget does not cover
        rss_at_start = rss_bytes()
        layout = "-".join([dtype_name] + ([runtime.quantize] if runtime.quantize else []) + (["blocks"] if keeps_blocks else []))
        streamer = attach_streaming(model, plan, index, cfg, device, runtime.offload_dir, layout)
        if keeps_blocks or runtime.quantize == "int4":
            from tp_runtime.model.blocks import choose_prefill

            choose_prefill(model, runtime.block_prefill)
        model.to_empty(device=device)
        model.init_buffers()
        progress = _progress_bar(f"rank {parallel.rank} loading") if runtime.show_progress and parallel.rank == 0 else (lambda it: it)
        streamed, experts_out = set(plan.streamed), set(plan.experts_streamed)
        resident = [e for e in entries if e.layer not in streamed and not (e.expert is not None and e.layer in experts_out)]
        nbytes = load_shard(model, index, resident, cfg, parallel.world_size, parallel.rank, progress)
        decode_context = _choose_matmuls(model, streamer, runtime, device, dtype)
        model.eval()
        fault = (runtime.fail_rank, runtime.fail_step) if runtime.fail_rank is not None else None
        stall = (runtime.stall_rank, runtime.stall_step, runtime.stall_s) if runtime.stall_rank is not None else None
        engine = Engine(model, comm, cfg, max_seq_len, runtime.max_batch_size, device, dtype, fault, decode_context, stall=stall)
        engine.fused_decode = _fused_step(model, engine.cache, runtime, device)
        embedding_map = _embedding_lookup_(engine.fused_decode, model, comm, index, device) if model.embed_tokens.split else None
        llm = cls(cfg, engine, tokenizer, parallel, dtype_name, time.perf_counter() - t0, owns_comm)
        llm.embedding_map = embedding_map
        llm.chat_template, llm.format = files.chat_template, files.format
        llm.plan, llm.streamer, llm.rss_at_start = plan, streamer, rss_at_start
        llm.memory_at_load = llm.memory()
        llm.bytes_read = nbytes
        log.info("rank %d: %.1f MB of weights read, %d of %d layers streamed (the routed experts of %d), KV cache %.1f MB on %s", parallel.rank, nbytes / 1e6,
                 len(plan.streamed), cfg.num_layers, len(plan.experts_streamed), engine.cache.nbytes / 1e6, device)
        return llm

    def encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation through the model's chat template, ready for the answer."""
        return chat_prompt_ids(self.tokenizer, self.chat_template, messages, self.cfg.bos_token_id, self.cfg.eos_token_ids)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[TokenEvent]:
        return generate(self.engine, prompts, params)

    def prompt_logits(self, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """float32 logits at every prompt position ([len_i, vocab] each), as a scoring API would return."""
        return self.engine.prompt_logits(prompts)

    def expert_load(self) -> dict:
        """Tokens routed to each expert of each MoE layer since load (every rank counts all of
        them alike), prefill and decode apart, with what each rank's experts took (--moe ep: its
        own experts; tp: a slice of every one) and the imbalance, max / mean over the ranks."""
        from tp_runtime.model.moe import load_table

        table = load_table(self.engine.model, self.comm.world_size)
        if self.cfg.moe.data_parallel and self.comm.world_size > 1:  # each rank counted its own tokens: sum them
            counts = torch.tensor([row[k] for row in table["layers"] for k in ("prefill", "decode")], dtype=torch.float64)
            with self.comm.stats.in_phase("report"):
                counts = self.comm.all_reduce(counts, site="expert_load").long().tolist()
            table = load_table(self.engine.model, self.comm.world_size, counts)
        return table

    def memory(self) -> dict[str, int]:
        """This rank's memory now: weights per tier, KV cache, staging, peak use, streamed bytes."""
        return rank_memory(self.engine.model, self.plan, self.streamer, self.engine.cache.nbytes, self.engine.device, self.rss_at_start)

    def gather_memory(self) -> list[dict]:
        """Every rank's memory now (`memory()`), with its figures at load under "at_load", its
        count of streamed layers and of MoE layers whose routed experts stream, on every rank
        (one small all-gather outside any token step)."""
        now, load = self.memory(), self.memory_at_load
        row = [float(now[k]) for k in MEMORY_FIELDS] + [float(load[k]) for k in MEMORY_FIELDS] + [float(len(self.plan.streamed)), float(len(self.plan.experts_streamed))]
        if self.comm.world_size == 1:
            table = [row]
        else:
            with self.comm.stats.in_phase("report"):  # kept out of the per-token collective counts
                t = torch.tensor([row], dtype=torch.float64, device=self.engine.device)
                table = self.comm.all_gather(t, dim=0, site="memory_report").cpu().tolist()
        n = len(MEMORY_FIELDS)
        return [
            {**{k: int(v) for k, v in zip(MEMORY_FIELDS, r[:n])}, "at_load": {k: int(v) for k, v in zip(MEMORY_FIELDS, r[n : 2 * n])}, "streamed_layers": int(r[2 * n]),
             "expert_layers_streamed": int(r[2 * n + 1])}
            for r in table
        ]

    def close(self) -> None:
        self.engine.fused_decode = None  # holds a view of the mapping
        if self.embedding_map is not None:
            try:
                self.embedding_map.close()
            except BufferError:
                pass  # a caller still holds the step (and its view): unmapped when the process ends
        if self.streamer is not None:
            self.streamer.source_close()
        if self.owns_comm:
            self.engine.comm.close()


def _progress_bar(desc: str):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, unit="tensor", leave=False)
