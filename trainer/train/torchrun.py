"""`python -m trainer.train.torchrun ARGS`: torchrun (same arguments), reporting a failed rank in one line.

When a rank exits with an error, torchrun raises `ChildFailedError` out of its entry point: the job's error log
then ends in the launcher's own stack trace and a failure table, under the rank's clear message (a refused config,
a damaged checkpoint). Here the rank's message stands as the last word, the launcher adds one line naming the
rank and its exit code, and exits with that code (2: refused, 75: preempted; torchrun's own is always 1). A signal
that stops torchrun itself (cancellation) is one line too.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def exit_code(code: int) -> int:
    """A rank's exit code as a shell reports it: a rank killed by signal N (code -N) gives 128 + N."""
    return 128 - code if code < 0 else code or 1


def main(argv: Sequence[str]) -> int:
    try:
        run(parse_args(list(argv)))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(f"anvil: rank {rank} on {socket.gethostname()} exited with code {failure.exitcode} (its own output "
              "is above)", file=sys.stderr)
        return exit_code(failure.exitcode)
    except SignalException as exc:  # scancel, a time limit: torchrun has passed the signal on to its ranks
        print(f"anvil: torchrun stopped by {exc.sigval.name}; its ranks got the signal too", file=sys.stderr)
        return exit_code(-exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
