"""Where a job runs: the executor interface, and the state of many jobs in one call.

Two implementations: `slurm.SlurmExecutor` (sbatch, scancel, one squeue — plus sacct where accounting exists —
for any number of jobs) and `local.LocalExecutor` (the job's own slurm.sh, run on this machine as a one-node
allocation). A job its executor no longer knows (SLURM forgets finished jobs after MinJobAge; a local run has
ended) is described by its job directory: the batch script's markers and events.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from trainer.core.jobdir import DONE, END_EVENTS, FAILED, PREEMPTED, JobDir, known_job_ids, read_events
from trainer.core.states import ACTIVE


@dataclass(frozen=True)
class JobState:
    """What is known of a job directory's latest job."""

    state: str
    """SLURM's word (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...), or from the job directory:
    PREEMPTED (stopped at a checkpoint and not requeued), UNKNOWN (gone, with no end recorded), NOT_SUBMITTED."""
    job_id: str | None
    source: str
    """Where it was read: squeue, sacct, local (a live local run) or the job directory."""
    detail: str = ""
    """SLURM's pending reason, the FAILED marker's reason, the preempted step, ..."""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


@dataclass
class Submission:
    executor: str
    job_id: str
    command: list[str]
    exit_code: int | None = None
    """Set by executors that run the job to its end before returning (local)."""


class Executor(ABC):
    name: ClassVar[str]

    @abstractmethod
    def command(self, job: JobDir, after: str | None = None) -> list[str]:
        """The command `submit` runs for this job."""

    @abstractmethod
    def submit(self, job: JobDir, announce: Callable[[Submission], None] | None = None,
               after: str | None = None) -> Submission:
        """Submit the job directory's script (recorded in submit.json); `announce` is called once the job has
        an id, before a local run starts. `after`: start only once that job has ended (SLURM; a local run
        starts when the previous one has ended anyway)."""

    @abstractmethod
    def cancel(self, jobs: Sequence[JobDir]) -> list[str]:
        """Stop whatever of these jobs is queued or running (one command for all), recording a `cancel` event in
        each job directory; returns the job ids."""

    @abstractmethod
    def live_states(self, jobs: Sequence[JobDir]) -> dict[Path, JobState]:
        """What the executor itself knows of these jobs, in one query: {job path: state} for those it knows."""

    def states(self, jobs: Sequence[JobDir]) -> dict[Path, JobState]:
        """Every job's state: the executor's where it knows the job, else what the job directory says. For a job
        that has ended, the directory's reason (the FAILED marker's, with the trainer's own error) is kept."""
        live = self.live_states(jobs)
        states = {}
        for job in jobs:
            known = live.get(job.path)
            recorded = recorded_state(job) if known is None or not known.active else None
            if known is None:
                states[job.path] = recorded
            elif recorded is not None and recorded.job_id == known.job_id and recorded.detail:
                states[job.path] = replace(known, detail=recorded.detail)
            else:
                states[job.path] = known
        return states


def recorded_state(job: JobDir) -> JobState:
    """A job its executor no longer knows, from its directory alone."""
    ids = known_job_ids(job)
    if not ids:
        return JobState("NOT_SUBMITTED", None, "job directory")
    latest = ids[-1]
    events = read_events(job)
    mine = [e for e in events if str(e["job_id"]) == latest]
    ended = [e for e in mine if e["event"] in END_EVENTS]
    said = str(ended[-1].get("reason") or "") if ended else ""
    if any(e["event"] == "cancel" for e in mine):
        cancel = next(str(e.get("reason") or "") for e in mine if e["event"] == "cancel")
        return JobState("CANCELLED", latest, "job directory", said or cancel)
    started = [e for e in events if e["event"] == "start"]
    if not started or str(started[-1]["job_id"]) != latest:  # every attempt's start clears the old markers
        return JobState("UNKNOWN", latest, "job directory", "left the queue without starting")
    outcome = job.outcome()
    if outcome is None and ended and ended[-1]["event"] in ("failed", "stopped"):  # its marker could not be written
        return JobState("FAILED" if ended[-1]["event"] == "failed" else "PREEMPTED", latest, "job directory", said)
    if outcome is None:
        return JobState("UNKNOWN", latest, "job directory",
                        "started, then left the queue with no end recorded (killed, or its node failed)")
    marker, text = outcome
    if marker == DONE:
        return JobState("COMPLETED", latest, "job directory")
    if marker == FAILED:
        return JobState("FAILED", latest, "job directory", text.splitlines()[0] if text else "")
    assert marker == PREEMPTED
    step = text.split()[0] if text else "?"
    return JobState("PREEMPTED", latest, "job directory", said or f"stopped at the checkpoint of step {step}")
