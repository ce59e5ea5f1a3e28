"""Process-group setup that works under torchrun (RANK, ...) and under plain srun (SLURM_PROCID, ...)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.core.config import AnvilConfig
from trainer.core.processes import node_name
from trainer.train.gpu import GpuPaths


def log(rank: int, message: str) -> None:
    """One line of a rank's log, prefixed with its rank and node (the tests and users grep for these)."""
    node = node_name()
    # A log that cannot be written (the launcher gone, the output's disk full) must not stop the rank.
    with contextlib.suppress(OSError, ValueError):
        print(f"anvil[rank {rank} {node}]: {message}", flush=True)


CACHE_VARIABLES = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "MIOPEN_USER_DB_PATH")


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world_size: int


def ranks_from_environment() -> Ranks:
    """torchrun's variables, else srun's (one task per device: the LUMI way)."""
    env = os.environ

    def pick(*names: str, default: str) -> int:
        return int(next((env[n] for n in names if env.get(n)), default))

    ranks = Ranks(
        rank=pick("RANK", "SLURM_PROCID", default="0"),
        local_rank=pick("LOCAL_RANK", "SLURM_LOCALID", default="0"),
        world_size=pick("WORLD_SIZE", "SLURM_NTASKS", default="1"),
    )
    # init_process_group("env://") reads these names only.
    env.setdefault("RANK", str(ranks.rank))
    env.setdefault("LOCAL_RANK", str(ranks.local_rank))
    env.setdefault("WORLD_SIZE", str(ranks.world_size))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    return ranks


def make_node_local_caches() -> None:
    """The batch shell points compile caches at node-local disk; each node must create its own."""
    for name in CACHE_VARIABLES:
        if os.environ.get(name):
            os.makedirs(os.environ[name], exist_ok=True)


def process_group() -> None:
    """A gloo process group for tools that use the trainer's parallelize step: the one torchrun describes in the
    environment, else one of this process alone (no port: a file store)."""
    if dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        return
    fd, store = tempfile.mkstemp(prefix="anvil-pg-")
    os.close(fd)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def init_distributed(cfg: AnvilConfig, timeout_s: float = 300) -> Ranks:
    ranks = ranks_from_environment()
    make_node_local_caches()
    backend = "gloo"
    if GpuPaths.of_cluster(cfg.cluster.device).nccl:
        torch.cuda.set_device(ranks.local_rank)
        backend = "nccl"  # RCCL on ROCm, under the same name
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))
    return ranks
