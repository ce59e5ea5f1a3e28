"""sweep.py: the sweep file, its points and names, refusals that write nothing, retry's choices, and a 1,000-point
status with one squeue call. The full lifecycle on the real cluster is in tests/test_sweep_slurm.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from trainer.core.jobdir import JobDir, append_event, write_error
from trainer.launch.executor import JobState
from trainer.launch.sweep import run
from trainer.launch.sweep.cli import main as sweep_main
from trainer.launch.sweep.spec import format_value, read_sweep
from trainer.launch.sweep.state import PointRecord, SweepState


def sweep_file(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_axes_expand_into_named_points(tmp_path: Path) -> None:
    path = sweep_file(tmp_path, """
name: grid
overrides: {train.steps: 7}
axes:
  optim.lr: {logspace: [1e-4, 1e-2, 3]}
  model.dim: {linspace: [64, 128, 2]}
zip:
  - {model.n_layers: [2, 4], model.n_heads: [2, 4]}
random: {count: 2, seed: 3, axes: {optim.weight_decay: {loguniform: [1e-3, 1e-1]}, train.seed: {randint: [0, 9]}}}
skip:
  - {model.dim: 128, optim.lr: [1e-2]}
""")
    sweep = read_sweep(path)
    assert sweep.keys == ["optim.lr", "model.dim", "model.n_layers", "model.n_heads", "optim.weight_decay",
                          "train.seed"]
    assert len(sweep.points) + len(sweep.skipped) == 3 * 2 * 2 * 2 and len(sweep.skipped) == 4
    first = sweep.points[0]
    assert first.values["optim.lr"] == 1e-4 and first.values["model.dim"] == 64
    assert first.name.startswith("lr-1e-4_dim-64_n_layers-2_n_heads-2_weight_decay-")
    assert sweep.job_name(first) == f"grid.{first.name}"
    assert {p.values["optim.lr"] for p in sweep.points} == {1e-4, 1e-3, 1e-2}
    assert all(not (p.values["model.dim"] == 128 and p.values["optim.lr"] == 1e-2) for p in sweep.points)
    assert [p.values["model.n_heads"] for p in sweep.points[:2]] == [2, 2]  # zipped with n_layers
    assert read_sweep(path).points == sweep.points  # random draws are seeded: the same points, the same names
    assert sweep.base_overrides() == ["train.steps=7"]
    # name_keys: names made of the keys that tell points apart (the head count follows the depth here).
    path.write_text(path.read_text() + "name_keys: [model.n_layers, optim.lr, model.dim, optim.weight_decay]\n")
    named = read_sweep(path)
    assert [p.values for p in named.points] == [p.values for p in sweep.points]
    assert named.points[0].name.startswith("lr-1e-4_dim-64_n_layers-2_weight_decay-")  # in the order swept


@pytest.mark.parametrize(("value", "text"), [(3e-4, "3e-4"), (1e-2, "1e-2"), (0.1, "0.1"), (2.5, "2.5"),
                                             (256, "256"), (256.0, "256"), (True, "true"), ("a/b c", "a-b-c"),
                                             (1.5e-3, "1.5e-3"), (-1, "-1"), ([0.9, 0.95], "0.9-0.95")])
def test_values_in_names(value, text: str) -> None:
    assert format_value(value) == text


BAD_SWEEPS = [
    ("axes: {optim.lr: [1e-3\n", "is not valid YAML (line"),
    ("axes: {optim.lrr: [1, 2]}\n", "'optim.lrr' is not a config field; fields of optim: lr, weight_decay"),
    ("axes: {optim.lr: []}\n", "axes.optim.lr: no values"),
    ("axes: {optim.lr: [1e-3, 0.001]}\n", "two points are named lr-1e-3"),
    ("name: ../x\naxes: {optim.lr: [1e-3]}\n", "the sweep name '../x' must be letters, digits"),
    ("axes: {optim.lr: [1e-3]}\nzip: [{model.dim: [64, 128], model.n_heads: [4]}]\n", "zip.0: the paired axes"),
    ("axes: {optim.lr: [1e-3]}\nskip: [{model.dim: 64}]\n", "skip.0: 'model.dim' is not a swept key"),
    ("axes: {optim.lr: {linspace: [1, 2]}}\n", "axes.optim.lr"),
    ("axes: {optim.lr: [1e-3]}\nbogus: 1\n", "bogus: Extra inputs are not permitted"),
    ("axes: {optim.lr: [1e-3]}\nskip: [{optim.lr: 1e-3}]\n", "every point is skipped"),
    ("axes: {model.dim: [64, 36]}\n", "point dim-36: model.dim: the head size 9 must be even"),
    ("axes: {optim.lr: [1e-3, -1]}\n", "point lr--1: optim.lr: input should be greater than 0"),
    ("axes: {job.name: [a, b]}\n", "job.name cannot be swept"),
    ("overrides: {job.name: x}\naxes: {optim.lr: [1e-3, 3e-3]}\n", "overrides: job.name cannot be set"),
    ("axes: {optim.lr: [1e-3]}\nname_keys: [model.dim]\n", "name_keys: 'model.dim' is not a swept key"),
    ("axes: {optim.lr: [1e-3], model.dim: [64, 128]}\nname_keys: [optim.lr]\n",
     "two points are named lr-1e-3"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_SWEEPS)
def test_bad_sweeps_are_refused_clearly_and_write_nothing(roots, tmp_path: Path, capsys, text: str,
                                                           fragment: str) -> None:
    jobs, sweeps = roots
    path = sweep_file(tmp_path, text)
    code = sweep_main(["submit", str(path), "--executor", "local"])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err, err
    assert "Traceback" not in err
    assert list(jobs.iterdir()) == [] and list(sweeps.iterdir()) == []


def test_every_invalid_point_is_listed_before_anything_is_written(roots, tmp_path: Path, capsys) -> None:
    jobs, sweeps = roots
    path = sweep_file(tmp_path, "axes: {model.dim: [36, 64, 68], optim.lr: [1e-3, -1]}\n")
    assert sweep_main(["submit", str(path), "--executor", "local"]) == 2
    err = capsys.readouterr().err
    assert "invalid sweep: 5 of 6 points cannot run" in err
    for name in ("dim-36_lr-1e-3", "dim-36_lr--1", "dim-64_lr--1", "dim-68_lr-1e-3", "dim-68_lr--1"):
        assert f"point {name}:" in err
    assert "point dim-64_lr-1e-3:" not in err
    assert list(jobs.iterdir()) == [] and list(sweeps.iterdir()) == []
    # skip_invalid: the same sweep leaves them out, names them, and goes on (here: a dry run).
    path.write_text("skip_invalid: true\n" + path.read_text())
    assert sweep_main(["submit", str(path), "--executor", "local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("left out (skip_invalid)") == 5 and "dim-64_lr-1e-3" in out
    assert list(jobs.iterdir()) == [] and list(sweeps.iterdir()) == []


def test_dry_run_lists_points_and_writes_nothing(roots, tmp_path: Path, capsys) -> None:
    jobs, sweeps = roots
    path = sweep_file(tmp_path, "name: dry\naxes: {optim.lr: [1e-3, 3e-3]}\n")
    assert sweep_main(["submit", str(path), "--executor", "slurm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lr-1e-3" in out and "lr-3e-3" in out and f"{jobs}/dry.lr-1e-3" in out
    assert "sbatch --parsable" in out
    assert list(jobs.iterdir()) == [] and list(sweeps.iterdir()) == []


def test_command_line_overrides_apply_to_every_point_but_not_to_swept_keys(roots, tmp_path: Path, capsys) -> None:
    jobs, _ = roots
    path = sweep_file(tmp_path, "name: o\naxes: {optim.lr: [1e-3, 3e-3]}\n")
    sweep = read_sweep(path)
    planned, invalid = run.plan(sweep, ["train.steps=11"], jobs, "local")
    assert invalid == {} and [p.cfg.train.steps for p in planned] == [11, 11]
    assert [p.cfg.optim.lr for p in planned] == [1e-3, 3e-3] and planned[0].cfg.job.name == "o.lr-1e-3"
    assert sweep_main(["submit", str(path), "optim.lr=1", "--dry-run"]) == 2
    assert "optim.lr: swept by" in capsys.readouterr().err


def _record(jobs: Path, name: str, job_id: str | None) -> PointRecord:
    job = JobDir(jobs / name)
    job.path.mkdir()
    if job_id:
        job.submissions.write_text(json.dumps({"submissions": [{"job_id": job_id, "executor": "slurm",
                                                                "time": "2026-12-01T10:00:00+00:00"}]}))
    return PointRecord(name, str(job.path), {"optim.lr": 1e-3})


def test_retry_takes_what_failed_and_skips_what_would_fail_again(tmp_path: Path) -> None:
    names = ["done", "crashed", "refused", "oom", "cancelled", "running", "never", "timeout"]
    state = SweepState("r", "r.yaml", "slurm")
    for i, name in enumerate(names):
        state.points[name] = _record(tmp_path, name, None if name == "never" else str(100 + i))
    job = {name: state.points[name].job for name in names}
    write_error(job["crashed"], "crash", "rank 0: RuntimeError: NCCL timeout")
    write_error(job["refused"], "refused", "rank 0: data.tokenizer: 'x' does not exist\nmore")
    states = {job[n].path: JobState(s, "1", "squeue") for n, s in [
        ("done", "COMPLETED"), ("crashed", "FAILED"), ("refused", "FAILED"), ("oom", "OUT_OF_MEMORY"),
        ("cancelled", "CANCELLED"), ("running", "RUNNING"), ("never", "NOT_SUBMITTED"), ("timeout", "TIMEOUT")]}
    choice = run.choose_retries(state, names, states, force=False)
    assert choice.retry == ["crashed", "cancelled", "timeout"]
    assert set(choice.repeating) == {"refused", "oom"}
    assert "refused: rank 0: data.tokenizer: 'x' does not exist" in choice.repeating["refused"]
    assert choice.ineligible == {"done": "COMPLETED", "running": "RUNNING", "never": "NOT_SUBMITTED"}
    forced = run.choose_retries(state, names, states, force=True)
    assert forced.retry == ["crashed", "refused", "oom", "cancelled", "timeout"]


def test_forgotten_jobs_are_told_apart_by_their_directories(tmp_path: Path) -> None:
    """What the markers and events say once the cluster has forgotten a job."""
    from trainer.launch.executor import recorded_state

    cases = {}
    for name, events, marker in [("done", ["start"], ("DONE", "job 7, restart 0")),
                                 ("failed", ["start"], ("FAILED", "trainer exited with code 2 (refused: x)\njob 7")),
                                 ("lost", ["start"], None), ("cancelled", ["start", "cancel"], None),
                                 ("never-started", [], None)]:
        job = JobDir(tmp_path / name)
        job.path.mkdir()
        job.submissions.write_text(json.dumps({"submissions": [{"job_id": "7", "time": "2026-12-01T10:00:00Z"}]}))
        for event in events:
            append_event(job, event, "7")
        if marker:
            (job.path / marker[0]).write_text(marker[1])
        cases[name] = recorded_state(job)
    assert cases["done"] == JobState("COMPLETED", "7", "job directory")
    assert cases["failed"] == JobState("FAILED", "7", "job directory", "trainer exited with code 2 (refused: x)")
    assert cases["lost"].state == "UNKNOWN" and "no end recorded" in cases["lost"].detail
    assert cases["cancelled"].state == "CANCELLED"
    assert cases["never-started"].state == "UNKNOWN" and "without starting" in cases["never-started"].detail


def test_throttled_submission_waits_in_lanes(tmp_path: Path) -> None:
    """--max-running 2: two points start freely, each further one waits (afterany) for the newest of a lane."""
    class Recording:
        name = "slurm"

        def __init__(self) -> None:
            self.calls: list[tuple[str, str | None]] = []

        def submit(self, job, announce=None, after=None):
            from trainer.launch.executor import Submission

            self.calls.append((job.name, after))
            return Submission("slurm", str(500 + len(self.calls)), [])

    state = SweepState("t", "t.yaml", "slurm", max_running=2)
    for name in "abcde":
        state.points[name] = _record(tmp_path, name, None)
    states = {state.points[n].job.path: JobState("NOT_SUBMITTED", None, "job directory") for n in "abcde"}
    recording = Recording()
    done, stopped = run.submit(recording, state, tmp_path / "sweep", list("abcde"), "submit", states)
    assert done == list("abcde") and not stopped
    assert recording.calls == [("a", None), ("b", None), ("c", "501"), ("d", "502"), ("e", "503")]
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [j["id"] for j in saved["points"]["e"]["job_ids"]] == ["505"] and saved["points"]["e"]["job_ids"][0][
        "after"] == "503"


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_status_of_1000_points_makes_one_squeue_call(roots, tmp_path: Path) -> None:
    """Points the cluster has forgotten (done, failed, lost, half-written metrics), never submitted, and two still
    pending: one squeue call for all (counted by a wrapper on PATH around the real binary)."""
    jobs, sweeps = roots
    state = SweepState("big", "big.yaml", "slurm")
    pending = []
    for i in range(2):
        job = JobDir(jobs / f"big.pending-{i}")
        job.path.mkdir()
        job.script.write_text("#!/bin/bash\n#SBATCH --begin=now+900\n#SBATCH --output=/dev/null\ntrue\n")
        pending.append(subprocess.run(["sbatch", "--parsable", str(job.script)], capture_output=True, text=True,
                                      check=True).stdout.strip())
        job.submissions.write_text(json.dumps({"submissions": [{"job_id": pending[-1], "executor": "slurm",
                                                                "time": "2026-12-01T10:00:00Z"}]}))
        state.points[f"pending-{i}"] = PointRecord(f"pending-{i}", str(job.path), {"optim.lr": 0.1})
    try:
        for i in range(998):
            name = f"p-{i}"
            job = JobDir(jobs / f"big.{name}")
            job.path.mkdir()
            if i % 4 != 3:  # a quarter never submitted
                job_id = str(900000 + i)
                job.submissions.write_text(json.dumps({"submissions": [{"job_id": job_id, "executor": "slurm",
                                                                        "time": "2026-12-01T10:00:00Z"}]}))
                append_event(job, "start", job_id)
                if i % 4 == 0:
                    job.done.write_text(f"job {job_id}, restart 0\n")
                    job.metrics.write_text(json.dumps({"step": 10, "loss": 3.5, "tokens_per_s": 1e4}) + "\n")
                elif i % 4 == 1:
                    job.failed.write_text("trainer exited with code 137; see logs/\n")
                    job.metrics.write_text(json.dumps({"step": 4, "loss": 5.0}) + '\n{"step": 5, "lo')  # cut short
            state.points[name] = PointRecord(name, str(job.path), {"optim.lr": 1e-3 * (i + 1)})
        (sweeps / "big").mkdir()
        (sweeps / "big" / "sweep.json").write_text(state.to_json())

        wrappers = tmp_path / "bin"
        wrappers.mkdir()
        real = subprocess.run(["which", "squeue"], capture_output=True, text=True, check=True).stdout.strip()
        calls = tmp_path / "squeue-calls"
        (wrappers / "squeue").write_text(f'#!/bin/bash\necho "$@" >>{calls}\nexec {real} "$@"\n')
        (wrappers / "squeue").chmod(0o755)
        env = {**os.environ, "PATH": f"{wrappers}:{os.environ['PATH']}", "COLUMNS": "200"}
        done = subprocess.run([sys.executable, str(REPO_ROOT / "sweep.py"), "status", "big", "--json"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(calls.read_text().splitlines()) == 1
        rows = {row["point"]: row for row in json.loads(done.stdout)}
        assert len(rows) == 1000
        assert [rows[f"pending-{i}"]["state"] for i in range(2)] == ["PENDING", "PENDING"]
        assert rows["p-0"]["state"] == "COMPLETED" and rows["p-0"]["loss"] == 3.5
        assert rows["p-1"]["state"] == "FAILED" and rows["p-1"]["step"] == 4  # the half-written line is skipped
        assert rows["p-2"]["state"] == "UNKNOWN" and rows["p-3"]["state"] == "NOT_SUBMITTED"
        table = subprocess.run([sys.executable, str(REPO_ROOT / "sweep.py"), "status", "big"], capture_output=True,
                               text=True, env=env, timeout=120)
        assert table.returncode == 0 and len(calls.read_text().splitlines()) == 2, table.stderr[-2000:]
        assert "249 NOT_SUBMITTED" in table.stdout and "2 PENDING" in table.stdout
    finally:
        subprocess.run(["scancel", *pending])


def test_example_sweep_file_is_valid() -> None:
    sweep = read_sweep(REPO_ROOT / "sweeps" / "demo-lr.yaml")
    assert sweep.name == "demo-lr" and len(sweep.points) == 5 and len(sweep.skipped) == 1
    said = re.search(r"(\d+) learning rates x (\d+) widths, less the (\d+) skipped = (\d+) points",
                     sweep.file.read_text())  # the file's own comment counts them right
    assert said is not None and [int(n) for n in said.groups()] == [3, 2, len(sweep.skipped), len(sweep.points)]
    assert yaml.safe_load((REPO_ROOT / "sweeps" / "demo-lr.yaml").read_text())["base"] == "configs/demo.yaml"


def test_local_sweep_runs_points_in_turn_and_a_second_submission_adds_only_new_points(roots, tmp_path: Path,
                                                                                       corpus: Path, capsys) -> None:
    from tests.train_helpers import TINY, corpus_overrides

    jobs, sweeps = roots
    overrides = [*(o for o in TINY if not o.startswith("optim.lr=")), *corpus_overrides(corpus), "train.steps=3"]
    path = tmp_path / "local.yaml"
    path.write_text(json.dumps({"name": "loc", "overrides": overrides, "axes": {"optim.lr": [1e-3]}}))
    assert sweep_main(["submit", str(path), "--executor", "local"]) == 0
    assert "submitting 1 (0 already submitted)" in capsys.readouterr().out
    path.write_text(json.dumps({"name": "loc", "overrides": overrides, "axes": {"optim.lr": [1e-3, 3e-3]}}))
    assert sweep_main(["submit", str(path), "--executor", "local"]) == 0
    assert "submitting 1 (1 already submitted)" in capsys.readouterr().out
    assert sweep_main(["status", "loc", "--json"]) == 0
    rows = {r["point"]: r for r in json.loads(capsys.readouterr().out)}
    assert {p: (r["state"], r["step"]) for p, r in rows.items()} == {"lr-1e-3": ("COMPLETED", 3),
                                                                     "lr-3e-3": ("COMPLETED", 3)}
    state = json.loads((sweeps / "loc" / "sweep.json").read_text())
    assert [len(state["points"][p]["job_ids"]) for p in ("lr-1e-3", "lr-3e-3")] == [1, 1]
    assert (sweeps / "loc" / "sweep.yaml").read_text() == path.read_text()  # the file as last submitted
    assert sweep_main(["status", "loc", "--watch", "--interval", "0.1"]) == 0  # settled: it stops by itself
    assert "2 COMPLETED" in capsys.readouterr().out
    # A point's job directory is the one submit.py makes for the same config.
    from trainer.launch.submit import main as submit_main

    assert submit_main(["--name", "loc.lr-3e-3", *overrides, "optim.lr=3e-3", "--dry-run", "--executor", "local"]) == 0
    assert capsys.readouterr().out == (jobs / "loc.lr-3e-3" / "slurm.sh").read_text()
    assert submit_main(["--name", "loc.lr-3e-3", *overrides, "optim.lr=3e-3", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((jobs / "loc.lr-3e-3" / "config.json").read_text())
