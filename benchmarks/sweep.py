"""A 1,000-point sweep: validating and rendering every point, writing the job directories, and the status table.

    python benchmarks/sweep.py [--points 1000] [--rounds 3] [--dir /dev/shm]

Rows, in one run on the same disk, medians of interleaved rounds:
- `floor: write 1,000 job dirs`: the same files with no validation (the disk's own cost);
- `expand + validate + render`: `read_sweep` and `run.plan` for every point (config layers, cross-field and
  filesystem checks against the demo corpus, the batch script), nothing written; goal < 5 s;
- `write job dirs + sweep.json`: what `sweep.py submit` adds before submitting;
- `floor: one squeue`: a bare `squeue` for the same ids (SLURM present), else nothing;
- `status`: `job_rows` (one squeue, the job directories) and the rich table for 1,000 points the cluster has
  forgotten, with metrics files; goal < 1 s for both.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from trainer.core import jobdir  # noqa: E402
from trainer.data.tools import build_demo  # noqa: E402
from trainer.launch.executors import executor_for  # noqa: E402
from trainer.launch.slurm import available  # noqa: E402
from trainer.launch.status import job_rows, status_table  # noqa: E402
from trainer.launch.sweep import run  # noqa: E402
from trainer.launch.sweep.spec import read_sweep  # noqa: E402


def sweep_file(work: Path, points: int, corpus: Path) -> Path:
    lrs = max(points // 100, 1)
    path = work / "bench.yaml"
    path.write_text(json.dumps({
        "name": "bench",
        "overrides": {"data.datasets": [{"path": str(corpus / "train")}],
                      "data.tokenizer": str(corpus / "tokenizer.json"), "cluster.profile": "lumi",
                      "cluster.account": "project_465000001", "cluster.nodes": 4, "cluster.container": None,
                      "train.global_batch_size": 256},
        "axes": {"optim.lr": {"logspace": [1e-4, 1e-2, lrs]}, "optim.weight_decay": {"linspace": [0.0, 0.2, 10]},
                 "train.seed": list(range(10))}}))
    return path


def floor(root: Path, n: int, script: str, config: str) -> None:
    for i in range(n):
        path = root / f"bench.{i}"
        (path / jobdir.LOGS).mkdir(parents=True)
        (path / jobdir.CHECKPOINTS).mkdir()
        (path / jobdir.CONFIG).write_text(config)
        (path / jobdir.SCRIPT).write_text(script)


def fake_history(planned) -> None:
    """What a sweep looks like days later: submitted ids the cluster has forgotten, markers, metrics."""
    for i, item in enumerate(planned):
        job = item.job
        job_id = str(800000 + i)
        job.submissions.write_text(json.dumps({"submissions": [{"job_id": job_id, "executor": "slurm",
                                                                "time": "2026-12-01T10:00:00Z"}]}))
        jobdir.append_event(job, "start", job_id)
        (job.done if i % 3 else job.failed).write_text(f"job {job_id}\n")
        job.metrics.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 100, "tokens_per_s": 1e5,
                                                   "step_time_s": 0.5}) + "\n" for s in range(10, 210, 10)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to work (default: the system temp dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="anvil-sweep-bench-", dir=args.dir))
    build_demo(work / "corpus", max_mb=0.5, vocab_size=512)
    path = sweep_file(work, args.points, work / "corpus")
    slurm = available()
    times: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def timed(name: str):
        start = time.perf_counter()
        yield
        times.setdefault(name, []).append(time.perf_counter() - start)

    for r in range(args.rounds):
        jobs = work / f"jobs-{r}"
        jobs.mkdir()
        with timed("expand + validate + render"):
            sweep = read_sweep(path)
            planned, invalid = run.plan(sweep, [], jobs, "slurm")
        assert not invalid and len(planned) == len(sweep.points), invalid
        with timed("floor: write the job dirs"):
            floor(work / f"floor-{r}", len(planned), planned[0].script, planned[0].cfg.model_dump_json(indent=2))
        with timed("write job dirs + sweep.json"):
            state = run.write(sweep, planned, work / f"sweeps-{r}" / "bench", "slurm", None)
        fake_history(planned)
        if slurm:
            every = ",".join(str(800000 + i) for i in range(len(planned)))
            with timed("floor: one squeue"):
                subprocess.run(["squeue", "-h", "--states=all", "--jobs", every, "--format=%i|%T|%r"],
                               capture_output=True)
        executor = executor_for("slurm" if slurm else "local")
        records = list(state.points.values())
        with timed("status: job_rows"):
            rows = job_rows([rec.job for rec in records], executor)
        with timed("status: the table, rendered"):
            table = status_table(rows, "bench", [rec.values for rec in records], [rec.name for rec in records])
            Console(file=io.StringIO(), width=200).print(table)
        for folder in (jobs, work / f"floor-{r}", work / f"sweeps-{r}"):
            shutil.rmtree(folder)
    shutil.rmtree(work)

    table = Table(title=f"a {args.points}-point sweep in {args.dir or tempfile.gettempdir()}, median of {args.rounds} "
                        f"rounds ({os.cpu_count()} cores; {'SLURM' if slurm else 'no SLURM: local executor'})")
    for column in ("step", "seconds", "ms / point"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for name, values in times.items():
        median = statistics.median(values)
        table.add_row(name, f"{median:.2f}", f"{1000 * median / args.points:.2f}")
    Console().print(table)
    scale = args.points / 1000
    validate = statistics.median(times["expand + validate + render"])
    status_s = statistics.median(times["status: job_rows"]) + statistics.median(times["status: the table, rendered"])
    print(f"goal expand + validate + render < {5 * scale:.1f} s: {'meets' if validate < 5 * scale else 'misses'}; "
          f"goal status < {1 * scale:.1f} s: {'meets' if status_s < 1 * scale else 'misses'}")


if __name__ == "__main__":
    main()
