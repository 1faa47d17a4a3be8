"""One rank of a parity run: load each model with the shared communicator, score the prompts,
generate greedily, and (rank 0) save everything for the test process to compare.

argv: OUT_FILE JSON_SPEC  with spec {"models": [dirs], "prompts": [[ids]], "new_tokens": n, "dtype": str|None}
"""

import json
import sys
from dataclasses import replace

import torch

from tp_runtime.comm import create
from tp_runtime.config import RuntimeConfig
from tp_runtime.engine.llm import LLM, pick_device
from tp_runtime.engine.sampling import SamplingParams
from tp_runtime.launch.env import parallel_from_env
from tp_runtime.launch.spawn import record_failure


def main() -> None:
    out_file, spec = sys.argv[1], json.loads(sys.argv[2])
    parallel = parallel_from_env()
    try:
        runtime = RuntimeConfig(dtype=spec.get("dtype"), max_seq_len=128, max_batch_size=len(spec["prompts"]), show_progress=False)
        comm = create(parallel, pick_device(runtime, parallel))
        results = {}
        for model_dir in spec["models"]:
            llm = LLM.load(model_dir, parallel, runtime, comm=comm)
            logits = [t.float().cpu() for t in llm.prompt_logits(spec["prompts"])]
            comm.stats.reset()
            tokens = [[] for _ in spec["prompts"]]
            params = SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True)
            for ev in llm.generate(spec["prompts"], params):
                tokens[ev.seq].append(ev.token_id)
            counts = {op: comm.stats.count(op) for op in ("all_reduce", "all_gather", "broadcast", "barrier")}
            # each prompt alone
            single_tokens, single_counts = [], []
            for prompt in spec["prompts"]:
                comm.stats.reset()
                single_tokens.append([ev.token_id for ev in llm.generate([prompt], params)])
                single_counts.append({op: comm.stats.count(op) for op in ("all_reduce", "all_gather")})
            fused = llm.engine.fused_decode is not None
            llm.close()
            # the batch again through the eager decode step (the default above is the fused one on CPU)
            llm = LLM.load(model_dir, parallel, replace(runtime, decode_step="eager"), comm=comm)
            eager_tokens = [[] for _ in spec["prompts"]]
            for ev in llm.generate(spec["prompts"], params):
                eager_tokens[ev.seq].append(ev.token_id)
            llm.close()
            results[model_dir] = {
                "logits": logits, "tokens": tokens, "counts": counts, "layers": llm.cfg.num_layers,
                "single_tokens": single_tokens, "single_counts": single_counts, "fused": fused, "eager_tokens": eager_tokens,
            }
        if parallel.rank == 0:
            torch.save(results, out_file)
        comm.close()
    except BaseException as e:
        record_failure(parallel.rank, e)
        raise


if __name__ == "__main__":
    main()
