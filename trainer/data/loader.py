"""The stateful distributed loader the trainer iterates: batches per data-parallel rank, worker processes,
prefetching, and a small state that restores exactly — or onto a different world size.

Each worker process sends its stream state along with every batch; the main process keeps the state
of the last batch it handed out, so a checkpoint describes exactly what the trainer has consumed (not
what workers have prefetched). TP ranks of one DP group build the same loader and get identical batches.
"""

from __future__ import annotations

import copy
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.launch.config import DataConfig
from trainer.data.sources import DataError, open_source
from trainer.data.stream import StreamSpec, WorkerStream, load_tokenizer, set_tokenizer_threads

STATE_VERSION = 1


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

    names = [ds.name or _default_name(ds.path) or f"dataset{i}" for i, ds in enumerate(data.datasets)]
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


def _default_name(path: str) -> str:
    """`data/web` -> web, `data/code/*.parquet` -> code, `data/x/part-0.parquet` -> part-0."""
    plain = [part for part in Path(path).parts if not glob.has_magic(part)]
    return Path(*plain).stem if plain else ""


class _Batches(IterableDataset):
    """Runs in each worker process (or in-process with num_workers=0)."""

    def __init__(self, spec: StreamSpec, dp_rank: int, dp_size: int, num_workers: int, batch_size: int,
                 states: dict[int, dict], offset: int, threads: int):
        self.spec, self.dp_rank, self.dp_size, self.num_workers = spec, dp_rank, dp_size, num_workers
        self.batch_size, self.states, self.offset, self.threads = batch_size, states, offset, threads

    def __iter__(self) -> Iterator[dict]:
        global _TOKENIZED_HERE
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is None:
            _TOKENIZED_HERE = True
        workers = max(self.num_workers, 1)
        logical = (physical + self.offset) % workers  # resume with the worker whose batch is due next
        gid = self.dp_rank * workers + logical
        set_tokenizer_threads(self.threads)
        stream = WorkerStream(self.spec, gid, self.dp_size * workers, self.states.get(gid))
        while True:
            seqs = []
            for _ in range(self.batch_size):
                got = stream.next_sequence()
                if got is None:
                    break
                seqs.append(got)
            if not seqs:
                return
            # Plain int32 arrays travel between processes far more cheaply than tensors (no shared-memory
            # handles); the main process turns them into the batch.
            yield {
                "tokens": np.stack([s[0] for s in seqs]),
                "valid": [s[2] for s in seqs],
                "positions": np.stack([s[1] for s in seqs]) if self.spec.positions else None,
                "worker": logical,
                "state": stream.state_dict(),
            }


def _keep(item: dict) -> dict:
    """No collation: torch's default would walk the state dict of every batch."""
    return item


def _to_batch(item: dict) -> dict[str, torch.Tensor]:
    tokens = torch.from_numpy(item["tokens"]).long()
    labels = tokens[:, 1:].clone()
    size = tokens.shape[1]
    for row, valid in enumerate(item["valid"]):
        if valid < size:
            labels[row, max(valid - 1, 0):] = -100  # padding at the very end of a finite run
    batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": labels}
    if item["positions"] is not None:
        batch["positions"] = torch.from_numpy(item["positions"][:, :-1]).long()
    return batch


_TOKENIZED_HERE = False
"""Set once this process has tokenized in-process (num_workers=0): its tokenizer thread pool must not be forked."""


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
        self._states: dict[int, dict] = {}  # global worker id -> stream state after its last consumed batch
        self._next = 0  # logical worker whose batch is due next

    @property
    def _workers(self) -> int:
        return max(self.shape.num_workers, 1)

    def _start(self) -> Iterator:
        threads = max(self.cores // self._workers, 1)
        base = self.shape.dp_rank * self._workers
        dataset = _Batches(self.spec, self.shape.dp_rank, self.shape.dp_size, self.shape.num_workers,
                           self.batch_size, copy.deepcopy(self._states), self._next, threads)
        kwargs = {}
        if self.shape.num_workers > 0:
            # fork is fast and safe while this process has never tokenized (the trainer's case: with
            # workers, it never does). After in-process tokenization a forked child would inherit the
            # tokenizer's thread-pool locks without the threads and can hang: start from a clean server.
            context = "forkserver" if _TOKENIZED_HERE else "fork"
            kwargs = {"prefetch_factor": self.prefetch, "persistent_workers": False,
                      "multiprocessing_context": context}
        loader = DataLoader(dataset, batch_size=None, collate_fn=_keep, num_workers=self.shape.num_workers, **kwargs)
        try:
            for item in loader:
                self._states[base + item["worker"]] = item["state"]
                self._next = (item["worker"] + 1) % self._workers
                batch = _to_batch(item)
                if self.pin_memory:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                yield batch
        except DataError as exc:
            # A worker's DataError arrives wrapped with its traceback; the user needs the message only.
            message = str(exc)
            if "Original Traceback" in message:
                message = message.rsplit("DataError: ", 1)[-1].strip()
            raise DataError(message) from None

    def __iter__(self) -> Iterator[dict]:
        # The loader must not keep its iterator: a loader <-> generator cycle is torn down by the
        # garbage collector in an order that leaves torch's worker shutdown waiting 5 s per worker.
        return self._start()

    def state_dict(self) -> dict:
        """This DP rank's part of the loader state: cursors and counters (a few KB), no buffered text."""
        return {"version": STATE_VERSION, "dp_rank": self.shape.dp_rank, "dp_size": self.shape.dp_size,
                "num_workers": self.shape.num_workers, "n_shards": self.spec.n_shards,
                "next_worker": self._next, "workers": copy.deepcopy(self._states)}

    def load_state_dict(self, rank_states: list[dict]) -> None:
        """Restore from the states of *all* DP ranks of a checkpoint (any DP size, any worker count).

        Same shape: exact (the next batch is the one the uninterrupted run would have given). Other shape:
        every logical shard keeps its cursor and moves to its new owner, so no document is dropped or
        repeated; mixing counters are pooled and shared out; the shuffle position inside a worker restarts.
        """
        if not rank_states:
            return
        versions = {s.get("version") for s in rank_states}
        if versions != {STATE_VERSION}:
            raise DataError(f"loader state version {versions} cannot be read by this Anvil (expects {STATE_VERSION})")
        shards = {s["n_shards"] for s in rank_states}
        if shards != {self.spec.n_shards}:
            raise DataError(f"the checkpoint's loader used data.logical_shards={shards.pop()}; this run has "
                            f"{self.spec.n_shards}: keep it unchanged to resume the data position")
        old = rank_states[0]
        if (old["dp_size"], old["num_workers"]) == (self.shape.dp_size, self.shape.num_workers):
            mine = next(s for s in rank_states if s["dp_rank"] == self.shape.dp_rank)
            self._states = {int(k): v for k, v in mine["workers"].items()}
            self._next = mine["next_worker"]
            return
        self._states = _rescale(rank_states, self.shape.dp_rank, self.shape.dp_size, self._workers,
                                self.spec)
        self._next = 0


def _rescale(rank_states: list[dict], dp_rank: int, dp_size: int, workers: int, spec: StreamSpec) -> dict:
    cursors: dict[str, dict[str, list[int]]] = {}
    tokens: dict[str, int] = {}
    docs = empty = 0
    for rank_state in rank_states:
        for worker_state in rank_state["workers"].values():
            for name, src in worker_state["sources"].items():
                cursors.setdefault(name, {}).update(src["shards"])
                tokens[name] = tokens.get(name, 0) + src["tokens"]
            docs += worker_state.get("docs", 0)
            empty += worker_state.get("empty_docs", 0)
    total_workers = dp_size * workers
    states = {}
    for logical in range(workers):
        gid = dp_rank * workers + logical
        states[gid] = {
            "sources": {
                source.name: {
                    "shards": {s: c for s, c in cursors.get(source.name, {}).items() if int(s) % total_workers == gid},
                    "turn": 0,
                    "tokens": tokens.get(source.name, 0) // total_workers,
                }
                for source in spec.sources
            },
            "current": None,
            "docs": docs // total_workers,
            "empty_docs": empty // total_workers,
        }
    return states


def build_loader(data: DataConfig, seed: int, dp_rank: int, dp_size: int, batch_size: int,
                 pin_memory: bool = False) -> TokenLoader:
    return TokenLoader(build_spec(data, seed), dp_rank, dp_size, batch_size, num_workers=data.num_workers,
                       prefetch=data.prefetch, pin_memory=pin_memory)
