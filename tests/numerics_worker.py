"""Run under torchrun by tests/test_train.py: 10 optimizer steps of the trainer's own `train_step` on one
fixed global batch sequence, whatever the parallel layout, so layouts can be compared number for number.

Every rank reads the same global batches (a one-rank loader) and takes its data-parallel slice, as the
loader would hand it; rank 0 writes the losses and gradient norms as JSON (and, with metrics.mup_monitors, what
the muP monitors measured at each step, to `<out>.monitors`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.core.jobdir import JobDir
from trainer.data.loader import build_loader
from trainer.train.distributed import init_distributed
from trainer.train.loop import Trainer
from trainer.train.parallelize import build_layout


def main(job_dir: str, out: str, control: str = "", steps: int = 10) -> None:
    if control == "fp32-parameters":
        from trainer.train import parallelize

        policy = parallelize.MixedPrecisionPolicy
        parallelize.MixedPrecisionPolicy = lambda **kw: policy(**{**kw, "param_dtype": torch.float32})
    job = JobDir(Path(job_dir))
    cfg = job.read_config()
    ranks = init_distributed(cfg)
    torch.manual_seed(cfg.train.seed)
    layout = build_layout(cfg, "cpu")
    trainer = Trainer(cfg, job, ranks.rank, layout, torch.device("cpu"))
    t = cfg.train
    per_rank = t.global_batch_size // layout.dp_size
    batches = iter(build_loader(cfg.data, t.seed, 0, 1, t.global_batch_size))
    record, monitored = [], []
    for _ in range(steps):
        batch = next(batches)
        mine = {k: v[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank] for k, v in batch.items()}
        micro = [{k: v[i:i + t.micro_batch_size] for k, v in mine.items()}
                 for i in range(0, per_rank, t.micro_batch_size)]
        if trainer.monitor is not None:  # metrics.mup_monitors: every step is watched here
            trainer.monitor.arm()
        result = trainer.train_step(micro)
        record.append([result["loss"], result["grad_norm"]])  # both global already
        if trainer.monitor is not None:
            monitored.append(trainer.monitor.collect())
    if ranks.rank == 0:
        Path(out).write_text(json.dumps(record))
        if monitored:
            Path(f"{out}.monitors").write_text(json.dumps(monitored))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
