"""Stop at a step boundary when SLURM asks: every rank agrees, then the caller checkpoints and exits.

Signal handlers only set a flag (work inside a handler can land mid-backward or mid-write); the
`PREEMPT` trigger file is checked by rank 0 alone, so thousands of ranks do not stat a shared
filesystem every step; one all-reduce makes the decision common to all ranks.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from trainer.files import write_atomic
from trainer.launch.jobdir import JobDir


class PreemptionWatch:
    def __init__(self, job: JobDir, device: torch.device):
        self.trigger = job.preempt
        self.marker = job.preempted
        self.device = device
        self.signalled = False
        # SIGTERM: SLURM's cancellation/time limit (and torchrun's forwarding of it); SIGUSR2: srun-launched
        # ranks that receive the signal directly.
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def requested(self) -> bool:
        """True on every rank once any rank was signalled or the trigger file exists (a collective)."""
        local = self.signalled or (dist.get_rank() == 0 and self.trigger.exists())
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def mark_preempted(self, step: int) -> None:
        """Call after the checkpoint is complete: tells the batch shell to requeue."""
        if dist.get_rank() == 0:
            write_atomic(self.marker, f"{step}\n")
