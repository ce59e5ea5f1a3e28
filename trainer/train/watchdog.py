"""A hung or lost rank ends the job within a timeout, naming the rank and its host, instead of burning the allocation.

Every rank runs a thread that publishes a heartbeat (a counter, its step and phase, host and pid) to the job's
rendezvous store every `interval` seconds, and watches its own main thread: no progress for the phase's timeout and
the rank is hung (or waits for one that is). Then it looks at everyone's heartbeats twice, `interval` × 2.5 apart —
counters compared, not clocks, so skewed node clocks do not matter — and names the culprit:

- a rank whose heartbeat stopped: its process is stopped (SIGSTOP), stuck in the kernel, or its node is gone;
- else the rank(s) still in an earlier step or phase than the others (a slow write, an endless loop);
- else every rank waits inside the same step: a collective that never completes (network, NCCL).

The first rank to write the reason records it (`jobdir.write_error`, kind `hung`), and each rank exits with
`EXIT_HUNG`, which `job.retry_on_failure` requeues. A collective that fails at once instead (gloo: "Connection
reset by peer") is diagnosed the same way by `lost()`: the rank whose heartbeat stopped is named (kind `lost`).

Timeouts: `parallel.init_timeout_s` from the start until the first step is done (rendezvous, restore, a real first
compile of a large model takes minutes) and for checkpoint saves, restores and evaluations; `parallel.step_timeout_s`
for a training step. The collectives' own timeout is set longer than both (see `collective_timeout`), so that this
diagnosis, not an anonymous timeout error, ends a hang.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist

from trainer.core import jobdir
from trainer.core.config import ParallelConfig
from trainer.core.jobdir import JobDir
from trainer.core.processes import node_name
from trainer.core.states import EXIT_HUNG

LONG_PHASES = ("start", "restore", "save", "eval")
"""Phases bounded by `parallel.init_timeout_s`; a training step ("step") by `parallel.step_timeout_s`."""
_KEY = "anvil/heartbeat/{rank}"


def heartbeat_interval(parallel: ParallelConfig) -> float:
    """Often enough to tell a stopped rank within seconds, seldom enough that thousands of ranks do not load the store
    (a few hundred small writes a second): a hundredth of the step timeout, between 0.5 and 2 seconds."""
    return min(max(parallel.step_timeout_s / 100, 0.5), 2.0)


def collective_timeout(parallel: ParallelConfig) -> dt.timedelta:
    """The process groups' timeout: past the watchdog's longest, plus its diagnosis, so that it speaks first."""
    interval = heartbeat_interval(parallel)
    return dt.timedelta(seconds=max(parallel.init_timeout_s, parallel.step_timeout_s) + 10 * interval + 60)


@dataclass
class Beat:
    rank: int
    count: int
    mark: int
    """How many times the main thread has reported progress: every rank reports the same sequence (one loop), so the
    lowest is the furthest behind."""
    step: int
    phase: str
    host: str
    pid: int

    def where(self) -> str:
        return f"{self.phase} of step {self.step}" if self.phase != "step" else f"step {self.step}"

    def who(self) -> str:
        return f"rank {self.rank} on {self.host} (pid {self.pid})"


class Watchdog:
    def __init__(self, job: JobDir, rank: int, world_size: int, parallel: ParallelConfig, log):
        self.job, self.rank, self.world_size, self.log = job, rank, world_size, log
        self.timeouts = {"long": parallel.init_timeout_s, "step": parallel.step_timeout_s}
        self.interval = heartbeat_interval(parallel)
        self.host = node_name()
        self.step, self.phase, self.mark = 0, "start", 0
        self.since = time.monotonic()
        self.count = 0
        self.store = self._connect() if world_size > 1 else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anvil-watchdog", daemon=True)

    def _connect(self) -> dist.Store | None:
        """A client of its own to the rendezvous store (torchrun's agent, or rank 0 under srun), with a short
        timeout: it is asked only when something already went wrong, and a store that does not answer at once is
        itself a finding."""
        try:
            return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                 timeout=dt.timedelta(seconds=max(2 * self.interval, 2)))
        except (KeyError, ValueError, RuntimeError, dist.DistError) as exc:
            self.log(f"watchdog: no heartbeats ({type(exc).__name__}: {exc}); hangs end at the collective timeout")
            return None

    def start(self) -> None:
        self._publish()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def progress(self, step: int, phase: str = "step") -> None:
        """The main thread got somewhere: a step done, or a phase begun (cheap: a few assignments)."""
        self.step, self.phase, self.since, self.mark = step, phase, time.monotonic(), self.mark + 1

    @contextlib.contextmanager
    def during(self, step: int, phase: str) -> Iterator[None]:
        """A long phase (save, eval, restore) of `step` runs, under its own timeout; then the one before it again."""
        before = self.phase
        self.progress(step, phase)
        yield
        self.progress(step, before)

    # -- the thread -------------------------------------------------------------------------------------------

    def _timeout(self) -> float:
        return self.timeouts["long" if self.phase in LONG_PHASES else "step"]

    def _publish(self) -> None:
        if self.store is None:
            return
        self.count += 1
        record = {"count": self.count, "mark": self.mark, "step": self.step, "phase": self.phase, "host": self.host,
                  "pid": os.getpid()}
        self.store.set(_KEY.format(rank=self.rank), json.dumps(record))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            # The store's host may be gone: the main thread's collectives will tell, or the timeout.
            with contextlib.suppress(RuntimeError, dist.DistError):
                self._publish()
            waited = time.monotonic() - self.since
            if waited > self._timeout() and not self._stop.is_set():
                self._end(waited)

    def _end(self, waited: float) -> None:
        reason = self.hung(waited)
        recorded = jobdir.write_error(self.job, "hung", reason)
        self.log(f"error: {reason}" + ("" if recorded else " (an earlier reason is recorded in ERROR)"))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_HUNG)  # the main thread is stuck in a collective or a call: it cannot be unwound

    # -- diagnosis --------------------------------------------------------------------------------------------

    def _survey(self) -> dict[int, Beat]:
        beats = {}
        for rank in range(self.world_size):
            key = _KEY.format(rank=rank)
            if self.store.check([key]):
                record = json.loads(self.store.get(key))
                beats[rank] = Beat(rank, record["count"], record["mark"], record["step"], record["phase"],
                                   record["host"], record["pid"])
        return beats

    def _silent(self) -> tuple[list[Beat], dict[int, Beat]] | str:
        """The ranks whose heartbeat did not move over 2.5 intervals (and everyone's latest), or why that cannot be
        told."""
        if self.store is None:
            return "no heartbeats to compare (no store)"
        try:
            first = self._survey()
            time.sleep(2.5 * self.interval)
            second = self._survey()
        except (RuntimeError, dist.DistError):
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            return f"the rendezvous store at {where} does not answer: the node that holds it is gone or stopped"
        silent = [second.get(r) or first.get(r) or Beat(r, 0, 0, 0, "start", "?", 0) for r in range(self.world_size)
                  if r not in second or first.get(r) is None or second[r].count == first[r].count]
        return [b for b in silent if b.rank != self.rank], second

    def hung(self, waited: float) -> str:
        """Why this rank has made no progress for `waited` seconds, naming whom it waits for."""
        here = f"step {self.step + 1}" if self.phase == "step" else f"{self.phase} of step {self.step}"
        mine = f"rank {self.rank} on {self.host} made no progress for {waited:.0f} s in {here}"
        found = self._silent()
        if isinstance(found, str):
            return f"{mine}; {found}"
        silent, beats = found
        if silent:
            names = "; ".join(f"{b.who()} during {b.where()}" for b in silent)
            return (f"{names}: stopped answering (no heartbeat for {2.5 * self.interval:.0f} s: the process is "
                    f"stopped or stuck in the kernel, or its node is gone); {mine}, waiting for it")
        lowest = min((b.mark for b in beats.values()), default=None)
        behind = [b for b in beats.values() if b.mark == lowest]
        if lowest is not None and len(behind) < len(beats):
            names = "; ".join(f"{b.who()} is still in {b.where()}" for b in behind)
            return f"{names} while the other ranks have moved on and wait for it; {mine}"
        return f"every rank has waited {waited:.0f} s in {here}: a collective that never completes (network, NCCL)"

    def lost(self, error: BaseException) -> str | None:
        """After a collective failed at once (a connection closed or reset): the rank on another node that is gone, or
        None when every peer is alive (one stopped on its own and recorded why) or the gone one was on this node (its
        launcher saw how it ended and records that)."""
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        cause = cause.split(". This is typically")[0][:200]  # gloo's advice is longer than its finding
        found = self._silent()
        if isinstance(found, str):
            return f"{found} ({cause})"
        silent, _ = found
        if not silent or all(b.host == self.host for b in silent):
            return None  # a peer that ended on its own said why; one on this node, its launcher reports
        names = "; ".join(f"{b.who()} during {b.where()}" for b in silent)
        return (f"{names}: gone (its connection closed and its heartbeat stopped: killed, or its node was lost); "
                f"rank {self.rank} on {self.host} saw: {cause}")


def collective_failure(error: BaseException) -> bool:
    """A collective or store operation that failed because a peer went away or timed out (gloo raises these as
    RuntimeErrors naming gloo; NCCL and the store as torch.distributed errors)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("gloo" in text or "Connection reset" in text
                                                or "Connection closed" in text)
