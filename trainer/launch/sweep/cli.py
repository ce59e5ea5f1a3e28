"""`sweep.py submit|status|cancel|retry|summarize|plot`: every verb is one short process that reads the sweep's
files and asks the queue once; no daemon, no terminal kept open (`status --watch` is only a view)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from trainer.core.commands import command
from trainer.core.errors import run_command
from trainer.core.jobdir import JobDir, JobDirError, jobs_root, write_plan
from trainer.core.layers import ConfigError
from trainer.core.states import EXIT_REFUSED, PREEMPTED_EXIT, SETTLED
from trainer.launch.executor import Submission
from trainer.launch.executors import executor_for
from trainer.launch.planning import memory_wanted, plan_jobs, plans_table
from trainer.launch.status import job_rows, status_table
from trainer.launch.sweep import results, run
from trainer.launch.sweep.spec import format_value, read_sweep
from trainer.launch.sweep.state import SUMMARY, SWEEP_JSON, SweepState, read_state, sweep_path, sweeps_root


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command("sweep"), description="SLURM-native sweeps over ordinary job directories.")
    p.add_argument("--sweeps-dir", help="where sweeps live (default: $ANVIL_SWEEPS_DIR or sweeps/)")
    p.add_argument("--jobs-dir", help="where job directories go (default: $ANVIL_JOBS_DIR or jobs/)")
    verbs = p.add_subparsers(dest="verb", required=True)

    s = verbs.add_parser("submit", help="validate every point, write the job directories and sweep.json, submit")
    s.add_argument("items", nargs="+", metavar="FILE [key=value ...]", help="the sweep file, then overrides")
    s.add_argument("--dry-run", action="store_true", help="validate and list the points; write and submit nothing")
    s.add_argument("--max-running", type=int, metavar="N",
                   help="at most N points queued to start at once (SLURM dependencies; no daemon)")
    s.add_argument("--executor", choices=("auto", "slurm", "local"), default="auto")
    s.add_argument("--force", action="store_true", help="replace the config of points whose job exists differently, "
                   "and submit points planned not to fit their devices")
    s.add_argument("--plan", action="store_true",
                   help="print every point's plan (memory per rank, speed, cost, data) as a table; write nothing")

    st = verbs.add_parser("status", help="one table for a sweep (or for job directories): one squeue for all")
    st.add_argument("targets", nargs="+", metavar="SWEEP | JOB_DIR", help="sweeps/<name>, a sweep name, or jobs/<x>")
    st.add_argument("--watch", action="store_true", help="refresh in place until every job has ended (Ctrl-C stops)")
    st.add_argument("--interval", type=float, default=10.0, help="seconds between refreshes with --watch")
    st.add_argument("--json", action="store_true", help="print the rows as JSON (for scripts)")

    c = verbs.add_parser("cancel", help="cancel the sweep's queued and running points (or the ones named)")
    c.add_argument("sweep")
    c.add_argument("--points", nargs="+", metavar="POINT")

    r = verbs.add_parser("retry", help="resubmit failed, timed-out, cancelled or lost points (never completed ones)")
    r.add_argument("sweep")
    r.add_argument("--points", nargs="+", metavar="POINT")
    r.add_argument("--force", action="store_true", help="also retry failures that would repeat (config, OOM)")
    r.add_argument("--max-running", type=int, metavar="N", help="throttle as for submit (default: as submitted)")
    r.add_argument("--dry-run", action="store_true", help="list what would be retried")

    m = verbs.add_parser("summarize", help="final and best metrics per point: a table and sweeps/<name>/summary.csv")
    m.add_argument("sweep")
    m.add_argument("--metrics", nargs="+",
                   help=f"metrics of metrics.jsonl (default: those of {', '.join(results.METRICS)} the points log)")
    m.add_argument("-o", "--output", type=Path, help="the CSV file (default: sweeps/<name>/summary.csv)")

    pl = verbs.add_parser("plot", help="PNG figures: loss curves per point; a final metric against a swept axis")
    pl.add_argument("sweep")
    pl.add_argument("--x", help="the swept key on the x axis (default: the first)")
    pl.add_argument("--hue", help="one curve per value of this swept key (default: the second, if any)")
    pl.add_argument("--metric", default="loss", help="the metric (default: loss)")
    pl.add_argument("--out", type=Path, help="the folder for the PNG files (default: the sweep's folder)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`sweep.py VERB ...`; returns the exit code."""
    return run_command(_sweep, argv)


def _sweep(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)  # tables whole in logs and pipes
    verb = {"submit": _submit, "status": _status, "cancel": _cancel, "retry": _retry, "summarize": _summarize,
            "plot": _plot}[args.verb]
    return verb(args, out)


def _sweep_dir(args: argparse.Namespace, target: str) -> Path:
    """A sweep folder given as a path (sweeps/<name>) or a name."""
    path = Path(target)
    if (path / SWEEP_JSON).is_file():
        return path.resolve()
    return sweep_path(sweeps_root(args.sweeps_dir), target)


def _states(state: SweepState, executor_name: str | None = None):
    executor = executor_for(executor_name or state.executor)
    jobs = [record.job for record in state.points.values()]
    return executor, executor.states(jobs)


def _submit(args: argparse.Namespace, out: Console) -> int:
    file, overrides = Path(args.items[0]), args.items[1:]
    if args.max_running is not None and args.max_running < 1:
        raise ConfigError(["--max-running: must be at least 1"], "invalid arguments")
    sweep = read_sweep(file)
    path = sweep_path(sweeps_root(args.sweeps_dir), sweep.name)
    executor = executor_for(args.executor)
    planned, invalid = run.plan(sweep, overrides, jobs_root(args.jobs_dir), executor.name, force=args.force)
    if invalid and not sweep.spec.skip_invalid:
        raise run.refuse(invalid, len(sweep.points))
    for name, problems in invalid.items():
        out.print(f"left out (skip_invalid): {name}: {problems[0]}", markup=False, soft_wrap=True)
    if sweep.skipped:
        out.print(f"left out by skip rules: {len(sweep.skipped)} point(s)", markup=False)
    plans = plan_jobs([item.cfg for item in planned],  # alternatives: per point with submit.py --plan
                      memory=args.plan or any(memory_wanted(item.cfg) for item in planned), alternatives=False)
    if args.plan:
        out.print(plans_table(f"sweep {sweep.name}: the plan of {len(planned)} points (nothing written)",
                              [item.point.name for item in planned], plans))
        return EXIT_REFUSED if any(plan.problems for plan in plans) else 0
    kept = []
    for item, plan in zip(planned, plans, strict=True):
        if not plan.stops(args.force):
            kept.append((item, plan))
            continue
        out.print(f"left out: {item.point.name}: {plan.problems[0]}" + (
            f" (submit it anyway with --force; `{command('submit')} --plan` with its config lists changes "
            "that fit)" if plan.fits is False else ""), markup=False, soft_wrap=True)
    if planned and not kept:
        raise ConfigError([f"point {item.point.name}: {plan.problems[0]}"
                           for item, plan in zip(planned, plans, strict=True)], "the sweep's plan: no point can run")
    planned, plans = [item for item, _ in kept], [plan for _, plan in kept]
    if args.dry_run:
        table = Table(title=f"sweep {sweep.name}: {len(planned)} points (dry run: nothing written)",
                      title_justify="left")
        for column in ("point", *sweep.keys, "job directory"):
            table.add_column(column)
        for item in planned:
            table.add_row(item.point.name, *(format_value(item.point.values[k]) for k in sweep.keys),
                          str(item.job.path) + (" (exists)" if item.job.path.exists() else ""))
        out.print(table)
        example = " ".join(executor.command(planned[0].job)) if planned else "nothing"
        out.print(f"dry run: would write {path}/ and the job directories, and submit each point as: {example}",
                  markup=False, soft_wrap=True)
        return 0
    state = run.write(sweep, planned, path, executor.name, args.max_running, force=args.force)
    for item, plan in zip(planned, plans, strict=True):
        write_plan(item.job, plan.to_dict())
    names = [item.point.name for item in planned]
    states = executor.states([state.points[n].job for n in names])
    todo = run.to_submit(state, names, states, executor.name)
    out.print(f"sweep {sweep.name}: {len(names)} points in {path}; submitting {len(todo)} "
              f"({len(names) - len(todo)} already submitted)"
              + (f", at most {state.max_running} at a time" if state.max_running and executor.name == "slurm" else ""),
              markup=False, soft_wrap=True)
    done, stopped = run.submit(executor, state, path, todo, "submit", states, announce=_announcer(out, executor.name))
    return _report_submitted(out, path, done, stopped)


def _announcer(out: Console, executor: str):
    def announce(point: str, submission: Submission) -> None:
        if executor == "local":
            out.rule(f"point {point}: local run {submission.job_id}")
        else:
            out.print(f"  {point}: job {submission.job_id}", markup=False)
    return announce


def _report_submitted(out: Console, path: Path, done: list[str], stopped: bool) -> int:
    if stopped:
        out.print(f"stopped at a checkpoint after {len(done)} point(s): run the same command again to continue",
                  markup=False)
        return PREEMPTED_EXIT
    out.print(f"submitted {len(done)} point(s); watch with: {command('sweep')} status {path}", markup=False)
    return 0


def _targets(args: argparse.Namespace) -> list[tuple[SweepState | None, list[JobDir]]]:
    """Each target: a sweep (its folder, or its name) with its points' jobs, or one job directory."""
    found = []
    for target in args.targets:
        job = JobDir(Path(target).resolve())
        if job.config.is_file() and not (job.path / SWEEP_JSON).is_file():
            found.append((None, [job]))
            continue
        try:
            state = read_state(_sweep_dir(args, target))
        except JobDirError:
            raise JobDirError(f"{target} is neither a sweep (sweeps/<name>, or its name) nor a job directory "
                              f"(jobs/<name>, with its {job.config.name})") from None
        found.append((state, [record.job for record in state.points.values()]))
    return found


def _status_view(args: argparse.Namespace) -> tuple[list, list[Table]]:
    rows_out, tables = [], []
    plain: list[JobDir] = []
    for state, jobs in _targets(args):
        if state is None:
            plain += jobs
            continue
        rows = job_rows(jobs, executor_for(state.executor))
        names = list(state.points)
        values = [record.values for record in state.points.values()]
        tables.append(status_table(rows, f"sweep {state.name}: {len(rows)} points ({state.executor})", values, names))
        rows_out += [{"sweep": state.name, "point": n, "values": v, **r.as_dict()}
                     for n, v, r in zip(names, values, rows, strict=True)]
    if plain:
        rows = job_rows(plain)
        tables.append(status_table(rows, f"{len(rows)} job(s)"))
        rows_out += [r.as_dict() for r in rows]
    return rows_out, tables


def _status(args: argparse.Namespace, out: Console) -> int:
    if args.json:
        rows, _ = _status_view(args)
        sys.stdout.write(json.dumps(rows, indent=1, default=str) + "\n")
        return 0
    if not args.watch:
        _, tables = _status_view(args)
        for table in tables:
            out.print(table)
        return 0
    group = _Tables()
    with Live(group, console=out, auto_refresh=False) as live:
        try:
            while True:
                rows, group.tables = _status_view(args)
                live.update(group, refresh=True)
                if rows and all(r["state"] in SETTLED for r in rows):
                    break
                time.sleep(args.interval)
        except KeyboardInterrupt:
            pass
    return 0


class _Tables:
    """Several tables as one renderable, for rich's Live."""

    def __init__(self) -> None:
        self.tables: list[Table] = []

    def __rich_console__(self, console, options):
        yield from self.tables


def _cancel(args: argparse.Namespace, out: Console) -> int:
    path = _sweep_dir(args, args.sweep)
    state = read_state(path)
    names = run.select(state, args.points)
    executor = executor_for(state.executor)
    ids = executor.cancel([state.points[n].job for n in names])
    out.print(f"cancelled {len(ids)} job(s) of sweep {state.name}: {' '.join(ids) or 'none was queued or running'}",
              markup=False, soft_wrap=True)
    return 0


def _retry(args: argparse.Namespace, out: Console) -> int:
    path = _sweep_dir(args, args.sweep)
    state = read_state(path)
    names = run.select(state, args.points)
    if args.max_running is not None:
        state.max_running = args.max_running
    executor, states = _states(state)
    choice = run.choose_retries(state, names, states, args.force)
    for name, why in choice.repeating.items():
        out.print(f"not retried: {name}: {why}", markup=False, soft_wrap=True)
    if args.points:
        for name, current in choice.ineligible.items():
            out.print(f"not retried: {name}: {current}", markup=False)
    if args.dry_run or not choice.retry:
        out.print(f"{'would retry' if args.dry_run else 'nothing to retry'}: {', '.join(choice.retry) or 'none'}",
                  markup=False, soft_wrap=True)
        return 0
    done, stopped = run.submit(executor, state, path, choice.retry, "retry", states,
                               announce=_announcer(out, executor.name))
    return _report_submitted(out, path, done, stopped)


def _summarize(args: argparse.Namespace, out: Console) -> int:
    path = _sweep_dir(args, args.sweep)
    state = read_state(path)
    _, states = _states(state)
    metrics = args.metrics or list(results.METRICS)
    rows = results.summary(state, {p: s.state for p, s in states.items()}, metrics)
    if not args.metrics:  # the defaults the points actually log
        metrics = [m for m in metrics if any(r[f"final_{m}"] is not None for r in rows)] or metrics[:1]
    keys = list(next(iter(state.points.values())).values) if state.points else []
    out.print(results.summary_table(rows, keys, metrics, f"sweep {state.name}: {len(rows)} points"))
    target = args.output or path / SUMMARY
    results.write_csv(rows, target)
    for metric, (point, value) in results.best_points(rows, metrics).items():
        out.print(f"best final {metric}: {point} ({value:.4f})", markup=False)
    out.print(f"wrote {target}", markup=False)
    return 0


def _plot(args: argparse.Namespace, out: Console) -> int:
    path = _sweep_dir(args, args.sweep)
    state = read_state(path)
    keys = list(next(iter(state.points.values())).values) if state.points else []
    for key in (args.x, args.hue):
        if key is not None and key not in keys:
            raise ConfigError([f"{key} is not a swept key of {state.name} (swept: {', '.join(keys) or 'none'})"],
                              "invalid arguments")
    folder = args.out or path
    folder.mkdir(parents=True, exist_ok=True)
    _, states = _states(state)
    rows = results.summary(state, {p: s.state for p, s in states.items()}, [args.metric])
    written = [results.plot_curves(state, args.metric, folder / f"{args.metric}_curves.png")]
    x = args.x or (keys[0] if keys else None)
    hue = args.hue if args.hue is not None else next((k for k in keys if k != x), None)
    if x is not None:
        title = f"sweep {state.name}: final {args.metric}"
        written.append(results.plot_against(rows, x, hue, args.metric, folder / f"{args.metric}_vs_{x}.png", title))
    out.print("wrote " + ", ".join(str(p) for p in written), markup=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
