"""Render `slurm.sh` from the Jinja template and a validated config.

Every `{{ value }}` in the template is shell-quoted by Jinja's `finalize` hook, so quoting is the
default and cannot be forgotten. The only ways around it are the `sbatch` and `envname` filters,
which let through only plain words that need no quoting (`#SBATCH` lines have no shell quoting).
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import shlex
from pathlib import Path

import jinja2

from trainer.core import jobdir, states
from trainer.core.commands import command
from trainer.core.config import ENV_NAME, SBATCH_WORD, SECRET_NAME, AnvilConfig
from trainer.core.errors import AnvilError

TEMPLATES_DIR = Path(str(importlib.resources.files("trainer.launch") / "templates"))
SCRIPT_TEMPLATE = "slurm.sh.j2"


class RenderError(AnvilError):
    """A value that cannot be placed into the script safely."""


class _Raw(str):
    """Text a filter has checked, or this module has composed, to be safe as is."""


def _finalize(value: object) -> str:
    if isinstance(value, _Raw):
        return value
    if value is None or isinstance(value, (dict, list, tuple)):
        raise RenderError(f"template bug: cannot render {value!r} into the script")
    return shlex.quote(str(value))


def _sbatch(value: object) -> _Raw:
    text = str(value)
    if not re.fullmatch(SBATCH_WORD, text):
        raise RenderError(
            f"'{text}' cannot go onto an #SBATCH line (only letters, digits and _@%+=:,./[]- are safe there)"
        )
    return _Raw(text)


def _envname(value: object) -> _Raw:
    text = str(value)
    if not re.fullmatch(ENV_NAME, text):
        raise RenderError(f"'{text}' is not a shell variable name")
    return _Raw(text)


@functools.lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["sbatch"] = _sbatch
    env.filters["envname"] = _envname
    return env.get_template(SCRIPT_TEMPLATE)


def render_script(cfg: AnvilConfig, job_dir: Path, code_dir: Path = jobdir.CODE_DIR) -> str:
    """The batch script for `cfg`, with absolute paths so `sbatch` works from any directory."""
    job = jobdir.JobDir(job_dir)
    cluster = cfg.cluster
    cpus_per_rank = max(cluster.cores_per_node // cluster.devices_per_node, 1)
    return _template().render(
        job=cfg.job,
        cluster=cluster,
        job_dir=str(job.path),
        code_dir=str(code_dir),
        log_out=str(job.logs / jobdir.sbatch_log("out")),
        log_err=str(job.logs / jobdir.sbatch_log("err")),
        env_report=_Raw(jobdir.env_report_name("$SLURM_JOB_ID", "$RESTART")),  # expanded by the script
        python=cluster.interpreter,
        submit=command("submit"),
        cpus_per_rank=cpus_per_rank,
        threads_per_rank=cpus_per_rank,
        layout=jobdir,  # every name in the job directory and its markers
        codes=states,  # the exit codes the trainer and the script agree on
        secret_names=SECRET_NAME.pattern,
    )
