"""The job directory: created atomically, never silently replaced, and the record of every submission.

```
jobs/<name>/ config.json  slurm.sh  submit.json  git.diff  logs/  checkpoints/  (+ markers, see lifecycle)
```
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
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import NAME_PATTERN, SBATCH_WORD, SECRET_NAME, AnvilConfig
from trainer.files import write_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent


class JobDirError(Exception):
    """A job directory that cannot be created as asked; the message says what to do instead."""


@dataclass(frozen=True)
class JobDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def script(self) -> Path:
        return self.path / "slurm.sh"

    @property
    def submissions(self) -> Path:
        return self.path / "submit.json"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"


def jobs_root(override: str | None = None) -> Path:
    """`--jobs-dir`, else $ANVIL_JOBS_DIR, else `jobs/` in the Anvil checkout."""
    root = override or os.environ.get("ANVIL_JOBS_DIR") or REPO_ROOT / "jobs"
    return Path(root).expanduser().resolve()


def job_dir(root: Path, name: str) -> JobDir:
    """The directory for `name`, which can never lie outside `root`."""
    if not re.fullmatch(NAME_PATTERN, name) or name in (".", ".."):
        raise JobDirError(f"job name '{name}' is not allowed: use letters, digits, '.', '_' or '-'")
    path = (root / name).resolve()
    if path.parent != root:
        raise JobDirError(f"job name '{name}' would leave {root}")
    if not re.fullmatch(SBATCH_WORD, str(path)):
        raise JobDirError(
            f"the job directory {path} contains characters SLURM cannot take in #SBATCH --output; "
            "move the Anvil checkout or set --jobs-dir to a plain path"
        )
    return JobDir(path)


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


def write_job(cfg: AnvilConfig, script: str, job: JobDir, force: bool = False) -> bool:
    """Create the job directory (atomically), or refresh an existing one for the same config.

    Returns True if the directory was new. A different config under the same name is refused unless
    `force`, which replaces config.json and slurm.sh but keeps logs and checkpoints.
    """
    config_text = cfg.model_dump_json(indent=2) + "\n"
    if job.path.exists():
        if not job.config.is_file():
            raise JobDirError(
                f"{job.path} exists but is not an Anvil job directory (no config.json); pick another name"
            )
        old_text = job.config.read_text(encoding="utf-8")
        if old_text != config_text and not force:
            try:
                diff = config_differences(json.loads(old_text), json.loads(config_text))
            except json.JSONDecodeError:
                diff = ["(the existing config.json is not valid JSON)"]
            raise JobDirError(
                f"job '{cfg.job.name}' already exists at {job.path} with a different config:\n    "
                + "\n    ".join(diff)
                + "\n  Use --name to start a new job, or --force to replace its config and script "
                "(logs and checkpoints are kept, and it resumes from them)."
            )
        write_atomic(job.config, config_text)
        write_atomic(job.script, script, 0o755)
        job.logs.mkdir(exist_ok=True)
        job.checkpoints.mkdir(exist_ok=True)
        return False
    job.path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=job.path.parent, prefix=f".{cfg.job.name}.tmp-"))
    try:
        (staging / "config.json").write_text(config_text, encoding="utf-8")
        (staging / "slurm.sh").write_text(script, encoding="utf-8")
        os.chmod(staging / "slurm.sh", 0o755)
        (staging / "logs").mkdir()
        (staging / "checkpoints").mkdir()
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, job.path)  # atomic: the directory appears complete or not at all
        except OSError:
            raise JobDirError(f"{job.path} appeared while it was being created; submit again") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """Commit and uncommitted changes of the code a job runs, for reproducing it later."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=20)
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


def known_job_ids(job: JobDir) -> list[str]:
    """SLURM job ids this directory has run under: submit.py's records and the script's own events."""
    ids: list[str] = []
    if job.submissions.is_file():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            ids += [str(s["job_id"]) for s in json.loads(job.submissions.read_text())["submissions"] if s["job_id"]]
    events = job.path / "events.jsonl"
    if events.is_file():
        for line in events.read_text().splitlines():
            try:
                ids.append(str(json.loads(line)["job_id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return list(dict.fromkeys(ids))


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
        write_atomic(job.path / "git.diff", redact_secrets(diff))
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
            record = {"submissions": [], "note": "an unreadable earlier submit.json was replaced"}
    record.setdefault("submissions", []).append(entry)
    write_atomic(job.submissions, json.dumps(record, indent=2) + "\n")
    return entry
