"""Jobs on the real local SLURM cluster (slurmctld + two slurmd nodes + munge, scripts/local_slurm.sh)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SECRETS, assert_no_secrets, events, wait_for
from trainer.launch import slurm

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def submitted_id(out: str) -> str:
    match = re.search(r"SLURM job\s+(\d+)", out)
    assert match, out
    return match.group(1)


def log_of(job: Path, job_id: str) -> str:
    path = job / "logs" / f"{job.name}-{job_id}.out"
    return path.read_text() if path.exists() else ""


def job_state(job_id: str) -> str | None:
    """PENDING, RUNNING, COMPLETED, ...; None once SLURM has forgotten the job (MinJobAge)."""
    return slurm.queue([job_id]).get(job_id, (None, ""))[0]


def restarts(job_id: str) -> str | None:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    match = re.search(r"\bRestarts=(\d+)", out.stdout)
    return match.group(1) if match else None


def watch_states(job_id: str, timeout: float) -> list[str]:
    """Every distinct state the job passes through until it ends (or SLURM forgets it)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state and (not seen or seen[-1] != state):
            seen.append(state)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", None):
            return seen
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {seen[-1:]} after {timeout:.0f} s (states: {seen})")


def test_two_node_job_runs_across_both_nodes_and_resubmits(submit, jobs_dir: Path, monkeypatch, tiny) -> None:
    for name, value in SECRETS.items():  # in the submitting shell, as a user keeps them
        monkeypatch.setenv(name, value)
    code, out, err = submit("--name", "two-nodes", *tiny, "cluster.nodes=2", "train.steps=10",
                            "cluster.sbatch_extra={begin: now+3}", "--executor", "slurm")
    assert code == 0, err
    job_id = submitted_id(out)
    job = jobs_dir / "two-nodes"
    states = watch_states(job_id, 180)
    assert states[0] == "PENDING" and "RUNNING" in states and states[-1] == "COMPLETED", states
    log = log_of(job, job_id)
    ranks = dict(re.findall(r"anvil\[rank \d (n\d)\]: rank (\d)/2 on cpu; restart 0", log))
    assert sorted(ranks) == ["n1", "n2"] and sorted(ranks.values()) == ["0", "1"], log
    assert (job / "DONE").is_file() and events(job) == [("start", 0), ("done", 0)]
    record = json.loads((job / "submit.json").read_text())["submissions"]
    assert [r["job_id"] for r in record] == [job_id]
    report = (job / "logs" / f"env-{job_id}-0.txt").read_text()
    assert "HF_TOKEN=<redacted>" in report  # the job had it; no file shows it
    assert_no_secrets(job)

    # Resubmit the script as is, from another directory: it runs the same job again.
    again = subprocess.run(["sbatch", "--parsable", str(job / "slurm.sh")], cwd="/", capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    second_id = again.stdout.strip()
    assert watch_states(second_id, 180)[-1] == "COMPLETED"
    assert events(job) == [("start", 0), ("done", 0), ("start", 0), ("done", 0)]
    assert [json.loads(line)["job_id"] for line in (job / "events.jsonl").read_text().splitlines()] == [
        job_id, job_id, second_id, second_id]
    assert "step 10/10  loss" in log_of(job, job_id)
    assert "finished 10 steps" in log_of(job, second_id)  # resumed from step-10: nothing left to train

    # Through submit.py with the same config: finished, said at once, nothing queued ...
    same = ("--name", "two-nodes", *tiny, "cluster.nodes=2", "train.steps=10", "cluster.sbatch_extra={begin: now+3}",
            "--executor", "slurm")
    code, out, err = submit(*same)
    assert code == 0 and "anvil: job two-nodes has finished (DONE: job " in out, out + err
    assert [r["job_id"] for r in json.loads((job / "submit.json").read_text())["submissions"]] == [job_id]
    # ... until its last checkpoint is gone: then the same job directory runs again, the new id appended.
    shutil.rmtree(job / "checkpoints" / "step-10")
    code, out, err = submit(*same)
    assert code == 0 and "existing job: it resumes" in out, err
    third_id = submitted_id(out)
    assert watch_states(third_id, 180)[-1] == "COMPLETED"
    record = json.loads((job / "submit.json").read_text())["submissions"]
    assert [r["job_id"] for r in record] == [job_id, third_id]


def test_crash_loop_stops_at_the_restart_limit(submit, jobs_dir: Path) -> None:
    code, out, err = submit("--name", "crashes", "job.retry_on_failure=true", "job.max_restarts=2",
                            "cluster.sbatch_extra={begin: now+4}", "--executor", "slurm")
    assert code == 0, err
    job_id, job = submitted_id(out), jobs_dir / "crashes"
    (job / "config.json").write_text("{ broken")  # every attempt now fails on start

    wait_for(lambda: (job / "FAILED").exists(), 300, "the restart limit")
    assert watch_states(job_id, 60)[-1] == "FAILED"
    reason = (job / "FAILED").read_text()
    # The rank's own exit code (2: refused), not the launcher's 1.
    assert "restart limit reached (job.max_restarts = 2) after: trainer exited with code 2 (refused: " in reason
    assert "(refused: " in reason and "config.json is not a valid Anvil config" in reason  # the trainer's own
    assert events(job) == [("start", 0), ("requeue", 0), ("start", 1), ("requeue", 1), ("start", 2), ("failed", 2)]
    log = (job / "logs" / f"crashes-{job_id}.err").read_text()
    assert "config.json is not a valid Anvil config" in log and "Traceback" not in log, log[-3000:]


def test_allocation_that_differs_from_the_config_is_refused_by_the_trainer(submit, jobs_dir: Path, tiny) -> None:
    code, out, err = submit("--name", "mismatch", *tiny, "train.steps=5", "--executor", "slurm")
    assert code == 0, err
    first_id, job = submitted_id(out), jobs_dir / "mismatch"
    assert watch_states(first_id, 180)[-1] == "COMPLETED"
    # Someone resubmits the 1-node job on 2 nodes: the trainer names the fields instead of hanging.
    again = subprocess.run(["sbatch", "--parsable", "--nodes=2", str(job / "slurm.sh")], capture_output=True, text=True)
    job_id = again.stdout.strip()
    assert watch_states(job_id, 180)[-1] == "FAILED"
    assert "the allocation has 2 ranks but the config asks for cluster.nodes × cluster.devices_per_node = 1" in (
        log_of(job, job_id))
    assert "trainer exited with code" in (job / "FAILED").read_text()


def test_a_job_still_queued_is_not_submitted_twice(submit, jobs_dir: Path) -> None:
    code, out, err = submit("--name", "queued", "cluster.sbatch_extra={begin: now+600}", "--executor", "slurm")
    assert code == 0, err
    job_id = submitted_id(out)
    try:
        assert job_state(job_id) == "PENDING"
        code, out, err = submit("--name", "queued", "cluster.sbatch_extra={begin: now+600}", "--executor", "slurm")
        assert code == 2 and f"already queued or running as SLURM job {job_id}" in err and f"scancel {job_id}" in err
        record = json.loads((jobs_dir / "queued" / "submit.json").read_text())["submissions"]
        assert [r["job_id"] for r in record] == [job_id]
    finally:
        subprocess.run(["scancel", job_id])
    wait_for(lambda: job_state(job_id) == "CANCELLED", 30, "the cancellation")
    code, out, err = submit("--name", "queued", "cluster.sbatch_extra={begin: now+600}", "--executor", "slurm")
    assert code == 0, err  # once it is gone, resubmitting is fine
    subprocess.run(["scancel", submitted_id(out)])
