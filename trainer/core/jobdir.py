"""The job directory: every name in it, its markers and exit codes, the record of submissions and the lookup of
checkpoint steps. This module spells them once; the batch script, the trainer, the exporter, the executors and
the sweep tool all ask it.

```
jobs/<name>/
  config.json     the frozen config (the trainer reads only this)
  plan.json       its plan at the last submit: memory per rank, speed, cost, checkpoint, data (submit.py --plan)
  slurm.sh        the batch script;  submit.json + git.diff: every submission and the code it ran
  logs/           <name>-<jobid>.out/.err, env-<jobid>-<restart>.txt
  checkpoints/    step-N/ (DCP), complete once step-N/COMPLETE exists; step-N.damaged/ set aside on resume
  metrics.jsonl   one JSON row per logged step;  wandb/, wandb-run-id
  events.jsonl    one JSON line per attempt start and end (END_EVENTS), and what the tools and trainer add
  eval/step-N/    lm-eval results of the export of step N
  profiles/       torch.profiler traces (and CUDA memory snapshots) of metrics.profile_steps
  RESTARTS  PREEMPT  PREEMPTED  DONE  FAILED  ERROR  local-run.json   markers (see below)
```

A job directory is created atomically (it appears complete or not at all), and a different config is never
written over an existing job without `--force`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import getpass
import hashlib
import json
import os
import re
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

import trainer
from trainer.core.config import NAME_PATTERN, SBATCH_WORD, SECRET_NAME, AnvilConfig
from trainer.core.errors import AnvilError
from trainer.core.files import staged_dir, write_atomic

CODE_DIR = Path(trainer.__file__).resolve().parent.parent
"""Where the ranks import this trainer from (`slurm.sh` changes into it): the checkout, or site-packages."""

CONFIG = "config.json"
PLAN = "plan.json"
SCRIPT = "slurm.sh"
SUBMISSIONS = "submit.json"
GIT_DIFF = "git.diff"
LOGS = "logs"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
"""One JSON line per attempt start, requeue and end, appended by the batch shell; the tools add `cancel`, the
trainer `rollback`, `checkpoint_damaged`, `init_from` and `data_mix`."""
END_EVENTS = ("done", "failed", "stopped", "requeue")
"""How the batch script ends an attempt: finished; failed (the reason); stopped at a checkpoint and not run again
(cancelled, interrupted); requeued (preemption, the time limit, a lost node)."""
WANDB_ID = "wandb-run-id"
EVAL = "eval"
PROFILES = "profiles"
LOCAL_RUN = "local-run.json"
"""The local executor's record of the run in progress (its process id), so that other commands can see and stop it."""

PREEMPT = "PREEMPT"
"""Trigger written by the batch shell when SLURM asks the job to stop: checkpoint and exit."""
PREEMPTED = "PREEMPTED"
"""Written by the trainer after its preemption checkpoint (holds the step): requeue me."""
DONE = "DONE"
"""The run finished; holds the job id and time."""
FAILED = "FAILED"
"""The run stopped for good; holds the reason, then the job id."""
RESTARTS = "RESTARTS"
"""SLURM_RESTART_COUNT of the current attempt."""
ERROR = "ERROR"
"""The first reason any process of the job gave for stopping on an error: `<kind>: <its message's first line>`.
The first one written stays (a peer's collateral error never replaces it); the kinds are ERROR_KINDS."""
ERROR_KINDS = {
    "refused": "bad input a person must fix (config, data, checkpoint)",
    "diverged": "the loss stayed non-finite or spiking after the allowed rollbacks",
    "oom": "out of memory",
    "disk": "out of disk space, over quota, or an I/O error where the job writes",
    "killed": "a rank was killed by a signal (kill -9, the kernel's OOM killer, a segfault)",
    "lost": "a rank stopped answering because its process or its node is gone",
    "hung": "no rank made progress within the timeout (a stopped rank, a collective that never completes)",
    "crash": "an unexpected error (a bug: its traceback is in the log)",
}
REPEATING_ERRORS = ("refused", "diverged", "oom", "disk")
"""Error kinds a plain retry would meet again."""
REQUEUED_ERRORS = ("lost",)
"""Error kinds the batch script requeues even without `job.retry_on_failure` (within `job.max_restarts`), as SLURM
requeues a job whose node failed: the allocation broke, not the job."""
COMPLETE = "COMPLETE"
"""In `checkpoints/step-N/`: the step is whole (written last, atomically)."""
DAMAGED = ".damaged"
"""Suffix of a complete step found damaged later (files missing or cut short) and set aside: `step-N.damaged`."""

TRIGGER_CAUSE = "trigger"
PREEMPT_CAUSES = (TRIGGER_CAUSE, "SIGUSR2", "SIGHUP", "SIGINT", "SIGTERM")
"""What made the trainer checkpoint and stop, as PREEMPTED names it after the step (`<step> <cause>`): the PREEMPT
trigger file, or a signal to one of the ranks. When ranks heard different ones, the last in this order wins: a stop
(TERM, INT, HUP) outranks a requeue (the trigger, USR2). The batch script requeues on a requeue cause and stops on a
stop cause (unless SLURM is preempting the job or its time limit was reached)."""

_LOG = "{name}-{job_id}.{stream}"
_ENV_REPORT = "env-{job_id}-{restart}.txt"
_STEP = "step-{step}"
_PROFILE = "{kind}-rank{rank}-steps{first}-{last}"
_STEP_PATTERN = re.compile(r"step-(\d+)")


class JobDirError(AnvilError):
    """A job directory or checkpoint that cannot be used as asked; the message says what to do instead."""


@dataclass(frozen=True)
class JobDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def script(self) -> Path:
        return self.path / SCRIPT

    @property
    def plan(self) -> Path:
        return self.path / PLAN

    @property
    def submissions(self) -> Path:
        return self.path / SUBMISSIONS

    @property
    def git_diff(self) -> Path:
        return self.path / GIT_DIFF

    @property
    def logs(self) -> Path:
        return self.path / LOGS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def events(self) -> Path:
        return self.path / EVENTS

    @property
    def wandb_id(self) -> Path:
        return self.path / WANDB_ID

    @property
    def local_run(self) -> Path:
        return self.path / LOCAL_RUN

    @property
    def preempt(self) -> Path:
        return self.path / PREEMPT

    @property
    def preempted(self) -> Path:
        return self.path / PREEMPTED

    @property
    def done(self) -> Path:
        return self.path / DONE

    @property
    def failed(self) -> Path:
        return self.path / FAILED

    @property
    def restarts(self) -> Path:
        return self.path / RESTARTS

    @property
    def error(self) -> Path:
        return self.path / ERROR

    def log(self, job_id: str, stream: str = "out") -> Path:
        """The batch script's stdout (`out`) or stderr (`err`) for one SLURM job (every attempt appends)."""
        return self.logs / _LOG.format(name=self.name, job_id=job_id, stream=stream)

    def eval_dir(self, step: int) -> Path:
        return self.path / EVAL / _STEP.format(step=step)

    def profile(self, rank: int, first: int, last: int, kind: str = "trace") -> Path:
        """A profile of steps first..last on one rank: `trace` (a torch.profiler trace, Chrome/Perfetto JSON) or
        `memory` (a CUDA memory snapshot for pytorch.org/memory_viz)."""
        name = _PROFILE.format(kind=kind, rank=rank, first=first, last=last)
        return self.path / PROFILES / (name + (".json" if kind == "trace" else ".pickle"))

    def read_config(self) -> AnvilConfig:
        """The frozen config, or a JobDirError naming the file."""
        try:
            return AnvilConfig.model_validate_json(self.config.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise JobDirError(f"{self.config} not found: give a job directory (jobs/<name>, as submit makes them)"
                              ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise JobDirError(f"{self.config} cannot be read: {exc}") from None
        except ValidationError as exc:
            raise JobDirError(
                f"{self.config} is not a valid Anvil config ({exc.error_count()} problems):\n{exc}") from None

    def outcome(self) -> tuple[str, str] | None:
        """How the last attempt ended, by its markers: (DONE | FAILED | PREEMPTED, the marker's text), or None."""
        for name in (DONE, FAILED, PREEMPTED):
            path = self.path / name
            with contextlib.suppress(OSError):
                return name, path.read_text(encoding="utf-8", errors="replace").strip()
        return None


def sbatch_log(stream: str) -> str:
    """The log name as an `#SBATCH --output` pattern (SLURM fills in %x, the job name, and %j, the job id)."""
    return _LOG.format(name="%x", job_id="%j", stream=stream)


def env_report_name(job_id: str, restart: str) -> str:
    """Under logs/: the environment report of one attempt (the batch script passes shell variables)."""
    return _ENV_REPORT.format(job_id=job_id, restart=restart)


def tool_root(override: str | None, variable: str, folder: str) -> Path:
    """Where a tool keeps its folders: the command-line option, else the environment variable, else `folder/` in
    the Anvil checkout (or, for an installed Anvil, in the current directory)."""
    default = CODE_DIR / folder if (CODE_DIR / "pyproject.toml").is_file() else Path.cwd() / folder
    root = override or os.environ.get(variable) or default
    return Path(root).expanduser().resolve()


def jobs_root(override: str | None = None) -> Path:
    """`--jobs-dir`, else $ANVIL_JOBS_DIR, else `jobs/`."""
    return tool_root(override, "ANVIL_JOBS_DIR", "jobs")


def contained(root: Path, name: str, what: str) -> Path:
    """`root/<name>` for a name that can never lead outside `root` (a `what` name: job, sweep)."""
    if not re.fullmatch(NAME_PATTERN, name) or name in (".", ".."):
        raise JobDirError(f"{what} name '{name}' is not allowed: use letters, digits, '.', '_' or '-'")
    path = (root / name).resolve()
    if path.parent != root:
        raise JobDirError(f"{what} name '{name}' would leave {root}")
    return path


def job_dir(root: Path, name: str) -> JobDir:
    """The directory for `name`, which can never lie outside `root`."""
    path = contained(root, name, "job")
    if not re.fullmatch(SBATCH_WORD, str(path)):
        raise JobDirError(
            f"the job directory {path} contains characters SLURM cannot take in #SBATCH --output; "
            "move the Anvil checkout or set --jobs-dir to a plain path"
        )
    return JobDir(path)


# -- checkpoint steps ----------------------------------------------------------------------------------------------


def step_dir(root: Path, step: int) -> Path:
    """`root/step-N`: where checkpoint step N of a checkpoints folder lives."""
    return root / _STEP.format(step=step)


def step_of(path: Path) -> int | None:
    """N for a `step-N` directory, else None."""
    match = _STEP_PATTERN.fullmatch(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def mark_complete(path: Path, record: dict[str, Any]) -> None:
    """Declare a step whole: its last write."""
    write_atomic(path / COMPLETE, json.dumps(record) + "\n")


def list_steps(root: Path) -> list[tuple[int, Path, bool]]:
    """(step, directory, complete) for every step directory, oldest first."""
    found = []
    for path in root.glob("step-*") if root.is_dir() else []:
        step = step_of(path)
        if step is not None and path.is_dir():
            found.append((step, path, is_complete(path)))
    return sorted(found)


def latest_complete(root: Path) -> int | None:
    """The newest complete step (newer incomplete ones are interrupted saves, never resumed from)."""
    complete = [step for step, _, done in list_steps(root) if done]
    return complete[-1] if complete else None


def interrupted_saves(root: Path) -> list[Path]:
    """Step directories newer than the newest complete one and without the marker: saves cut short."""
    latest = latest_complete(root)
    return [path for step, path, done in list_steps(root) if not done and (latest is None or step > latest)]


def pick_step(root: Path, step: int | None = None) -> Path:
    """The newest complete step, or step `step`, refusing missing and incomplete ones by name."""
    complete = [s for s, _, done in list_steps(root) if done]
    listing = ", ".join(_STEP.format(step=s) for s in complete) or "none"
    if step is None:
        if not complete:
            raise JobDirError(f"{root} holds no complete checkpoint yet: train the job first")
        return step_dir(root, complete[-1])
    path = step_dir(root, step)
    if not path.is_dir():
        raise JobDirError(f"{path} does not exist; complete checkpoints: {listing}")
    if step not in complete:
        raise JobDirError(f"{path} is incomplete (interrupted while saving); complete checkpoints: {listing}")
    return path


def set_aside(path: Path) -> Path:
    """Rename a damaged `step-N` to `step-N.damaged` (`.damaged-2`, … if taken): no longer a step, kept for a look."""
    target = path.with_name(path.name + DAMAGED)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{DAMAGED}-{n}")
    path.rename(target)
    return target


def checkpoint_source(path: Path) -> tuple[Path, int | None]:
    """`checkpoint.init_from`: a job directory or a checkpoints folder (step None: its newest usable step is meant),
    or one complete `step-N` directory; returns (checkpoints folder, step)."""
    step = step_of(path)
    if step is not None and is_complete(path):
        return path.parent, step
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    if latest_complete(root) is None:
        raise JobDirError(f"checkpoint.init_from: {path} holds no complete checkpoint "
                          "(give a job directory that has saved one, or a checkpoints/step-N directory)")
    return root, None


# -- creating a job and recording its submissions --------------------------------------------------------------------


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def config_differences(old: dict, new: dict, limit: int = 8) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    lines = [f"{k}: {json.dumps(a.get(k, '<unset>'))} -> {json.dumps(b.get(k, '<unset>'))}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"... and {len(keys) - limit} more")
    return lines


def frozen(cfg: AnvilConfig) -> str:
    """config.json's text for `cfg`."""
    return cfg.model_dump_json(indent=2) + "\n"


def holds(job: JobDir, cfg: AnvilConfig) -> bool:
    """Whether `job` exists with exactly this config (a submit resumes it)."""
    try:
        return job.config.read_text(encoding="utf-8") == frozen(cfg)
    except (OSError, UnicodeDecodeError):
        return False


def check_replaceable(cfg: AnvilConfig, job: JobDir, force: bool) -> str:
    """An existing job directory may take `cfg`: it holds the same config, or `force`. Returns its config.json's
    text; raises JobDirError saying what differs."""
    if not job.config.is_file():
        raise JobDirError(f"{job.path} exists but is not an Anvil job directory (no {CONFIG}); pick another name")
    old_text = job.config.read_text(encoding="utf-8")
    config_text = frozen(cfg)
    if old_text != config_text and not force:
        try:
            diff = config_differences(json.loads(old_text), json.loads(config_text))
        except json.JSONDecodeError:
            diff = [f"(the existing {CONFIG} is not valid JSON)"]
        raise JobDirError(
            f"job '{cfg.job.name}' already exists at {job.path} with a different config:\n    "
            + "\n    ".join(diff)
            + "\n  Use --name to start a new job, or --force to replace its config and script "
            "(logs and checkpoints are kept, and it resumes from them)."
        )
    return old_text


def write_job(cfg: AnvilConfig, script: str, job: JobDir, force: bool = False) -> bool:
    """Create the job directory (atomically), or refresh an existing one for the same config.

    Returns True if the directory was new. A different config under the same name is refused unless
    `force`, which replaces config.json and slurm.sh but keeps logs and checkpoints.
    """
    config_text = frozen(cfg)
    if job.path.exists():
        old_text = check_replaceable(cfg, job, force)
        with _writing(job.path):  # what is already as it should be is not written again (a full disk can resubmit)
            if old_text != config_text:
                write_atomic(job.config, config_text)
            if not job.script.is_file() or job.script.read_text(encoding="utf-8") != script:
                write_atomic(job.script, script, 0o755)
            job.logs.mkdir(exist_ok=True)
            job.checkpoints.mkdir(exist_ok=True)
        return False
    try:
        with staged_dir(job.path) as staging:  # the directory appears complete or not at all
            new = JobDir(staging)
            new.config.write_text(config_text, encoding="utf-8")
            new.script.write_text(script, encoding="utf-8")
            os.chmod(new.script, 0o755)
            new.logs.mkdir()
            new.checkpoints.mkdir()
    except OSError as exc:
        if job.path.exists():
            raise JobDirError(f"{job.path} appeared while it was being created; submit again") from None
        raise _unwritable(job.path, exc) from None
    return True


def _unwritable(path: Path, exc: OSError) -> JobDirError:
    return JobDirError(f"cannot write the job directory {path}: {exc.strerror or exc} (errno {exc.errno}"
                       f"{', ' + str(exc.filename) if exc.filename else ''}); free space or fix the file system, "
                       "then submit again")


@contextlib.contextmanager
def _writing(path: Path):
    """A job directory that cannot be written (a full disk, a quota) is refused in one line."""
    try:
        yield
    except OSError as exc:
        raise _unwritable(path, exc) from None


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """Commit and uncommitted changes of the code a job runs, for reproducing it later."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(CODE_DIR), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {"sha": None, "dirty": None, "diff": ""}
    status = git("status", "--porcelain") or ""
    diff = git("diff", "HEAD") or ""
    return {
        "sha": sha.strip(),
        "dirty": bool(status.strip()),
        "untracked": sum(1 for line in status.splitlines() if line.startswith("??")),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
        "diff": diff,
    }


def append_event(job: JobDir, event: str, job_id: str | None = None, reason: str = "", **fields: Any) -> bool:
    """One more line of events.jsonl, as the batch script writes them (the tools add `cancel`, the trainer
    `rollback`, `checkpoint_damaged`, ...): inside a job, its id, restart and nodes come from SLURM's variables.
    Returns whether it was written (a full disk loses the line, not the job)."""
    env = os.environ
    try:
        restart = int(env.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        restart = 0
    line = {"time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "event": event,
            "job_id": job_id if job_id is not None else env.get("SLURM_JOB_ID", ""), "restart": restart,
            "nodes": env.get("SLURM_JOB_NODELIST", "") if job_id is None else "", "reason": reason, **fields}
    try:
        with open(job.events, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        return True
    except OSError:
        return False


def write_plan(job: JobDir, plan: dict[str, Any]) -> None:
    """The plan of the config just submitted (replacing the previous submit's; the same one is not written again, so
    that a full disk can resubmit, and a disk that cannot take a new one is refused in one line)."""
    text = json.dumps(plan, indent=2) + "\n"
    try:
        same = job.plan.read_text(encoding="utf-8") == text
    except OSError:
        same = False
    if not same:
        with _writing(job.path):
            write_atomic(job.plan, text)


def write_error(job: JobDir, kind: str, message: str) -> bool:
    """Record a process's reason for stopping, for the FAILED marker and for deciding whether a retry can help: only
    if no process of this attempt has recorded one yet (the first failure is the cause; what follows is collateral).
    Returns whether it was recorded. Never raises: on a full or failing disk the reason stays in the log and exit
    code."""
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}")
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")[:500]
    try:
        fd, tmp = tempfile.mkstemp(dir=job.path, prefix=f".{ERROR}.")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{kind}: {first}\n")
        os.link(tmp, job.error)  # atomic and exclusive, on NFS and Lustre too: the first one wins
        return True
    except OSError:  # FileExistsError: another process was first; ENOSPC and the like: nowhere to write it
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def read_error(job: JobDir) -> tuple[str, str] | None:
    """(kind, message) of the trainer's ERROR marker, or None."""
    try:
        kind, _, message = job.error.read_text(encoding="utf-8", errors="replace").partition(": ")
    except OSError:
        return None
    return kind.strip(), message.strip()


def read_events(job: JobDir) -> list[dict[str, Any]]:
    """The batch script's events, oldest first; a line cut short by a crash is skipped."""
    events = []
    with contextlib.suppress(OSError):
        for line in job.events.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                if isinstance(event, dict) and "event" in event and "job_id" in event:
                    events.append(event)
    return events


def first_submission(job: JobDir) -> str | None:
    """When the job was first submitted (ISO time, to the second: when sbatch or the local executor was called), or
    None if it never was (or its submit.json cannot be read)."""
    try:
        return str(json.loads(job.submissions.read_text(encoding="utf-8"))["submissions"][0]["time"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def known_job_ids(job: JobDir) -> list[str]:
    """Job ids this directory has run under, oldest first: the submission records and the script's own events
    (a resubmission with a plain `sbatch slurm.sh` appears in the events only)."""
    seen: list[tuple[str, str]] = []  # (time, id)
    if job.submissions.is_file():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError, AttributeError, OSError):
            seen += [(s.get("time", ""), str(s["job_id"]))
                     for s in json.loads(job.submissions.read_text())["submissions"] if s.get("job_id")]
    seen += [(str(event.get("time", "")), str(event["job_id"])) for event in read_events(job)]
    first: dict[str, dt.datetime] = {}
    for time, job_id in seen:
        when = _parse_time(time)
        if job_id not in first or when < first[job_id]:
            first[job_id] = when
    return sorted(first, key=first.__getitem__)  # by first appearance (sorted is stable for equal times)


def _parse_time(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return dt.datetime.min.replace(tzinfo=dt.UTC)
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def redact_secrets(text: str, environ: dict[str, str] | None = None) -> str:
    """Replace the values of secret-named environment variables (tokens, keys) wherever they appear."""
    environ = os.environ if environ is None else environ
    for name, value in environ.items():
        if SECRET_NAME.search(name) and len(value) >= 8:
            text = text.replace(value, f"<{name} redacted>")
    return text


def record_submission(job: JobDir, executor: str, command: list[str], job_id: str | None) -> dict:
    """Append this submission to submit.json (and the uncommitted diff, if any, to git.diff).

    The diff is the user's own code, but a token pasted into it must not be copied into the job directory
    any more than one in the environment: the values of secret-named variables are redacted from it.
    """
    git = dict(git_state())
    diff = git.pop("diff")
    if diff:
        with _writing(job.path):
            write_atomic(job.git_diff, redact_secrets(diff))
    entry = {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "executor": executor,
        "job_id": job_id,
        "command": command,
        "host": socket.gethostname(),
        "user": getpass.getuser(),
        "git": git,
    }
    record = {"submissions": []}
    if job.submissions.is_file():
        try:
            record = json.loads(job.submissions.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            record = {"submissions": [], "note": f"an unreadable earlier {SUBMISSIONS} was replaced"}
    record.setdefault("submissions", []).append(entry)
    with _writing(job.path):
        write_atomic(job.submissions, json.dumps(record, indent=2) + "\n")
    return entry
