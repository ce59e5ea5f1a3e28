"""The status of many jobs at once: each job's state from its executor (one query for all), joined with its job
directory (the newest metrics row, the restart count, the reason it failed). Never fails on a job that left the
queue, was never submitted, or has a missing or half-written metrics file; reads nothing from the network.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from trainer.core.jobdir import JobDir
from trainer.launch.executor import Executor, JobState
from trainer.launch.executors import executor_for
from trainer.launch.sweep.spec import format_value

_TAIL_BYTES = 16384


def last_metrics(job: JobDir) -> dict[str, Any]:
    """The newest training row of metrics.jsonl (with `loss`), from the file's tail; {} if there is none yet."""
    try:
        with open(job.metrics, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return {}
    for line in reversed(tail.splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash, or the cut at the start of the tail
            continue
        if isinstance(row, dict) and "loss" in row and "step" in row:
            return row
    return {}


def _total_steps(job: JobDir) -> int | None:
    try:
        return int(json.loads(job.config.read_text())["train"]["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _restarts(job: JobDir) -> int:
    try:
        return int(job.restarts.read_text().strip())
    except (OSError, ValueError):
        return 0


@dataclass(frozen=True)
class JobRow:
    job: str
    path: str
    state: str
    job_id: str | None
    source: str
    detail: str
    step: int | None
    steps: int | None
    loss: float | None
    tokens_per_s: float | None
    eta_s: float | None
    restarts: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def job_row(job: JobDir, state: JobState) -> JobRow:
    metrics = last_metrics(job)
    step, steps = metrics.get("step"), _total_steps(job)
    step_time = metrics.get("step_time_s")
    eta = None
    if state.state == "RUNNING" and isinstance(step, int) and steps and isinstance(step_time, int | float):
        eta = max(steps - step, 0) * step_time
    loss = metrics.get("loss")
    return JobRow(job=job.name, path=str(job.path), state=state.state, job_id=state.job_id, source=state.source,
                  detail=state.detail, step=step if isinstance(step, int) else None, steps=steps,
                  loss=float(loss) if isinstance(loss, int | float) else None,
                  tokens_per_s=metrics.get("tokens_per_s"), eta_s=eta, restarts=_restarts(job))


def executor_of(job: JobDir) -> str:
    """The executor of the job's latest submission (auto when it was never submitted)."""
    try:
        return json.loads(job.submissions.read_text())["submissions"][-1]["executor"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "auto"


def job_rows(jobs: Sequence[JobDir], executor: Executor | None = None) -> list[JobRow]:
    """Rows for every job, in order: one state query per executor in use (SLURM: one squeue for all)."""
    groups: dict[str, list[JobDir]] = {}
    if executor is not None:
        groups[executor.name] = list(jobs)
    else:
        for job in jobs:
            groups.setdefault(executor_of(job), []).append(job)
    states: dict[Path, JobState] = {}
    for name, group in groups.items():
        states.update((executor if executor is not None else executor_for(name)).states(group))
    return [job_row(job, states[job.path]) for job in jobs]


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return ""
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(seconds % 60):02d}s"


STATE_STYLE = {"RUNNING": "green", "COMPLETED": "bold green", "PENDING": "yellow", "FAILED": "red",
               "CANCELLED": "magenta", "TIMEOUT": "red", "UNKNOWN": "red", "PREEMPTED": "cyan"}


def status_table(rows: Sequence[JobRow], title: str, values: Sequence[dict[str, Any]] | None = None,
                 names: Sequence[str] | None = None) -> Table:
    """A row per job: name, the swept values (if any), state, step / total, loss, tokens/s, ETA, restarts; the
    counts by state as the caption."""
    table = Table(title=title, title_justify="left")
    table.add_column("point" if values is not None else "job")
    keys = list(values[0]) if values else []
    for key in keys:
        table.add_column(key.rsplit(".", 1)[-1], justify="right")
    for column in ("state", "step", "loss", "tok/s", "ETA", "restarts", "job id / reason"):
        table.add_column(column, justify="left" if column in ("state", "job id / reason") else "right")
    for i, row in enumerate(rows):
        step = "" if row.step is None else f"{row.step}/{row.steps or '?'}"
        cells = [names[i] if names else row.job]
        cells += [format_value(values[i].get(k)) for k in keys] if values else []
        state = Text(row.state, style=STATE_STYLE.get(row.state, ""))
        tail = [step, "" if row.loss is None else f"{row.loss:.4f}",
                "" if row.tokens_per_s is None else f"{row.tokens_per_s:,.0f}", _duration(row.eta_s),
                str(row.restarts) if row.restarts else "", " ".join(filter(None, [row.job_id or "", row.detail]))]
        table.add_row(*map(Text, cells), state, *map(Text, tail))  # Text: names and reasons are not markup
    counts = Counter(row.state for row in rows)
    table.caption = ", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    table.caption_justify = "left"
    return table

