"""DCP checkpoints in the job directory's checkpoint steps: complete only once the marker is written.

A crash, kill -9 or preemption mid-write leaves a step directory without its completion marker; it is never
resumed from, and it is removed by the next save. The step directories, the marker and the lookup of the newest
complete step belong to the job directory (`trainer.core.jobdir`). The loader state of every DP rank goes into the
same checkpoint (key `loader.dp<rank>`, JSON: no pickle to execute), so a restore can hand it to a
different number of DP ranks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from trainer.core.config import CheckpointConfig
from trainer.core.errors import AnvilError
from trainer.core.jobdir import (
    COMPLETE,
    checkpoint_source,
    interrupted_saves,
    is_complete,
    latest_complete,
    list_steps,
    mark_complete,
    pick_step,
    set_aside,
    step_dir,
    step_of,
)

LOADER_PREFIX = "loader.dp"


class CheckpointError(AnvilError):
    """A checkpoint that cannot be used; the message names it and what to do."""


class StorageError(AnvilError):
    """The checkpoint's file system is full, over quota or failing: the message names the directory, the bytes
    needed and free, and the newest whole checkpoint (which nothing touched)."""


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})
"""Write errors that are the storage's, not the program's."""
SPACE_MARGIN = 0.05
"""Room asked for beyond the last checkpoint's size (metadata, the loader state growing, logs written meanwhile):
5 % and SPACE_SLACK more."""
SPACE_SLACK = 2**20


def size_of(path: Path) -> int:
    """Bytes in a step directory's files."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def storage_failure(exc: BaseException, root: Path | None = None) -> OSError | None:
    """The storage error inside a failed save (DCP wraps each rank's in a CheckpointException), or None. A write
    that failed without one where `root`'s file system is full is its ENOSPC all the same: torch's writer of a
    checkpoint's non-tensor items reports a short write as `RuntimeError: ... unexpected pos`."""
    found = [exc]
    if isinstance(exc, CheckpointException):
        found = [wrapped[0] for wrapped in exc.failures.values()]
    for error in found:
        while error is not None:
            if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
                return error
            error = error.__cause__ or error.__context__
    if root is not None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(root if root.exists() else root.parent).free < SPACE_SLACK:
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root))
    return None


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def space_problem(root: Path, step: int, expected: int, measured: bool) -> str | None:
    """Why checkpoint `step` cannot be written under `root` before writing anything, or None when it fits."""
    needed = int(expected * (1 + SPACE_MARGIN)) + SPACE_SLACK
    probe = root if root.exists() else root.parent
    free = shutil.disk_usage(probe).free
    if free >= needed:
        return None
    return (f"checkpoint {step_dir(root, step).name} not written: {root} has {_size(free)} free, a checkpoint needs "
            f"{_size(needed)} ({'the last one took' if measured else 'its tensors take about'} {_size(expected)}, "
            f"plus {SPACE_MARGIN:.0%} and {_size(SPACE_SLACK)}); {newest_whole(root)}. Free space (or lower "
            "checkpoint.keep) and resubmit: the job resumes from there")


def newest_whole(root: Path) -> str:
    """A phrase naming the newest complete checkpoint, for the messages of a failed save."""
    latest = latest_complete(root)
    return ("no checkpoint has been written yet" if latest is None else
            f"the newest whole checkpoint is {step_dir(root, latest)} (untouched)")


def check_space(root: Path, step: int, state: dict[str, Any]) -> None:
    """Collective, before anything of checkpoint `step` is written: rank 0 compares the file system's free space with
    the last checkpoint's size (before the first one: the state's tensor bytes summed over ranks) and tells every
    rank; StorageError on all of them when it will not fit."""
    local = torch.tensor([float(tensor_bytes(state))], dtype=torch.float64)
    dist.all_reduce(local)
    problem: list = [None]
    if _rank() == 0:
        measured = last_size(root)
        expected = measured if measured is not None else int(local.item())
        problem = [space_problem(root, step, expected, measured is not None)]
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise StorageError(problem[0])


@contextlib.contextmanager
def storage_errors(root: Path, step: int) -> Iterator[None]:
    """A save of `step` that fails on the storage (ENOSPC, EDQUOT, EIO, ...) becomes one StorageError line, and rank 0
    removes the partial step. Other failures pass through."""
    try:
        yield
    except BaseException as exc:  # DCP reports failures as CheckpointException, a BaseException
        error = storage_failure(exc, root)
        if error is None:
            raise
        if _rank() == 0:
            remove_partial(root, step)
        raise StorageError(write_failure(root, step, error)) from None


def write_failure(root: Path, step: int, error: OSError) -> str:
    """The one line for a save that failed on the storage (after the space check passed)."""
    what = os.strerror(error.errno) if error.errno else str(error)
    return (f"writing checkpoint {step_dir(root, step).name} to {root} failed: {what} (errno {error.errno}"
            f"{', ' + error.filename if getattr(error, 'filename', None) else ''}); {newest_whole(root)}, and the "
            "partial step is removed. Free space or fix the file system, then resubmit: the job resumes from there")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class PendingSave:
    """A checkpoint being written in the background; complete once `finish()` has returned."""

    def __init__(self, root: Path, step: int, future, keep: int, pinned: Sequence[int] = ()):
        self.root, self.step, self.future, self.keep, self.pinned = root, step, future, keep, pinned

    def done(self) -> bool:
        return self.future.done()

    def finish(self) -> None:
        """Wait for this rank's writes; rank 0 then marks the checkpoint complete.

        DCP's background save ends with the coordinator (rank 0) writing the metadata after gathering every
        rank's write results, so rank 0's future completing means every shard is on disk.
        """
        self.future.result()
        if _rank() == 0:
            _mark_complete(self.root, self.step, self.keep, self.pinned)


def save(root: Path, step: int, state: dict[str, Any], loader_states: dict[int, dict], keep: int,
         pinned: Sequence[int] = (), async_group: dist.ProcessGroup | None = None) -> PendingSave | None:
    """Collective: every rank passes its state (and the loader states of the DP ranks it speaks for).

    With `async_group` (a gloo group kept for checkpoints, so the background thread never shares a group
    with training collectives), tensors are staged to host memory and written in the background: the
    returned `PendingSave` must be finished before the next save and before exiting. The newest `keep` complete
    steps and the `pinned` ones stay; older ones are deleted.
    """
    path = step_dir(root, step)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a leftover of an interrupted save of this very step
            shutil.rmtree(path)
    _barrier()
    payload = dict(state)
    for dp_rank, loader_state in loader_states.items():
        payload[f"{LOADER_PREFIX}{dp_rank}"] = json.dumps(loader_state).encode()
    if async_group is not None:
        future = dcp.async_save(payload, checkpoint_id=str(path), process_group=async_group)
        return PendingSave(root, step, future, keep, pinned)
    dcp.save(payload, checkpoint_id=str(path))
    _barrier()  # every rank's shard is on disk before the checkpoint is declared complete
    if _rank() == 0:
        _mark_complete(root, step, keep, pinned)
    return None


def _mark_complete(root: Path, step: int, keep: int, pinned: Sequence[int]) -> None:
    path = step_dir(root, step)
    mark_complete(path, {"step": step, "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                         "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                         "bytes": size_of(path)})
    prune(root, keep, pinned)


def last_size(root: Path) -> int | None:
    """Bytes of the newest complete checkpoint, as its completion marker recorded them (None: none recorded)."""
    latest = latest_complete(root)
    if latest is None:
        return None
    try:
        size = json.loads((step_dir(root, latest) / COMPLETE).read_text()).get("bytes")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) else None


def tensor_bytes(state: Any) -> int:
    """Bytes of the tensors this rank holds in a (nested) state dict: its shards of sharded ones."""
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(tensor_bytes(v) for v in state)
    if isinstance(state, DTensor):
        state = state.to_local()
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    return len(state) if isinstance(state, bytes) else 0


def remove_partial(root: Path, step: int) -> None:
    """Remove what a failed save of `step` left (never a complete step): it frees the space it took."""
    path = step_dir(root, step)
    if path.is_dir() and not is_complete(path):
        shutil.rmtree(path, ignore_errors=True)


def prune(root: Path, keep: int, pinned: Sequence[int] = ()) -> None:
    """Keep the newest `keep` complete steps and the `pinned` ones (steps other jobs fork from); drop the other
    complete ones and incomplete leftovers older than the newest. The newest whole step is never dropped, even when
    the kept ones have been damaged since they were written."""
    steps = list_steps(root)
    complete = [s for s, _, c in steps if c]
    keep_steps = set(complete[-keep:])
    if not any(damage(step_dir(root, s)) is None for s in keep_steps):
        keep_steps |= {next((s for s in reversed(complete) if damage(step_dir(root, s)) is None), -1)}
    keep_steps |= set(pinned)
    newest = complete[-1] if complete else -1
    for step, path, whole in steps:
        if (whole and step not in keep_steps) or (not whole and step < newest):
            shutil.rmtree(path, ignore_errors=True)


METADATA = ".metadata"
"""DCP's index of a step: which file holds which bytes of every tensor."""


def damage(path: Path) -> str | None:
    """What is wrong with a step's files, or None when its metadata is readable and every file it names exists
    with at least the bytes it should hold. (Sizes, not contents: cheap enough for every resume.)"""
    if not (path / METADATA).is_file():
        return f"its metadata file {METADATA} is missing"
    try:
        storage = dcp.FileSystemReader(str(path)).read_metadata().storage_data
        needed: dict[str, int] = {}
        for info in storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as exc:  # noqa: BLE001 - a garbled pickle can raise almost anything
        return f"its metadata file {METADATA} cannot be read ({type(exc).__name__})"
    if not needed:
        return f"its metadata file {METADATA} names no data"
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size < size:
            return f"{name} is cut short ({file.stat().st_size:,} of {size:,} bytes)"
    return None


@dataclass
class Loadable:
    """The newest complete step whose files are whole, and the newer complete ones that are not."""

    step: int | None
    damaged: list[tuple[Path, str]]

    def refusal(self, root: Path) -> str:
        """Why there is nothing to load although complete steps exist (every one damaged)."""
        listing = "; ".join(f"{path.name}: {problem}" for path, problem in self.damaged)
        return (f"no checkpoint in {root} can be loaded, every complete step is damaged ({listing}). Restore the "
                "files, or move the checkpoints away to start over")


def newest_loadable(root: Path) -> Loadable:
    """The newest whole complete step, checking newest first."""
    damaged = []
    for found, path, complete in reversed(list_steps(root)):
        if not complete:
            continue
        problem = damage(path)
        if problem is None:
            return Loadable(found, damaged)
        damaged.append((path, problem))
    return Loadable(None, damaged)


def pick(root: Path, step: int | None = None) -> tuple[Path, list[str]]:
    """Step `step`, or the newest complete step whose files are whole, refusing by name what cannot be loaded; with
    a note for each newer complete step passed over as damaged (nothing is moved: another job's, or an export's)."""
    if step is not None:
        path = pick_step(root, step)
        problem = damage(path)
        if problem is not None:
            raise CheckpointError(f"{path} is damaged ({problem}); choose another step")
        return path, []
    found = newest_loadable(root)
    if found.step is None:
        if found.damaged:
            raise CheckpointError(found.refusal(root))
        pick_step(root)  # raises: names what is there instead
    return step_dir(root, found.step), [f"{path.name} is damaged ({problem})" for path, problem in found.damaged]


PARTS = {"model": "model weights", "optim": "optimizer state", "train": "step counter and scheduler state"}
"""The top-level entries of a checkpoint's state (besides the loader states) and what they hold."""


FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
"""How the optimizer is saved: its state and hyperparameters under each parameter's name. Ranks holding different
parameters (pipeline stages) then never write the same key (unflattened, each rank's first group would be
`param_groups.0`), and any layout reads them back."""


def optimizer_flat(path: Path) -> bool:
    """Whether a checkpoint holds its optimizer flattened (`FLAT`; those written before pipelines did not)."""
    try:
        keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except (OSError, ValueError, EOFError):
        return True  # `load` names what is wrong with it
    return not any(key.startswith("optim.param_groups.0.") for key in keys)


def load(root: Path, step: int, state: dict[str, Any]) -> list[dict]:
    """Load `state` in place from step `step`; returns the loader states of all DP ranks that saved one."""
    path = step_dir(root, step)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
        held = {key.split(".", 1)[0] for key in metadata.state_dict_metadata}
        for part in state:
            if part in PARTS and part not in held:  # e.g. an import from Hugging Face holds weights only
                listing = ", ".join(p for p in PARTS if p in held) or "nothing"
                raise CheckpointError(f"{path} holds no {PARTS[part]} (it holds: {listing})")
        loader_keys = sorted(k for k in metadata.state_dict_metadata if k.startswith(LOADER_PREFIX))
        target = {**state, **{k: b"" for k in loader_keys}}
        dcp.load(target, checkpoint_id=str(path))
    except (CheckpointException, RuntimeError, ValueError, OSError, EOFError) as exc:
        # DCP reports a whole per-rank traceback; its last line says what went wrong.
        cause = [line.strip() for line in str(exc).splitlines() if line.strip()][-1][:300]
        raise CheckpointError(
            f"{path} cannot be loaded into this model ({cause}); "
            "was it written by a different model or config? A different model needs a new job (--name)"
        ) from None
    for key in state:
        state[key] = target[key]
    return [json.loads(target[k]) for k in loader_keys]


# -- restoring a trainer ---------------------------------------------------------------------------------------------

RESTORABLE = ("model", "optimizer", "scheduler", "data", "step")
"""The parts of a checkpoint (`checkpoint.init_restore` picks among them; a job's own resume takes all)."""


@dataclass
class Parts:
    """What a checkpoint is saved from and restored into: the trainer's stateful parts, and where a restore says
    what it did."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    say: Callable[[str], None]
    """A line of the log (rank 0's)."""
    record: Callable[[str, str], None]
    """(event, message) into events.jsonl (rank 0's part)."""

    def state(self, train: dict) -> dict[str, Any]:
        """The tensors to save (model and optimizer, sharded as they are) and the training position as JSON."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=FLAT)
        return {"model": model_state, "optim": optim_state, "train": json.dumps(train).encode()}


def resume_point(root: Path, say: Callable[[str], None], record: Callable[[str, str], None]) -> int | None:
    """Collective: the newest complete step whose files are whole. Rank 0 checks, sets damaged newer steps aside
    (said, and a `checkpoint_damaged` event) and tells every rank, so that all load the same step."""
    decision: list = [None]
    if _rank() == 0:
        for path in interrupted_saves(root):
            say(f"skipping {path}: incomplete (interrupted while saving)")
        found = newest_loadable(root)
        if found.step is None and found.damaged:
            decision = [found.refusal(root)]
        else:
            then = ("nothing older to resume from: starting from scratch" if found.step is None else
                    f"resuming from {step_dir(root, found.step).name}")
            for path, problem in found.damaged:
                message = f"{path.name} is damaged ({problem}); set aside as {set_aside(path).name}, {then}"
                say(message)
                record("checkpoint_damaged", message)
            decision = [found.step]
    if dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], str):
        raise CheckpointError(decision[0])
    return decision[0]


def load_parts(root: Path, step: int, names: set[str], parts: Parts) -> dict:
    """Load the named parts of checkpoint `step` (see `checkpoint.init_restore`); returns the training position it
    recorded (step, tokens seen, the step guard's history) where `step` is named, else {}."""
    state: dict = {}
    options = StateDictOptions(flatten_optimizer_state_dict=optimizer_flat(step_dir(root, step)))
    if names & {"model", "optimizer"}:
        state["model"], optim_state = get_state_dict(parts.model, parts.optimizer, options=options)
        if "optimizer" in names:
            state["optim"] = optim_state
    if names & {"scheduler", "step"}:
        state["train"] = b""
    loader_states = load(root, step, state)
    if "optimizer" in names:
        # The moments come from the checkpoint; the hyperparameters stay this config's (and the learning rate the
        # restored schedule's, or the fresh one's).
        keep = ("weight_decay", "betas", "eps") + (() if "scheduler" in names else ("lr", "initial_lr"))
        config = [{k: g[k] for k in keep if k in g} for g in parts.optimizer.param_groups]
        set_state_dict(parts.model, parts.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)
        for group, values in zip(parts.optimizer.param_groups, config, strict=True):
            group.update(values)
    elif "model" in names:
        set_model_state_dict(parts.model, state["model"], options=StateDictOptions(strict=True))
    train = json.loads(state["train"]) if "train" in state else {}
    if "scheduler" in names:
        # The schedule's position sets the next step's LR (a fresh optimizer's is warmup's): each group's initial LR
        # times the schedule's factor there. Only the position is taken from the checkpoint, not its per-group lists:
        # another layout's ranks hold other groups (a pipeline stage holds some roles only).
        scheduler, saved = parts.scheduler, train["scheduler"]
        scheduler.last_epoch = saved["last_epoch"]
        scheduler._step_count = saved.get("_step_count", saved["last_epoch"] + 1)
        scheduler.base_lrs = [group["initial_lr"] for group in parts.optimizer.param_groups]
        lrs = [base * factor(scheduler.last_epoch)
               for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
        for group, lr in zip(parts.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs
    if "data" in names:
        if not loader_states:
            raise CheckpointError(f"{step_dir(root, step)} holds no data position")
        parts.loader.load_state_dict(loader_states)
        if parts.loader.mix_change is not None:
            message = f"step {train['step'] if 'step' in names else 0}: {parts.loader.mix_change.describe()}"
            parts.say(message)
            parts.record("data_mix", message)
    return train if "step" in names else {}


def restore(root: Path, cfg: CheckpointConfig, steps: int, parts: Parts) -> tuple[dict, bool]:
    """This job's newest whole checkpoint, all of it; else, with `checkpoint.init_from`, the parts of another job's
    checkpoint that `checkpoint.init_restore` names. Returns the restored training position ({} for none) and
    whether it is this job's own checkpoint (then it is also the last one saved)."""
    latest = resume_point(root, parts.say, parts.record)
    if latest is not None:
        train = load_parts(root, latest, set(RESTORABLE), parts)
        parts.say(f"resumed from {step_dir(root, latest)} (step {train['step']})")
        return train, True
    if cfg.init_from is None:
        return {}, False
    names = cfg.init_restore
    source_root, step = checkpoint_source(Path(cfg.init_from))
    try:
        source, notes = pick(source_root, step)
        train = load_parts(source_root, step_of(source), set(names), parts)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint.init_from: {exc}") from None
    start = train.get("step", 0)
    if start >= steps:
        raise CheckpointError(f"checkpoint.init_from: the restored step {start} is not below train.steps = {steps}; "
                              "raise train.steps, or leave step out of init_restore")
    for note in notes:
        parts.say(f"checkpoint.init_from: {note}; taking {source.name}")
    fresh = [part for part in RESTORABLE if part not in names]
    message = (f"restored {', '.join(names)} from {source}" + (f"; fresh: {', '.join(fresh)}" if fresh else "")
               + f" (starting at step {start + 1})")
    parts.say(message)
    parts.record("init_from", message)
    return train, False
