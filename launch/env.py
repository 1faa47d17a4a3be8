"""torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) -> ParallelConfig."""

from __future__ import annotations

import os
from typing import Mapping

from tp_runtime.config import ParallelConfig
from tp_runtime.errors import ConfigError


def is_rank_process(environ: Mapping[str, str] = os.environ) -> bool:
    """True under torchrun or our own spawner: the process is one rank of a job."""
    return "RANK" in environ and "WORLD_SIZE" in environ


def parallel_from_env(environ: Mapping[str, str] = os.environ) -> ParallelConfig:
    try:
        world = int(environ["WORLD_SIZE"])
        rank = int(environ["RANK"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
        port = int(environ.get("MASTER_PORT", "29500"))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"rank environment is incomplete or not numeric ({e}); expected RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT as torchrun sets them") from None
    # torchrun's agent already serves the rendezvous store on MASTER_PORT: join it as a client
    init = "env://" if "TORCHELASTIC_RUN_ID" in environ else None
    return ParallelConfig(
        world_size=world,
        rank=rank,
        local_rank=local_rank,
        local_world_size=local_world,
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=port,
        init_method=init,
    )
