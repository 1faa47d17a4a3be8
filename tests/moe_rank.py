"""One rank of a MoE run: each model under each --moe mode, over one communicator; rank 0 saves
what the test process compares (logits, greedy tokens, collective counts per decode step,
weight bytes read by every rank, the routed-token counts).

argv: OUT_FILE JSON_SPEC  with spec {"models": [dirs], "modes": ["tp", "ep", "dp"], "prompts": [[ids]], "new_tokens": n}
(modes: --moe tp, --moe ep, --moe ep --attention dp)
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

OPS = ("all_reduce", "all_gather", "all_to_all", "broadcast", "barrier")
SPLITS = {"tp": {"moe": "tp"}, "ep": {"moe": "ep"}, "dp": {"moe": "ep", "attention": "dp"}}


def main() -> None:
    out_file, spec = sys.argv[1], json.loads(sys.argv[2])
    parallel = parallel_from_env()
    try:
        base = RuntimeConfig(max_seq_len=128, max_batch_size=len(spec["prompts"]), show_progress=False)
        comm = create(parallel, pick_device(base, parallel))
        results = {}
        for model_dir in spec["models"]:
            for mode in spec["modes"]:
                llm = LLM.load(model_dir, parallel, RuntimeConfig(**{**base.__dict__, **SPLITS[mode]}), comm=comm)
                logits = [t.float().cpu() for t in llm.prompt_logits(spec["prompts"])]
                llm.engine.model.init_buffers()  # routed-token counts of the generation alone
                comm.stats.reset()
                tokens = [[] for _ in spec["prompts"]]
                for ev in llm.generate(spec["prompts"], SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True)):
                    tokens[ev.seq].append(ev.token_id)
                counts = {op: comm.stats.count(op) for op in OPS}
                decode = {op: comm.stats.count(op, phase="decode") for op in OPS}
                sites = sorted({site for (phase, _, site) in comm.stats.by_key if phase == "decode"})
                # every rank's bytes per destination of each all-to-all site over the whole run
                # (prefill, decode, and the idle passes that meet them on a rank with nothing to
                # run): [world][world], the sites from the config, so every rank reduces alike
                pairs = {}
                sparse = [i for i, s in enumerate(llm.cfg.moe.sparse_layers) if s] if mode == "dp" and parallel.world_size > 1 else []
                for site in (f"layer.{i}.{k}" for i in sparse for k in ("moe_counts", "moe_dispatch", "moe_combine")):
                    mine = torch.zeros(parallel.world_size, parallel.world_size, dtype=torch.float64)
                    for phase in ("prefill", "decode", "idle"):
                        st = comm.stats.by_key.get((phase, "all_to_all", site))
                        if st is not None:
                            mine[parallel.rank] += torch.tensor(st.to_rank, dtype=torch.float64)
                    with comm.stats.in_phase("report"):
                        pairs[site] = comm.all_reduce(mine, site="test.pairs").tolist()
                read = torch.zeros(parallel.world_size, dtype=torch.float64)
                read[parallel.rank] = llm.bytes_read
                with comm.stats.in_phase("report"):
                    comm.all_reduce(read, site="test.bytes")
                results[(model_dir, mode)] = {
                    "logits": logits, "tokens": tokens, "counts": counts, "decode_counts": decode, "decode_sites": sites, "pairs": pairs,
                    "decode_steps": llm.engine.last_stats.decode_steps, "layers": llm.cfg.num_layers,
                    "fused": llm.engine.fused_decode is not None, "bytes_read": read.tolist(), "experts": llm.expert_load(),
                }
                llm.close()
        if parallel.rank == 0:
            torch.save(results, out_file)
        comm.close()
    except BaseException as e:
        record_failure(parallel.rank, e)
        raise


if __name__ == "__main__":
    main()
