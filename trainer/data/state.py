"""What a data stream is and where it stands: the stream's description (`StreamSpec`) and its position as typed
records — a shard's cursor, a source's turn and token count, a held document, a worker's and a DP rank's state —
serialised to and from plain JSON data in one place (`RankState.to_dict` / `RankState.from_dict`), which is what a
checkpoint stores under `loader.dp<rank>`.

Only version 2 is read: version 1 (one packed stream per worker, before a67cff8 on 2026-12-02) never left this
repository's history — no release or tag of Anvil carries it — so no checkpoint a user holds can contain one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.data.sources import DataError, Source

STATE_VERSION = 2
"""2: rows hold the rest of the document they are in (`lanes`, `pending`), and the mix's weights are recorded."""


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to rebuild its stream (picklable for worker processes)."""

    sources: list[Source]
    tokenizer: Path
    seq_len: int
    eos_id: int
    bos_id: int | None
    window: int
    n_shards: int
    seed: int
    epochs: int | None = None
    positions: bool = False

    @property
    def weights(self) -> dict[str, float]:
        """The mixing weights, normalised to shares (what a checkpoint records to detect a changed mix)."""
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}


Cursor = list[int]
"""How far a logical shard has been read: `[epoch, unit position, window, document, offset]`."""


@dataclass
class HeldDoc:
    """Where a document a row is in the middle of lies, and how much of its layout the row has used: it is read
    again from its Parquet window on restore (no text in the state)."""

    source: str
    shard: int
    doc: list[int]
    """epoch, unit position, window, row of the window's text."""
    offset: int


@dataclass
class SourcePosition:
    """One source's part of a worker: its shards' cursors, whose turn it is, and the tokens it gave (mixing)."""

    shards: dict[int, Cursor] = field(default_factory=dict)
    turn: int = 0
    tokens: int = 0


@dataclass
class WorkerState:
    """One data worker's stream after the last batch it gave."""

    sources: dict[str, SourcePosition] = field(default_factory=dict)
    weights: dict[str, float] | None = None
    """The mix's shares the worker followed (None: unknown, read as unchanged)."""
    lanes: list[HeldDoc | None] = field(default_factory=list)
    """Per row of a batch, the document it continues."""
    pending: list[HeldDoc] = field(default_factory=list)
    """Held documents waiting for a row (more than this run's rows, or moved here by a rescale)."""
    docs: int = 0
    empty_docs: int = 0


@dataclass
class RankState:
    """One DP rank's loader: its shape, which worker's batch is due next, and every worker's state."""

    dp_rank: int
    dp_size: int
    num_workers: int
    n_shards: int
    next_worker: int = 0
    into_chunk: int = 0
    """Batches of the due worker's current chunk already handed out."""
    workers: dict[int, WorkerState] = field(default_factory=dict)
    """Global worker id -> its state."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as JSON writes it (worker ids stay ints here; JSON turns them into strings, which
        `from_dict` reads back)."""
        return {"version": STATE_VERSION, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "num_workers": self.num_workers, "n_shards": self.n_shards, "next_worker": self.next_worker,
                "into_chunk": self.into_chunk, "workers": {g: _worker_dict(w) for g, w in self.workers.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankState:
        version = data.get("version")
        if version != STATE_VERSION:
            raise DataError(f"loader state version {version} cannot be read by this Anvil (expects {STATE_VERSION})")
        try:
            return cls(data["dp_rank"], data["dp_size"], data["num_workers"], data["n_shards"], data["next_worker"],
                       data.get("into_chunk", 0), {int(g): _worker(w) for g, w in data["workers"].items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"the checkpoint's loader state is malformed ({type(exc).__name__}: {exc})") from None


@dataclass
class PooledState:
    """Every DP rank's loader state of a checkpoint pooled: each shard's cursor, each held document, the counters.
    Handed out to a new shape by `share` (one pass over the pool per shape, then each rank's part directly)."""

    cursors: dict[str, dict[int, Cursor]]
    tokens: dict[str, int]
    held: list[HeldDoc]
    docs: int
    empty_docs: int
    _owners: dict[int, tuple[dict[int, dict[str, dict[int, Cursor]]], dict[int, list[HeldDoc]]]] = field(
        default_factory=dict, repr=False)

    @classmethod
    def of(cls, rank_states: list[RankState]) -> PooledState:
        cursors: dict[str, dict[int, Cursor]] = {}
        tokens: dict[str, int] = {}
        held: list[HeldDoc] = []
        docs = empty = 0
        for rank_state in rank_states:
            for worker in rank_state.workers.values():
                for name, src in worker.sources.items():
                    cursors.setdefault(name, {}).update(src.shards)
                    tokens[name] = tokens.get(name, 0) + src.tokens
                held += [h for h in [*worker.lanes, *worker.pending] if h is not None]
                docs += worker.docs
                empty += worker.empty_docs
        held.sort(key=lambda h: (h.source, h.shard, h.doc))
        return cls(cursors, tokens, held, docs, empty)

    def _by_owner(self, total_workers: int):
        """{global worker: its shards' cursors per source}, {global worker: its held documents}, for one shape."""
        if total_workers not in self._owners:
            cursors: dict[int, dict[str, dict[int, Cursor]]] = {}
            for name, shards in self.cursors.items():
                for shard, cursor in shards.items():
                    cursors.setdefault(shard % total_workers, {}).setdefault(name, {})[shard] = cursor
            held: dict[int, list[HeldDoc]] = {}
            for doc in self.held:
                held.setdefault(doc.shard % total_workers, []).append(doc)
            self._owners[total_workers] = (cursors, held)
        return self._owners[total_workers]

    def share(self, dp_rank: int, dp_size: int, workers: int, spec: StreamSpec) -> dict[int, WorkerState]:
        """The workers' states of DP rank `dp_rank` of `dp_size` with `workers` each: every shard's cursor and
        every held document go to the worker that now owns their shard (shard mod all workers); the counters are
        shared out evenly."""
        total = dp_size * workers
        cursors, held = self._by_owner(total)
        states = {}
        for logical in range(workers):
            gid = dp_rank * workers + logical
            mine = cursors.get(gid, {})
            states[gid] = WorkerState(
                sources={source.name: SourcePosition(dict(mine.get(source.name, {})), 0,
                                                     self.tokens.get(source.name, 0) // total)
                         for source in spec.sources},
                weights=spec.weights,
                pending=list(held.get(gid, [])),
                docs=self.docs // total,
                empty_docs=self.empty_docs // total,
            )
        return states


def _held_dict(held: HeldDoc) -> dict[str, Any]:
    return {"source": held.source, "shard": held.shard, "doc": list(held.doc), "offset": held.offset}


def _held(data: dict[str, Any]) -> HeldDoc:
    return HeldDoc(data["source"], int(data["shard"]), [int(v) for v in data["doc"]], int(data["offset"]))


def _worker_dict(worker: WorkerState) -> dict[str, Any]:
    return {
        "sources": {name: {"shards": {str(s): list(c) for s, c in src.shards.items()}, "turn": src.turn,
                           "tokens": src.tokens} for name, src in worker.sources.items()},
        "weights": None if worker.weights is None else dict(worker.weights),
        "lanes": [None if h is None else _held_dict(h) for h in worker.lanes],
        "pending": [_held_dict(h) for h in worker.pending],
        "docs": worker.docs,
        "empty_docs": worker.empty_docs,
    }


def _worker(data: dict[str, Any]) -> WorkerState:
    sources = {name: SourcePosition({int(s): [int(v) for v in c] for s, c in src["shards"].items()},
                                    int(src.get("turn", 0)), int(src.get("tokens", 0)))
               for name, src in data["sources"].items()}
    weights = data.get("weights")
    return WorkerState(sources, None if weights is None else {k: float(v) for k, v in weights.items()},
                       [None if h is None else _held(h) for h in data.get("lanes", [])],
                       [_held(h) for h in data.get("pending", [])], int(data.get("docs", 0)),
                       int(data.get("empty_docs", 0)))
