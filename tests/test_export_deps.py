"""convert.py's optional packages: an option whose package is missing is refused in one line before any work, with
the install line that fits how Anvil was installed (a checkout's editable install, or the package of a wheel).

A missing package is simulated as tests/test_launch_side.py simulates a missing torch: `sys.modules[name] = None`
(in a subprocess through a `sitecustomize` on PYTHONPATH, or in-process with monkeypatch), which both `import`
and `importlib.util.find_spec` see as not installed. No training: the checkpoint holds an untrained model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp

from tests.conftest import REPO_ROOT
from tests.train_helpers import make_job
from trainer.core import commands
from trainer.core.jobdir import JobDir, mark_complete, step_dir
from trainer.export import deps
from trainer.export.cli import main
from trainer.train.model import Transformer


def untrained_job(tmp_path: Path, corpus: Path) -> Path:
    """A job with one complete checkpoint (step-2) of an untrained tiny model: exportable, in a second."""
    job = make_job(tmp_path, "src", corpus)
    cfg = JobDir(job).read_config()
    step = step_dir(JobDir(job).checkpoints, 2)
    dcp.save({"model": Transformer(cfg.model, cfg.data.seq_len).state_dict()}, checkpoint_id=str(step), no_dist=True)
    mark_complete(step, {"step": 2})
    return job


def convert_without(tmp_path: Path, *blocked: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`python convert.py ARGV` in a process where the modules `blocked` cannot be imported (none: as installed)."""
    site = tmp_path / "blocked"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO_ROOT)])}
    return subprocess.run([sys.executable, str(REPO_ROOT / "convert.py"), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_sample_without_transformers_is_refused_before_the_export(tmp_path: Path, corpus: Path) -> None:
    job, out = untrained_job(tmp_path, corpus), tmp_path / "out"
    assert commands.IN_CHECKOUT  # the tests run from the checkout: its install line
    refused = convert_without(tmp_path, "transformers", argv=[str(job), str(out), "--sample", "hi"])
    assert refused.returncode == 2 and refused.stdout == "", refused.stdout + refused.stderr[-3000:]
    assert refused.stderr == ("--sample needs transformers, which is not installed: pip install -e '.[eval]'\n")
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # refused before any work
    # Control: transformers is there, so the check passes and the usual errors follow (a missing job here).
    passed = convert_without(tmp_path, argv=[str(tmp_path / "nojob"), str(out), "--sample", "hi"])
    assert passed.returncode == 2 and "Traceback" not in passed.stderr, passed.stderr[-3000:]
    assert passed.stderr.strip() == f"{tmp_path / 'nojob'} is not a job directory (no config.json)"
    # And the checkpoint itself exports: the missing package alone kept `out` from being written.
    assert main([str(job), str(out)]) == 0 and (out / "config.json").is_file()


@pytest.mark.parametrize(("checkout", "line"), [(True, "pip install -e '.[eval]'"),
                                               (False, "pip install 'anvil[eval]'")])
def test_eval_names_each_missing_package_and_the_install_line(tmp_path: Path, capsys, monkeypatch, checkout: bool,
                                                                line: str) -> None:
    monkeypatch.setattr(commands, "IN_CHECKOUT", checkout)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "accelerate", None)
    nojob, out = tmp_path / "nojob", tmp_path / "out"  # the check comes before the job is even looked at
    assert main([str(nojob), str(out), "--eval"]) == 2
    assert capsys.readouterr().err == f"--eval needs lm-eval and accelerate, which are not installed: {line}\n"
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main([str(nojob), str(out), "--eval", "anvil_mc", "--sample", "hi"]) == 2
    assert capsys.readouterr().err == ("--eval needs lm-eval, transformers and accelerate, --sample needs "
                                       f"transformers, which are not installed: {line}\n")
    assert main([str(nojob), str(out), "--upload", "org/model", "--dry-run"]) == 2  # needs none of them
    assert "is not a job directory" in capsys.readouterr().err
    assert not out.exists()


def test_a_vllm_backend_is_checked_once_the_config_is_read(tmp_path: Path, corpus: Path, capsys,
                                                          monkeypatch) -> None:
    monkeypatch.setattr(commands, "IN_CHECKOUT", False)
    monkeypatch.setitem(sys.modules, "vllm", None)
    job = make_job(tmp_path, "v", corpus, "eval.backend=vllm")  # no checkpoint: the check comes before it is read
    assert main([str(job), str(tmp_path / "out"), "--eval"]) == 2
    assert capsys.readouterr().err == ("--eval (eval.backend: vllm) needs vllm, which is not installed: "
                                       "pip install 'anvil[vllm]'\n")


def test_install_line_fits_the_installation(monkeypatch) -> None:
    monkeypatch.setattr(commands, "IN_CHECKOUT", True)
    assert deps.install_line("eval") == "pip install -e '.[eval]'"
    assert deps.install_line("eval", "vllm") == "pip install -e '.[eval,vllm]'"
    monkeypatch.setattr(commands, "IN_CHECKOUT", False)
    assert deps.install_line("eval") == "pip install 'anvil[eval]'"
    assert deps.install_line("eval", "vllm") == "pip install 'anvil[eval,vllm]'"


def test_every_package_checked_is_an_extra_of_anvil() -> None:
    """The install line installs what was missing: each distribution checked is in the extra it is mapped to."""
    import tomllib

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for distribution in {*deps.EVAL, *deps.SAMPLE, *deps.VLLM}:
        requirements = extras[deps.EXTRA[distribution]]
        assert any(r.split(">")[0].split("<")[0].split("[")[0] == distribution for r in requirements), distribution
