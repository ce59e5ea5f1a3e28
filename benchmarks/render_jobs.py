"""Render N job directories (what a large sweep does) and compare with the bare file-writing floor.

    python benchmarks/render_jobs.py [--jobs 1000] [--rounds 3]

Rows, in one run on the same disk: `floor` writes the same files with no validation or rendering;
`validate` resolves and checks each config (YAML + env + CLI + profile + cross-field checks);
`render` adds the Jinja script; `anvil` is the whole path submit.py takes (validate, render, atomic
job directory, submit.json with git provenance). Medians of several rounds. Goal: anvil < 5 s / 1,000.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from trainer.core import jobdir  # noqa: E402
from trainer.core.checks import all_problems  # noqa: E402
from trainer.core.jobdir import job_dir, record_submission, write_job  # noqa: E402
from trainer.core.layers import load_config  # noqa: E402
from trainer.launch.render import render_script  # noqa: E402


def overrides(i: int) -> list[str]:
    return [f"job.name=bench-{i}", f"optim.lr={1e-4 * (1 + i % 17)}", f"train.seed={i}", "cluster.profile=lumi",
            "cluster.account=project_465000001", "cluster.nodes=4", "train.global_batch_size=256"]


def floor(root: Path, n: int, script: str, config: str) -> None:
    for i in range(n):
        path = root / f"bench-{i}"
        (path / jobdir.LOGS).mkdir(parents=True)
        (path / jobdir.CHECKPOINTS).mkdir()
        (path / jobdir.CONFIG).write_text(config)
        (path / jobdir.SCRIPT).write_text(script)
        (path / jobdir.SUBMISSIONS).write_text("{}")


def validate(root: Path, n: int) -> None:
    for i in range(n):
        all_problems(load_config(None, overrides(i)), filesystem=False)


def validate_render(root: Path, n: int) -> None:
    for i in range(n):
        cfg = load_config(None, overrides(i))
        all_problems(cfg, filesystem=False)
        render_script(cfg, root / cfg.job.name)


def anvil(root: Path, n: int) -> None:
    for i in range(n):
        cfg = load_config(None, overrides(i))
        all_problems(cfg, filesystem=False)
        job = job_dir(root, cfg.job.name)
        write_job(cfg, render_script(cfg, job.path), job)
        record_submission(job, "slurm", ["sbatch", "--parsable", str(job.script)], str(1000 + i))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to create them (default: the system temp dir)")
    args = parser.parse_args()
    os.environ.pop("ANVIL_JOBS_DIR", None)

    sample = load_config(None, overrides(0))
    script = render_script(sample, Path("/tmp/bench-0"))
    config = sample.model_dump_json(indent=2)
    variants = {
        "floor": lambda root: floor(root, args.jobs, script, config),
        "validate": lambda root: validate(root, args.jobs),
        "validate+render": lambda root: validate_render(root, args.jobs),
        "anvil (submit path)": lambda root: anvil(root, args.jobs),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleaved rounds: machine noise hits every variant alike
        for name, run in variants.items():
            root = Path(tempfile.mkdtemp(prefix="anvil-bench-", dir=args.dir))
            start = time.perf_counter()
            run(root)
            times[name].append(time.perf_counter() - start)
            shutil.rmtree(root)

    base = statistics.median(times["floor"])
    where = args.dir or tempfile.gettempdir()
    title = f"{args.jobs} job directories in {where}, median of {args.rounds} rounds ({os.cpu_count()} cores)"
    table = Table(title=title)
    for column in ("variant", "seconds", "ms / job", "× floor"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, values in times.items():
        median = statistics.median(values)
        table.add_row(name, f"{median:.2f}", f"{1000 * median / args.jobs:.2f}", f"{median / base:.1f}")
    Console().print(table)
    verdict = "meets" if statistics.median(times["anvil (submit path)"]) < 5 * args.jobs / 1000 else "misses"
    print(f"goal (< 5 s per 1,000 jobs): {verdict}")


if __name__ == "__main__":
    main()
