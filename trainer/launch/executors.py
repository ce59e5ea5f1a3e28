"""Which executor runs a job: chosen by name, apart from the interface (`executor.py`) that both implement."""

from __future__ import annotations

from trainer.launch import local, slurm
from trainer.launch.executor import Executor


def executor_for(name: str) -> Executor:
    """`slurm`, `local`, or `auto` (SLURM where sbatch is on PATH, else local)."""
    if name == "auto":
        name = "slurm" if slurm.available() else "local"
    if name == "slurm":
        return slurm.SlurmExecutor()
    if name == "local":
        return local.LocalExecutor()
    raise ValueError(f"no executor '{name}' (expected auto, slurm or local)")
