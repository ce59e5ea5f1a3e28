"""Run under torchrun by tests/test_plan.py: one training step of each job's config on real tensors, every rank, with
the planner's tracker; rank 0 writes what it measured (a JSON list), to hold the planner's fake-tensor figures
against. The jobs share one world size (and this process group)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from trainer.core.jobdir import JobDir
from trainer.plan.memory import trace
from trainer.train.distributed import init_distributed


def main(out: str, jobs: list[str]) -> None:
    configs = [JobDir(Path(job)).read_config() for job in jobs]
    ranks = init_distributed(configs[0])
    measured = [trace(cfg, fake=False).to_dict() for cfg in configs]
    if ranks.rank == 0:
        Path(out).write_text(json.dumps(measured))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
