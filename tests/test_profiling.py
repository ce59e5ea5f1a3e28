"""Step profiles: the runs of consecutive steps, a resumed run, a run cut short (in-process, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.core.jobdir import JobDir
from trainer.train.profiling import StepProfiler, runs


def _steps(trace: Path) -> set[str]:
    return {e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name", "").startswith("step ")}


def test_runs_resumes_and_cut_short_runs(tmp_path: Path) -> None:
    assert runs([9, 3, 4, 5, 11, 4]) == {3: 5, 9: 9, 11: 11}
    job, said, x = JobDir(tmp_path), [], torch.randn(32, 32)
    profiler = StepProfiler([3, 4, 5, 9], job, 0, torch.device("cpu"), said.append)
    for step in range(4, 11):  # resumed at step 4: what is left of 3..5, then 9
        profiler.begin(step)
        x = x @ x / 32
        profiler.end(step)
    profiler.close()
    assert sorted(p.name for p in (tmp_path / "profiles").iterdir()) == ["trace-rank0-steps4-5.json",
                                                                        "trace-rank0-steps9-9.json"]
    assert _steps(job.profile(0, 4, 5)) == {"step 4", "step 5"} and _steps(job.profile(0, 9, 9)) == {"step 9"}
    assert said == [f"profile of steps 4..5: {job.profile(0, 4, 5)} (one per rank; open in ui.perfetto.dev or "
                    "chrome://tracing)", f"profile of steps 9..9: {job.profile(0, 9, 9)} (one per rank; open in "
                    "ui.perfetto.dev or chrome://tracing)"]

    cut = StepProfiler([2, 3, 4], JobDir(tmp_path / "cut"), 1, torch.device("cpu"), said.append)
    cut.begin(2), cut.end(2), cut.begin(3)  # the run stops inside step 3 (an error, preemption)
    cut.close()
    assert _steps(JobDir(tmp_path / "cut").profile(1, 2, 2)) == {"step 2", "step 3"}
