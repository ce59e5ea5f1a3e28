"""Process lifetimes on Linux, so that no process of a job outlives it where no cgroup tracks it: children that die
with their parent, the stop signals a job obeys, and every process of a local run found by its job id.

SLURM with `proctrack/linuxproc` (and the local executor, which has no tracking of its own) finds a job's processes
by parentage; a process whose parent died is re-parented to PID 1 and escapes. So each layer ties its children to
itself: a rank's data workers die with their rank, a rank dies with its launcher (torchrun), and the local executor
kills whatever of its run is left when the batch script has ended. No torch here: the launch side uses it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
"""What asks a job to checkpoint and stop: TERM (scancel, preemption, the time limit), INT (Ctrl-C), HUP (a closed
terminal) and USR2 (Anvil's time-limit warning, `#SBATCH --signal=B:USR2@lead`). USR1 is left to NCCL. Which of them
mean "run again" is the batch script's decision (`jobdir.PREEMPT_CAUSES`)."""

_PR_SET_PDEATHSIG = 1

_received: list[signal.Signals] = []


def record_stop_signals() -> None:
    """From now on a stop signal is only noted, whenever it comes (see `stop_signals_received`): a rank finishes the
    step it is in, and all ranks agree to checkpoint at the same step boundary. Installed first thing in a rank, so
    that a signal during start-up (imports, rendezvous, restore) is not lost either."""
    def note(signum: int, frame: object) -> None:
        if signum not in _received:
            _received.append(signal.Signals(signum))

    for sig in STOP_SIGNALS:
        signal.signal(sig, note)


def stop_signals_received() -> list[signal.Signals]:
    """The stop signals this process has received since `record_stop_signals`, first first."""
    return list(_received)


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def die_with_parent(sig: signal.Signals = signal.SIGKILL, parent: int | None = None) -> bool:
    """Have the kernel send `sig` to this process when the thread that started it exits (Linux's parent-death
    signal). `parent`: the pid the caller knows as its parent; if that one is already gone, `sig` comes now."""
    if not _prctl(_PR_SET_PDEATHSIG, int(sig)):
        return False
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def ignore_stop_signals() -> None:
    """For processes that never decide (data workers): the stop signals pass them by; their rank decides."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold the stop signals back from this thread while it starts children: a child inherits the blocked mask, so a
    signal sent to the whole process group while it starts waits until it has chosen to ignore it. Signals that
    arrived meanwhile reach this process when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def node_name() -> str:
    """This node as SLURM names it (several nodes of the local test cluster share one host), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def process_start(pid: int) -> str | None:
    """The kernel's start time of a process (tells it from a later process that reuses the pid), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the parenthesised command name


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` now."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[-1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def with_environment(variables: dict[str, str]) -> list[int]:
    """Every process (but this one) started with all these environment variables: the processes of one local run,
    wherever their parents went. (A process's environment as it was when it started, readable by its owner.)"""
    wanted = [f"{k}={v}".encode() for k, v in variables.items()]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            environ = (entry / "environ").read_bytes().split(b"\0")
            if all(w in environ for w in wanted) and not _zombie(int(entry.name)):
                found.append(int(entry.name))
    return found


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def send(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def end_processes(find, grace: float = 5.0) -> list[int]:
    """Stop the processes `find()` returns as SLURM ends a job's: CONT and TERM, then KILL after `grace` seconds for
    those still there. Returns the pids that had to be killed."""
    pids = find()
    if not pids:
        return []
    send(pids, signal.SIGCONT)
    send(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and find():
        time.sleep(0.1)
    left = find()
    send(left, signal.SIGKILL)
    return left
