"""A six-point sweep on the real SLURM cluster: submit, status moving through RUNNING to COMPLETED, one point
cancelled and one killed mid-training, retry resubmitting exactly those two, all six completed, and the summary
and plots agreeing with every point's metrics.jsonl."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.train_helpers import TINY, corpus_overrides
from trainer.launch.sweep.cli import main as sweep_main

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"}


def status(capsys) -> dict[str, dict]:
    assert sweep_main(["status", "six", "--json"]) == 0
    return {row["point"]: row for row in json.loads(capsys.readouterr().out)}


def metrics(row: dict) -> list[dict]:
    path = Path(row["path"]) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def watch(capsys, seen: dict[str, set], until, timeout: float, what: str) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = status(capsys)
        for point, row in rows.items():
            seen.setdefault(point, set()).add(row["state"])
        if until(rows):
            return rows
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}: {({p: r['state'] for p, r in rows.items()})}")


def test_six_point_sweep_cancel_failure_retry_summary_and_plot(roots, tmp_path: Path, corpus: Path,
                                                              capsys) -> None:
    jobs, sweeps = roots
    # One thread per job: the two "nodes" share this machine's two cores.
    overrides = [*(o for o in TINY if not o.startswith("optim.lr=")), *corpus_overrides(corpus), "train.steps=80",
                 "checkpoint.interval=20", "metrics.log_every=10", "cluster.env={OMP_NUM_THREADS: '1'}"]
    (tmp_path / "six.yaml").write_text(json.dumps({
        "name": "six", "overrides": overrides, "axes": {"optim.lr": [1e-3, 3e-3, 1e-2], "train.seed": [0, 1]}}))
    assert sweep_main(["submit", str(tmp_path / "six.yaml"), "--executor", "slurm", "--max-running", "2"]) == 0
    out = capsys.readouterr().out
    assert "submitting 6 (0 already submitted), at most 2 at a time" in out
    names = ["lr-1e-3_seed-0", "lr-1e-3_seed-1", "lr-3e-3_seed-0", "lr-3e-3_seed-1", "lr-1e-2_seed-0",
             "lr-1e-2_seed-1"]
    victim, cancelled = names[0], names[-1]

    # Two start; each further point waits for the newest job of one of two lanes (SLURM dependencies).
    state = json.loads((sweeps / "six" / "sweep.json").read_text())
    ids = {p: state["points"][p]["job_ids"][0] for p in names}
    assert [ids[p]["after"] for p in names] == [None, None, *(ids[p]["id"] for p in names[:4])]
    first = status(capsys)
    assert first[cancelled]["state"] == "PENDING" and "Dependency" in first[cancelled]["detail"]
    # The last point waits: cancel it there.
    assert sweep_main(["cancel", "six", "--points", cancelled]) == 0
    assert "cancelled 1 job(s)" in capsys.readouterr().out
    seen: dict[str, set] = {}

    # Kill the first point's training mid-run (after its first checkpoint), as a failing node would.
    rows = watch(capsys, seen, lambda r: r[victim]["state"] == "RUNNING" and (r[victim]["step"] or 0) >= 30,
                 180, "the first point to train")
    subprocess.run(["pkill", "-9", "-f", f"trainer.train {rows[victim]['path']}"], check=True)
    assert (Path(rows[victim]["path"]) / "checkpoints" / "step-20" / "COMPLETE").is_file()
    rows = watch(capsys, seen, lambda r: not any(row["state"] in ACTIVE for row in r.values()), 300,
                 "every point to end")
    assert {p: r["state"] for p, r in rows.items()} == {
        **{n: "COMPLETED" for n in names[1:-1]}, victim: "FAILED", cancelled: "CANCELLED"}
    assert "trainer exited with code" in rows[victim]["detail"] and "killed by SIGKILL" in rows[victim]["detail"]
    assert rows[cancelled]["detail"] == "cancelled with scancel"  # every ended point says why

    # Retry takes exactly those two (and a second retry finds nothing while they run).
    assert sweep_main(["retry", "six"]) == 0
    out = capsys.readouterr().out
    assert "submitted 2 point(s)" in out
    state = json.loads((sweeps / "six" / "sweep.json").read_text())
    retried = sorted(p for p, record in state["points"].items() if any(j["action"] == "retry"
                                                                       for j in record["job_ids"]))
    assert retried == sorted([victim, cancelled])
    assert all(len(state["points"][p]["job_ids"]) == (2 if p in retried else 1) for p in names)
    assert sweep_main(["retry", "six"]) == 0 and "nothing to retry" in capsys.readouterr().out
    rows = watch(capsys, seen, lambda r: all(row["state"] == "COMPLETED" for row in r.values()), 300,
                 "the retried points to complete")
    assert all("RUNNING" in seen[p] for p in names), seen  # every row was seen moving through RUNNING
    victim_log = "".join(p.read_text() for p in (Path(rows[victim]["path"]) / "logs").glob("*.out"))
    assert "resumed from" in victim_log  # the retry went on from the killed run's checkpoint

    # The summary and the plots hold each point's own numbers.
    assert sweep_main(["summarize", "six"]) == 0
    assert "best final loss:" in capsys.readouterr().out
    with open(sweeps / "six" / "summary.csv") as f:
        summary = {row["point"]: row for row in csv.DictReader(f)}
    assert sorted(summary) == sorted(names)
    for point, row in rows.items():
        losses = [m["loss"] for m in metrics(row) if "loss" in m]
        assert summary[point]["state"] == "COMPLETED" and int(summary[point]["step"]) == 80
        assert float(summary[point]["final_loss"]) == losses[-1]
        assert float(summary[point]["best_loss"]) == min(losses)
    assert sweep_main(["plot", "six", "--x", "optim.lr", "--hue", "train.seed"]) == 0
    capsys.readouterr()
    for name in ("loss_curves", "loss_vs_optim.lr"):
        assert (sweeps / "six" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    against = json.loads((sweeps / "six" / "loss_vs_optim.lr.json").read_text())
    for seed in ("0", "1"):
        expected = sorted((rows[n]["values"]["optim.lr"], float(summary[n]["final_loss"])) for n in names
                          if n.endswith(f"seed-{seed}"))
        assert [tuple(p) for p in against["curves"][seed]] == expected
    curves = json.loads((sweeps / "six" / "loss_curves.json").read_text())["curves"]
    assert {p: [v for _, v in c] for p, c in curves.items()} == {
        p: [m["loss"] for m in metrics(rows[p]) if "loss" in m] for p in names}
    # The same file again submits nothing: every point is known.
    assert sweep_main(["submit", str(tmp_path / "six.yaml"), "--executor", "slurm"]) == 0
    assert "submitting 0 (6 already submitted)" in capsys.readouterr().out
    wait_for(lambda: not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip(), 60,
             "the queue to drain")
