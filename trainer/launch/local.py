"""The local executor: a job's `slurm.sh` run on this machine, as SLURM would on a one-node allocation.

For laptops and machines with no cluster: the same script, the same markers and logs, the same requeue protocol
(the script exits with PREEMPTED_EXIT where it would call `scontrol requeue`, and the executor runs it again).
Ctrl-C (like TERM and HUP to this process) plays the part of scancel: the trainer checkpoints and stops; a second
Ctrl-C kills every process of the run. Whatever of a run outlives its script is ended, as SLURM ends a job's
processes; if this executor itself is killed, the script gets TERM and the job checkpoints and stops. While it runs,
`local-run.json` in the job directory names this process, so that other commands see the run and can stop it
(`cancel` is a Ctrl-C from afar).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from trainer.core.config import AnvilConfig
from trainer.core.files import write_atomic
from trainer.core.jobdir import JobDir, append_event, record_submission
from trainer.core.processes import STOP_SIGNALS, die_with_parent, end_processes, process_start, send, with_environment
from trainer.core.states import PREEMPTED_EXIT
from trainer.launch.executor import Executor, JobState, Submission


def new_job_id() -> str:
    """Numeric like SLURM's (the script derives a port from it), and unlikely to repeat."""
    return str(int(time.time() * 1000) % 10**9)


def _pump(source: IO[bytes], sink: IO[bytes], echo: IO[bytes] | None) -> None:
    """Copy the job's output to its log (and the terminal) to the end. A log that cannot be written any more (a full
    disk) is said once on the terminal and the copying goes on: the job must never block on a full pipe."""
    broken = False
    for line in iter(source.readline, b""):
        if not broken:
            try:
                sink.write(line)
                sink.flush()
            except OSError as exc:
                broken = True
                _say(echo, f"anvil: cannot write {sink.name} any more ({exc.strerror}); the rest of this job's "
                           "output goes to this terminal only\n")
        if echo is not None:
            with contextlib.suppress(OSError):
                echo.write(line)
                echo.flush()


def _say(echo: IO[bytes] | None, text: str) -> None:
    with contextlib.suppress(OSError):
        (echo or sys.stderr.buffer).write(text.encode())
        (echo or sys.stderr.buffer).flush()


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


STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""What stops a local run at a checkpoint: Ctrl-C, a kill, a closed terminal; passed on to the batch script as is."""


def _job_processes(job_id: str) -> list[int]:
    """Every process of this local run, wherever its parent went: they all carry its job id in their environment."""
    return with_environment({"ANVIL_EXECUTOR": "local", "SLURM_JOB_ID": job_id})


def _bash_child() -> None:
    """In the batch script's process, before it starts: the stop signals at their defaults (a shell cannot trap a
    signal it started with ignored, as anything started in the background of a script has SIGINT), and if this
    executor dies, the job checkpoints and stops."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    die_with_parent(signal.SIGTERM)


def _attempt(cfg: AnvilConfig, job: JobDir, job_id: str, restart: int, echo: bool) -> tuple[int, bool]:
    """One run of the script; returns its exit code and whether the user interrupted it. Like SLURM at the end of a
    job, it ends whatever of the run is still alive when the script has exited."""
    interrupted = False
    with open(job.log(job_id, "out"), "ab") as out, open(job.log(job_id, "err"), "ab") as err:
        proc = subprocess.Popen(
            ["bash", str(job.script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_environment(cfg, job_id, restart),
            cwd=job.path,
            start_new_session=True,  # Ctrl-C reaches us, not the job; we forward it as SLURM would
            preexec_fn=_bash_child,
        )
        pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, out, sys.stdout.buffer if echo else None)),
            threading.Thread(target=_pump, args=(proc.stderr, err, sys.stderr.buffer if echo else None)),
        ]
        for t in pumps:
            t.start()

        def on_stop(signum, frame):
            nonlocal interrupted
            if not interrupted:
                interrupted = True
                with contextlib.suppress(OSError):
                    print("\nanvil: stopping: the trainer checkpoints first (Ctrl-C again to kill)", file=sys.stderr)
                proc.send_signal(signum)
            elif signum == signal.SIGINT:
                send(_job_processes(job_id), signal.SIGKILL)

        previous = {sig: signal.signal(sig, on_stop) for sig in STOPS}
        try:
            rc = proc.wait()
        finally:
            killed = end_processes(lambda: _job_processes(job_id))
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for t in pumps:
                t.join()
        if killed:
            _say(sys.stderr.buffer if echo else None,
                 f"anvil: {len(killed)} process(es) of the run outlived its script and were killed: {killed}\n")
    return rc, interrupted


def run_local(cfg: AnvilConfig, job: JobDir, job_id: str, echo: bool = True) -> int:
    """Run the job to its end (requeues included); returns the script's final exit code."""
    restart = 0
    while True:
        rc, interrupted = _attempt(cfg, job, job_id, restart, echo)
        if rc != PREEMPTED_EXIT or interrupted:
            return rc
        restart += 1


def mark_running(job: JobDir, job_id: str, pid: int) -> None:
    """Name the process running this job (until it ends), for other commands' states and cancel."""
    write_atomic(job.local_run, json.dumps({"job_id": job_id, "pid": pid, "host": socket.gethostname(),
                                            "started": process_start(pid)}) + "\n")


def _live_run(job: JobDir) -> dict | None:
    """The record of this job's local run, if that run is alive on this host."""
    try:
        record = json.loads(job.local_run.read_text())
        pid, host, started = int(record["pid"]), record["host"], record["started"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname() or process_start(pid) != started:
        return None
    return record


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo

    def command(self, job: JobDir, after: str | None = None) -> list[str]:
        return ["bash", str(job.script)]

    def submit(self, job: JobDir, announce: Callable[[Submission], None] | None = None,
               after: str | None = None) -> Submission:
        """Runs the job here, now, to its end (or until interrupted); `exit_code` holds the script's."""
        cfg = job.read_config()
        job_id = new_job_id()
        command = self.command(job)
        record_submission(job, self.name, command, job_id)
        submission = Submission(self.name, job_id, command)
        if announce is not None:
            announce(submission)
        mark_running(job, job_id, os.getpid())
        try:
            submission.exit_code = run_local(cfg, job, job_id, echo=self.echo)
        finally:
            job.local_run.unlink(missing_ok=True)
        return submission

    def cancel(self, jobs: Sequence[JobDir]) -> list[str]:
        """Interrupt each live local run, as Ctrl-C in its terminal would: it checkpoints and stops."""
        cancelled = []
        for job in jobs:
            record = _live_run(job)
            if record is not None:
                append_event(job, "cancel", str(record["job_id"]), "cancelled: stopped at a checkpoint")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(record["pid"]), signal.SIGINT)
                    cancelled.append(str(record["job_id"]))
        return cancelled

    def live_states(self, jobs: Sequence[JobDir]) -> dict[Path, JobState]:
        states = {}
        for job in jobs:
            record = _live_run(job)
            if record is not None:
                states[job.path] = JobState("RUNNING", str(record["job_id"]), "local", f"process {record['pid']}")
        return states
