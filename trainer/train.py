"""`python -m trainer.train jobs/<name>`: what slurm.sh runs on every rank.

For now the distributed skeleton the trainer will fill: it reads the frozen config, joins the
process group across all nodes, proves the group works with an all-reduce, then runs the step
loop with the preemption protocol (a step is a placeholder pause until the model exists).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import ValidationError

from trainer import lifecycle
from trainer.config import AnvilConfig
from trainer.config_checks import world_size
from trainer.distributed import init_distributed
from trainer.preemption import PreemptionWatch

PLACEHOLDER_STEP_SECONDS = 0.2


def log(rank: int, message: str) -> None:
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"anvil[rank {rank} {node}]: {message}", flush=True)


def load_job_config(job_dir: Path) -> AnvilConfig:
    path = job_dir / "config.json"
    try:
        return AnvilConfig.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        sys.exit(f"anvil: {path} not found: give the job directory that submit.py created")
    except ValidationError as exc:
        sys.exit(f"anvil: {path} is not a valid Anvil config ({exc.error_count()} problems):\n{exc}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.exit("usage: python -m trainer.train jobs/<name>")
    job_dir = Path(argv[1]).resolve()
    cfg = load_job_config(job_dir)
    ranks = init_distributed(cfg)
    expected = world_size(cfg)
    if ranks.world_size != expected:
        if ranks.rank == 0:
            log(0, f"the allocation has {ranks.world_size} ranks but the config asks for cluster.nodes × "
                   f"cluster.devices_per_node = {expected}; fix the config (or the sbatch options you added)")
        dist.destroy_process_group()
        return 2
    device = torch.device("cpu") if cfg.cluster.device == "cpu" else torch.device("cuda", ranks.local_rank)
    total = torch.tensor([float(ranks.rank + 1)], device=device)
    dist.all_reduce(total)
    want = ranks.world_size * (ranks.world_size + 1) / 2
    log(ranks.rank, f"rank {ranks.rank}/{ranks.world_size} all-reduce sum {total.item():g} (expected {want:g}); "
                    f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')}")
    if total.item() != want:
        return 1

    watch = PreemptionWatch(job_dir, device)
    for step in range(1, cfg.train.steps + 1):
        if watch.requested():
            # The trainer saves its checkpoint here before marking the job preempted.
            watch.mark_preempted(step - 1)
            if ranks.rank == 0:
                log(0, f"preempted after step {step - 1}; requeue requested")
            dist.destroy_process_group()
            return lifecycle.PREEMPTED_EXIT
        time.sleep(PLACEHOLDER_STEP_SECONDS)
        if ranks.rank == 0 and step % cfg.metrics.log_every == 0:
            log(0, f"step {step}/{cfg.train.steps}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
