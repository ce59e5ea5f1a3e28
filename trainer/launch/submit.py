"""`submit.py`: validate a config, create its job directory, submit it (sbatch or the local executor).

Non-interactive by design: everything is decided by arguments, and every refusal says how to proceed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from trainer.core.checks import all_problems, submit_problems
from trainer.core.commands import command
from trainer.core.errors import AnvilError, run_command
from trainer.core.jobdir import (
    JobDir,
    JobDirError,
    check_replaceable,
    holds,
    job_dir,
    jobs_root,
    latest_complete,
    write_job,
    write_plan,
)
from trainer.core.layers import ConfigError, as_submitted, load_config
from trainer.core.states import EXIT_REFUSED
from trainer.launch.executor import Submission
from trainer.launch.executors import executor_for
from trainer.launch.planning import memory_wanted, plan_jobs, print_plans
from trainer.launch.render import RenderError, render_script


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command("submit"),
        description="Validate a config, create jobs/<name>/ and submit it to SLURM (or run it locally).",
        epilog="Overrides take dotted paths: optim.lr=1e-3 cluster.nodes=2 'data.datasets=[{path: data/x}]'. "
        "Environment: ANVIL_<SECTION>__<FIELD>=value. Precedence: defaults < cluster profile < YAML < env < CLI.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="a YAML config file (optional), then overrides")
    p.add_argument("--name", help="job name (same as job.name=NAME)")
    p.add_argument("--cluster", metavar="PROFILE", help="cluster profile (same as cluster.profile=PROFILE)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the script (exactly, to stdout); write and submit nothing")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--plan", action="store_true",
                   help="print the job's plan (memory per rank, speed, cost, checkpoint, data), write nothing")
    p.add_argument("--force", action="store_true",
                   help="submit a job even if it is planned not to fit its devices, and replace the config and script "
                   "of an existing job of this name (its logs and checkpoints stay)")
    p.add_argument("--executor", choices=("auto", "slurm", "local"), default="auto",
                   help="slurm: sbatch; local: run here as a one-node allocation; auto: slurm if sbatch exists")
    p.add_argument("--jobs-dir", help="where job directories go (default: $ANVIL_JOBS_DIR or jobs/)")
    return p


def split_items(items: Sequence[str]) -> tuple[Path | None, list[str]]:
    """`[CONFIG.yaml] [key=value ...]`: the optional config file first, then overrides."""
    config_file, overrides = None, []
    for i, item in enumerate(items):
        if "=" in item:
            overrides.append(item)
        elif i == 0:
            config_file = Path(item)
            if not config_file.exists() and config_file.suffix not in (".yaml", ".yml"):
                raise ConfigError(
                    [f"'{item}' is neither a YAML config file nor an override (which looks like section.field=value)"],
                    "invalid arguments",
                )
        else:
            raise ConfigError(
                [f"'{item}': only the first argument may be a config file; overrides look like section.field=value"],
                "invalid arguments",
            )
    return config_file, overrides


def _print_exactly(out: Console, text: str, lexer: str) -> None:
    """Highlighted on a terminal; byte for byte otherwise (`--dry-run > job.sh` must be the script itself)."""
    if out.is_terminal:
        out.print(Syntax(text, lexer, theme="ansi_dark", word_wrap=True))
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """`submit.py [CONFIG.yaml] [key=value ...] [options]`; returns the exit code."""
    return run_command(_submit, argv)


def _submit(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    if not args.items and args.name is None and "ANVIL_JOB__NAME" not in os.environ:
        parser.print_usage(sys.stderr)
        err.print(f"{parser.prog}: give a config file (e.g. configs/demo.yaml), or --name NAME to run on the "
                  f"defaults; {parser.prog} --help for more", markup=False, soft_wrap=True)
        return EXIT_REFUSED
    config_file, overrides = split_items(args.items)
    if args.name is not None:
        overrides.append(f"job.name={args.name}")
    if args.cluster is not None:
        overrides.append(f"cluster.profile={args.cluster}")
    cfg = as_submitted(load_config(config_file, overrides))
    executor = executor_for(args.executor)
    # A plan is made anywhere (a laptop, before the data is copied): only the config's own consistency counts.
    problems = all_problems(cfg, filesystem=False) if args.plan else submit_problems(cfg, executor.name)
    if problems:
        raise ConfigError(problems)

    if args.print_config:
        _print_exactly(out, cfg.model_dump_json(indent=2), "json")
        return 0
    if args.plan:
        plan = plan_jobs([cfg], memory=True)[0]
        print_plans(out, [plan])
        return EXIT_REFUSED if plan.problems else 0

    try:
        job = job_dir(jobs_root(args.jobs_dir), cfg.job.name)
        script = render_script(cfg, job.path)
    except (JobDirError, RenderError) as exc:
        raise JobDirError(f"cannot create the job: {exc}") from None

    plan = plan_jobs([cfg], memory=memory_wanted(cfg), alternatives=not args.force)[0]
    if plan.stops(args.force):
        print_plans(err, [plan])
        raise ConfigError(plan.problems + (["or submit it anyway with --force"] if plan.fits is False else []),
                          "the job's plan")
    if plan.problems:
        err.print(f"anvil: --force: submitting although {plan.problems[0]}", markup=False, soft_wrap=True)
    if plan.memory_skipped and memory_wanted(cfg):
        err.print(f"anvil: {plan.memory_skipped}", markup=False, soft_wrap=True)

    same = holds(job, cfg)
    # Finished: DONE, and its newest checkpoint is the last step (deleted since: it runs again from the newest).
    finished = same and job.done.is_file() and latest_complete(job.checkpoints) == cfg.train.steps
    if args.dry_run:
        _print_exactly(out, script, "bash")
        command = " ".join(executor.command(job))
        if finished:
            what = f"job {cfg.job.name} has finished (DONE), so a submit would do nothing"
        elif same:
            what = f"would resume the job in {job.path}/ ({_resumes_from(job)}) with: {command}"
        elif job.path.exists():
            try:
                check_replaceable(cfg, job, args.force)  # refuses as the submit would
            except JobDirError as exc:
                raise JobDirError(f"a submit would refuse: {exc}") from None
            what = f"would replace the config and script in {job.path}/ (it resumes) and run: {command}"
        else:
            what = f"would write {job.path}/ and run: {command}"
        err.print(f"dry run: {what}", markup=False, soft_wrap=True)
        return 0
    if finished:
        ended = job.outcome()
        out.print(f"anvil: job {cfg.job.name} has finished (DONE: {ended[1] if ended else '?'}); nothing to run. "
                  "To train on, raise train.steps (with --force: it resumes from its last checkpoint); for a new run, "
                  "--name",
                  markup=False, soft_wrap=True)
        return 0

    if job.path.exists():
        state = executor.states([job])[job.path]
        if state.active:
            raise AnvilError(
                f"job '{cfg.job.name}' is already queued or running as {executor.name.upper()} job {state.job_id}: a "
                f"second copy would write the same checkpoints. Wait for it, or "
                + (f"`scancel {state.job_id}` first." if executor.name == "slurm" else "stop it (Ctrl-C) first."))
    try:
        created = write_job(cfg, script, job, force=args.force)
    except JobDirError as exc:
        raise JobDirError(f"cannot create the job: {exc}") from None
    write_plan(job, plan.to_dict())

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("job", cfg.job.name)
    table.add_row("directory", f"{job.path}" + ("" if created else "  (existing job: it resumes)"))
    table.add_row("ranks", f"{cfg.cluster.nodes} node(s) × {cfg.cluster.devices_per_node} ({cfg.cluster.profile})")

    def announce(submission: Submission) -> None:
        log = job.log(submission.job_id)
        if executor.name == "slurm":
            table.add_row("SLURM job", submission.job_id)
            table.add_row("logs", f"{log} (.err)")
            table.add_row("watch", f"squeue -j {submission.job_id}; tail -f {log}")
            table.add_row("resubmit", f"sbatch {job.script}")
        else:
            table.add_row("local run", submission.job_id)
            table.add_row("logs", f"{log} (.err)")
        out.print(table)

    submission = executor.submit(job, announce)
    if submission.exit_code is None:
        return 0
    out.print(f"anvil: job {cfg.job.name} {_outcome(job, submission.exit_code)}", markup=False, soft_wrap=True)
    return submission.exit_code


def _resumes_from(job: JobDir) -> str:
    step = latest_complete(job.checkpoints)
    return "from the start: no whole checkpoint yet" if step is None else f"from its checkpoint of step {step}"


def _outcome(job: JobDir, rc: int) -> str:
    if rc == 0:
        return "finished (DONE)"
    if job.preempted.exists():
        return "stopped at a checkpoint; run the same command again to resume"
    if not job.failed.is_file():  # a full disk: the reason could only go to this terminal
        return f"stopped with exit code {rc}; its reason is above ({job.failed} could not be written)"
    return f"stopped with exit code {rc}; see {job.failed} and the logs"


if __name__ == "__main__":
    sys.exit(main())
