"""The job-directory protocol shared by `slurm.sh`, the trainer, the local executor and status tools.

The batch shell turns SLURM's USR2 into the `PREEMPT` trigger; the trainer, having saved a checkpoint,
writes `PREEMPTED` and exits with `PREEMPTED_EXIT` (a file as well as a code, because torchrun reports
any failing worker as exit code 1); the shell then requeues, or writes `DONE` / `FAILED`.
"""

PREEMPT = "PREEMPT"
"""Trigger written by the batch shell when SLURM asks the job to stop: checkpoint and exit."""
PREEMPTED = "PREEMPTED"
"""Written by the trainer after its preemption checkpoint: requeue me."""
DONE = "DONE"
"""The run finished; holds the job id and time."""
FAILED = "FAILED"
"""The run stopped for good; holds the reason."""
RESTARTS = "RESTARTS"
"""SLURM_RESTART_COUNT of the current attempt."""
EVENTS = "events.jsonl"
"""One JSON line per attempt start, requeue and end, appended by the batch shell."""

PREEMPTED_EXIT = 75
"""Exit code of a trainer that checkpointed on request and wants to be requeued (EX_TEMPFAIL)."""
