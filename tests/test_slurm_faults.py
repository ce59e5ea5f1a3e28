"""What a real cluster does to a job, on the local SLURM cluster (slurmctld + two slurmd nodes, scripts/local_slurm.sh):
scancel, TERM to one rank, `scancel --full`, preemption and the time-limit warning; kill -9 of a rank, a stopped
(hung) rank and a lost node. Each job ends with a reason, leaves no process behind, and its final losses equal an
uninterrupted twin's."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SECRETS, assert_no_secrets, events, ranks_among, wait_for
from tests.test_slurm_lifecycle import log_of, restarts, submitted_id, watch_states
from tests.train_helpers import losses, run_trainer
from trainer.core import jobdir
from trainer.core.processes import with_environment
from trainer.launch.slurm import SlurmExecutor

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

STEPS = 160
SETTINGS = [f"train.steps={STEPS}", "checkpoint.interval=20", "checkpoint.keep=20", "data.num_workers=1",
            "cluster.nodes=2", "parallel.step_timeout_s=10"]


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[int, float]:
    """The losses of the same config run without interruption: two ranks on one node, as the two nodes' ranks."""
    from tests.train_helpers import make_job

    job = make_job(tmp_path_factory.mktemp("twin"), "twin", corpus, *SETTINGS, "cluster.nodes=1",
                   "cluster.devices_per_node=2")
    done = run_trainer(job, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    return losses(job)


def logged(job: Path, job_id: str) -> int:
    """The newest step the current attempt of this SLURM job has logged."""
    found = re.findall(r"step (\d+)/\d+  loss", log_of(job, job_id).rsplit("anvil: job ", 1)[-1])
    return int(found[-1]) if found else 0


def reach(job: Path, job_id: str, step: int) -> int:
    return wait_for(lambda: logged(job, job_id) >= step and logged(job, job_id), 240, f"step {step}", 0.1)


def processes(job_id: str, node: str | None = None) -> list[int]:
    """Every live process of this SLURM job (on one node), wherever its parent went."""
    wanted = {"SLURM_JOB_ID": job_id, **({"SLURMD_NODENAME": node} if node else {})}
    return with_environment(wanted)


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])


def rank_on(job_id: str, node: str) -> int:
    """The rank of this job on `node` (one per node here)."""
    ranks = ranks_among(processes(job_id, node))
    assert len(ranks) == 1, (job_id, node, ranks)
    return ranks[0]


def ended(job_id: str, timeout: float) -> float:
    """Seconds until SLURM has ended the job (or requeued it), then: nothing of it alive 5 s later."""
    started = time.monotonic()
    wait_for(lambda: slurm_state(job_id) not in ("RUNNING", "COMPLETING"), timeout, f"job {job_id} to end", 0.2)
    took = time.monotonic() - started
    wait_for(lambda: not processes(job_id), 5, f"every process of job {job_id} to end", 0.2)
    return took


def slurm_state(job_id: str) -> str | None:
    out = subprocess.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip() or None


def resubmit(job: Path) -> str:
    done = subprocess.run(["sbatch", "--parsable", str(job / "slurm.sh")], cwd="/", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def events_of(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]


def last_event(job: Path) -> dict:
    return events_of(job)[-1]


def stopped_at(job: Path, at_least: int) -> int:
    """The step the trainer checkpointed when it stopped: at least the step logged when it was asked, and whole."""
    step = int((job / "PREEMPTED").read_text().split()[0])
    assert step >= at_least and (job / "checkpoints" / f"step-{step}" / "COMPLETE").is_file(), (step, at_least)
    return step


def test_every_stop_signal_ends_in_a_checkpoint_of_the_step_reached(submit, jobs_dir: Path, monkeypatch, tiny,
                                                                     twin) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    rng = random.Random(24)
    code, out, err = submit("--name", "signalled", *tiny, *SETTINGS, "metrics.wandb.enabled=true",
                            "metrics.wandb.mode=offline", "--executor", "slurm")
    assert code == 0, err
    job, job_id = jobs_dir / "signalled", submitted_id(out)

    # scancel: TERM to the batch shell and every rank (and their data workers): a checkpoint of the step reached,
    # not requeued against the user's wish.
    asked = reach(job, job_id, rng.randint(25, 50))
    subprocess.run(["scancel", job_id], check=True)
    ended(job_id, 60)
    step = stopped_at(job, asked)
    assert last_event(job)["event"] == "stopped" and last_event(job)["reason"].startswith(
        f"cancelled (SIGTERM, scancel) at step {step}, checkpoint saved; resume with: sbatch {job}/slurm.sh")
    state = SlurmExecutor().states([jobdir.JobDir(job)])[job]
    assert (state.state, state.detail) == ("CANCELLED", last_event(job)["reason"])  # sweep.py status shows this

    # TERM to one rank only (a health checker, a user's kill): the ranks agree, checkpoint and stop.
    job_id = resubmit(job)
    asked = reach(job, job_id, step + rng.randint(10, 25))
    os.kill(rank_on(job_id, "n2"), signal.SIGTERM)
    ended(job_id, 60)
    step = stopped_at(job, asked)
    assert last_event(job)["reason"].startswith(f"stopped by SIGTERM at step {step}, checkpoint saved (a signal")

    # scancel --signal=TERM --full also signals srun, which answers TERM by killing its tasks at once: no checkpoint
    # can be written, and the job says so and resumes from the newest whole one.
    job_id = resubmit(job)
    reach(job, job_id, step + 5)
    subprocess.run(["scancel", "--signal=TERM", "--full", job_id], check=True)
    ended(job_id, 60)
    assert last_event(job)["event"] == "stopped" and last_event(job)["reason"].startswith(
        "srun killed the step as SIGTERM reached it (scancel --full signals srun too")

    # Preemption by a job of a higher-priority partition (TERM to the steps, GraceTime, SLURM's requeue) and the
    # time-limit warning (USR2 to the batch shell): checkpoint and requeue, each restart resuming where it stopped.
    job_id = resubmit(job)
    asked = reach(job, job_id, 100)
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "--nodes=2", "--exclusive", "--output=/dev/null",
                             "--wrap", "sleep 1"], capture_output=True, text=True, check=True).stdout.strip()
    wait_for(lambda: ("requeue", 0) in events(job)[-1:], 90, "the preemption's requeue")
    step = stopped_at(job, asked)
    assert last_event(job)["reason"] == f"preempted by SLURM (SIGTERM) at step {step}, checkpoint saved"
    assert watch_states(urgent, 120)[-1] == "COMPLETED"
    asked = reach(job, job_id, step + 10)
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True)
    wait_for(lambda: ("requeue", 1) in events(job), 60, "the time limit's requeue")
    step = stopped_at(job, asked)
    assert last_event(job)["reason"] == f"preempted at step {step}, checkpoint saved (USR2: the time limit is near)"
    # `scontrol requeue` (an admin's, or SLURM's own after a node failure): SLURM requeues and TERMs the job; the
    # shell sees the restart count move and says so, not "cancelled".
    asked = reach(job, job_id, step + 10)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_for(lambda: ("requeue", 2) in events(job), 60, "SLURM's requeue")
    step = stopped_at(job, asked)
    assert last_event(job)["reason"] == f"requeued by SLURM (SIGTERM) at step {step}, checkpoint saved"
    assert watch_states(job_id, 300)[-1] == "COMPLETED" and (job / "DONE").is_file()
    assert [e for e, _ in events(job)] == ["start", "stopped"] * 3 + ["start", "requeue"] * 3 + ["start", "done"]

    got = losses(job)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(abs(got[s] - twin[s]) <= 1e-6 for s in twin), [(s, got[s], twin[s]) for s in (1, STEPS)]
    run_id = (job / "wandb-run-id").read_text().strip()  # one wandb run across all seven attempts
    runs = sorted(p.name for p in (job / "wandb").glob("offline-run-*"))
    assert len(runs) == 7 and all(name.endswith(f"-{run_id}") for name in runs), runs
    assert_no_secrets(job)


def restore_node(node: str) -> None:
    """Bring a node's slurmd back (if it was killed) and wait until SLURM takes it again."""
    pid_file = Path(f"/run/slurm/slurmd-{node}.pid")
    alive = pid_file.is_file() and Path(f"/proc/{pid_file.read_text().strip()}").exists()
    if not alive:
        subprocess.run(["slurmd", "-N", node], check=True)
    wait_for(lambda: subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True,
                                    text=True).stdout.strip() in ("idle", "mixed", "allocated"), 120,
             f"{node} to come back")


def lose_node(job_id: str, node: str) -> None:
    """A node dies: its slurmd and every process of the job on it (the step daemons included) vanish at once."""
    victims = processes(job_id, node)
    victims += [parent(pid) for pid in victims if b"slurmstepd" in Path(f"/proc/{parent(pid)}/cmdline").read_bytes()]
    victims.append(int(Path(f"/run/slurm/slurmd-{node}.pid").read_text()))
    for pid in victims:
        os.kill(pid, signal.SIGKILL)


def test_a_killed_a_hung_and_a_lost_rank_end_the_job_with_the_reason(submit, jobs_dir: Path, tiny, twin) -> None:
    code, out, err = submit("--name", "failing", *tiny, *SETTINGS, "--executor", "slurm")
    assert code == 0, err
    job, job_id = jobs_dir / "failing", submitted_id(out)

    # kill -9 of one rank: the job ends within seconds, its launcher names it, nothing of it stays alive. (And FAILED
    # cannot be written here, as on a full disk: the reason is in the SLURM job's comment, and status shows it.)
    reach(job, job_id, 25)
    (job / "FAILED").mkdir()
    victim = rank_on(job_id, "n2")
    os.kill(victim, signal.SIGKILL)
    assert ended(job_id, 60) < 20
    comment = subprocess.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%k"], capture_output=True,
                             text=True).stdout
    said = rf"trainer exited with code \d+ \(killed: rank \d on n2 was killed by SIGKILL \(pid {victim}:"
    assert re.match(rf"anvil: FAILED: {said}.*FAILED could not be written .* this reason is in the job's comment: "
                    rf"scontrol show job {job_id}\]", comment), comment
    state = SlurmExecutor().states([jobdir.JobDir(job)])[job]
    assert state.state == "FAILED" and re.match(said, state.detail), state
    (job / "FAILED").rmdir()

    # A stopped rank (SIGSTOP: a hung process, a node that stopped answering): the watchdog ends the job within
    # parallel.step_timeout_s, naming it.
    job_id = resubmit(job)
    reach(job, job_id, 30)
    victim = rank_on(job_id, "n1")
    os.kill(victim, signal.SIGSTOP)
    assert ended(job_id, 90) < 10 + 30
    reason = (job / "FAILED").read_text()
    assert re.match(rf"trainer exited with code \d+ \(hung: rank \d on n1 \(pid {victim}\) during [^:]+: stopped "
                    r"answering \(no heartbeat for \d+ s", reason), reason

    # A lost node (its slurmd and the job's processes on it gone at once): the survivors name the lost rank, the job
    # is requeued, and once the node is back it resumes from the newest whole checkpoint.
    job_id = resubmit(job)
    reach(job, job_id, 60)
    try:
        lose_node(job_id, "n2")
        newest = jobdir.latest_complete(job / "checkpoints")
        # Requeued by the batch script, or by SLURM itself when it notices the node first (then the next attempt
        # records the end, with the reason the trainer left).
        wait_for(lambda: restarts(job_id) == "1", 120, "the requeue")
        # The node comes back later, as a real one does after a reboot, not while SLURM still cleans up after the
        # requeue (a terminate meant for the old attempt would reach the new one): the job waits until then.
        subprocess.run(["scontrol", "hold", job_id], check=True)
    finally:
        restore_node("n2")
    # SLURM's own cleanup of the lost attempt reaches n2 late: the controller keeps retrying a REQUEST_SIGNAL_TASKS
    # for the lost step (`sdiag` showed it pending for 60 s, well after n2 answered again). Delivered after the
    # release, it signals the new attempt's step, which has the same id (<job>.0), on n2: the job stops there with a
    # checkpoint ("stopped by SIGTERM", twice on a busy machine). Released once the controller has nothing pending.
    wait_for(lambda: "No pending RPCs" in subprocess.run(["sdiag"], capture_output=True, text=True).stdout, 180,
             "the controller's pending messages to the returned node")
    time.sleep(2)
    subprocess.run(["scontrol", "release", job_id], check=True)
    assert watch_states(job_id, 300)[-1] == "COMPLETED"
    requeued = next(e for e in reversed(events_of(job)) if e["event"] == "requeue")
    assert re.search(r"\(lost: (rank \d on n2 \(pid \d+\) during .*: gone|the rendezvous store at \S+ does not "
                     r"answer)", requeued["reason"]), requeued
    assert f"resumed from {job / 'checkpoints' / f'step-{newest}'} (step {newest})" in log_of(job, job_id)
    assert [e for e, _ in events(job)] == ["start", "failed"] * 2 + ["start", "requeue", "start", "done"]
    got = losses(job)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(abs(got[s] - twin[s]) <= 1e-6 for s in twin)
