"""Faults on one machine, with real processes, Parquet, tokenizers and DCP: data workers under stop signals, kill -9
of a rank, a full file system during a save, non-finite losses rolled back, the hung-rank diagnosis and first
reasons. (The same faults on the real SLURM cluster: tests/test_slurm_faults.py.)"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, events, ranks_among, wait_for
from tests.train_helpers import corpus_overrides, losses, make_job, run_trainer, trainer_env
from trainer.core import jobdir, states
from trainer.core.config import RollbackConfig
from trainer.core.processes import with_environment
from trainer.core.states import EXIT_REFUSED
from trainer.launch.local import LocalExecutor
from trainer.train.guard import StepGuard

HOOKS = REPO_ROOT / "tests" / "hooks"


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# -- data workers -----------------------------------------------------------------------------------------------------

LOADER = """
import contextlib, os, sys, time
from trainer.data import loader
from trainer.core.layers import load_config
from trainer.core.processes import children, record_stop_signals, stop_signals_received

if sys.argv[1] == "torch-default":  # the control: workers as torch's DataLoader starts them
    loader._worker_start = lambda rank_pid, worker_id: None
    loader.stop_signals_blocked = contextlib.nullcontext
record_stop_signals()
cfg = load_config(None, ["job.name=x", "data.num_workers=2", "data.seq_len=64", "data.logical_shards=8",
                         *sys.argv[2:]])
batches = iter(loader.build_loader(cfg.data, 0, 0, 1, 8))
next(batches)
print(*children(os.getpid()), flush=True)
try:
    while not stop_signals_received():
        next(batches)
    for _ in range(20):  # the rank finishes its step after the signal: its workers must still serve it
        next(batches)
    print("read 20 batches after", stop_signals_received()[0].name, flush=True)
except RuntimeError as exc:
    print("failed:", exc, flush=True)
    sys.exit(1)
time.sleep(120)
"""


def start_loader(variant: str, corpus: Path) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", LOADER, variant, *corpus_overrides(corpus)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=trainer_env(),
                            start_new_session=True)
    workers = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(workers) == 2 and all(alive(pid) for pid in workers), workers
    return proc, workers


def test_data_workers_ignore_stop_signals_and_die_with_their_rank(corpus: Path) -> None:
    # TERM to every process of the group, as torchrun stops its ranks and SLURM a step: the workers pass it by.
    proc, workers = start_loader("anvil", corpus)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.stdout.readline() == "read 20 batches after SIGTERM\n"
        assert all(alive(pid) for pid in workers)
        orphan_when_the_rank_dies(proc, workers)  # kill -9 of the rank: the kernel ends its workers at once
        wait_for(lambda: not any(alive(pid) for pid in workers), 2, "the workers to die with their rank", 0.05)
    finally:
        proc.kill()

    # Control: torch's own workers die of the TERM, and the rank with them ...
    proc, workers = start_loader("torch-default", corpus)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        # torch names the signal when its SIGCHLD handler sees the death first, else just the worker's absence
        assert proc.returncode == 1 and re.search(r"killed by signal: Terminated|\(pid\(s\) [\d, ]+\) exited "
                                                  r"unexpectedly", out + err), out + err
    finally:
        proc.kill()
    # ... and outlive a rank killed with -9 (re-parented to PID 1) for as long as nothing else wakes them.
    proc, workers = start_loader("torch-default", corpus)
    try:
        orphan_when_the_rank_dies(proc, workers)
        time.sleep(1.5)
        assert all(alive(pid) for pid in workers)
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def orphan_when_the_rank_dies(rank: subprocess.Popen, workers: list[int]) -> None:
    """Kill the rank with -9 while its workers are stopped (busy, as a worker blocked on a full pipe is): only a
    signal the kernel sends them can end them then (SIGKILL ends a stopped process too)."""
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    rank.kill()
    rank.wait()


WORKER_FAILS = """
import sys
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from tests.data_helpers import data_config, write_tokenizer
from trainer.data import loader

if sys.argv[1] == "left-to-torch":  # the control: the workers end when torch's iterator is collected
    loader._end_workers = lambda items, workers: None
data = Path(sys.argv[2])
pq.write_table(pa.table({"text": ["d0 a", None]}), data / "x.parquet")
cfg = data_config([(data, 1.0)], write_tokenizer(data.parent / "tok.json", 10), logical_shards=1, num_workers=2)
next(iter(loader.build_loader(cfg, 0, 0, 1, 2)))  # a worker's DataError, uncaught: its traceback lives to the end
"""


def test_a_rank_whose_data_worker_failed_exits(tmp_path: Path) -> None:
    """A worker's error ends its iteration and, with it, every worker: at interpreter exit multiprocessing would
    otherwise TERM them (ignored: they leave stop signals to their rank) and wait for them for ever."""
    def run(variant: str, timeout: float) -> subprocess.CompletedProcess:
        data = tmp_path / variant / "data"
        data.mkdir(parents=True)
        return subprocess.run([sys.executable, "-c", WORKER_FAILS, variant, str(data)], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=timeout, env=trainer_env())

    done = run("anvil", 120)
    assert done.returncode == 1 and "(row group 0): null text at row 1" in done.stderr, done.stderr
    with pytest.raises(subprocess.TimeoutExpired):  # the control hangs at exit (its workers die with it when killed)
        run("left-to-torch", 15)


LEAVES_A_CHILD = """
import multiprocessing, signal, time

def stubborn():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)

def test_leaves_a_child():
    multiprocessing.get_context("fork").Process(target=stubborn, daemon=True).start()
"""


def test_the_suite_fails_on_a_child_left_alive(tmp_path: Path) -> None:
    """The suite's own guard (conftest's pytest_sessionfinish): a child that would hang pytest's exit fails the run."""
    (tmp_path / "test_leak.py").write_text(LEAVES_A_CHILD)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           str(tmp_path / "test_leak.py")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"1 multiprocessing child\(ren\) outlived the tests and were killed: ForkProcess-1 \(pid \d+\)",
                     done.stdout), done.stdout


LEFT_OPEN = """
import sys
from trainer.data import loader
from trainer.core.layers import load_config

if sys.argv[1] == "collected-at-exit":  # the control: left to the garbage collector at interpreter exit
    import atexit
    atexit.unregister(loader._close_open)
cfg = load_config(None, ["job.name=x", "data.num_workers=0", "data.seq_len=64", *sys.argv[2:]])
batches = iter(loader.build_loader(cfg.data, 0, 0, 1, 8))
next(batches)
"""


def test_a_loader_left_open_at_exit_closes_quietly(corpus: Path) -> None:
    """A loader iteration nobody closed (a rank that returns early) is finalized after the modules are torn down."""
    def run(variant: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", LEFT_OPEN, variant, *corpus_overrides(corpus)], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120, env=trainer_env())

    done = run("anvil")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    control = run("collected-at-exit")
    assert "Exception ignored" in control.stderr and "'NoneType' object has no attribute 'Empty'" in control.stderr


# -- the local executor -----------------------------------------------------------------------------------------------


def submit_local(jobs: Path, name: str, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    environment = {**trainer_env(), "ANVIL_JOBS_DIR": str(jobs), **(env or {})}
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "submit.py"), "--name", name, *overrides, "--executor",
                             "local"], cwd=jobs.parent, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_local(jobs: Path, name: str, *overrides: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = submit_local(jobs, name, *overrides, env=env)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out + err


def last_event_of(job: Path) -> dict:
    return json.loads((job / "events.jsonl").read_text().splitlines()[-1])


def local_job_id(job: Path) -> str:
    return json.loads((job / "submit.json").read_text())["submissions"][-1]["job_id"]


def test_kill_9_of_a_rank_ends_the_run_at_once_and_leaves_no_process(tmp_path: Path, tiny: list[str]) -> None:
    jobs = tmp_path / "jobs"
    proc = submit_local(jobs, "killed", *tiny, "train.steps=5000", "cluster.devices_per_node=2",
                        "data.num_workers=1")
    job = jobs / "killed"
    wait_for(lambda: any("step 3/5000" in p.read_text() for p in (job / "logs").glob("*.out")), 180,
             "training to start", 0.1)
    mine = {"ANVIL_EXECUTOR": "local", "SLURM_JOB_ID": local_job_id(job)}
    running = with_environment(mine)
    try:
        assert len(running) >= 6, running  # the check below sees them: bash, torchrun, 2 ranks, 2 workers
        started = time.monotonic()
        os.kill(min(ranks_among(running)), signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        for pid in with_environment(mine):
            os.kill(pid, signal.SIGKILL)
    took = time.monotonic() - started
    assert proc.returncode == 128 + signal.SIGKILL and took < 20, (took, out[-2000:] + err[-2000:])
    assert with_environment(mine) == []  # nothing of the run outlives it
    reason = (job / "FAILED").read_text()
    assert re.match(r"trainer exited with code 137 \(killed: rank \d on \S+ was killed by SIGKILL \(pid \d+", reason)
    assert events(job) == [("start", 0), ("failed", 0)] and "Traceback" not in err, err[-3000:]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 32 MiB tmpfs (root: CI runs as root; elsewhere this is skipped, and fails under CI's ANVIL_REQUIRE_SLURM)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        if os.environ.get("ANVIL_REQUIRE_SLURM") == "1":
            pytest.fail(f"cannot mount a tmpfs (CI runs as root): {done.stderr}")
        pytest.skip(f"mounting a small tmpfs needs root: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves `leave` bytes free on the file system of `disk`."""
    filler = disk / "filler"
    size = shutil.disk_usage(disk).free - leave + (filler.stat().st_size if filler.exists() else 0)
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * size)
    return filler


def test_a_full_disk_stops_before_the_save_in_one_line_and_the_same_command_resumes(
        small_disk: Path, tmp_path: Path, tiny: list[str], corpus: Path) -> None:
    settings = ["train.steps=12", "checkpoint.interval=4", "checkpoint.keep=1"]
    twin = make_job(tmp_path / "twin", "twin", corpus, *settings)
    assert run_trainer(twin).returncode == 0
    size = json.loads((twin / "checkpoints" / "step-12" / "COMPLETE").read_text())["bytes"]
    jobs = small_disk / "jobs"
    jobs.mkdir()
    # Room for one checkpoint and its margin, not for a second one beside it.
    filler = fill(small_disk, int(2**20 + 1.6 * size))
    code, out = run_local(jobs, "full", *tiny, *settings)
    job, root = jobs / "full", jobs / "full" / "checkpoints"
    assert code == states.EXIT_DISK and "Traceback" not in out, out[-3000:]
    line = re.search(r"error: checkpoint step-8 not written: (\S+) has [\d.]+ MiB free, a checkpoint needs "
                     r"[\d.]+ MiB \(the last one took [\d.]+ MiB, plus 5% and 1.0 MiB\); the newest whole checkpoint "
                     r"is (\S+) \(untouched\)\. Free space", out)
    assert line and line[1] == str(root) and line[2] == str(root / "step-4"), out[-3000:]
    assert (job / "FAILED").read_text().startswith("trainer exited with code 74 (disk: rank 0: checkpoint step-8 not")
    assert sorted(p.name for p in root.iterdir()) == ["step-4"]  # nothing of step 8 was written
    from trainer.train.checkpoint import damage

    assert damage(root / "step-4") is None

    # A write that fails all the same (the space check misled: here by a recorded size that is far too small): the
    # same one line, the partial step removed, step-4 untouched.
    complete = root / "step-4" / "COMPLETE"
    record = json.loads(complete.read_text())
    complete.write_text(json.dumps({**record, "bytes": 1}))
    fill(small_disk, int(0.5 * size))
    (job / "FAILED").unlink()  # the first run's; now the job's own FAILED cannot be written: the reason goes to the
    (job / "FAILED").mkdir()  # terminal
    code, out = run_local(jobs, "full", *tiny, *settings)
    assert code == states.EXIT_DISK and "Traceback" not in out, out[-3000:]
    assert re.search(r"error: writing checkpoint step-8 to \S+ failed: No space left on device \(errno 28.*\); the "
                     r"newest whole checkpoint is \S+/step-4 \(untouched\), and the partial step is removed", out), out
    assert re.search(r"anvil: FAILED: trainer exited with code 74 \(disk: rank 0: writing checkpoint step-8 .*\[\S+/"
                     r"FAILED could not be written \(a full or failing disk\); this reason is on the terminal of "
                     r"python submit.py\]", out), out[-3000:]
    assert "its reason is above" in out and last_event_of(job)["event"] == "failed"
    state = LocalExecutor().states([jobdir.JobDir(job)])[job]  # status reads it from events.jsonl
    assert state.state == "FAILED" and "could not be written" in state.detail
    (job / "FAILED").rmdir()
    assert sorted(p.name for p in root.iterdir()) == ["step-4"] and damage(root / "step-4") is None
    complete.write_text(json.dumps(record))

    # Not a byte left: submit.py refuses in one line, before anything runs.
    fill(small_disk, 0)
    code, out = run_local(jobs, "full", *tiny, *settings)
    assert code == EXIT_REFUSED and "Traceback" not in out, out[-3000:]
    assert re.search(rf"cannot write the job directory {job}: No space left on device \(errno 28(, \S+)?\); free space",
                     out), out

    filler.unlink()  # space freed: the same command resumes and ends as the uninterrupted twin
    code, out = run_local(jobs, "full", *tiny, *settings)
    assert code == 0, out[-3000:]
    assert f"resumed from {root / 'step-4'} (step 4)" in out
    assert losses(job) == pytest.approx(losses(twin), abs=1e-6) and sorted(losses(job)) == list(range(1, 13))


def test_a_full_log_disk_never_stops_the_output_pump(tmp_path: Path) -> None:
    """The local executor copies a job's output to its log and the terminal; a log that cannot be written is said once
    and the copying goes on (a pump that stopped would leave the job blocked on a full pipe)."""
    import io

    from trainer.launch.local import _pump

    class Full(io.BytesIO):
        name = "logs/job-1.out"

        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

    source, echo = io.BytesIO(b"".join(b"line %d\n" % i for i in range(1000))), io.BytesIO()
    _pump(source, Full(), echo)
    said = echo.getvalue().decode()
    assert said.count("cannot write logs/job-1.out any more (No space left on device)") == 1
    assert said.endswith("line 999\n") and source.read() == b""  # all of it read and shown (the pump before this
    # change raised the OSError at the first line, from its thread, and stopped reading)


# -- training faults --------------------------------------------------------------------------------------------------


def test_a_non_finite_loss_rolls_back_skips_its_data_and_matches_a_twin_told_to_skip(
        tmp_path: Path, tiny: list[str], corpus: Path) -> None:
    settings = ["train.steps=14", "checkpoint.interval=4", "checkpoint.keep=10", "data.num_workers=1"]
    jobs = tmp_path / "jobs"
    inject = {"PYTHONPATH": f"{HOOKS}{os.pathsep}{trainer_env()['PYTHONPATH']}", "FAULT_NAN_STEPS": "7"}
    code, out = run_local(jobs, "rolled", *tiny, *settings, "metrics.wandb.enabled=true",
                          "metrics.wandb.mode=offline", env=inject)
    job = jobs / "rolled"
    assert code == 0, out[-3000:]
    said = (r"step 7: loss nan, gradient norm [\d.]+; rolled back to step-4 \(rollback 1 of at most 3\), the data of "
            r"step 7")
    assert re.search(said, out) and "step 7: its data is skipped" in out, out[-3000:]
    rollbacks = [e for e in map(json.loads, (job / "events.jsonl").read_text().splitlines())
                 if e["event"] == "rollback"]
    assert [(e["skip"], e["to"]) for e in rollbacks] == [(7, 4)] and re.search(said, rollbacks[0]["reason"])
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 4, "rollbacks": 1, "rollback_from_step": 7} in rows
    assert any(b"rollback_from_step" in p.read_bytes() for p in (job / "wandb").rglob("*.wandb"))

    told = make_job(tmp_path, "told", corpus, *settings, "train.skip_steps=[7]")
    assert run_trainer(told).returncode == 0
    assert losses(job) == pytest.approx(losses(told), abs=1e-6) and sorted(losses(job)) == list(range(1, 15))
    plain = make_job(tmp_path, "plain", corpus, *settings)  # control: the skipped data mattered
    assert run_trainer(plain).returncode == 0
    assert all(abs(losses(plain)[s] - losses(told)[s]) > 1e-4 for s in range(7, 15))

    # The decision outlives the attempt: resumed from step 4 again, the job skips step 7's data by itself.
    for step in (8, 12):
        shutil.rmtree(job / "checkpoints" / f"step-{step}")
    shutil.rmtree(job / "checkpoints" / "step-14")
    code, out = run_local(jobs, "rolled", *tiny, *settings, "metrics.wandb.enabled=true",
                          "metrics.wandb.mode=offline")
    assert code == 0 and f"resumed from {job / 'checkpoints' / 'step-4'}" in out, out[-3000:]
    assert losses(job) == pytest.approx(losses(told), abs=1e-6)

    # Bounded: past train.rollback.max, the job fails with the reason.
    inject["FAULT_NAN_STEPS"] = "6,7,8"
    code, out = run_local(jobs, "diverging", *tiny, *settings, "train.rollback.max=2", env=inject)
    reason = (jobs / "diverging" / "FAILED").read_text()
    assert code == EXIT_REFUSED and "Traceback" not in out, out[-3000:]
    assert re.match(r"trainer exited with code 2 \(diverged: rank 0: step 8: loss nan, gradient norm [\d.]+, after 2 "
                    r"rollback\(s\) \(train.rollback.max = 2\)\. Nothing was saved from this state; the newest whole "
                    r"checkpoint is step-4", reason), reason


def test_a_spike_is_judged_against_the_recent_window(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text("")
    guard = StepGuard(RollbackConfig(spike_window=8, spike_sigma=6, spike_rise=0.1), set(), jobdir.JobDir(tmp_path))
    for loss in (3.0, 3.02, 2.98, 3.01, 2.99, 3.0, 3.02):
        assert guard.problem(1, loss, 1.0) is None  # no spike before the window is full
        guard.passed(loss)
    guard.passed(2.97)
    assert guard.problem(9, 3.05, 1.0) is None  # ordinary noise: neither 6 sigma nor +10 %
    assert guard.problem(9, 3.25, 1.0) is None  # +8 %: many sigma, but under the rise bound
    assert re.match(r"loss spike: 3\.6000 is \d+\.\d standard deviations and 20% above the mean 2\.9988",
                    guard.problem(9, 3.6, 1.0))
    assert guard.problem(9, 3.0, math.inf).startswith("loss 3, gradient norm inf")


# -- reasons ----------------------------------------------------------------------------------------------------------


def test_the_first_reason_recorded_stays(tmp_path: Path) -> None:
    job = jobdir.JobDir(tmp_path)
    assert jobdir.write_error(job, "refused", "rank 1: data.datasets.0.path: no Parquet files")
    assert not jobdir.write_error(job, "lost", "rank 1 on n2: gone (collateral)")
    assert jobdir.read_error(job) == ("refused", "rank 1: data.datasets.0.path: no Parquet files")
    assert [p.name for p in tmp_path.iterdir()] == ["ERROR"]  # no temporary file left behind


def test_the_watchdog_names_the_rank_that_stopped_answering_or_lags(tmp_path: Path) -> None:
    """Heartbeats in a real TCPStore: a rank whose counter stops is named; with every rank beating, the one furthest
    behind; with every rank at the same place, none."""
    import threading

    import torch.distributed as dist

    from trainer.core.config import ParallelConfig
    from trainer.train.watchdog import Watchdog

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(server.port))
    watchdog = Watchdog(jobdir.JobDir(tmp_path), 0, 3, ParallelConfig(step_timeout_s=10), lambda message: None)
    marks = {0: 5, 1: 5, 2: 5}
    beating = {0, 1, 2}
    stop = threading.Event()

    def beat() -> None:  # ranks 1 and 2 as other processes would publish them
        count = 0
        while not stop.wait(0.2):
            count += 1
            for rank in beating - {0}:
                server.set(f"anvil/heartbeat/{rank}", json.dumps({"count": count, "mark": marks[rank], "step": 7,
                                                                  "phase": "step", "host": f"n{rank}", "pid": rank}))

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        watchdog.mark = 5
        watchdog._publish()
        time.sleep(0.5)  # every rank has published
        beating.discard(2)
        said = watchdog.hung(20)
        assert said.startswith("rank 2 on n2 (pid 2) during step 7: stopped answering"), said
        beating.add(2)
        marks[1] = 4
        said = watchdog.hung(20)
        assert said.startswith("rank 1 on n1 (pid 1) is still in step 7 while the other ranks have moved on"), said
        marks[1] = 5
        said = watchdog.hung(20)
        assert said.startswith("every rank has waited 20 s"), said  # the control: nobody to blame
    finally:
        stop.set()
        thread.join()
