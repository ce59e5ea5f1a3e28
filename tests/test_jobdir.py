"""The job directory contract: contents, atomic creation, refusal to replace a different job, escapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.core.jobdir import JobDirError, job_dir, write_job
from trainer.core.layers import load_config


def test_dry_run_writes_nothing_and_shows_the_script(submit, jobs_dir: Path) -> None:
    code, out, err = submit("--name", "dry", "--dry-run", "--executor", "slurm")
    assert code == 0, err
    assert "#SBATCH --job-name=dry" in out and f"would write {jobs_dir}/dry/ and run: sbatch --parsable" in err
    assert list(jobs_dir.iterdir()) == []


def test_job_directory_contents(jobs_dir: Path) -> None:
    cfg = load_config(None, ["job.name=contents"], environ={})
    job = job_dir(jobs_dir, "contents")
    assert write_job(cfg, "#!/bin/bash\n", job) is True
    assert sorted(p.name for p in job.path.iterdir()) == ["checkpoints", "config.json", "logs", "slurm.sh"]
    assert json.loads(job.config.read_text())["job"]["name"] == "contents"
    assert job.script.stat().st_mode & 0o111
    assert [p.name for p in jobs_dir.iterdir()] == ["contents"], "no staging directory left behind"


def test_same_config_again_is_a_resubmission(jobs_dir: Path) -> None:
    cfg = load_config(None, ["job.name=again"], environ={})
    job = job_dir(jobs_dir, "again")
    write_job(cfg, "#!/bin/bash\n", job)
    (job.checkpoints / "step-10").mkdir()
    assert write_job(cfg, "#!/bin/bash\n", job) is False
    assert (job.checkpoints / "step-10").is_dir()


def test_different_config_is_refused_with_the_differences(jobs_dir: Path) -> None:
    job = job_dir(jobs_dir, "differs")
    write_job(load_config(None, ["job.name=differs"], environ={}), "#!/bin/bash\n", job)
    before = job.config.read_text()
    changed = load_config(None, ["job.name=differs", "optim.lr=0.01"], environ={})
    with pytest.raises(JobDirError) as info:
        write_job(changed, "#!/bin/bash\n", job)
    message = str(info.value)
    assert "optim.lr: 0.0003 -> 0.01" in message and "--force" in message and "--name" in message
    assert job.config.read_text() == before
    (job.checkpoints / "step-5").mkdir()
    write_job(changed, "#!/bin/bash\n", job, force=True)
    assert json.loads(job.config.read_text())["optim"]["lr"] == 0.01
    assert (job.checkpoints / "step-5").is_dir(), "--force keeps checkpoints"


def test_refuses_a_foreign_directory(jobs_dir: Path) -> None:
    (jobs_dir / "mine").mkdir()
    (jobs_dir / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(JobDirError, match="not an Anvil job directory"):
        write_job(load_config(None, ["job.name=mine"], environ={}), "", job_dir(jobs_dir, "mine"), force=True)
    assert (jobs_dir / "mine" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "/etc", "x\n", "", "$(id)"])
def test_names_cannot_escape_the_jobs_root(jobs_dir: Path, name: str) -> None:
    with pytest.raises(JobDirError):
        job_dir(jobs_dir, name)


def test_symlinked_job_name_cannot_escape(jobs_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (jobs_dir / "link").symlink_to(outside)
    with pytest.raises(JobDirError, match="would leave"):
        job_dir(jobs_dir, "link")


def test_submit_cli_refuses_a_changed_config(submit, jobs_dir: Path, tmp_path: Path) -> None:
    """The CLI path: nothing half-written, and the message says how to go on."""
    code, _, err = submit("--name", "cli", "--dry-run")
    assert code == 0, err
    job = job_dir(jobs_dir, "cli")
    write_job(load_config(None, ["job.name=cli"], environ={}), "#!/bin/bash\n", job)
    code, out, err = submit("--name", "cli", "train.steps=5", "--executor", "slurm")
    assert code == 2 and "already exists" in err and "train.steps: 1000 -> 5" in err


def test_secret_values_are_redacted_from_saved_text() -> None:
    from trainer.core.jobdir import redact_secrets

    environ = {"HF_TOKEN": "hf_abcdefgh123", "MY_API_KEY": "k-9876543210", "HOME": "/root", "SHORT_TOKEN": "abc"}
    diff = "+token = 'hf_abcdefgh123'\n+key = 'k-9876543210'\n+home = '/root'\n+x = 'abc'\n"
    assert redact_secrets(diff, environ) == (
        "+token = '<HF_TOKEN redacted>'\n+key = '<MY_API_KEY redacted>'\n+home = '/root'\n+x = 'abc'\n")


def test_no_arguments_give_usage_and_an_empty_file_says_so(submit, tmp_path: Path) -> None:
    code, out, err = submit()
    assert code == 2 and out == "" and err.startswith("usage: "), err
    assert "give a config file (e.g. configs/demo.yaml), or --name NAME" in err and "required" not in err
    for text in ("", "# settings to come\n"):
        (tmp_path / "empty.yaml").write_text(text)
        code, _, err = submit(str(tmp_path / "empty.yaml"))
        assert code == 2 and f"config file '{tmp_path / 'empty.yaml'}' is empty (or only comments)" in err, err
    (tmp_path / "empty.yaml").write_text("job: {name: full}\n")  # the control: a file with settings goes on
    code, _, err = submit(str(tmp_path / "empty.yaml"), "--dry-run")
    assert code == 0, err


def test_dry_run_and_submit_say_what_becomes_of_an_existing_job(submit, jobs_dir: Path) -> None:
    from trainer.core.jobdir import mark_complete
    from trainer.core.layers import as_submitted
    from trainer.launch.render import render_script

    code, _, err = submit("--name", "ex", "--dry-run", "--executor", "slurm")
    assert code == 0 and f"dry run: would write {jobs_dir}/ex/ and run: sbatch" in err, err
    job = job_dir(jobs_dir, "ex")
    cfg = as_submitted(load_config(None, ["job.name=ex"], environ={}))
    write_job(cfg, render_script(cfg, job.path), job)  # as submit.py writes it
    code, _, err = submit("--name", "ex", "--dry-run", "--executor", "slurm")
    assert code == 0 and f"dry run: would resume the job in {job.path}/ (from the start: no whole checkpoint yet) " \
                          "with: sbatch" in err, err
    (job.checkpoints / "step-10").mkdir()
    mark_complete(job.checkpoints / "step-10", {"step": 10})
    code, _, err = submit("--name", "ex", "--dry-run", "--executor", "slurm")
    assert code == 0 and "(from its checkpoint of step 10)" in err, err
    code, _, err = submit("--name", "ex", "train.steps=5", "--dry-run", "--executor", "slurm")
    assert code == 2 and "a submit would refuse: job 'ex' already exists" in err and "train.steps: 1000 -> 5" in err
    code, _, err = submit("--name", "ex", "train.steps=5", "--dry-run", "--force", "--executor", "slurm")
    assert code == 0 and f"would replace the config and script in {job.path}/ (it resumes)" in err, err

    job.done.write_text("job 7, restart 0, Sat Dec  5 04:00:00 UTC 2026\n")
    code, _, err = submit("--name", "ex", "--dry-run", "--executor", "slurm")  # DONE, but step 1000 is not there
    assert code == 0 and "(from its checkpoint of step 10)" in err, err
    (job.checkpoints / "step-1000").mkdir()
    mark_complete(job.checkpoints / "step-1000", {"step": 1000})
    code, _, err = submit("--name", "ex", "--dry-run", "--executor", "slurm")
    assert code == 0 and "dry run: job ex has finished (DONE), so a submit would do nothing" in err, err
    code, out, err = submit("--name", "ex", "--executor", "local")
    assert code == 0 and "anvil: job ex has finished (DONE: job 7, restart 0, Sat Dec  5 04:00:00 UTC 2026); " \
                          "nothing to run" in out, out + err
    assert not job.submissions.exists()  # nothing was started
