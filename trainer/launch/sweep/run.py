"""Running a sweep: validate every point before writing any, write the job directories and `sweep.json`, submit
through an executor, throttled with SLURM's own dependencies; retry what failed; cancel.

Throttling (`--max-running N`) needs no daemon and no open terminal: at most N points are free to start; each
further point is submitted with `--dependency=afterany:<id>` on the newest job of one of N lanes, so SLURM starts
it when that job ends (finished, failed or cancelled). A requeued (preempted) job keeps its lane.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.core.checks import submit_problems
from trainer.core.config import AnvilConfig
from trainer.core.jobdir import (
    REPEATING_ERRORS,
    JobDir,
    JobDirError,
    config_differences,
    job_dir,
    read_error,
    write_job,
)
from trainer.core.layers import ConfigError, as_submitted, load_config
from trainer.core.states import RETRYABLE
from trainer.launch.executor import Executor, JobState, Submission
from trainer.launch.render import RenderError, render_script
from trainer.launch.sweep.spec import Point, Sweep, override_text
from trainer.launch.sweep.state import SWEEP_FILE, SWEEP_JSON, PointRecord, SweepState, read_state, write_state


@dataclass(frozen=True)
class PlannedPoint:
    point: Point
    cfg: AnvilConfig
    job: JobDir
    script: str


def plan(sweep: Sweep, overrides: Sequence[str], jobs: Path, executor: str, force: bool = False
         ) -> tuple[list[PlannedPoint], dict[str, list[str]]]:
    """Every point's config, checked as submit.py checks one, and its job directory and script; nothing written.
    Returns the valid points and {point: problems} for the others."""
    swept = set(sweep.keys)
    clash = sorted(item.partition("=")[0] for item in overrides if item.partition("=")[0] in swept)
    if clash:
        raise ConfigError([f"{key}: swept by {sweep.file}, so a command-line override cannot set it" for key in clash],
                          "invalid command-line overrides")
    base = Path(sweep.spec.base) if sweep.spec.base else None
    shared = [*sweep.base_overrides(), *overrides]
    planned, invalid = [], {}
    for point in sweep.points:
        items = [*shared, *(f"{k}={override_text(v)}" for k, v in point.values.items()),
                 f"job.name={sweep.job_name(point)}"]
        try:
            cfg = as_submitted(load_config(base, items))
        except ConfigError as exc:
            invalid[point.name] = exc.problems
            continue
        problems = submit_problems(cfg, executor)
        try:
            job = job_dir(jobs, cfg.job.name)
            script = render_script(cfg, job.path)
        except (JobDirError, RenderError) as exc:
            invalid[point.name] = [*problems, str(exc)]
            continue
        if job.config.is_file() and not force:
            try:
                old = json.loads(job.config.read_text())
                changed = config_differences(old, json.loads(cfg.model_dump_json()), limit=3)
            except (OSError, ValueError):
                changed = ["(its config.json cannot be read)"]
            if changed:
                problems.append(f"{job.path} exists with a different config ({'; '.join(changed)}); "
                                "use --force to replace it (its checkpoints are kept), or another sweep name")
        elif job.path.exists() and not job.config.is_file():
            problems.append(f"{job.path} exists but is not an Anvil job directory")
        if problems:
            invalid[point.name] = problems
        else:
            planned.append(PlannedPoint(point, cfg, job, script))
    return planned, invalid


def refuse(invalid: dict[str, list[str]], total: int) -> ConfigError:
    problems = [f"point {name}: {problem}" for name, found in invalid.items() for problem in found]
    return ConfigError(problems, f"invalid sweep: {len(invalid)} of {total} points cannot run")


def write(sweep: Sweep, planned: Sequence[PlannedPoint], path: Path, executor: str, max_running: int | None,
          force: bool = False) -> SweepState:
    """The job directories (each atomically) and sweep.json, keeping what an earlier submission recorded."""
    known = (path / SWEEP_JSON).exists()
    state = read_state(path) if known else SweepState(sweep.name, str(sweep.file.resolve()), executor)
    state.file, state.executor = str(sweep.file.resolve()), executor
    if max_running is not None:
        state.max_running = max_running
    for item in planned:
        write_job(item.cfg, item.script, item.job, force=force)
        record = state.points.get(item.point.name)
        if record is None:
            state.points[item.point.name] = PointRecord(item.point.name, str(item.job.path), item.point.values)
        else:
            record.values, record.job_dir = item.point.values, str(item.job.path)
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sweep.file, path / SWEEP_FILE)
    write_state(path, state)
    return state


def submit(executor: Executor, state: SweepState, path: Path, names: Sequence[str], action: str,
           states: dict[Path, JobState], announce: Callable[[str, Submission], None] | None = None
           ) -> tuple[list[str], bool]:
    """Submit the named points (throttled by state.max_running on SLURM); records every job id in sweep.json.
    Returns the points submitted, and whether the user stopped a local run (then nothing further starts)."""
    lanes = _lanes(state, states) if state.max_running and executor.name == "slurm" else None
    done, stopped = [], False
    try:
        for name in names:
            record = state.points[name]
            after = None
            if lanes is not None and len(lanes) >= state.max_running:
                after = lanes.pop(0)
            submission = executor.submit(record.job, (lambda s, n=name: announce(n, s)) if announce else None,
                                         after=after)
            if lanes is not None:
                lanes.append(submission.job_id)
            state.record(name, submission.job_id, executor.name, action, after)
            done.append(name)
            if len(done) % 100 == 0:
                write_state(path, state)
            if submission.exit_code and record.job.preempted.exists():  # a local run stopped at a checkpoint
                stopped = True
                break
    finally:
        write_state(path, state)
    return done, stopped


def _lanes(state: SweepState, states: dict[Path, JobState]) -> list[str]:
    """The active jobs of the sweep that further points may wait for: the newest `max_running` of them, oldest
    first (each a lane's tail)."""
    active = []
    for record in state.points.values():
        current = states.get(record.job.path)
        if current is not None and current.active and current.job_id:
            submitted = next((j["time"] for j in reversed(record.job_ids) if j["id"] == current.job_id), "")
            active.append((submitted, current.job_id))
    return [job_id for _, job_id in sorted(active)][-state.max_running:]


def to_submit(state: SweepState, names: Sequence[str], states: dict[Path, JobState], executor: str) -> list[str]:
    """Points a submission should start: never submitted ones, and with the local executor also those stopped at a
    checkpoint (Ctrl-C). Queued, running and ended ones are left alone (retry is for what failed)."""
    wanted = {"NOT_SUBMITTED"} | ({"PREEMPTED"} if executor == "local" else set())
    return [n for n in names if states[state.points[n].job.path].state in wanted]


@dataclass(frozen=True)
class RetryChoice:
    retry: list[str]
    repeating: dict[str, str]
    """Point -> the failure a plain retry would meet again (retried only with --force)."""
    ineligible: dict[str, str]
    """Point -> its state, for points that are completed, queued, running or never submitted."""


def choose_retries(state: SweepState, names: Sequence[str], states: dict[Path, JobState], force: bool
                   ) -> RetryChoice:
    """Failed, timed-out, cancelled, requeue-exhausted or lost points; never completed or active ones. A failure
    that would repeat (a refused config or input, out of memory) is left out unless `force`, with its reason."""
    retry, repeating, ineligible = [], {}, {}
    for name in names:
        record = state.points[name]
        current = states[record.job.path]
        if current.state not in RETRYABLE:
            ineligible[name] = current.state
            continue
        error = read_error(record.job)
        if not force and current.state == "OUT_OF_MEMORY":
            repeating[name] = "out of memory (SLURM): it would fail again; fix the config, or --force"
        elif not force and error is not None and error[0] in REPEATING_ERRORS:
            repeating[name] = f"{error[0]}: {error[1]} (it would fail again; fix it, or --force)"
        else:
            retry.append(name)
    return RetryChoice(retry, repeating, ineligible)


def select(state: SweepState, points: Sequence[str] | None) -> list[str]:
    """The named points (all when none are named); an unknown name is refused with the known ones."""
    if not points:
        return list(state.points)
    unknown = [p for p in points if p not in state.points]
    if unknown:
        known = ", ".join(list(state.points)[:10]) + (" ..." if len(state.points) > 10 else "")
        raise ConfigError([f"--points: no point named {p} in sweep {state.name} (points: {known})" for p in unknown],
                          "invalid arguments")
    return list(points)
