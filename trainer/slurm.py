"""Thin wrappers over the SLURM commands Anvil uses; no torch, no daemons of our own."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                           "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"})
"""States in which a job may still run or write to its directory."""


class SlurmError(Exception):
    """A SLURM command failed; the message carries what it said."""


def available() -> bool:
    return shutil.which("sbatch") is not None


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} not found: is SLURM installed here? (or submit with --executor local)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv)} did not answer within {timeout:.0f} s: is slurmctld up?") from None


def sbatch_command(script: Path) -> list[str]:
    return ["sbatch", "--parsable", str(script)]


def sbatch(script: Path) -> str:
    """Submit `script`; returns the job id."""
    out = _run(sbatch_command(script))
    if out.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch answered {out.stdout.strip()!r}, expected a job id")
    return job_id


def job_state(job_id: str) -> str | None:
    """PENDING, RUNNING, COMPLETED, ...; None once SLURM has forgotten the job (MinJobAge)."""
    out = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    state = out.stdout.strip() if out.returncode == 0 else ""
    if state:
        return state
    out = _run(["scontrol", "show", "job", "-o", job_id])
    match = re.search(r"\bJobState=(\S+)", out.stdout) if out.returncode == 0 else None
    return match.group(1) if match else None


def job_field(job_id: str, field: str) -> str | None:
    """One `scontrol show job` field, e.g. Restarts or ExitCode."""
    out = _run(["scontrol", "show", "job", "-o", job_id])
    match = re.search(rf"\b{re.escape(field)}=(\S+)", out.stdout) if out.returncode == 0 else None
    return match.group(1) if match else None
