"""Stop at a step boundary when asked: every rank agrees, then the caller checkpoints and exits.

What asks: a stop signal to any rank (TERM, INT, HUP, USR2: noted by `trainer.core.processes.record_stop_signals`, never
acted on inside the handler, which could land mid-backward or mid-write), or the batch shell's `PREEMPT` trigger
file, which rank 0 alone checks (thousands of ranks must not stat a shared filesystem every step). One all-reduce per
step makes the decision, and its cause, common to all ranks: the cause ranked last in `PREEMPT_CAUSES` wins, so a stop
(TERM) outranks a requeue (USR2) that another rank heard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.core.files import write_atomic
from trainer.core.jobdir import PREEMPT_CAUSES, TRIGGER_CAUSE, JobDir
from trainer.core.processes import record_stop_signals, stop_signals_received


class PreemptionWatch:
    def __init__(self, job: JobDir, device: torch.device):
        self.trigger = job.preempt
        self.marker = job.preempted
        self.device = device
        self.cause: str | None = None
        record_stop_signals()  # already on in a rank started by `python -m trainer.train`; tools too

    def _local_cause(self) -> int:
        heard = [PREEMPT_CAUSES.index(s.name) for s in stop_signals_received() if s.name in PREEMPT_CAUSES]
        if dist.get_rank() == 0 and self.trigger.exists():
            heard.append(PREEMPT_CAUSES.index(TRIGGER_CAUSE))
        return max(heard, default=-1)

    def requested(self) -> bool:
        """True on every rank once any rank was signalled or the trigger file exists (a collective)."""
        code = torch.tensor([float(self._local_cause() + 1)], device=self.device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        found = int(code.item()) - 1
        self.cause = PREEMPT_CAUSES[found] if found >= 0 else None
        return self.cause is not None

    def mark_preempted(self, step: int) -> None:
        """After the checkpoint is complete: tells the batch shell the step and the cause (it requeues or stops)."""
        if dist.get_rank() == 0:
            write_atomic(self.marker, f"{step} {self.cause}\n")
