"""The SLURM executor: sbatch, scancel, and the state of any number of jobs from one squeue call (plus one sacct
call where the cluster keeps accounting). No torch, no daemons of our own."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from trainer.core.errors import AnvilError
from trainer.core.jobdir import JobDir, append_event, known_job_ids, record_submission
from trainer.core.states import ACTIVE
from trainer.launch.executor import Executor, JobState, Submission


class SlurmError(AnvilError):
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


COMMENT_PREFIX = "anvil: "
"""How the batch script marks the end it writes into the SLURM job's comment (a reason that needs no file)."""


def _detail(state: str, reason: str, comment: str) -> str:
    """What to show beside a state: an ended job's end as its batch script told SLURM, else SLURM's reason."""
    if comment.startswith(COMMENT_PREFIX) and state not in ACTIVE:
        return comment[len(COMMENT_PREFIX):]
    return "" if reason == "None" else reason


def queue(job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, detail)} for the ids slurmctld still knows (finished ones for MinJobAge): one squeue call."""
    if not job_ids:
        return {}
    out = _run(["squeue", "--noheader", "--states=all", "--jobs", ",".join(job_ids), "--format=%i|%T|%r|%k"])
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:  # squeue's answer when it knows none of the ids
            return {}
        raise SlurmError(f"squeue failed: {out.stderr.strip() or out.stdout.strip()}")
    found = {}
    for line in out.stdout.splitlines():
        job_id, _, rest = line.partition("|")
        state, _, rest = rest.partition("|")
        reason, _, comment = rest.partition("|")  # the comment last: it is free text
        if job_id.strip() and state:
            found[job_id.strip()] = (state.strip(), _detail(state.strip(), reason.strip(), comment.strip()))
    return found


class SlurmExecutor(Executor):
    name = "slurm"

    def __init__(self) -> None:
        self.accounting: bool | None = None  # learnt from the first sacct call

    def command(self, job: JobDir, after: str | None = None) -> list[str]:
        dependency = [f"--dependency=afterany:{after}"] if after else []
        return ["sbatch", "--parsable", *dependency, str(job.script)]

    def submit(self, job: JobDir, announce: Callable[[Submission], None] | None = None,
               after: str | None = None) -> Submission:
        command = self.command(job, after)
        out = _run(command)
        job_id = out.stdout.strip().split(";")[0]
        if out.returncode != 0 or not job_id.isdigit():
            record_submission(job, self.name, command, None)
            said = out.stderr.strip() or out.stdout.strip()
            raise SlurmError(f"submission failed: sbatch refused the job: {said}\n"
                             f"  The job directory is ready; resubmit with: sbatch {job.script}")
        record_submission(job, self.name, command, job_id)
        submission = Submission(self.name, job_id, command)
        if announce is not None:
            announce(submission)
        return submission

    def cancel(self, jobs: Sequence[JobDir]) -> list[str]:
        live = self.live_states(jobs)
        chosen = {path: state.job_id for path, state in live.items() if state.active and state.job_id}
        if chosen:
            for job in jobs:  # first: the batch script's own events follow the cancellation
                if job.path in chosen:
                    append_event(job, "cancel", chosen[job.path], "cancelled with scancel")
            out = _run(["scancel", *chosen.values()])
            if out.returncode != 0:
                raise SlurmError(f"scancel failed: {out.stderr.strip() or out.stdout.strip()}")
        return list(chosen.values())

    def live_states(self, jobs: Sequence[JobDir]) -> dict[Path, JobState]:
        """Every id each job ever ran under goes into the one squeue call; per job, the newest active id wins,
        else the newest id SLURM (or its accounting) still knows."""
        ids_of = {job.path: known_job_ids(job) for job in jobs}
        every = list(dict.fromkeys(i for ids in ids_of.values() for i in ids))
        known = {i: JobState(state, i, "squeue", reason) for i, (state, reason) in queue(every).items()}
        missing = [i for i in every if i not in known]
        known.update(self._accounting(missing))
        states = {}
        for path, ids in ids_of.items():
            seen = [known[i] for i in ids if i in known]
            if seen:
                active = [s for s in seen if s.active]
                states[path] = active[-1] if active else seen[-1]
        return states

    def _accounting(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        """sacct for jobs slurmctld has forgotten, where the cluster keeps accounting (one call; none once it
        has said that it does not)."""
        if not job_ids or self.accounting is False:
            return {}
        try:
            out = _run(["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", ",".join(job_ids),
                        "--format=JobIDRaw,State,ExitCode,Comment"])
        except SlurmError:
            self.accounting = False
            return {}
        if out.returncode != 0:
            self.accounting = False  # e.g. "Slurm accounting storage is disabled"
            return {}
        self.accounting = True
        wanted, found = set(job_ids), {}
        for line in out.stdout.splitlines():
            fields = line.split("|")
            if len(fields) >= 2 and fields[0] in wanted:
                state = fields[1].split()[0] if fields[1].split() else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
                exit_code = fields[2] if len(fields) > 2 else ""
                comment = "|".join(fields[3:])
                detail = _detail(state, "", comment) or (f"exit code {exit_code}" if exit_code else "")
                found[fields[0]] = JobState(state, fields[0], "sacct", detail)
        return found
