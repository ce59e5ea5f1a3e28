"""`python -m trainer.train.torchrun ARGS`: torchrun (same arguments), a transparent launcher for Anvil's ranks.

Two things torchrun does its own way, done here the way a SLURM job needs them:

- **Signals.** torchrun meets TERM/INT/HUP by stopping its ranks itself, with SIGKILL 30 s later, and dies of USR2.
  Here every stop signal (TERM, INT, HUP, USR2) is passed on to the ranks (with CONT, as SLURM sends it, so that a
  stopped rank hears it too) and torchrun keeps waiting: the ranks agree on a step, checkpoint and exit, however long
  the checkpoint takes (SLURM's KillWait bounds it on a cluster). A signal before the ranks exist ends torchrun at
  once: there is nothing to save yet.
- **Failures.** When a rank exits with an error, torchrun raises `ChildFailedError`: the job's error log would end in
  the launcher's own stack trace and a failure table, under the rank's clear message. Here the rank's message stands
  as the last word, the launcher adds one line naming the rank and its exit code, and exits with that code (2:
  refused, 75: preempted, 128 + N: killed by signal N; torchrun's own is always 1). A rank killed by a signal could
  not say why it ended, so the launcher records that in the job's ERROR as soon as it sees it (the first reason
  recorded stays). torchrun's own log line for the same failure (`E… failed (exitcode: N) …`) is dropped, and a rank
  that checkpointed and stopped (75) is no failure: the launcher says nothing of it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.run import parse_args, run

from trainer.core import jobdir, states
from trainer.core.processes import STOP_SIGNALS, children, die_with_parent, node_name, send


def exit_code(code: int) -> int:
    """A rank's exit code as a shell reports it: a rank killed by signal N (code -N) gives 128 + N."""
    return 128 - code if code < 0 else code or 1


def _forward(signum: int, frame: object) -> None:
    """A stop signal to this launcher goes to its ranks (with CONT, so that a stopped one hears it too)."""
    sig = signal.Signals(signum)
    ranks = children(os.getpid())
    if not ranks:
        raise SignalException(f"got {sig.name} before any rank started", sigval=sig)
    send(ranks, signal.SIGCONT)
    send(ranks, sig)


def _report_kills_at_once(job: jobdir.JobDir) -> None:
    """Record a rank killed by a signal the moment torchrun's monitor sees it: torchrun itself raises only after its
    other ranks have ended, and by then a peer's diagnosis ("rank N is gone") may have been recorded first."""
    original = LocalElasticAgent._monitor_workers

    def monitor(self, worker_group):
        result = original(self, worker_group)
        killed = [(rank, f) for rank, f in result.failures.items() if f.exitcode < 0]
        if killed and job.path.is_dir():
            rank, failure = min(killed, key=lambda item: item[1].timestamp)
            jobdir.write_error(job, "killed", _killed(rank, failure))
        return result

    LocalElasticAgent._monitor_workers = monitor


def _killed(rank: int, failure) -> str:
    return (f"rank {rank} on {node_name()} was killed by {signal.Signals(-failure.exitcode).name} (pid {failure.pid}: "
            "by hand, by the kernel's out-of-memory killer, or a crash)")


class _DropFailureLine(logging.Filter):
    """torchrun's `failed (exitcode: …)` record: this launcher reports the failure in its own one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed (exitcode")


def _job(args) -> jobdir.JobDir | None:
    """The job directory when the ranks run Anvil's trainer (`-m trainer.train JOB`)."""
    if args.module and args.training_script == "trainer.train" and args.training_script_args:
        return jobdir.JobDir(Path(args.training_script_args[0]).resolve())
    return None


def main(argv: Sequence[str]) -> int:
    args = parse_args(list(argv))
    if hasattr(args, "signals_to_handle"):  # torch >= 2.9: torchrun handles only what it is told to
        args.signals_to_handle = "SIGQUIT"
        for sig in STOP_SIGNALS:
            signal.signal(sig, _forward)
    die_with_parent(signal.SIGTERM)  # the batch shell or srun's step gone: the ranks checkpoint and stop
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropFailureLine())
    job = _job(args)
    if job is not None:
        _report_kills_at_once(job)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        host = node_name()
        if failure.exitcode == states.PREEMPTED_EXIT:  # checkpointed and stopped, as asked: the rank said so
            return failure.exitcode
        if failure.exitcode >= 0:
            print(f"anvil: rank {rank} on {host} exited with code {failure.exitcode} (its own output is above)",
                  file=sys.stderr)
            return exit_code(failure.exitcode)
        print(f"anvil: {_killed(rank, failure)}", file=sys.stderr)
        return exit_code(failure.exitcode)
    except RendezvousError as exc:  # the store's host (another node's torchrun) is gone: the job is over
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"anvil: torchrun on {node_name()} lost the job's rendezvous ({cause}): another node's launcher is "
              "gone", file=sys.stderr)
        return states.EXIT_LOST
    except SignalException as exc:  # a signal before the ranks started, or a torch without signals_to_handle
        print(f"anvil: torchrun stopped by {exc.sigval.name}; its ranks got the signal too", file=sys.stderr)
        return exit_code(-exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
