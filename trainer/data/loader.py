"""The stateful distributed loader the trainer iterates: batches per data-parallel rank, worker processes,
prefetching, and a small state that restores exactly — or onto a different world size.

Each worker process sends its stream state along with every batch; the main process keeps the state
of the last batch it handed out, so a checkpoint describes exactly what the trainer has consumed (not
what workers have prefetched). TP ranks of one DP group build the same loader and get identical batches.
"""

from __future__ import annotations

import atexit
import copy
import functools
import multiprocessing
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.core.config import DataConfig
from trainer.core.processes import die_with_parent, ignore_stop_signals, stop_signals_blocked
from trainer.data.sources import DataError, open_source
from trainer.data.state import PooledState, RankState, SourcePosition, StreamSpec, WorkerState
from trainer.data.stream import WorkerStream
from trainer.data.windows import load_tokenizer


@dataclass(frozen=True)
class MixChange:
    """The data mix of a restored checkpoint differs from this run's: from here on, the new shares apply."""

    old: dict[str, float]
    new: dict[str, float]

    def describe(self) -> str:
        names = [*self.new, *(n for n in self.old if n not in self.new)]
        parts = []
        for name in names:
            note = " (new: starts at its beginning)" if name not in self.old else \
                " (removed)" if name not in self.new else ""
            parts.append(f"{name} {self.old.get(name, 0.0):.4g} -> {self.new.get(name, 0.0):.4g}{note}")
        return ("data mix changed (shares of the tokens): " + ", ".join(parts)
                + "; the new shares apply from this step on, every kept source continues from its position")


def _saved_shares(rank_states: list[RankState]) -> dict[str, float] | None:
    """The mix the checkpoint's workers followed (None where none recorded one)."""
    for rank_state in rank_states:
        for worker in rank_state.workers.values():
            if worker.weights is not None:
                return dict(worker.weights)
    return None


def _mix_changed(old: dict[str, float], new: dict[str, float]) -> bool:
    return set(old) != set(new) or any(abs(old[name] - new[name]) > 1e-9 for name in new)


def build_spec(data: DataConfig, seed: int) -> StreamSpec:
    """Open every dataset's footers and the tokenizer: all input errors surface here, in the main process."""
    if not data.datasets:
        raise DataError("data.datasets is empty: give at least one Parquet dataset")
    if data.tokenizer is None:
        raise DataError("data.tokenizer is not set: give the path of a tokenizer.json")
    tokenizer_path = Path(data.tokenizer)
    if not tokenizer_path.is_file():
        raise DataError(f"data.tokenizer: {tokenizer_path} does not exist")
    tokenizer = load_tokenizer(tokenizer_path)

    def token_id(token: str, field: str) -> int:
        found = tokenizer.token_to_id(token)
        if found is None:
            raise DataError(f"{field}: '{token}' is not a token of {tokenizer_path}")
        return found

    names = data.dataset_names()
    if len(set(names)) != len(names):
        raise DataError(f"data.datasets: names must differ (got {', '.join(names)}); set name on each dataset")
    sources = [open_source(name, ds.path, ds.text_column, ds.weight)
               for name, ds in zip(names, data.datasets, strict=True)]
    return StreamSpec(
        sources=sources,
        tokenizer=tokenizer_path,
        seq_len=data.seq_len,
        eos_id=token_id(data.eos_token, "data.eos_token"),
        bos_id=token_id(data.bos_token, "data.bos_token") if data.bos_token is not None else None,
        window=data.shuffle_window,
        n_shards=data.logical_shards,
        seed=seed,
        epochs=data.epochs,
        positions=data.document_positions,
    )


CHUNK_TOKENS = 1 << 16
"""A worker sends its batches in chunks of about this many tokens (at most 8 batches): one message per batch costs
the main process more than a small batch is worth."""


def chunk_size(num_workers: int, batch_size: int, seq_len: int) -> int:
    if num_workers == 0:
        return 1
    return max(1, min(8, CHUNK_TOKENS // (batch_size * (seq_len + 1))))


class _Batches(IterableDataset):
    """Runs in each worker process (or in-process with num_workers=0)."""

    def __init__(self, spec: StreamSpec, dp_rank: int, dp_size: int, num_workers: int, batch_size: int,
                 states: dict[int, WorkerState], offset: int, first_chunk: int, threads: int):
        self.spec, self.dp_rank, self.dp_size, self.num_workers = spec, dp_rank, dp_size, num_workers
        self.batch_size, self.states, self.offset, self.threads = batch_size, states, offset, threads
        self.first_chunk = first_chunk

    def __iter__(self) -> Iterator[dict]:
        global _LOADED_HERE
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is None:
            _LOADED_HERE = True
        workers = max(self.num_workers, 1)
        logical = (physical + self.offset) % workers  # resume with the worker whose batch is due next
        gid = self.dp_rank * workers + logical
        stream = WorkerStream(self.spec, gid, self.dp_size * workers, self.states.get(gid), rows=self.batch_size,
                              threads=self.threads)
        chunk = chunk_size(self.num_workers, self.batch_size, self.spec.seq_len)
        size = self.first_chunk if physical == 0 else chunk  # the worker due next may be inside a chunk
        try:
            while True:
                batches = []
                while len(batches) < size:
                    tokens, positions, valid = stream.next_batch()
                    if not valid:
                        break
                    # Plain int32 arrays travel between processes far more cheaply than tensors (no shared-memory
                    # handles); the main process turns them into the batch.
                    batches.append({"tokens": tokens, "valid": valid, "positions": positions,
                                    "state": stream.state()})
                if not batches:
                    return
                yield {"batches": batches, "worker": logical, "full": len(batches) == size}
                size = chunk
        finally:
            stream.close()


def _worker_start(rank_pid: int | None, worker_id: int) -> None:
    """A data worker never decides: TERM/INT/HUP/USR2 sent to its process group or to every process of a step
    (scancel, torchrun stopping its ranks) pass it by, so that its rank can still read the batches of the step it
    finishes and checkpoint; and it dies with its rank, however the rank ends (kill -9 included), instead of
    living on re-parented to PID 1 with the step's output pipes open."""
    ignore_stop_signals()
    die_with_parent(parent=rank_pid)


def _end_workers(items: Iterator, workers: list) -> None:
    """End an iteration's workers now, however it ended. Left to torch's iterator being collected, they would live
    as long as anything holds it — a traceback of a worker's error does, until interpreter exit — and there
    multiprocessing terminates its children with TERM and joins them: workers that ignore TERM would hang the rank's
    exit for ever. So: torch's own shutdown (what its iterator does when collected: the workers finish and leave,
    or get TERM after a few seconds), then KILL for any worker still alive."""
    shutdown = getattr(items, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for process in workers:
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def _keep(item: dict) -> dict:
    """No collation: torch's default would walk the state dict of every batch."""
    return item


def _to_batch(item: dict) -> dict[str, torch.Tensor]:
    # In numpy, then wrapped: a few torch calls per batch cost more than the copies themselves.
    tokens = item["tokens"].astype(np.int64)
    labels = tokens[:, 1:].copy()
    size = tokens.shape[1]
    for row, valid in enumerate(item["valid"]):
        if valid < size:
            labels[row, max(valid - 1, 0):] = -100  # padding at the very end of a finite run
    batch = {"input_ids": torch.from_numpy(tokens[:, :-1].copy()), "labels": torch.from_numpy(labels)}
    if item["positions"] is not None:
        batch["positions"] = torch.from_numpy(item["positions"][:, :-1].astype(np.int64))
    return batch


_OPEN: weakref.WeakSet = weakref.WeakSet()
"""Iterations not yet finished or closed."""


@atexit.register
def _close_open() -> None:
    """An iteration left open (a rank that returned early) ends before the interpreter tears its modules down: closed
    later by the garbage collector, its reading and tokenizing threads would meet modules whose globals are gone."""
    for iteration in list(_OPEN):
        iteration.close()


_LOADED_HERE = False
"""Set once this process has run a loader in-process (num_workers=0)."""


@dataclass
class LoaderShape:
    dp_rank: int
    dp_size: int
    num_workers: int


class TokenLoader:
    """`for batch in loader`: dicts of `input_ids`, `labels` (and `positions`), each `[batch, seq_len]`."""

    def __init__(self, spec: StreamSpec, dp_rank: int, dp_size: int, batch_size: int, num_workers: int = 0,
                 prefetch: int = 2, pin_memory: bool = False, cores: int | None = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_size - 1}")
        self.spec, self.batch_size, self.prefetch, self.pin_memory = spec, batch_size, prefetch, pin_memory
        self.shape = LoaderShape(dp_rank, dp_size, num_workers)
        self.cores = cores or len(os.sched_getaffinity(0))
        self._states: dict[int, WorkerState] = {}  # global worker id -> its stream after its last consumed batch
        self._next = 0  # logical worker whose batch is due next
        self._into = 0  # batches of that worker's current chunk already handed out
        self.mix_change: MixChange | None = None  # set by a restore whose checkpoint had another data mix

    @property
    def _workers(self) -> int:
        return max(self.shape.num_workers, 1)

    def _start(self) -> Iterator:
        threads = max(self.cores // self._workers, 1)
        base = self.shape.dp_rank * self._workers
        chunk = chunk_size(self.shape.num_workers, self.batch_size, self.spec.seq_len)
        dataset = _Batches(self.spec, self.shape.dp_rank, self.shape.dp_size, self.shape.num_workers,
                           self.batch_size, copy.deepcopy(self._states), self._next, max(chunk - self._into, 1),
                           threads)
        if self.shape.num_workers == 0:
            # In-process, torch's DataLoader would only wrap every item in a profiler record (~40 us a batch).
            items = iter(dataset)
        else:
            # fork is fast and safe while this process has never loaded in-process (the trainer's case: with
            # workers, it never does). After that, its reading and tokenizing threads may still be alive, and a
            # forked child would inherit their locks without them: start from a clean server instead.
            context = "forkserver" if _LOADED_HERE else "fork"
            start = functools.partial(_worker_start, os.getpid() if context == "fork" else None)
            loader = DataLoader(dataset, batch_size=None, collate_fn=_keep, num_workers=self.shape.num_workers,
                                prefetch_factor=max(-(-self.prefetch // chunk), 2), persistent_workers=False,
                                multiprocessing_context=context, worker_init_fn=start)
            before = set(multiprocessing.active_children())
            with stop_signals_blocked():  # the workers start with them held back, until they ignore them
                items = iter(loader)
            workers = [p for p in multiprocessing.active_children() if p not in before]
        try:
            for item in items:
                into = self._into if item["worker"] == self._next else 0
                for i, part in enumerate(item["batches"], 1):
                    self._states[base + item["worker"]] = part["state"]
                    # Inside a chunk, the same worker's next batch is due; after it, the next worker's.
                    done = i == len(item["batches"]) and item["full"]
                    self._next = (item["worker"] + 1) % self._workers if done else item["worker"]
                    self._into = 0 if done else into + i
                    batch = _to_batch(part)
                    if self.pin_memory:
                        batch = {k: v.pin_memory() for k, v in batch.items()}
                    yield batch
        except Exception as exc:  # not `except DataError`: a generator left open until interpreter exit is closed
            # after the module's globals are gone, and the clause would then fail on a name that is None.
            if not isinstance(exc, DataError):
                raise
            # A worker's DataError arrives wrapped with its traceback; the user needs the message only.
            message = str(exc)
            if "Original Traceback" in message:
                message = message.rsplit("DataError: ", 1)[-1].strip()
            raise DataError(message) from None
        finally:
            if self.shape.num_workers == 0:
                items.close()  # the in-process stream's threads end now, not when the generator is collected
            else:
                _end_workers(items, workers)

    def __iter__(self) -> Iterator[dict]:
        # The loader must not keep its iterator: a loader <-> generator cycle is torn down by the
        # garbage collector in an order that leaves torch's worker shutdown waiting 5 s per worker.
        iteration = self._start()
        _OPEN.add(iteration)
        return iteration

    def state_dict(self) -> dict:
        """This DP rank's part of the loader state (`RankState`'s plain form): cursors and counters (a few KB), no
        buffered text."""
        return RankState(self.shape.dp_rank, self.shape.dp_size, self.shape.num_workers, self.spec.n_shards,
                         self._next, self._into, self._states).to_dict()

    def load_state_dict(self, saved: list[dict]) -> None:
        """Restore from the states of *all* DP ranks of a checkpoint (any DP size, any worker count).

        Same shape: exact (the next batch is the one the uninterrupted run would have given). Other shape:
        every logical shard keeps its cursor and moves to its new owner, so no document is dropped or
        repeated; mixing counters are pooled and shared out; the shuffle position inside a worker restarts.
        """
        if not saved:
            return
        rank_states = [RankState.from_dict(s) for s in saved]
        shards = {s.n_shards for s in rank_states}
        if shards != {self.spec.n_shards}:
            raise DataError(f"the checkpoint's loader used data.logical_shards={shards.pop()}; this run has "
                            f"{self.spec.n_shards}: keep it unchanged to resume the data position")
        old_shares, new_shares = _saved_shares(rank_states), self.spec.weights
        self.mix_change = None
        if old_shares is not None and _mix_changed(old_shares, new_shares):
            # The mixer compares each source's tokens with its share of the tokens it counted: counting from here
            # makes the new shares hold from this step on (counting from step 0, a new source would take every
            # batch until it had caught up with its share of the whole run).
            self.mix_change = MixChange(old_shares, new_shares)
            for rank_state in rank_states:
                for worker in rank_state.workers.values():
                    worker.sources = {name: SourcePosition(src.shards, src.turn, 0)
                                      for name, src in worker.sources.items() if name in new_shares}
                    worker.weights = new_shares
        old = rank_states[0]
        if (old.dp_size, old.num_workers) == (self.shape.dp_size, self.shape.num_workers):
            mine = next(s for s in rank_states if s.dp_rank == self.shape.dp_rank)
            self._states, self._next, self._into = mine.workers, mine.next_worker, mine.into_chunk
            return
        self._states = PooledState.of(rank_states).share(self.shape.dp_rank, self.shape.dp_size, self._workers,
                                                         self.spec)
        self._next = self._into = 0


def build_loader(data: DataConfig, seed: int, dp_rank: int, dp_size: int, batch_size: int,
                 pin_memory: bool = False) -> TokenLoader:
    return TokenLoader(build_spec(data, seed), dp_rank, dp_size, batch_size, num_workers=data.num_workers,
                       prefetch=data.prefetch, pin_memory=pin_memory)
