"""Run under torchrun by tests/test_plan.py: one training step of each job's config on real tensors, every rank, with
the planner's tracker (a pipeline: the real schedule, sending and receiving); rank 0 writes what it measured (a JSON
list; a pipeline's entry also holds its last pipeline rank's, `last_pipeline_rank`), to hold the planner's
fake-tensor figures against, with the bytes its all-to-alls sent to other ranks (`all_to_all_bytes`, counted as the
collectives run, in forward, backward and recomputation alike). The jobs share one world size (and this process
group)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.core.jobdir import JobDir
from trainer.plan.memory import trace
from trainer.train.distributed import init_distributed


class AllToAllSent(TorchDispatchMode):
    """Counts what this rank's all-to-alls send to the other ranks of their group, in bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "all_to_all_single" in str(func):
            rows, _, sizes, group = args  # input, output split sizes, input split sizes, group name
            mine = sizes[dist.get_rank(_resolve_process_group(group))]
            self.bytes += (sum(sizes) - mine) * rows[0].numel() * rows.element_size()
        return func(*args, **(kwargs or {}))


def measured(cfg) -> dict:
    with AllToAllSent() as sent:
        memory = trace(cfg, fake=False).to_dict()
    return memory | {"all_to_all_bytes": sent.bytes}


def main(out: str, jobs: list[str]) -> None:
    configs = [JobDir(Path(job)).read_config() for job in jobs]
    ranks = init_distributed(configs[0])
    measured_ = [measured(cfg) for cfg in configs]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, measured_)
    if ranks.rank == 0:  # a pipeline's: also what the first rank of its last pipeline rank measured
        for i, cfg in enumerate(configs):
            if cfg.parallel.pp > 1:
                measured_[i]["last_pipeline_rank"] = everyone[cfg.world_size - cfg.world_size // cfg.parallel.pp][i]
        Path(out).write_text(json.dumps(measured_))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
