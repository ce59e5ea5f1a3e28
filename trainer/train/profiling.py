"""Profiles of chosen training steps (`metrics.profile_steps`): a torch.profiler trace per run of consecutive steps
on every rank, and on GPU a CUDA memory snapshot of the same steps, written into the job directory.

Each step is recorded under a `step N` range, so the trace shows training steps by their own numbers.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from trainer.core.jobdir import JobDir
from trainer.train.gpu import GpuPaths


def runs(steps: list[int]) -> dict[int, int]:
    """First step -> last step of each run of consecutive steps."""
    spans: dict[int, int] = {}
    for step in sorted(set(steps)):
        first = next((f for f, last in spans.items() if last == step - 1), None)
        if first is None:
            spans[step] = step
        else:
            spans[first] = step
    return spans


class StepProfiler:
    def __init__(self, steps: list[int], job: JobDir, rank: int, device: torch.device, say):
        self.spans, self.job, self.rank, self.device, self.say = runs(steps), job, rank, device, say
        self._active: tuple[profile, int, int] | None = None
        self._done = 0  # the last step profiled to its end
        self._range: record_function | None = None

    def begin(self, step: int) -> None:
        """Before step `step` (its data included): a trace starts at the first step of a run."""
        if self._active is None:
            last = next((last for first, last in self.spans.items() if first <= step <= last), None)
            if last is not None:  # a run's first step, or (resumed mid-run) the first one this attempt takes
                self._start(step, last)
        if self._active is not None:
            self._range = record_function(f"step {step}")
            self._range.__enter__()

    def end(self, step: int) -> None:
        """After step `step`: at the last step of a run, the trace (and snapshot) is written."""
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
            self._done = step
            if step == self._active[2]:
                self._finish()

    def _start(self, first: int, last: int) -> None:
        cuda = GpuPaths.of(self.device).cuda_memory
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        prof = profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=False)
        if cuda:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        prof.start()
        self._active = (prof, first, last)

    def _finish(self) -> None:
        prof, first, _ = self._active
        last = self._done
        self._active = None
        if GpuPaths.of(self.device).cuda_memory:
            torch.cuda.synchronize(self.device)
        prof.stop()
        trace = self.job.profile(self.rank, first, last)
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
        where = f"{trace} (one per rank; open in ui.perfetto.dev or chrome://tracing)"
        if GpuPaths.of(self.device).cuda_memory:
            snapshot = self.job.profile(self.rank, first, last, kind="memory")
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            where += f"; CUDA memory snapshot {snapshot} (pytorch.org/memory_viz)"
        self.say(f"profile of steps {first}..{last}: {where}")

    def close(self) -> None:
        """A run cut short (preemption, the data ending, an error, out of memory): write what was recorded."""
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if self._active is not None and self._done >= self._active[1]:
            self._finish()
        elif self._active is not None:
            self._active[0].stop()
            self._active = None
