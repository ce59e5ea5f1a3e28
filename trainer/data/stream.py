"""One data worker's token stream: logical shards → tokenized, shuffled windows → mixing → packing.

Every source is split into `n_shards` logical shards; global worker `g` of `G` owns the shards `s` with
`s % G == g`. A shard's cursor `[epoch, unit, window, doc, offset]` says exactly how far it has been read,
so a shard can move to another worker (a different world size) and go on with nothing dropped or repeated.
Packing is lazy — a sequence pulls exactly the tokens it needs — so no token is ever buffered between
sequences, and the state is cursors and counters only: no text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from trainer.data.sources import DataError, Source, stable_hash


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


@dataclass
class Stats:
    docs: int = 0
    empty_docs: int = 0


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer  # imported here: worker processes pick their thread count first

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception subclasses for bad files
        raise DataError(f"tokenizer {path} cannot be loaded: {exc}") from None


class _Window:
    """One window of tokenized documents in shuffled order, as one flat token array (BOS/EOS included).

    A piece of the stream is then one slice, however many short documents it spans: no per-document
    Python work while packing.
    """

    def __init__(self, docs: list[list[int]], order: np.ndarray, bos_id: int | None, eos_id: int):
        extra = 1 + (bos_id is not None)
        lengths = np.fromiter((len(docs[i]) for i in order), dtype=np.int64, count=len(order)) + extra
        self.ends = np.cumsum(lengths)
        starts = self.ends - lengths
        total = int(self.ends[-1]) if len(order) else 0
        self.tokens = np.empty(total, dtype=np.int32)
        content = np.ones(total, dtype=bool)
        content[self.ends - 1] = False
        self.tokens[self.ends - 1] = eos_id
        if bos_id is not None:
            content[starts] = False
            self.tokens[starts] = bos_id
        self.tokens[content] = np.fromiter(chain.from_iterable(docs[i] for i in order), dtype=np.int32,
                                           count=total - extra * len(order))

    def __len__(self) -> int:
        return len(self.ends)

    def start(self, doc: int) -> int:
        return int(self.ends[doc - 1]) if doc else 0


class ShardReader:
    """One logical shard of one source; holds at most one window of tokenized documents."""

    def __init__(self, source: Source, shard: int, spec: StreamSpec, encode, stats: Stats, cursor=None):
        self.source, self.shard, self.spec, self.encode, self.stats = source, shard, spec, encode, stats
        self.cursor = list(cursor) if cursor is not None else [0, 0, 0, 0, 0]
        self._docs: _Window | None = None
        self._windows = None  # open reader over the current unit, positioned at self._next_window
        self._reading: tuple[int, int] | None = None
        self._next_window = 0
        self.has_units = len(source.shard_units(shard, spec.n_shards, 0, spec.seed)) > 0
        # With one source, a piece may run across documents; with several, each document is its own piece so
        # that mixing chooses the source document by document.
        self.across_documents = len(spec.sources) == 1

    @property
    def finished(self) -> bool:
        return self.spec.epochs is not None and self.cursor[0] >= self.spec.epochs

    def _load_window(self) -> bool:
        """Load the window under the cursor; False once the epoch limit is reached."""
        while self._docs is None:
            if self.finished:
                return False
            epoch, unit_pos, window = self.cursor[0], self.cursor[1], self.cursor[2]
            units = self.source.shard_units(self.shard, self.spec.n_shards, epoch, self.spec.seed)
            if unit_pos >= len(units):
                self.cursor[:] = [epoch + 1, 0, 0, 0, 0]
                continue
            if self._reading != (epoch, unit_pos) or self._next_window != window:
                unit = self.source.units[units[unit_pos]]
                self._windows = self.source.read_windows(unit, self.spec.window, start=window)
                self._reading, self._next_window = (epoch, unit_pos), window
            texts = next(self._windows, None)
            if texts is None:  # the unit is done
                self._reading = None
                self.cursor[:] = [epoch, unit_pos + 1, 0, 0, 0]
                continue
            self._next_window += 1
            docs = self._tokenize(texts)
            rng = np.random.default_rng([self.spec.seed, stable_hash(self.source.name), self.shard, epoch,
                                         unit_pos, window])
            order = rng.permutation(len(docs))
            if self.cursor[3] >= len(docs):  # an all-empty window
                self.cursor[:] = [epoch, unit_pos, window + 1, 0, 0]
                continue
            self._docs = _Window(docs, order, self.spec.bos_id, self.spec.eos_id)
        return True

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        docs = []
        for ids in self.encode(texts):
            if not ids:
                self.stats.empty_docs += 1
                continue
            docs.append(ids)
        return docs

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """Up to `n` tokens from the cursor on: (tokens, where documents start in them, whether the piece ends at
        the end of a document); None when done."""
        if not self._load_window():
            return None
        window, doc, offset = self._docs, self.cursor[3], self.cursor[4]
        pos = window.start(doc) + offset
        limit = len(window.tokens) if self.across_documents else int(window.ends[doc])
        end = min(pos + n, limit)
        piece = window.tokens[pos:end]
        # Documents that end inside the piece: the cursor moves past them.
        done = int(np.searchsorted(window.ends, end, side="right"))
        starts = window.ends[doc:done] - pos  # the next document starts where one ends
        starts = starts[starts < len(piece)]
        doc_starts = np.concatenate([[0], starts]) if offset == 0 else starts
        self.stats.docs += done - doc
        if done == len(window):  # window consumed: the cursor moves to the next one
            self._docs = None
            self.cursor[2] += 1
            self.cursor[3], self.cursor[4] = 0, 0
        else:
            self.cursor[3], self.cursor[4] = done, end - window.start(done)
        return piece, doc_starts, self.cursor[4] == 0

    @property
    def window_open(self) -> bool:
        return self._docs is not None


@dataclass
class _SourceState:
    readers: list[ShardReader]
    turn: int = 0
    tokens: int = 0


@dataclass
class WorkerStream:
    """Global data worker `worker` of `n_workers`: yields packed sequences of `seq_len + 1` tokens."""

    spec: StreamSpec
    worker: int
    n_workers: int
    state: dict | None = None
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        tokenizer = load_tokenizer(self.spec.tokenizer)

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

        saved = self.state or {}
        self.sources: list[_SourceState] = []
        for source in self.spec.sources:
            mine = saved.get("sources", {}).get(source.name, {})
            cursors = mine.get("shards", {})
            readers = [ShardReader(source, s, self.spec, encode, self.stats, cursors.get(str(s)))
                       for s in range(self.worker, self.spec.n_shards, self.n_workers)]
            readers = [r for r in readers if r.has_units]
            if not readers:
                raise DataError(
                    f"dataset {source.name}: its {len(source.units)} row groups cannot feed data worker "
                    f"{self.worker} of {self.n_workers}; write it with smaller row groups "
                    "(python -m trainer.data convert --row-group-rows ...) or use fewer workers"
                )
            self.sources.append(_SourceState(readers, mine.get("turn", 0) % len(readers), mine.get("tokens", 0)))
        self.current: int | None = saved.get("current")
        self.stats.docs = saved.get("docs", 0)
        self.stats.empty_docs = saved.get("empty_docs", 0)
        weights = np.array([s.weight for s in self.spec.sources], dtype=np.float64)
        self.weights = weights / weights.sum()

    def _choose(self) -> int | None:
        """The source furthest below its share of the tokens so far (deterministic)."""
        total = sum(s.tokens for s in self.sources)
        best, best_gap = None, -np.inf
        for i, s in enumerate(self.sources):
            if all(r.finished for r in s.readers):
                continue
            gap = self.weights[i] * total - s.tokens
            if gap > best_gap:
                best, best_gap = i, gap
        return best

    def _take(self, index: int, n: int) -> tuple[np.ndarray, np.ndarray, bool] | None:
        src = self.sources[index]
        for _ in range(len(src.readers)):
            reader = src.readers[src.turn]
            if not reader.finished:
                got = reader.take(n)
                if got is not None:
                    if not reader.window_open:  # rotate shards window by window
                        src.turn = (src.turn + 1) % len(src.readers)
                    return got
            src.turn = (src.turn + 1) % len(src.readers)
        return None

    def next_sequence(self) -> tuple[np.ndarray, np.ndarray | None, int] | None:
        """(tokens[seq_len + 1], positions or None, valid length); padded only at the end of a finite run."""
        size = self.spec.seq_len + 1
        tokens = np.full(size, self.spec.eos_id, dtype=np.int32)
        positions = np.zeros(size, dtype=np.int32) if self.spec.positions else None
        filled = 0
        while filled < size:
            if self.current is None:
                self.current = self._choose()
                if self.current is None:
                    break
            got = self._take(self.current, size - filled)
            if got is None:
                self.current = None
                continue
            piece, doc_starts, ended = got
            tokens[filled:filled + len(piece)] = piece
            if positions is not None:  # restarting at every document start, and at the start of the piece
                rel = np.arange(len(piece))
                marks = np.zeros(len(piece), dtype=np.int64)
                marks[doc_starts] = doc_starts
                positions[filled:filled + len(piece)] = rel - np.maximum.accumulate(marks)
            filled += len(piece)
            self.sources[self.current].tokens += len(piece)
            if ended:
                self.current = None
        if filled == 0:
            return None
        return tokens, positions, filled

    def state_dict(self) -> dict:
        return {
            "sources": {
                spec.name: {"shards": {str(r.shard): list(r.cursor) for r in s.readers}, "turn": s.turn,
                            "tokens": s.tokens}
                for spec, s in zip(self.spec.sources, self.sources, strict=True)
            },
            "current": self.current,
            "docs": self.stats.docs,
            "empty_docs": self.stats.empty_docs,
        }


def set_tokenizer_threads(threads: int) -> None:
    """Before the tokenizer's first use in a process: its Rust thread pool is sized once. (TOKENIZERS_PARALLELISM
    is left alone: tokenizers itself turns parallelism off in a child forked after the parent used it.)"""
    os.environ["RAYON_NUM_THREADS"] = str(max(threads, 1))
