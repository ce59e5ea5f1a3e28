"""Anvil outside an editable checkout: a wheel built from the repository holds every module and data file of the
package and declares every distribution it imports; installed into a fresh virtual environment, it submits (dry
run) and imports the trainer from a directory outside the repository."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_distributions(package: Path) -> dict[str, set[str]]:
    """Distribution (normalised name) -> the files of `package` that import it, from the source's import lines."""
    std = set(sys.stdlib_module_names) | {package.name}
    module_to_dists = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in std:
                    continue
                for dist in module_to_dists.get(top, [top]):  # not installed here: the module's own name
                    found.setdefault(_normalise(dist), set()).add(str(path.relative_to(package.parent)))
    return found


def declared_distributions(metadata: str) -> set[str]:
    """Every Requires-Dist of a wheel's METADATA, extras included."""
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", line.split(":", 1)[1].strip()).group(0))
            for line in metadata.splitlines() if line.startswith("Requires-Dist:")}


def undeclared(package: Path, metadata: str) -> dict[str, set[str]]:
    declared = declared_distributions(metadata)
    return {dist: files for dist, files in imported_distributions(package).items() if dist not in declared}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built (without network) from a copy of the checkout's files, as CI has them."""
    work = tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    source = work / "src"
    for name in listed:
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(work / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (found,) = (work / "dist").glob("anvil-*.whl")
    return found


def wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()


def test_wheel_holds_the_whole_package_and_declares_what_it_imports(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    metadata = wheel_metadata(wheel)
    package = REPO_ROOT / "trainer"
    tracked = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "--cached", "--others", "--exclude-standard",
                              "trainer"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert tracked and set(tracked) <= names, sorted(set(tracked) - names)  # modules, templates, profiles, evals
    for data in ("trainer/launch/templates/slurm.sh.j2", "trainer/core/clusters/lumi.yaml",
                 "trainer/export/evals/anvil_mc.jsonl"):
        assert data in names
    assert undeclared(package, metadata) == {}


def test_an_undeclared_import_is_found(wheel: Path, tmp_path: Path) -> None:
    """The declaration check fails where it should: huggingface_hub left out, or a new import nobody declared."""
    package = tmp_path / "trainer"
    shutil.copytree(REPO_ROOT / "trainer", package, ignore=shutil.ignore_patterns("__pycache__"))
    metadata = wheel_metadata(wheel)
    assert undeclared(package, metadata) == {}
    without_hub = "".join(line + "\n" for line in metadata.splitlines() if "huggingface" not in line.lower())
    assert set(undeclared(package, without_hub)) == {"huggingface-hub"}
    (package / "launch" / "extra.py").write_text("import sqlalchemy.orm\n")
    assert undeclared(package, metadata) == {"sqlalchemy": {"trainer/launch/extra.py"}}


def venv_seeing_these_packages(venv: Path) -> Path:
    """A fresh virtual environment that imports this environment's packages (no network at test time) after its own.
    Not `--system-site-packages`: made from inside a virtual environment, that sees the base interpreter's packages,
    not this environment's."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    (Path(own) / "these-packages.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    return python


def test_installed_wheel_submits_and_imports_the_trainer_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    python = venv_seeing_these_packages(venv)  # the dependencies from here; Anvil itself only from the wheel
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                                "--force-reinstall", str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ANVIL_JOBS_DIR")}

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([*argv], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)

    where = run(str(python), "-c", "import trainer, trainer.export.evaluation as e; print(trainer.__file__); "
                                   "print(e.EVALS_DIR / 'anvil_mc.jsonl')")
    assert where.returncode == 0, where.stderr[-3000:]
    module, evals = where.stdout.split()
    assert module.startswith(str(venv)) and not module.startswith(str(REPO_ROOT)), module
    assert evals.startswith(str(venv)) and Path(evals).is_file()

    dry = run(str(venv / "bin" / "anvil-submit"), "--name", "outside", "--cluster", "nvidia", "--executor", "slurm",
              "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert dry.stdout.startswith("#!/bin/bash\n") and "#SBATCH --gpus-per-node=8" in dry.stdout  # profile found
    assert f"would write {elsewhere.resolve() / 'jobs' / 'outside'}/" in dry.stderr  # not inside site-packages
    assert not (elsewhere / "jobs").exists()

    # Not activated (its bin/ is not on PATH, where `python3` has no torch): the job runs the venv's python all the
    # same; a job told to run that `python3` is refused before anything is written.
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")  # no site-packages: no torch
    (bare / "python3").chmod(0o755)
    path, env["PATH"] = env["PATH"], f"{bare}{os.pathsep}/usr/bin{os.pathsep}/bin"
    local = run(str(venv / "bin" / "anvil-submit"), "--name", "here", "--executor", "local", "--dry-run")
    assert local.returncode == 0, local.stderr[-3000:]
    assert f"PYTHON={python}\n" in local.stdout
    refused = run(str(venv / "bin" / "anvil-submit"), "--name", "here", "--executor", "local", "cluster.python=python3")
    assert refused.returncode == 2 and not (elsewhere / "jobs").exists(), refused.stderr[-3000:]
    assert "cluster.python: the job would run 'python3', which cannot import torch; point cluster.python at an " \
           f"interpreter with torch, or leave it unset to run the one running this ({python})" in refused.stderr
    env["PATH"] = path

    usage = run(str(venv / "bin" / "anvil-sweep"), "--help")  # the installed command's own name, not sweep.py's
    assert usage.returncode == 0 and usage.stdout.startswith("usage: anvil-sweep "), usage.stdout[:300]

    trainer = run(str(python), "-c", "import trainer.train.loop, trainer.export.cli, trainer.data.loader; print('ok')")
    assert trainer.returncode == 0 and trainer.stdout.strip() == "ok", trainer.stderr[-3000:]
    refused = run(str(venv / "bin" / "anvil-convert"), str(elsewhere), str(elsewhere / "out"))
    assert refused.returncode == 2 and "is not a job directory" in refused.stderr, refused.stderr[-2000:]
