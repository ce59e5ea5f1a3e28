"""A sweep's own state: `sweeps/<name>/sweep.json` (its points, their values and job directories, every job id ever
submitted for each), beside a copy of the sweep file as last submitted, the summary table and the plots.

The job directories themselves stay ordinary: `sbatch jobs/<job>/slurm.sh` resubmits a point on its own.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.core.commands import command
from trainer.core.files import write_atomic
from trainer.core.jobdir import JobDir, JobDirError, contained, tool_root

SWEEP_JSON = "sweep.json"
SWEEP_FILE = "sweep.yaml"
SUMMARY = "summary.csv"


def sweeps_root(override: str | None = None) -> Path:
    """`--sweeps-dir`, else $ANVIL_SWEEPS_DIR, else `sweeps/`."""
    return tool_root(override, "ANVIL_SWEEPS_DIR", "sweeps")


def sweep_path(root: Path, name: str) -> Path:
    """`root/<name>`, which can never lie outside `root`."""
    return contained(root, name, "sweep")


@dataclass
class PointRecord:
    name: str
    job_dir: str
    values: dict[str, Any]
    job_ids: list[dict[str, Any]] = field(default_factory=list)
    """Every submission: {id, time, executor, action (submit | retry), after (the job it waited for)}."""

    @property
    def job(self) -> JobDir:
        return JobDir(Path(self.job_dir))


@dataclass
class SweepState:
    name: str
    file: str
    executor: str
    max_running: int | None = None
    points: dict[str, PointRecord] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _now())

    def record(self, point: str, job_id: str, executor: str, action: str, after: str | None) -> None:
        self.points[point].job_ids.append({"id": job_id, "time": _now(), "executor": executor, "action": action,
                                           "after": after})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def read_state(path: Path) -> SweepState:
    """The sweep at `path` (a sweep directory), or a JobDirError saying what is wrong with it."""
    try:
        data = json.loads((path / SWEEP_JSON).read_text(encoding="utf-8"))
        points = {p["name"]: PointRecord(**p) for p in data.pop("points").values()}
        return SweepState(**data, points=points)
    except FileNotFoundError:
        raise JobDirError(f"{path} is not a sweep (no {SWEEP_JSON}); {command('sweep')} submit FILE creates one"
                          ) from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise JobDirError(f"{path / SWEEP_JSON} cannot be read ({exc}); it is the sweep's state: restore it from "
                          "a backup, or submit the sweep file again under a new name") from None


def write_state(path: Path, state: SweepState) -> None:
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / SWEEP_JSON, state.to_json())
