"""The embedded default: submit.py runs the same slurm.sh locally as a one-node allocation."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO_ROOT, SECRETS, assert_no_secrets, events, wait_for
from trainer.core.jobdir import JobDir
from trainer.launch.executor import JobState
from trainer.launch.local import LocalExecutor, mark_running

HOSTILE = "it's $(touch CANARY) `touch CANARY`; \"quoted\" \\ $HOME"


def start_submit(args: list[str], jobs_dir: Path, cwd: Path, extra_env: dict[str, str] | None = None):
    env = {**os.environ, "ANVIL_JOBS_DIR": str(jobs_dir), **(extra_env or {})}
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "submit.py"), *args, "--executor", "local"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def log_text(job: Path) -> str:
    return "".join(p.read_text() for p in sorted((job / "logs").glob("*.out")))


def test_demo_runs_locally_with_secrets_kept_out(jobs_dir: Path, tmp_path: Path, tiny: list[str]) -> None:
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump({"job": {"name": "demo"}, "cluster": {"env": {"EVIL": HOSTILE}}}))
    proc = start_submit([str(config), *tiny, "train.steps=10"], jobs_dir, tmp_path, SECRETS)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    job = jobs_dir / "demo"
    assert (job / "DONE").is_file() and not (job / "FAILED").exists()
    assert events(job) == [("start", 0), ("done", 0)]
    assert "rank 0/1 on cpu; restart 0" in log_text(job) and "job demo finished (DONE)" in out
    assert "step 10/10  loss" in log_text(job) and (job / "checkpoints" / "step-10" / "COMPLETE").is_file()
    submissions = json.loads((job / "submit.json").read_text())["submissions"]
    assert [s["executor"] for s in submissions] == ["local"] and submissions[0]["git"]["sha"]

    # Hostile values reach the job verbatim and execute nothing.
    report = next((job / "logs").glob("env-*.txt")).read_text()
    assert f"EVIL={HOSTILE}" in report
    assert not (tmp_path / "CANARY").exists() and not (REPO_ROOT / "CANARY").exists()
    # Secrets were in the job's environment, and appear nowhere in the job directory.
    assert "HF_TOKEN=<redacted>" in report and "WANDB_API_KEY=<redacted>" in report
    assert_no_secrets(job)
    assert not any(secret in out + err for secret in SECRETS.values())

    # The same config again is the same job, finished: said at once, nothing runs (no torchrun, no new records).
    proc = start_submit([str(config), *tiny, "train.steps=10"], jobs_dir, tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "anvil: job demo has finished (DONE: job " in out and err == "", out + err
    assert events(job) == [("start", 0), ("done", 0)]
    assert len(json.loads((job / "submit.json").read_text())["submissions"]) == 1
    # Its last checkpoint gone, it is not finished: it runs again from the newest whole one, appending its records.
    shutil.rmtree(job / "checkpoints" / "step-10")
    proc = start_submit([str(config), *tiny, "train.steps=10"], jobs_dir, tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "job demo finished (DONE)" in out, out + err
    assert events(job) == [("start", 0), ("done", 0), ("start", 0), ("done", 0)]
    assert len(json.loads((job / "submit.json").read_text())["submissions"]) == 2


def test_preempt_trigger_requeues_and_completes(jobs_dir: Path, tmp_path: Path, tiny: list[str]) -> None:
    proc = start_submit(["--name", "requeue", *tiny, "train.steps=300"], jobs_dir, tmp_path)
    job = jobs_dir / "requeue"
    wait_for(lambda: (job / "logs").is_dir() and "step 2/300" in log_text(job), 120, "training to start", 0.05)
    (job / "PREEMPT").touch()  # what the batch shell's USR2 trap does
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert events(job) == [("start", 0), ("requeue", 0), ("start", 1), ("done", 1)]
    assert (job / "RESTARTS").read_text().strip() == "1" and (job / "DONE").is_file()
    log = log_text(job)
    stopped = int(re.search(r"preempted after step (\d+) \(trigger\); checkpoint saved", log).group(1))
    assert 2 <= stopped < 300 and f"resumed from {job / 'checkpoints' / f'step-{stopped}'} (step {stopped})" in log
    assert "restart 1" in log and "step 300/300  loss" in log
    steps = [json.loads(line)["step"] for line in (job / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 301))  # one history, as if never interrupted


def test_ctrl_c_checkpoints_and_stops(jobs_dir: Path, tmp_path: Path, tiny: list[str]) -> None:
    proc = start_submit(["--name", "interrupted", *tiny, "train.steps=600"], jobs_dir, tmp_path)
    job = jobs_dir / "interrupted"
    wait_for(lambda: (job / "logs").is_dir() and "step 1/600" in log_text(job), 120, "training to start", 0.05)
    # Another process sees the live run.
    executor, local_id = LocalExecutor(), json.loads((job / "submit.json").read_text())["submissions"][-1]["job_id"]
    assert executor.states([JobDir(job)])[job] == JobState("RUNNING", local_id, "local", f"process {proc.pid}")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, out + err  # as a shell reports a Ctrl-C, not 75 ("run me again")
    assert "stopped at a checkpoint; run the same command again to resume" in out
    assert err.strip() == "anvil: stopping: the trainer checkpoints first (Ctrl-C again to kill)", err  # one line
    assert (job / "PREEMPTED").is_file() and not (job / "DONE").exists()
    assert events(job) == [("start", 0), ("stopped", 0)]  # not requeued: the user stopped it
    stopped = int((job / "PREEMPTED").read_text().split()[0])
    assert (job / "checkpoints" / f"step-{stopped}" / "COMPLETE").is_file()
    reason = f"stopped by SIGINT at step {stopped}, checkpoint saved; run the same command again to resume"
    assert executor.states([JobDir(job)])[job] == JobState("PREEMPTED", local_id, "job directory", reason)


def test_cancel_from_another_process_is_a_ctrl_c_and_is_recorded(tmp_path: Path) -> None:
    """`cancel` finds the live run through local-run.json, interrupts it and records a cancel event; the record
    left by a process that has ended is not taken for a live run."""
    job = JobDir(tmp_path / "job")
    job.path.mkdir()
    # Ctrl-C's handler set by hand: a pytest started in the background of a script has SIGINT ignored, and its
    # children inherit that.
    code = ("import signal, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\ntry:\n"
            "    print('ready', flush=True)\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('interrupted')\n")
    run = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline() == "ready\n"  # its Ctrl-C handler is in place
        mark_running(job, "42", run.pid)
        executor = LocalExecutor()
        assert executor.states([job])[job.path] == JobState("RUNNING", "42", "local", f"process {run.pid}")
        assert executor.cancel([job]) == ["42"]
        assert run.wait(timeout=30) == 0 and run.stdout.read().strip() == "interrupted"
    finally:
        run.kill()
    (job.path / "submit.json").write_text(json.dumps({"submissions": [{"job_id": "42", "executor": "local"}]}))
    assert executor.states([job])[job.path] == JobState("CANCELLED", "42", "job directory",
                                                        "cancelled: stopped at a checkpoint")
    assert [e["event"] for e in map(json.loads, job.events.read_text().splitlines())] == ["cancel"]
    assert executor.cancel([job]) == []  # nothing live any more
