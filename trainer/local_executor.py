"""Run a job's `slurm.sh` on this machine, as SLURM would on a one-node allocation.

For laptops and machines with no cluster: the same script, the same markers and logs, the same
requeue protocol (the script exits with PREEMPTED_EXIT where it would call `scontrol requeue`).
Ctrl-C plays the part of SLURM's USR2: the trainer checkpoints and stops; a second Ctrl-C kills.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

from trainer.config import AnvilConfig
from trainer.jobdir import JobDir
from trainer.lifecycle import PREEMPTED_EXIT


def new_job_id() -> str:
    """Numeric like SLURM's (the script derives a port from it), and unlikely to repeat."""
    return str(int(time.time() * 1000) % 10**9)


def _pump(source: IO[bytes], sink: IO[bytes], echo: IO[bytes] | None) -> None:
    for line in iter(source.readline, b""):
        sink.write(line)
        sink.flush()
        if echo is not None:
            echo.write(line)
            echo.flush()


def _environment(cfg: AnvilConfig, job_id: str, restart: int) -> dict[str, str]:
    host = socket.gethostname()
    env = dict(os.environ)
    env.pop("SLURM_RESTART_COUNT", None)
    env.update(
        ANVIL_EXECUTOR="local",
        SLURM_JOB_ID=job_id,
        SLURM_JOBID=job_id,
        SLURM_JOB_NAME=cfg.job.name,
        SLURM_JOB_NUM_NODES="1",
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST=host,
        SLURMD_NODENAME=host,
        SLURM_NODEID="0",
        SLURM_NTASKS="1",
        SLURM_CPUS_ON_NODE=str(cfg.cluster.cores_per_node),
        SLURM_SUBMIT_DIR=os.getcwd(),
    )
    if restart:  # SLURM sets it only on a requeued run
        env["SLURM_RESTART_COUNT"] = str(restart)
    return env


def _attempt(cfg: AnvilConfig, job: JobDir, job_id: str, restart: int, echo: bool) -> tuple[int, bool]:
    """One run of the script; returns its exit code and whether the user interrupted it."""
    interrupted = False
    out_path = job.logs / f"{cfg.job.name}-{job_id}.out"
    err_path = job.logs / f"{cfg.job.name}-{job_id}.err"
    with open(out_path, "ab") as out, open(err_path, "ab") as err:
        proc = subprocess.Popen(
            ["bash", str(job.script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_environment(cfg, job_id, restart),
            cwd=job.path,
            start_new_session=True,  # Ctrl-C reaches us, not the job; we forward it as SLURM would
        )
        pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, out, sys.stdout.buffer if echo else None)),
            threading.Thread(target=_pump, args=(proc.stderr, err, sys.stderr.buffer if echo else None)),
        ]
        for t in pumps:
            t.start()

        def on_interrupt(signum, frame):
            nonlocal interrupted
            if not interrupted:
                interrupted = True
                print("\nanvil: stopping: the trainer checkpoints first (Ctrl-C again to kill)", file=sys.stderr)
                proc.send_signal(signal.SIGUSR2)
            else:
                os.killpg(proc.pid, signal.SIGKILL)

        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            rc = proc.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
            for t in pumps:
                t.join()
    return rc, interrupted


def run_local(cfg: AnvilConfig, job: JobDir, job_id: str, echo: bool = True) -> int:
    """Run the job to its end (requeues included); returns the script's final exit code."""
    restart = 0
    while True:
        rc, interrupted = _attempt(cfg, job, job_id, restart, echo)
        if rc != PREEMPTED_EXIT or interrupted:
            return rc
        restart += 1
