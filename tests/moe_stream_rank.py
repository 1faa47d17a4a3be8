"""One rank of a run of MoE models with streamed experts (tests/test_offload_moe.py): each of
the spec's runs loads a model under a --moe mode and a host budget (None: resident), and rank 0
saves per run the prompt logits, the greedy tokens, the plan's streamed layers and experts, the
routed-token counts of the generation and every rank's memory report (peak RSS, expert bytes
read by the generation).

argv: OUT_FILE JSON_SPEC  with spec {"runs": [{"model": dir, "mode": "tp"|"ep"|"dp", "budget": bytes|null,
"prompts": [[ids]]}], "new_tokens": n}. The first run's peak RSS is the process's own (nothing
was loaded before it).
"""

import json
import sys

import torch

from tp_runtime.comm import create
from tp_runtime.config import RuntimeConfig
from tp_runtime.engine.llm import LLM, pick_device
from tp_runtime.engine.sampling import SamplingParams
from tp_runtime.launch.env import parallel_from_env
from tp_runtime.launch.spawn import record_failure

SPLITS = {"tp": {"moe": "tp"}, "ep": {"moe": "ep"}, "dp": {"moe": "ep", "attention": "dp"}}


def main() -> None:
    out_file, spec = sys.argv[1], json.loads(sys.argv[2])
    parallel = parallel_from_env()
    try:
        base = RuntimeConfig(max_seq_len=128, max_batch_size=2, show_progress=False)
        comm = create(parallel, pick_device(base, parallel))
        results = []
        for run in spec["runs"]:
            runtime = RuntimeConfig(**{**base.__dict__, **SPLITS[run["mode"]], "max_host_memory": run["budget"]})
            llm = LLM.load(run["model"], parallel, runtime, comm=comm)
            prompts = run["prompts"]
            logits = [t.float().cpu() for t in llm.prompt_logits(prompts)]
            llm.engine.model.init_buffers()  # routed-token counts of the generation alone
            experts = llm.streamer.experts if llm.streamer is not None else None
            before = experts.stats.bytes if experts is not None else 0
            tokens = [[] for _ in prompts]
            for ev in llm.generate(prompts, SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True)):
                tokens[ev.seq].append(ev.token_id)
            read = (experts.stats.bytes if experts is not None else 0) - before
            memory = llm.gather_memory()  # every rank's, on every rank
            mine = torch.zeros(parallel.world_size, dtype=torch.float64)
            mine[parallel.rank] = read
            with comm.stats.in_phase("report"):
                comm.all_reduce(mine, site="test.expert_bytes")
            results.append({
                "logits": logits, "tokens": tokens, "streamed": llm.plan.streamed, "experts_streamed": llm.plan.experts_streamed,
                "fused": llm.engine.fused_decode is not None, "decode_steps": llm.engine.last_stats.decode_steps,
                "experts": llm.expert_load(), "memory": memory, "expert_bytes_read": [int(v) for v in mine.tolist()],
            })
            llm.close()
        if parallel.rank == 0:
            torch.save(results, out_file)
        comm.close()
    except BaseException as e:
        record_failure(parallel.rank, e)
        raise


if __name__ == "__main__":
    main()
