"""The launch side starts without torch (login nodes), and what `--dry-run` prints is the script itself.

Each check runs in a fresh process where `import torch` fails (`sys.modules["torch"] = None`, set by a
`sitecustomize` on PYTHONPATH), exactly as on a login node without torch; a training module run the same way
fails, which shows that the harness does block torch.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import trainer.core
import trainer.launch
from tests.conftest import REPO_ROOT, wait_for
from trainer.core.jobdir import JobDir
from trainer.core.layers import as_submitted, load_config
from trainer.launch.executors import executor_for
from trainer.launch.render import render_script


@pytest.fixture
def without_torch(tmp_path: Path, jobs_dir: Path):
    """Run Python code or an entry script in a process where torch cannot be imported."""
    site = tmp_path / "no-torch"
    site.mkdir()
    (site / "sitecustomize.py").write_text('import sys\nsys.modules["torch"] = None\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO_ROOT)]), "ANVIL_JOBS_DIR": str(jobs_dir)}

    def run(*argv: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, stdout=stdout, stderr=subprocess.PIPE,
                              text=True, timeout=120)

    return run


HOST_TORCH = ("cluster.modules=[pytorch]",)
"""The job's torch comes from a module (as on a login node without torch): submit cannot check its interpreter."""


def test_the_harness_blocks_torch(without_torch) -> None:
    done = without_torch("-c", "import trainer.train.model")
    assert done.returncode != 0 and "import of torch halted" in done.stderr, done.stderr[-2000:]


def test_every_launch_and_ground_floor_module_imports_without_torch(without_torch) -> None:
    modules = [m.name for package in (trainer.core, trainer.launch)
               for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]
    assert {"trainer.launch.submit", "trainer.launch.executors", "trainer.core.jobdir", "trainer.core.states",
            "trainer.launch.sweep.cli"} <= set(modules)
    done = without_torch("-c", IMPORT_ALL, *sorted(modules))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


IMPORT_ALL = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')"


def test_the_ground_floor_imports_no_side_of_anvil(without_torch) -> None:
    """trainer.core with trainer.launch (and torch) unimportable: every module still imports; the control, a module
    that does use the launch side (the LR-transfer grid runs as a sweep), does not."""
    blocked = 'import sys\nsys.modules["trainer.launch"] = None\n'
    modules = sorted(m.name for m in pkgutil.walk_packages(trainer.core.__path__, "trainer.core."))
    done = without_torch("-c", blocked + IMPORT_ALL, *modules)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    control = without_torch("-c", blocked + IMPORT_ALL, "trainer.research.lr_transfer")
    assert control.returncode != 0 and "'trainer.launch' is not a package" in control.stderr, control.stderr[-2000:]


@pytest.mark.parametrize("cluster", ["local", "nvidia"])
def test_dry_run_and_config_docs_without_torch(without_torch, jobs_dir: Path, cluster: str) -> None:
    args = ["--name", "dry", "--cluster", cluster, "--dry-run", "--executor", "slurm"]
    done = without_torch(str(REPO_ROOT / "submit.py"), *args, *HOST_TORCH)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("#!/bin/bash\n") and "-m trainer.train" in done.stdout
    assert list(jobs_dir.iterdir()) == []
    # The plan's memory needs torch: on a GPU profile it is skipped, and said (a CPU profile plans it on --plan only).
    skipped = "memory not planned: the job's python comes from its modules, and this python"
    assert (skipped in " ".join(done.stderr.split())) == (cluster == "nvidia"), done.stderr
    # Without the module, the job would run this very interpreter, which has no torch: refused in one line.
    refused = without_torch(str(REPO_ROOT / "submit.py"), *args)
    assert refused.returncode == 2 and refused.stdout == "", refused.stderr
    assert f"cluster.python: the job would run '{sys.executable}', which cannot import torch" in refused.stderr
    assert "Traceback" not in refused.stderr
    docs = without_torch("-m", "trainer.launch.docs")
    assert docs.returncode == 0 and "| `optim.lr` | float |" in docs.stdout, docs.stderr[-2000:]


def test_sweep_submit_dry_run_and_status_without_torch(without_torch, jobs_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("name: nt\naxes: {optim.lr: [1e-3, 3e-3]}\n")
    sweeps = ["--sweeps-dir", str(tmp_path / "sweeps")]
    done = without_torch(str(REPO_ROOT / "sweep.py"), *sweeps, "submit", str(tmp_path / "s.yaml"), *HOST_TORCH,
                         "--dry-run", "--executor", "local")
    assert done.returncode == 0 and "lr-3e-3" in done.stdout, done.stderr[-2000:]
    assert list(jobs_dir.iterdir()) == [] and not (tmp_path / "sweeps").exists()
    job = jobs_dir / "plain"
    job.mkdir()
    (job / "config.json").write_text("{}")
    done = without_torch(str(REPO_ROOT / "sweep.py"), "status", str(job), "--json")
    assert done.returncode == 0 and json.loads(done.stdout)[0]["state"] == "NOT_SUBMITTED", done.stderr[-2000:]


def test_each_tool_has_one_name(without_torch) -> None:
    """Usage names the tool as the README calls it; `python -m` of a tool's package points there."""
    for tool in ("submit", "sweep"):  # (convert imports torch: its usage is checked in-process below)
        done = without_torch(str(REPO_ROOT / f"{tool}.py"), "--help")
        assert done.returncode == 0 and done.stdout.startswith(f"usage: python {tool}.py "), done.stdout[:200]
    for package, tool in (("trainer.launch.sweep", "sweep"), ("trainer.export", "convert")):
        done = subprocess.run([sys.executable, "-m", package], capture_output=True, text=True, timeout=120,
                              cwd=REPO_ROOT)
        assert done.returncode == 2 and done.stderr == f"anvil: run it as: python {tool}.py --help\n", done.stderr
    from trainer.export.cli import _parser

    assert _parser().format_usage().startswith("usage: python convert.py ")


def test_dry_run_redirected_is_the_script_byte_for_byte(without_torch, jobs_dir: Path, tmp_path: Path,
                                                         corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python submit.py configs/demo.yaml --dry-run > job.sh` gives exactly the script submit.py would write."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(corpus)  # the demo's relative data paths, from where submit.py runs
    config = REPO_ROOT / "configs" / "demo.yaml"
    with open(tmp_path / "job.sh", "w") as out:
        done = without_torch(str(REPO_ROOT / "submit.py"), str(config), "--dry-run",
                             "--executor", "local", *HOST_TORCH, stdout=out)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = (tmp_path / "job.sh").read_text()
    monkeypatch.chdir(tmp_path)
    cfg = as_submitted(load_config(config, [*HOST_TORCH], environ={}))
    expected = render_script(cfg, jobs_dir / cfg.job.name)
    assert max(map(len, expected.splitlines())) > 80  # a terminal-width wrap (rich's default) would show
    assert printed == expected
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0
    assert "dry run: would write" in done.stderr


def test_executor_queries_without_torch(without_torch, jobs_dir: Path) -> None:
    """The local executor's states of many jobs (live runs and finished ones) in a process without torch."""
    finished, never = JobDir(jobs_dir / "finished"), JobDir(jobs_dir / "never")
    for job in (finished, never):
        job.path.mkdir()
    finished.events.write_text(json.dumps({"event": "start", "job_id": "7", "restart": 0}) + "\n")
    finished.done.write_text("job 7, restart 0\n")
    code = ("import json, sys\nfrom pathlib import Path\nfrom trainer.launch.executors import executor_for\n"
            "from trainer.core.jobdir import JobDir\n"
            "jobs = [JobDir(Path(p)) for p in sys.argv[1:]]\n"
            "states = executor_for('local').states(jobs)\n"
            "print(json.dumps({p.name: [s.state, s.job_id] for p, s in states.items()}))")
    done = without_torch("-c", code, str(finished.path), str(never.path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == {"finished": ["COMPLETED", "7"], "never": ["NOT_SUBMITTED", None]}


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_executor_queries_without_torch(without_torch, jobs_dir: Path) -> None:
    """One squeue for many jobs: a pending one, one SLURM never knew (forgotten), one never submitted."""
    waiting, forgotten, never = (JobDir(jobs_dir / n) for n in ("waiting", "forgotten", "never"))
    for job in (waiting, forgotten, never):
        job.path.mkdir()
    waiting.script.write_text("#!/bin/bash\n#SBATCH --begin=now+600\n#SBATCH --output=/dev/null\nsleep 1\n")
    forgotten.events.write_text(json.dumps({"event": "start", "job_id": "987654", "restart": 0}) + "\n")
    forgotten.failed.write_text("trainer exited with code 2; see logs/\njob 987654, restart 0\n")
    executor = executor_for("slurm")
    job_id = executor.submit(waiting).job_id
    try:
        code = ("import json, sys\nfrom pathlib import Path\nfrom trainer.launch.executors import executor_for\n"
                "from trainer.core.jobdir import JobDir\n"
                "states = executor_for('slurm').states([JobDir(Path(p)) for p in sys.argv[1:]])\n"
                "print(json.dumps({p.name: [s.state, s.job_id, s.source, s.detail] for p, s in states.items()}))")
        done = without_torch("-c", code, str(waiting.path), str(forgotten.path), str(never.path))
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout) == {
            "waiting": ["PENDING", job_id, "squeue", "BeginTime"],
            "forgotten": ["FAILED", "987654", "job directory", "trainer exited with code 2; see logs/"],
            "never": ["NOT_SUBMITTED", None, "job directory", ""],
        }
        assert executor.cancel([waiting, forgotten, never]) == [job_id]  # only the one still queued
    finally:
        subprocess.run(["scancel", job_id])
    wait_for(lambda: executor.states([waiting])[waiting.path].state == "CANCELLED", 30, "the cancellation")
