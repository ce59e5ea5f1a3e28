"""`submit.py`: validate a config, create its job directory, submit it (sbatch or the local executor).

Non-interactive by design: everything is decided by arguments, and every refusal says how to proceed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from trainer import lifecycle, slurm
from trainer.config import AnvilConfig
from trainer.config_checks import all_problems
from trainer.config_sources import ConfigError, load_config
from trainer.jobdir import (
    REPO_ROOT,
    JobDir,
    JobDirError,
    job_dir,
    jobs_root,
    known_job_ids,
    record_submission,
    write_job,
)
from trainer.local_executor import new_job_id, run_local
from trainer.render import RenderError, render_script

EXIT_INVALID = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="submit.py",
        description="Validate a config, create jobs/<name>/ and submit it to SLURM (or run it locally).",
        epilog="Overrides take dotted paths: optim.lr=1e-3 cluster.nodes=2 'data.datasets=[{path: data/x}]'. "
        "Environment: ANVIL_<SECTION>__<FIELD>=value. Precedence: defaults < cluster profile < YAML < env < CLI.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="a YAML config file (optional), then overrides")
    p.add_argument("--name", help="job name (same as job.name=NAME)")
    p.add_argument("--cluster", metavar="PROFILE", help="cluster profile (same as cluster.profile=PROFILE)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the script; write and submit nothing")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--force", action="store_true",
                   help="replace the config and script of an existing job of this name (its logs and checkpoints stay)")
    p.add_argument("--executor", choices=("auto", "slurm", "local"), default="auto",
                   help="slurm: sbatch; local: run here as a one-node allocation; auto: slurm if sbatch exists")
    p.add_argument("--jobs-dir", help="where job directories go (default: $ANVIL_JOBS_DIR or jobs/)")
    return p


def _split_items(items: list[str]) -> tuple[Path | None, list[str]]:
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


def _absolute_paths(cfg: AnvilConfig) -> AnvilConfig:
    """Relative paths are relative to where submit.py runs; the frozen config holds absolute ones."""
    def absolute(path: str) -> str:
        return str(Path(path).expanduser().absolute())

    data = cfg.data.model_copy(update={
        "datasets": [d.model_copy(update={"path": absolute(d.path)}) for d in cfg.data.datasets],
        "tokenizer": absolute(cfg.data.tokenizer) if cfg.data.tokenizer else None,
    })
    cluster = cfg.cluster
    update = {"venv": absolute(cluster.venv) if cluster.venv else None}
    if cluster.container is not None:
        update["container"] = cluster.container.model_copy(update={"image": absolute(cluster.container.image)})
    return cfg.model_copy(update={"data": data, "cluster": cluster.model_copy(update=update)})


def _fail(err: Console, message: str) -> int:
    err.print(message, style="red", markup=False, soft_wrap=True)  # no markup: messages quote user input verbatim
    return EXIT_INVALID


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    try:
        config_file, overrides = _split_items(args.items)
        if args.name is not None:
            overrides.append(f"job.name={args.name}")
        if args.cluster is not None:
            overrides.append(f"cluster.profile={args.cluster}")
        cfg = _absolute_paths(load_config(config_file, overrides))
        executor = args.executor
        if executor == "auto":
            executor = "slurm" if slurm.available() else "local"
        problems = all_problems(cfg)
        if executor == "local" and cfg.cluster.nodes > 1:
            problems.append(f"cluster.nodes: the local executor runs one node, not {cfg.cluster.nodes}; "
                            "set cluster.nodes=1 or submit to a SLURM cluster")
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        return _fail(err, str(exc))

    if args.print_config:
        out.print_json(cfg.model_dump_json())
        return 0

    try:
        job = job_dir(jobs_root(args.jobs_dir), cfg.job.name)
        script = render_script(cfg, job.path, REPO_ROOT)
    except (JobDirError, RenderError) as exc:
        return _fail(err, f"cannot create the job: {exc}")

    if args.dry_run:
        out.print(Syntax(script, "bash", theme="ansi_dark", word_wrap=True))
        command = slurm.sbatch_command(job.script) if executor == "slurm" else ["(local executor)", str(job.script)]
        out.print(f"dry run: would write {job.path}/ and run: {' '.join(command)}", markup=False, soft_wrap=True)
        return 0

    if executor == "slurm" and job.path.exists():
        active = [i for i in known_job_ids(job)[-5:] if slurm.job_state(i) in slurm.ACTIVE_STATES]
        if active:
            return _fail(err, f"job '{cfg.job.name}' is already queued or running as SLURM job {active[-1]}: a second "
                              f"copy would write the same checkpoints. Wait for it, or `scancel {active[-1]}` first.")
    try:
        created = write_job(cfg, script, job, force=args.force)
    except JobDirError as exc:
        return _fail(err, f"cannot create the job: {exc}")

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("job", cfg.job.name)
    table.add_row("directory", f"{job.path}" + ("" if created else "  (existing job: it resumes)"))
    table.add_row("ranks", f"{cfg.cluster.nodes} node(s) × {cfg.cluster.devices_per_node} ({cfg.cluster.profile})")
    if executor == "slurm":
        return _submit_to_slurm(cfg, job, table, out, err)
    return _run_here(cfg, job, table, out)


def _submit_to_slurm(cfg: AnvilConfig, job: JobDir, table: Table, out: Console, err: Console) -> int:
    command = slurm.sbatch_command(job.script)
    try:
        job_id = slurm.sbatch(job.script)
    except slurm.SlurmError as exc:
        record_submission(job, "slurm", command, None)
        return _fail(err, f"submission failed: {exc}\n  The job directory is ready; resubmit with: sbatch {job.script}")
    record_submission(job, "slurm", command, job_id)
    log = f"{job.logs}/{cfg.job.name}-{job_id}.out"
    table.add_row("SLURM job", job_id)
    table.add_row("logs", f"{log} (.err)")
    table.add_row("watch", f"squeue -j {job_id}; tail -f {log}")
    table.add_row("resubmit", f"sbatch {job.script}")
    out.print(table)
    return 0


def _run_here(cfg: AnvilConfig, job: JobDir, table: Table, out: Console) -> int:
    job_id = new_job_id()
    record_submission(job, "local", ["bash", str(job.script)], job_id)
    table.add_row("local run", job_id)
    table.add_row("logs", f"{job.logs}/{cfg.job.name}-{job_id}.out (.err)")
    out.print(table)
    rc = run_local(cfg, job, job_id)
    if rc == 0:
        outcome = "finished (DONE)"
    elif (job.path / lifecycle.PREEMPTED).exists():
        outcome = "stopped at a checkpoint; run the same command again to resume"
    else:
        outcome = f"stopped with exit code {rc}; see {job.path}/{lifecycle.FAILED} and the logs"
    out.print(f"anvil: job {cfg.job.name} {outcome}", markup=False, soft_wrap=True)
    return rc
