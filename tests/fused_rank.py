"""One rank of the tp=2 allocation check (test_fused_decode.py): load over the default local
transport, decode a prompt eagerly and with the fused step, and record which aten ops of the
fused steps after warm-up made new storage.

argv: MODEL_DIR OUT_DIR  (writes OUT_DIR/rank<r>.json)
"""

import json
import sys
from pathlib import Path

import torch

from test_fused_decode import NewStorages
from tp_runtime.comm import create
from tp_runtime.config import CommConfig, ModelConfig, RuntimeConfig
from tp_runtime.engine.llm import LLM, decode_message_bytes
from tp_runtime.engine.sampling import Sampler, SamplingParams
from tp_runtime.launch.env import parallel_from_env
from tp_runtime.launch.spawn import record_failure


def main() -> None:
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    parallel = parallel_from_env()
    try:
        # one communicator for both models, as a job with several models shares one: a second
        # process group on the same port could meet rank 0's first store while it is torn down
        comm = create(parallel, torch.device("cpu"), CommConfig(), decode_message_bytes(ModelConfig.from_model_dir(model_dir), 2, 1, torch.float32))
        llm = LLM.load(model_dir, parallel, RuntimeConfig(dtype="float32", max_seq_len=64, max_batch_size=1, show_progress=False, decode_step="eager"), comm=comm)
        prompt, params = [5, 9, 2, 7], SamplingParams(max_new_tokens=8, ignore_eos=True)
        eager_tokens = [ev.token_id for ev in llm.generate([prompt], params)]
        llm.close()
        llm = LLM.load(model_dir, parallel, RuntimeConfig(dtype="float32", max_seq_len=64, max_batch_size=1, show_progress=False, decode_step="fused"), comm=comm)
        eng, sampler = llm.engine, Sampler()
        tok = int(eng.prompt_logits([prompt])[0][-1].argmax())
        tokens, new, ptrs = [tok], [], set()
        with eng.decode_context():
            for i in range(len(eager_tokens) - 1):
                mode = NewStorages()
                with mode:
                    logits = eng.fused_decode([tok], [len(prompt) + i])
                    tok = sampler(logits, [(params, params.seed, i + 1)])[0]
                tokens.append(tok)
                if i >= 1:  # the first step is warm-up
                    new += mode.ops
                    ptrs.add(logits.data_ptr())
        result = {"transport": llm.comm.transport, "new_storages": new, "logits_buffers": len(ptrs), "tokens": tokens, "eager_tokens": eager_tokens}
        (out_dir / f"rank{parallel.rank}.json").write_text(json.dumps(result))
        llm.close()
        comm.close()
    except BaseException as e:
        record_failure(parallel.rank, e)
        raise


if __name__ == "__main__":
    main()
