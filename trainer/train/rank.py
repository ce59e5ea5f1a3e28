"""One rank's process: `python -m trainer.train jobs/<name>` (slurm.sh starts it on every rank).

Reads only the job's `config.json`; joins the process group, checks the allocation against the config, starts the
watchdog and runs the `Trainer`. Every way it can end is recorded for the batch script: refused input, a full disk
or a run that kept diverging (ERROR with its kind, one line, no traceback), out of memory, a lost peer (at once: a
group with a dead peer may hang when torn down), a killed data worker, a crash (its traceback kept).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.core import jobdir, states
from trainer.core.errors import AnvilError
from trainer.core.jobdir import JobDir
from trainer.core.processes import node_name
from trainer.core.states import EXIT_REFUSED
from trainer.train import checkpoint
from trainer.train.distributed import init_distributed, log
from trainer.train.guard import DivergedError
from trainer.train.loop import Trainer
from trainer.train.parallelize import build_layout
from trainer.train.watchdog import Watchdog, collective_failure, collective_timeout


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        sys.exit("usage: python -m trainer.train jobs/<name>")
    job = JobDir(Path(argv[0]).resolve())
    try:
        cfg = job.read_config()
    except AnvilError as exc:  # before any rank exists: to stderr, as the batch script's error log shows it
        print(f"anvil: {exc}", file=sys.stderr)
        if job.path.is_dir():
            jobdir.write_error(job, "refused", str(exc))
        return EXIT_REFUSED
    ranks = init_distributed(cfg, timeout_s=collective_timeout(cfg.parallel).total_seconds())
    expected = cfg.world_size
    if ranks.world_size != expected:
        if ranks.rank == 0:
            message = (f"the allocation has {ranks.world_size} ranks but the config asks for cluster.nodes × "
                       f"cluster.devices_per_node = {expected}; fix the config (or the sbatch options you added)")
            log(0, message)
            jobdir.write_error(job, "refused", message)
        dist.destroy_process_group()
        return EXIT_REFUSED
    device = torch.device("cpu") if cfg.cluster.device == "cpu" else torch.device("cuda", ranks.local_rank)
    log(ranks.rank, f"rank {ranks.rank}/{ranks.world_size} on {device}; "
                    f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')}")
    torch.manual_seed(cfg.train.seed)
    watchdog = Watchdog(job, ranks.rank, ranks.world_size, cfg.parallel, lambda message: log(ranks.rank, message))
    watchdog.start()
    trainer = None
    try:
        layout = build_layout(cfg, device.type)
        trainer = Trainer(cfg, job, ranks.rank, layout, device, watchdog)
        code = trainer.run()
    except AnvilError as exc:  # refused input, a full disk, a run that kept diverging: one line, no traceback
        kind, code = ("disk", states.EXIT_DISK) if isinstance(exc, checkpoint.StorageError) else (
            "diverged" if isinstance(exc, DivergedError) else "refused", EXIT_REFUSED)
        log(ranks.rank, f"error: {exc}")
        jobdir.write_error(job, kind, f"rank {ranks.rank}: {exc}")
    except (torch.OutOfMemoryError, MemoryError) as exc:  # recorded, so that a retry knows it would repeat
        jobdir.write_error(job, "oom", f"rank {ranks.rank}: {type(exc).__name__}: {exc}")
        raise
    except Exception as exc:
        if collective_failure(exc):
            _end_after_lost_peer(job, ranks.rank, watchdog, exc)
        worker = DEAD_WORKER.search(str(exc))
        if worker:  # torch's DataLoader noticed that a worker process died (kill -9, the kernel's OOM killer)
            message = (f"rank {ranks.rank} on {node_name()}: its data worker (pid {worker[1]}) was killed by a "
                       f"signal ({worker[2]}: by hand, or by the kernel's out-of-memory killer)")
            log(ranks.rank, f"error: {message}")
            jobdir.write_error(job, "killed", message)
            code = 128 + signal.SIGKILL
        else:
            jobdir.write_error(job, "crash", f"rank {ranks.rank}: {type(exc).__name__}: {exc}")
            raise
    finally:
        watchdog.stop()
        if trainer is not None:
            trainer.profiler.close()
            trainer.metrics.finish()
    dist.destroy_process_group()
    return code


DEAD_WORKER = re.compile(r"DataLoader worker \(pid (\d+)\) is killed by signal: (\w+)")


def _end_after_lost_peer(job: JobDir, rank: int, watchdog: Watchdog, exc: BaseException) -> None:
    """A collective failed because a peer went away: name it (if it is gone rather than stopped on its own, which
    recorded its reason), and leave at once — a process group with a dead peer may hang when torn down."""
    reason = watchdog.lost(exc)
    if reason is None:
        log(rank, "stopping: a peer rank stopped (its reason is recorded in ERROR and in its own log)")
    else:
        recorded = jobdir.write_error(job, "lost", reason)
        log(rank, f"error: {reason}" + ("" if recorded else " (an earlier reason is recorded in ERROR)"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(states.EXIT_LOST)
