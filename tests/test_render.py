"""Golden tests of the rendered batch scripts: what research/peers.md §3 says a correct one does.

Each profile renders to a file under tests/golden/ (regenerate with ANVIL_UPDATE_GOLDEN=1 after a
deliberate template change, and read the diff); on top of the exact match, the checklist items are
asserted one by one so a regenerated golden cannot silently drop one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from trainer.core.layers import load_config
from trainer.launch.render import RenderError, render_script

GOLDEN = Path(__file__).parent / "golden"
JOB_DIR, CODE_DIR = Path("/scratch/project_465000001/anvil/jobs/run-1"), Path("/scratch/project_465000001/anvil")

PROFILES = {
    "lumi": ["--cluster=lumi", "cluster.account=project_465000001", "cluster.nodes=4"],
    # As submit.py freezes it: no container, so the python that submitted (here, a user's venv).
    "nvidia": ["--cluster=nvidia", "cluster.nodes=2", "cluster.python=/home/user/venv/bin/python"],
    "nvidia-container": ["--cluster=nvidia", "cluster.nodes=2",
                         "cluster.container={runtime: apptainer, image: /images/pytorch.sif, flags: [--nv]}"],
    "local": ["--cluster=local", "cluster.nodes=2", "cluster.python=/home/user/venv/bin/python"],
}


def render(name: str, *extra: str, env: dict[str, str] | None = None, tmp: Path | None = None) -> str:
    overrides = [a.replace("--cluster=", "cluster.profile=") for a in PROFILES[name]]
    config_file = None
    if env:  # hostile values travel through a YAML file, exactly as a user would write them
        config_file = tmp / "env.yaml"
        config_file.write_text(yaml.safe_dump({"cluster": {"env": env}}))
    cfg = load_config(config_file, ["job.name=run-1", "train.global_batch_size=64", *overrides, *extra], environ={})
    return render_script(cfg, JOB_DIR, CODE_DIR)


HOSTILE = "a'b\"c $(touch CANARY) `touch CANARY` ; touch CANARY \\ \n second line $HOME '' \"\" \t end"


def sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            options[key] = value
    return options


@pytest.mark.parametrize("name", PROFILES)
def test_matches_golden_file(name: str) -> None:
    script = render(name)
    golden = GOLDEN / f"{name}.sh"
    if os.environ.get("ANVIL_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(script)
    assert script == golden.read_text(), f"rendered script differs from {golden}; see the module docstring"


@pytest.mark.parametrize("name", PROFILES)
def test_bash_syntax_and_shellcheck_clean(name: str, tmp_path: Path) -> None:
    path = tmp_path / "slurm.sh"
    path.write_text(render(name, env={"WEIRD": HOSTILE}, tmp=tmp_path))
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert shutil.which("shellcheck"), "shellcheck is part of the test toolchain (apt install shellcheck)"
    out = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("name", PROFILES)
def test_common_checklist(name: str) -> None:
    script = render(name)
    opts = sbatch_options(script)
    assert opts["signal"] == "B:USR2@300"  # to the batch shell only, well before the limit; not USR1 (NCCL)
    assert "requeue" in opts and opts["open-mode"] == "append"
    assert opts["output"] == f"{JOB_DIR}/logs/%x-%j.out" and opts["error"] == f"{JOB_DIR}/logs/%x-%j.err"
    assert opts["chdir"] == str(CODE_DIR)
    # Every stop signal is noted and passed to the trainer through the trigger file, never fatal to the shell.
    assert 'for sig in USR2 TERM INT HUP; do' in script and 'trap "note_signal $sig" "$sig"' in script
    assert 'touch "$PREEMPT_FILE"' in script
    assert '"${LAUNCH[@]}" &' in script and 'wait "$STEP_PID"' in script  # interruptible wait
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and 'if [ "$RESTART" -ge "$MAX_RESTARTS" ]' in script
    assert "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in script  # no fixed port
    assert not re.search(r"MASTER_PORT=\d|rdzv-endpoint=[^\"$]*:\d|29500", script)
    assert "--kill-on-bad-exit=1" in script and "set -euo pipefail" in script
    assert 'export TRITON_CACHE_DIR="$NODE_LOCAL/triton" TORCHINDUCTOR_CACHE_DIR="$NODE_LOCAL/inductor"' in script
    assert "NODE_LOCAL=/tmp/" in script
    assert 'report_environment >"$JOB_DIR/logs/env-$SLURM_JOB_ID-$RESTART.txt"' in script
    assert "CUDA_VISIBLE_DEVICES" not in script and "ROCR_VISIBLE_DEVICES" not in script
    # Node counts come from SLURM at run time, never hard-coded a second time.
    assert '--nodes="$SLURM_JOB_NUM_NODES"' in script
    # No comment line inside a backslash-continued command (Modalities' bug).
    lines = script.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.rstrip().endswith("\\"):
            assert not lines[i + 1].lstrip().startswith("#"), f"comment inside a continued command at line {i + 2}"


def test_lumi_checklist() -> None:
    script = render("lumi")
    opts = sbatch_options(script)
    assert opts["account"] == "project_465000001" and opts["partition"] == "standard-g"
    assert opts["gpus-per-node"] == "8" and opts["ntasks-per-node"] == "8" and opts["cpus-per-task"] == "7"
    assert int(opts["ntasks-per-node"]) * int(opts["cpus-per-task"]) <= 56  # low-noise mode: 56 of 64 cores
    assert "exclusive" in opts and opts["mem"] == "480G" and opts["nodes"] == "4"
    masks = "0x00fe000000000000,0xfe00000000000000,0x0000000000fe0000,0x00000000fe000000,0x00000000000000fe"
    assert f"--cpu-bind=mask_cpu:{masks}" in script
    for bind in ("/var/spool/slurmd", "/opt/cray", "/usr/lib64/libcxi.so.1"):
        assert f"--bind {bind}" in script
    assert 'RUN=(singularity exec --bind "$JOB_DIR" --bind "$CODE_DIR"' in script
    assert "export NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3" in script
    assert 'export MIOPEN_USER_DB_PATH="$NODE_LOCAL/miopen" MIOPEN_CUSTOM_CACHE_DIR="$NODE_LOCAL/miopen"' in script
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script
    # srun launcher: one task per GCD, no torchrun; ranks come from SLURM_PROCID in the trainer.
    assert "trainer.train.torchrun --nnodes" not in script
    assert '"${RUN[@]}" "$PYTHON" -m trainer.train "$JOB_DIR")' in script


def test_nvidia_checklist() -> None:
    script = render("nvidia")
    opts = sbatch_options(script)
    assert opts["gpus-per-node"] == "8" and opts["ntasks-per-node"] == "1" and opts["cpus-per-task"] == "64"
    assert "exclusive" in opts and opts["mem"] == "0" and "account" not in opts
    assert '-m trainer.train.torchrun --nnodes="$SLURM_JOB_NUM_NODES"' in script
    assert '--rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d' in script
    assert '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"' in script
    assert "--nproc-per-node=8" in script and "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script
    assert "MIOPEN" not in script and "RUN=(" not in script.replace("RUN=()", "")


def test_nvidia_container() -> None:
    script = render("nvidia-container")
    assert 'RUN=(apptainer exec --nv --bind "$JOB_DIR" --bind "$CODE_DIR" /images/pytorch.sif)' in script
    assert '"${RUN[@]}" "$PYTHON" -m trainer.train.torchrun' in script


def test_rendered_values_stay_literal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hostile values are data: running the export lines sets them verbatim and executes nothing."""
    monkeypatch.chdir(tmp_path)
    script = render("local", env={"EVIL": HOSTILE}, tmp=tmp_path)
    exports = script[script.index("export EVIL="):script.index("\nRUN=(")]  # the value spans lines
    out = subprocess.run(["bash", "-c", exports + '\nprintf %s "$EVIL"'], capture_output=True, text=True)
    assert out.stdout == HOSTILE
    assert not (tmp_path / "CANARY").exists()


def test_unsafe_sbatch_path_is_refused() -> None:
    cfg = load_config(None, ["job.name=x"], environ={})
    with pytest.raises(RenderError, match="#SBATCH"):
        render_script(cfg, Path("/tmp/with space/jobs/x"), Path("/tmp"))
