"""Small real training jobs for trainer tests: a demo corpus of real text, a byte-level BPE tokenizer,
job directories with a frozen config.json, and the trainer run as `slurm.sh` runs it (torchrun for
several ranks)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from trainer.core.layers import load_config

TINY = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=512",
    "data.seq_len=64", "data.num_workers=0", "data.logical_shards=8", "data.shuffle_window=64",
    "train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=20",
    "optim.lr=3e-3", "optim.warmup_steps=2", "metrics.log_every=1", "checkpoint.interval=5",
]


def corpus_overrides(corpus: Path) -> list[str]:
    return [f"data.datasets=[{{path: {corpus / 'train'}}}]", f"data.tokenizer={corpus / 'tokenizer.json'}"]


def make_job(jobs_dir: Path, name: str, corpus: Path, *overrides: str) -> Path:
    """A job directory holding only what the trainer reads: config.json."""
    cfg = load_config(None, [f"job.name={name}", *TINY, *corpus_overrides(corpus), *overrides])
    job = jobs_dir / name
    job.mkdir(parents=True)
    (job / "config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    return job


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_command(job: Path, ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "trainer.train", str(job)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "-m", "trainer.train", str(job)]


def trainer_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    repo = str(Path(__file__).resolve().parent.parent)
    env.update(MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true",
               PYTHONPATH=os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")])))
    return env


def run_trainer(job: Path, ranks: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(trainer_command(job, ranks), capture_output=True, text=True, timeout=timeout,
                          env=trainer_env())


def losses(job: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last line of a step wins)."""
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll fast until `predicate` holds (True) or the trainer exits (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if predicate():
            return True
        time.sleep(0.002)
    raise AssertionError("the trainer neither progressed nor finished")


def logged_step(log: Path) -> int:
    """The newest step a run's log shows trained (metrics.log_every=1)."""
    return max((int(s) for s in re.findall(r"step (\d+)/\d+  loss", log.read_text())), default=0)
