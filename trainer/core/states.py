"""The words every side agrees on about how a job ends: Anvil's exit codes (trainer, batch script, executors, sweeps)
and SLURM's job states (executors, status, sweeps). One home, so a new code or state is added once."""

from __future__ import annotations

EXIT_REFUSED = 2
"""Exit code of every Anvil command (and of the trainer) that refused its input: a person must fix it, and a retry
would meet it again."""
PREEMPTED_EXIT = 75
"""Exit code of a trainer that checkpointed on request (EX_TEMPFAIL). A file (PREEMPTED) as well as a code: a
launcher between trainer and shell may not pass the code on (srun reports the highest code of its tasks)."""
EXIT_DISK = 74
"""The trainer stopped because the job's storage is full or failing (EX_IOERR): meant for when not even ERROR can be
written."""
EXIT_LOST = 76
"""The trainer stopped because a peer rank is gone (its process or node): ERROR kind `lost`."""
EXIT_HUNG = 124
"""The trainer's watchdog ended a rank that made no progress within the timeout (as timeout(1) exits): kind `hung`."""

# SLURM's job states (squeue/sacct `%T`), and the ones Anvil reads from a job directory it no longer finds queued:
# PREEMPTED (stopped at a checkpoint and not requeued), UNKNOWN (gone with no end recorded), NOT_SUBMITTED.
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                    "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"})
"""States in which a job may still run or write to its directory."""
SETTLED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                     "DEADLINE", "PREEMPTED", "UNKNOWN", "REVOKED", "NOT_SUBMITTED"})
"""States that will not change unless someone submits or retries (`status --watch` stops once every row has one)."""
RETRYABLE = SETTLED - {"COMPLETED", "NOT_SUBMITTED"}
"""End states a retry may resubmit (never COMPLETED, never a job still queued or running)."""
