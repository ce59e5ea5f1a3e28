"""One data worker's batches: mixing the sources and packing their documents into rows.

Every source is split into `n_shards` logical shards; global worker `g` of `G` owns the shards `s` with
`s % G == g`. A shard's cursor `[epoch, unit, window, doc, offset]` says exactly how far it has been read,
so a shard can move to another worker (a different world size) and go on with nothing dropped or repeated.
Its windows come read and tokenized from `windows.py`; the positions are the typed records of `state.py`.

A batch's rows are packed side by side, each from the shared stream, and **a document never spans two rows of
one batch**: when a row fills up in the middle of a document, the rest of that document is *held* by that row
and continues it in the following batches. So a long document takes one row of many batches instead of many rows
of one, and the rows of a batch are as independent as the documents. Packing is lazy — a row pulls exactly the
tokens it needs — and the state is cursors and counters only: a held document is saved as where it is and how
much of it was used, and re-read from its Parquet window on restore.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from trainer.data.sources import DataError, Source
from trainer.data.state import HeldDoc, SourcePosition, StreamSpec, WorkerState
from trainer.data.windows import Tokenizing, Window, WindowFeed

_EMPTY = np.empty(0, dtype=np.int64)
"""No document starts (positions off, or a piece inside one document)."""


@dataclass
class Stats:
    docs: int = 0
    empty_docs: int = 0


@dataclass
class Held:
    """The rest of a document a row is in the middle of: it continues that row in the next batches."""

    source: int
    shard: int
    where: list[int]  # epoch, unit position, window, row of the window's text
    offset: int  # tokens of the document's layout already emitted
    rest: np.ndarray

    def state(self, spec: StreamSpec) -> HeldDoc:
        return HeldDoc(spec.sources[self.source].name, self.shard, list(self.where), self.offset)


class ShardReader:
    """One logical shard of one source; holds at most one window of tokenized documents."""

    def __init__(self, source: Source, source_index: int, shard: int, spec: StreamSpec, stats: Stats, cursor=None):
        self.source, self.source_index, self.shard, self.spec, self.stats = source, source_index, shard, spec, stats
        self.index = 0  # its place among the source's readers on this worker (the feed's turn order)
        self.cursor = list(cursor) if cursor is not None else [0, 0, 0, 0, 0]
        self.feed: WindowFeed | None = None
        self._docs: Window | None = None
        self.has_units = len(source.shard_units(shard, spec.n_shards, 0, spec.seed)) > 0
        # With one source, a piece may run across documents; with several, each document is its own piece so
        # that mixing chooses the source document by document.
        self.across_documents = len(spec.sources) == 1

    @property
    def finished(self) -> bool:
        return self.spec.epochs is not None and self.cursor[0] >= self.spec.epochs

    def _load_window(self) -> bool:
        """Load the window the cursor is in (or the next one); False once the epoch limit is reached."""
        if self._docs is not None:
            return True
        due = self.feed.next(self.index)
        if due.where is None:
            self.cursor[:] = [self.spec.epochs or 0, 0, 0, 0, 0]
            return False
        if self.cursor[:3] != list(due.where):  # a fresh window (not the one a restore is inside)
            self.cursor[:] = [*due.where, 0, 0]
        self.stats.empty_docs += due.docs.empty
        self._docs = due.docs
        return True

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, Held | None] | None:
        """Up to `n` tokens from the cursor on: (tokens, where documents start in them, the rest of the last
        document if the piece ends inside it); None once finished. The cursor moves past every document the
        piece touches: a document's rest is the caller's from then on."""
        if not self._load_window():
            return None
        window, cursor = self._docs, self.cursor
        ends, doc, offset = window.end_list, cursor[3], cursor[4]
        count = len(ends)
        if doc >= count:  # an all-empty window: a turn with nothing in it
            return self._next_window(window.tokens[:0], _EMPTY, None)
        pos = window.start(doc) + offset
        end = min(pos + n, len(window.tokens) if self.across_documents else ends[doc])
        piece = window.tokens[pos:end]
        done = bisect.bisect_right(ends, end, doc)  # documents [doc, done) end inside the piece
        doc_starts = _EMPTY
        if self.spec.positions:
            starts = window.ends[doc:done] - pos  # the next document starts where one ends
            starts = starts[starts < len(piece)]
            doc_starts = np.concatenate([[0], starts]) if offset == 0 else starts
        held = None
        if done < count and end > window.start(done):  # the piece ends inside document `done`
            first = window.start(done)
            held = Held(self.source_index, self.shard, [*cursor[:3], int(window.rows[done])], end - first,
                        window.tokens[end:ends[done]].copy())
            done += 1
        self.stats.docs += done - doc
        if done == count:
            return self._next_window(piece, doc_starts, held)
        cursor[3], cursor[4] = done, 0
        return piece, doc_starts, held

    def _next_window(self, piece, doc_starts, held):
        self._docs = None
        self.cursor[2] += 1
        self.cursor[3], self.cursor[4] = 0, 0
        return piece, doc_starts, held

    @property
    def window_open(self) -> bool:
        return self._docs is not None


@dataclass
class _SourceState:
    readers: list[ShardReader]
    turn: int = 0
    tokens: int = 0
    feed: WindowFeed | None = None
    live: bool = True  # some reader has not reached the epoch limit


@dataclass
class WorkerStream:
    """Global data worker `worker` of `n_workers`: yields batches of `rows` packed rows of `seq_len + 1` tokens."""

    spec: StreamSpec
    worker: int
    n_workers: int
    saved: WorkerState | None = None
    """Where to start from (a checkpoint's), or the beginning."""
    rows: int = 1
    threads: int = 1
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        self.tokenizing = Tokenizing(self.spec.tokenizer, self.threads)
        saved = self.saved or WorkerState()
        self.sources: list[_SourceState] = []
        for index, source in enumerate(self.spec.sources):
            mine = saved.sources.get(source.name, SourcePosition())
            # Shard s holds row groups only if s < the source's row groups (each takes every n_shards-th of them).
            shards = range(self.worker, min(self.spec.n_shards, len(source.units)), self.n_workers)
            readers = [ShardReader(source, index, s, self.spec, self.stats, mine.shards.get(s)) for s in shards]
            readers = [r for r in readers if r.has_units]
            if not readers:
                raise DataError(
                    f"dataset {source.name}: its {len(source.units)} row groups cannot feed data worker "
                    f"{self.worker} of {self.n_workers}; write it with smaller row groups "
                    "(python -m trainer.data convert --row-group-rows ...) or use fewer workers"
                )
            for i, reader in enumerate(readers):
                reader.index = i
            self.sources.append(_SourceState(readers, mine.turn % len(readers), mine.tokens,
                                             live=not all(r.finished for r in readers)))
        self.stats.docs, self.stats.empty_docs = saved.docs, saved.empty_docs
        self.weights = np.array(list(self.spec.weights.values()), dtype=np.float64)
        names = {s.name: i for i, s in enumerate(self.spec.sources)}
        # Held documents of sources no longer in the mix are dropped; lanes beyond this batch size queue up.
        self.lanes: list[Held | None] = [None] * self.rows
        self.pending: deque[Held] = deque()
        for lane, saved_held in enumerate(saved.lanes):
            if saved_held is not None and saved_held.source in names:
                held = self._rebuild(saved_held, names)
                if lane < self.rows:
                    self.lanes[lane] = held
                else:
                    self.pending.append(held)
        self.pending.extend(self._rebuild(h, names) for h in saved.pending if h.source in names)
        self._cursors = [{r.shard: list(r.cursor) for r in src.readers} for src in self.sources]
        self._touched: set[ShardReader] = set()
        for src in self.sources:
            src.feed = WindowFeed(src.readers[0].source, self.spec, self.tokenizing,
                                  [(r.shard, r.cursor) for r in src.readers], src.turn)
            for reader in src.readers:
                reader.feed = src.feed

    def _rebuild(self, saved: HeldDoc, names: dict[str, int]) -> Held:
        """A held document from its saved place: the one window it came from is read again, one text encoded."""
        source = self.spec.sources[names[saved.source]]
        epoch, unit_pos, window, row = saved.doc
        units = source.shard_units(saved.shard, self.spec.n_shards, epoch, self.spec.seed)
        texts = next(source.read_windows(source.units[units[unit_pos]], self.spec.window, window), None)
        if texts is None or row >= len(texts):
            raise DataError(f"dataset {source.name}: the document a checkpointed row was in the middle of "
                            f"(row group {units[unit_pos]}, window {window}, row {row}) is no longer there: "
                            "the dataset changed under the job; restore it or start a new job")
        # The document as the stream lays it out ([BOS] ids EOS): a window of this one document.
        layout = Window(*self.tokenizing.encode([texts[row]]), np.arange, self.spec.bos_id, self.spec.eos_id).tokens
        return Held(names[saved.source], saved.shard, list(saved.doc), saved.offset, layout[saved.offset:])

    def close(self) -> None:
        for src in self.sources:
            if src.feed is not None:
                src.feed.close()
        self.tokenizing.close()

    def _choose(self) -> int | None:
        """The source furthest below its share of the tokens so far (deterministic)."""
        total = sum(s.tokens for s in self.sources)
        best, best_gap = None, -np.inf
        for i, s in enumerate(self.sources):
            if not s.live:
                continue
            gap = self.weights[i] * total - s.tokens
            if gap > best_gap:
                best, best_gap = i, gap
        return best

    def _take(self, index: int, n: int) -> tuple[np.ndarray, np.ndarray, Held | None] | None:
        src = self.sources[index]
        for _ in range(len(src.readers)):
            reader = src.readers[src.turn]
            self._touched.add(reader)
            if not reader.finished:
                got = reader.take(n)
                if got is not None:
                    if not reader.window_open:  # readers take turns, a window each
                        src.turn = (src.turn + 1) % len(src.readers)
                    return got
            src.turn = (src.turn + 1) % len(src.readers)
        src.live = False  # every reader has reached the epoch limit
        return None

    def _fill(self, lane: int, tokens: np.ndarray, positions: np.ndarray | None) -> int:
        """Fill row `lane` of the next batch (`tokens`, `positions`: its views, EOS and 0 beforehand); returns how
        many tokens are valid (fewer only at the end of a finite run)."""
        size = len(tokens)
        filled = 0
        while filled < size:
            held = self.lanes[lane]
            if held is None and self.pending:
                held = self.lanes[lane] = self.pending.popleft()
            if held is not None:  # the document this row is in the middle of comes first
                piece, doc_starts, source = held.rest[:size - filled], _EMPTY, held.source
                held.rest, held.offset = held.rest[len(piece):], held.offset + len(piece)
                if not len(held.rest):
                    self.lanes[lane] = None
            else:
                source = self._choose()
                if source is None:
                    break
                got = self._take(source, size - filled)
                if got is None:
                    continue
                piece, doc_starts, self.lanes[lane] = got
            n = len(piece)
            tokens[filled:filled + n] = piece
            if positions is not None:  # restarting at every document start, and at the start of the row
                marks = np.zeros(n, dtype=np.int64)
                marks[doc_starts] = doc_starts
                positions[filled:filled + n] = np.arange(n) - np.maximum.accumulate(marks)
            filled += n
            self.sources[source].tokens += n
        return filled

    def next_batch(self) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
        """The next batch: tokens `[rows, seq_len + 1]`, positions (or None) and each row's valid length; fewer rows,
        or none, only at the end of a finite run."""
        shape = (self.rows, self.spec.seq_len + 1)
        tokens = np.full(shape, self.spec.eos_id, dtype=np.int32)
        positions = np.zeros(shape, dtype=np.int32) if self.spec.positions else None
        valid = [self._fill(lane, tokens[lane], None if positions is None else positions[lane])
                 for lane in range(self.rows)]
        if 0 in valid:
            keep = [lane for lane, n in enumerate(valid) if n]
            tokens, valid = tokens[keep], [valid[lane] for lane in keep]
            positions = None if positions is None else positions[keep]
        return tokens, positions, valid

    def state(self) -> WorkerState:
        """Where this worker stands after its last batch. Sent with every batch: only the cursors of readers used
        since the last call are copied again."""
        for reader in self._touched:
            self._cursors[reader.source_index][reader.shard] = list(reader.cursor)
        self._touched.clear()
        return WorkerState(
            {spec.name: SourcePosition(dict(cursors), s.turn, s.tokens)
             for spec, s, cursors in zip(self.spec.sources, self.sources, self._cursors, strict=True)},
            self.spec.weights, [None if h is None else h.state(self.spec) for h in self.lanes],
            [h.state(self.spec) for h in self.pending], self.stats.docs, self.stats.empty_docs)

