"""Shared fixtures: isolated job directories, the submit CLI in-process, and the real SLURM cluster."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from trainer.launch.submit import main as submit_main

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout under test (its scripts, README and entry scripts)."""
CLUSTER_SCRIPT = REPO_ROOT / "scripts" / "local_slurm.sh"


@pytest.fixture
def jobs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh jobs/ root per test (via ANVIL_JOBS_DIR, as a user could set it)."""
    root = tmp_path / "jobs"
    root.mkdir()
    monkeypatch.setenv("ANVIL_JOBS_DIR", str(root))
    return root


@pytest.fixture
def roots(jobs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Fresh jobs/ and sweeps/ roots (through the environment, as a user could set them), run from tmp_path."""
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    monkeypatch.setenv("ANVIL_SWEEPS_DIR", str(sweeps))
    monkeypatch.chdir(tmp_path)
    return jobs_dir, sweeps


@pytest.fixture
def submit(jobs_dir: Path, capsys: pytest.CaptureFixture) -> Callable[..., tuple[int, str, str]]:
    """Run submit.py's main in-process; returns (exit code, stdout, stderr). An exception fails the test."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = submit_main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real text that ships with the machine as Parquet, and a BPE tokenizer trained on it (~4 s)."""
    from trainer.data.tools import build_demo

    out = tmp_path_factory.mktemp("corpus")
    build_demo(out, max_mb=1, vocab_size=512)
    return out


@pytest.fixture(scope="session")
def short_documents(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo corpus cut into documents of 120 characters, with its tokenizer: several documents to a row of the
    tests' 64 tokens, where document masks change what a model computes (the demo's documents span many rows)."""
    import pyarrow.parquet as pq

    from trainer.data.tools import write_parquet

    out = tmp_path_factory.mktemp("short-documents")
    texts = [text for path in sorted((corpus / "train").glob("*.parquet"))
             for text in pq.read_table(path, columns=["text"]).column("text").to_pylist()]
    write_parquet((text[i:i + 120] for text in texts for i in range(0, len(text), 120)), out / "train",
                  row_group_rows=64)
    shutil.copy(corpus / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture
def tiny(corpus: Path) -> list[str]:
    """Overrides for a tiny model training on the demo corpus (a few seconds per run). One thread per rank: the
    local cluster's two nodes share this host's cores (each would take them all), and the suite runs beside them."""
    from tests.train_helpers import TINY, corpus_overrides

    return [*TINY, *corpus_overrides(corpus), "cluster.env.OMP_NUM_THREADS=1"]


SECRETS = {"WANDB_API_KEY": "wandb-sekrit-0123456789", "HF_TOKEN": "hf_sekrit_9876543210"}
"""Secrets a user keeps in the submitting shell; tests check they reach no file of the job."""


def assert_no_secrets(job: Path) -> None:
    for path in job.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not any(secret in text for secret in SECRETS.values()), f"secret leaked into {path}"


def events(job: Path) -> list[tuple[str, int]]:
    """(event, restart) for each line the batch shell appended to events.jsonl."""
    lines = (job / "events.jsonl").read_text().splitlines()
    return [(e["event"], e["restart"]) for e in map(json.loads, lines)]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.5) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A multiprocessing child the tests left alive fails the run, by name, and is killed: at interpreter exit
    multiprocessing waits for its children, and a child that ignores TERM (a data worker) would hold the run (and CI)
    until it is killed from outside."""
    left = multiprocessing.active_children()
    if not left:
        return
    for process in left:
        process.kill()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"{len(left)} multiprocessing child(ren) outlived the tests and were killed: " + ", ".join(
        f"{p.name} (pid {p.pid})" for p in left)
    if reporter is not None:
        reporter.write_line(message, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets its share of the cores for torch's threads (set before torch is imported):
    two workers with two threads each on two cores spin against each other (one test ran 4.6 times slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(len(os.sched_getaffinity(0)) // workers, 1)))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`-n 2 --dist loadgroup`, as scripts/test.sh runs the suite) the tests on the local SLURM
    cluster run one after another on one worker, and first: they share its two nodes (one of them takes a node
    away), they are the longest chain, and they mostly wait (on the scheduler, on timeouts), while the other worker
    runs the rest."""
    for item in items:
        if item.get_closest_marker("slurm") is not None:
            item.add_marker(pytest.mark.xdist_group("slurm"))
    items.sort(key=lambda item: item.get_closest_marker("slurm") is None)  # stable: the rest keep their order


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = out.stdout.split()
    return out.returncode == 0 and bool(states) and all(s in ("idle", "mixed", "allocated") for s in states)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The local multi-node cluster (scripts/local_slurm.sh). CI sets ANVIL_REQUIRE_SLURM=1: fail, never skip."""
    if _cluster_up():
        return
    if shutil.which("slurmctld") is not None and os.geteuid() == 0:
        subprocess.run([str(CLUSTER_SCRIPT), "start"], check=True, timeout=180)
        if _cluster_up():
            return
    if os.environ.get("ANVIL_REQUIRE_SLURM") == "1":
        pytest.fail("the local SLURM cluster is not up: scripts/local_slurm.sh install && scripts/local_slurm.sh start")
    pytest.skip("no SLURM cluster here (as root: scripts/local_slurm.sh install && scripts/local_slurm.sh start)")


def _argv(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def ranks_among(pids: list[int]) -> list[int]:
    """The trainer ranks among a job's processes: the children of the torchrun launcher (`python -m
    trainer.train.torchrun`; not srun, whose command line names it too, nor the ranks' data workers)."""
    found = []
    for pid in pids:
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if _argv(ppid)[1:3] == [b"-m", b"trainer.train.torchrun"]:
            found.append(pid)
    return found
