"""One data worker's batches: logical shards → tokenized, shuffled windows → mixing → packing into rows.

Every source is split into `n_shards` logical shards; global worker `g` of `G` owns the shards `s` with
`s % G == g`. A shard's cursor `[epoch, unit, window, doc, offset]` says exactly how far it has been read,
so a shard can move to another worker (a different world size) and go on with nothing dropped or repeated.

A batch's rows are packed side by side, each from the shared stream, and **a document never spans two rows of
one batch**: when a row fills up in the middle of a document, the rest of that document is *held* by that row
and continues it in the following batches. So a long document takes one row of many batches instead of many rows
of one, and the rows of a batch are as independent as the documents. Packing is lazy — a row pulls exactly the
tokens it needs — and the state is cursors and counters only: a held document is saved as where it is and how
much of it was used, and re-read from its Parquet window on restore.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.random import default_rng

from trainer.data.sources import DataError, OpenFiles, Source, stable_hash


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


@dataclass
class Stats:
    docs: int = 0
    empty_docs: int = 0


def load_tokenizer(path: Path):
    """The tokenizer at `path`, loaded once per process while the file is unchanged (a forked worker inherits the
    parent's)."""
    try:
        stat = os.stat(path)
    except OSError:
        raise DataError(f"tokenizer {path} cannot be loaded: it does not exist") from None
    return _load_tokenizer(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str, mtime_ns: int, size: int):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises plain Exception subclasses for bad files
        raise DataError(f"tokenizer {path} cannot be loaded: {exc}") from None


class _Window:
    """One window of tokenized documents in shuffled order, as one flat token array (BOS/EOS included).

    A piece of the stream is then one slice, however many short documents it spans: no per-document
    Python work while packing, nor while building (the flat array is gathered with numpy). `rows[i]` is the row
    of the window's text that document `i` came from.
    """

    def __init__(self, flat: np.ndarray, counts: np.ndarray, order_of, bos_id: int | None, eos_id: int):
        """`flat`: every row's token ids one after another, `counts`: how many each row has (empty rows included);
        `order_of(n)`: the permutation of the n non-empty."""
        rows = np.flatnonzero(counts)
        self.empty = len(counts) - len(rows)
        order = order_of(len(rows))
        self.rows = rows[order]
        sizes = counts[self.rows]  # content tokens of each document, in shuffled order
        source_starts = (np.cumsum(counts) - counts)[self.rows]
        extra = 1 + (bos_id is not None)
        self.ends = np.cumsum(sizes + extra)
        self.end_list: list[int] = self.ends.tolist()  # the same, for the packer's scalar lookups (no numpy scalars)
        total = self.end_list[-1] if self.end_list else 0
        if not total:
            self.tokens = np.empty(0, dtype=np.int32)
            return
        # One gather builds the whole layout: each document's positions read its content from `flat`, shifted by
        # where it starts there; its BOS and EOS positions read two sentinels appended to `flat`.
        starts = self.ends - sizes - extra
        source = np.concatenate([flat, np.array([eos_id, eos_id if bos_id is None else bos_id], dtype=np.int32)])
        index = np.repeat(source_starts - starts - (extra - 1), sizes + extra) + np.arange(total)
        index[self.ends - 1] = len(flat)
        if bos_id is not None:
            index[starts] = len(flat) + 1
        self.tokens = source[index]

    def __len__(self) -> int:
        return len(self.end_list)

    def start(self, doc: int) -> int:
        return self.end_list[doc - 1] if doc else 0


def _window_rng(spec: StreamSpec, source: Source, shard: int, epoch: int, unit_pos: int, window: int):
    return default_rng([spec.seed, stable_hash(source.name), shard, epoch, unit_pos, window])


CHUNK_CHARS = 1 << 14
"""Characters of text per tokenizer call, about (whole documents): ~15 ms of one core's work, as fast per token as
any larger call, and fine-grained enough that every thread has a share of even a single window."""

_EMPTY = np.empty(0, dtype=np.int64)
"""No document starts (positions off, or a piece inside one document)."""

FINISHED = object()
"""What the feed hands a reader whose shard has reached the epoch limit."""


@dataclass
class _Turn:
    """One turn of a feed's schedule: reader `reader`'s next window (read as `texts`, then tokenized as `docs`),
    or, with `where` None, the news that this reader's shard has reached the epoch limit."""

    reader: int
    where: tuple[int, int, int] | None  # epoch, unit position, window
    texts: list[str] = field(default_factory=list)
    docs: _Window | None = None


class _Batch:
    """A batch of turns whose texts are being encoded in chunks: the chunks' results, how many are still out, and
    the future the feed's consumer waits on."""

    def __init__(self, turns: list[_Turn], chunks: int):
        self.turns = turns
        self.parts: list[tuple[np.ndarray, np.ndarray] | None] = [None] * chunks
        self.left = chunks
        self.lock = threading.Lock()
        self.done: Future = Future()

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if not self.done.done():
                self.done.set_exception(exc)


class Tokenizing:
    """The threads one data worker tokenizes on, shared by its sources' feeds.

    The tokenizer's own Rust thread pool is turned off in the process (TOKENIZERS_PARALLELISM=false): each call then
    encodes its texts on the calling thread with the GIL released, and the parallelism is these threads'. Measured
    on 2 cores, one-line documents: 0.96 x the pool's own speed on the same texts, against 0.83 with the pool —
    with the pool, everything the loader does beside the tokenizer (its Python objects, the `.ids` lists, reading,
    packing) competes with a pool that already fills every core, and the pool idles while a call holds the GIL."""

    def __init__(self, tokenizer_path: Path, threads: int):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before the first call: the setting is read at every call
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.threads = max(threads, 1)
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="anvil-tokenize")

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The texts' token ids one after another, and how many each text has. (One array per text, then one
        concatenation: cheaper than flattening the id lists in Python.)"""
        arrays = [np.array(e.ids, dtype=np.int32) for e in self.tokenizer.encode_batch_fast(texts,
                                                                                           add_special_tokens=False)]
        counts = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        return (np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int32)), counts

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class WindowFeed:
    """One source's windows, read and tokenized ahead, in exactly the order its shard readers will ask for them:
    readers take turns, one window a turn (an empty window is a turn too), so the order is a pure function of the
    cursors.

    A reading thread groups the turns into batches (whole windows, the first one alone so that it comes soon) and
    splits each batch's texts into chunks of about `CHUNK_CHARS` for the tokenizing threads; whichever thread
    encodes a batch's last chunk builds its windows. Batches are consumed in reading order; at most `AHEAD` of them
    wait, so memory stays bounded."""

    AHEAD = 2

    def __init__(self, source: Source, spec: StreamSpec, tokenizing: Tokenizing, starts: list[tuple[int, list[int]]],
                 turn: int):
        self.source, self.spec, self.tokenizing = source, spec, tokenizing
        self._starts, self._turn = starts, turn
        self._queue: queue.Queue = queue.Queue(maxsize=self.AHEAD)
        self._ready: deque[_Turn] = deque()
        self._ended = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"anvil-read-{source.name}", daemon=True)
        self._thread.start()

    def _schedule(self) -> Iterator[_Turn]:
        """Every reader's turns in reading order."""
        files = OpenFiles()
        positions = [list(cursor[:3]) for _, cursor in self._starts]
        shards = [shard for shard, _ in self._starts]
        done = [self.spec.epochs is not None and p[0] >= self.spec.epochs for p in positions]
        reading: list[tuple | None] = [None] * len(positions)  # (epoch, unit, next window, open reader)
        turn = self._turn
        try:
            while not all(done):
                i, turn = turn, (turn + 1) % len(positions)
                if done[i]:
                    continue
                while True:
                    epoch, unit_pos, window = positions[i]
                    if self.spec.epochs is not None and epoch >= self.spec.epochs:
                        done[i] = True
                        yield _Turn(i, None)
                        break
                    units = self.source.shard_units(shards[i], self.spec.n_shards, epoch, self.spec.seed)
                    if unit_pos >= len(units):
                        positions[i] = [epoch + 1, 0, 0]
                        continue
                    if reading[i] is None or reading[i][:3] != (epoch, unit_pos, window):
                        unit = self.source.units[units[unit_pos]]
                        windows = self.source.read_windows(unit, self.spec.window, window, files)
                        reading[i] = (epoch, unit_pos, window, windows)
                    texts = next(reading[i][3], None)
                    if texts is None:  # the unit is done
                        reading[i] = None
                        positions[i] = [epoch, unit_pos + 1, 0]
                        continue
                    reading[i] = (epoch, unit_pos, window + 1, reading[i][3])
                    positions[i] = [epoch, unit_pos, window + 1]
                    yield _Turn(i, (epoch, unit_pos, window), texts)
                    break
        finally:
            files.close()

    def _read(self) -> None:
        """Reading thread: the schedule's turns, in batches, each handed to the tokenizing threads."""
        try:
            schedule = self._schedule()
            target = 1  # characters: the first window alone, it is waited for
            while not self._stop.is_set():
                batch, chars = [], 0
                for due in schedule:
                    batch.append(due)
                    chars += sum(map(len, due.texts)) + len(due.texts)
                    if chars >= target:
                        break
                target = 2 * self.tokenizing.threads * CHUNK_CHARS
                if not batch:
                    self._put(None)
                    return
                self._put(self._submit(batch))
        except BaseException as exc:  # noqa: BLE001 - handed down the pipeline to the consumer, which raises it
            self._put(exc)

    def _submit(self, turns: list[_Turn]) -> Future:
        """Hand a batch's texts to the tokenizing threads in chunks; the returned future is the batch's turns with
        their windows built."""
        texts = [t for due in turns for t in due.texts]
        bounds, size = [0], 0
        for end, text in enumerate(texts, 1):
            size += len(text) + 1
            if size >= CHUNK_CHARS or end == len(texts):
                bounds.append(end)
                size = 0
        batch = _Batch(turns, len(bounds) - 1)
        if not batch.left:  # nothing to encode (the epoch limit, or windows of empty rows only)
            self._finish(batch)
        for k, (start, end) in enumerate(itertools.pairwise(bounds)):
            self.tokenizing.pool.submit(self._encode_part, batch, k, texts[start:end])
        return batch.done

    def _encode_part(self, batch: _Batch, k: int, texts: list[str]) -> None:
        """On a tokenizing thread: one chunk; the thread that encodes a batch's last chunk builds its windows (no
        thread ever waits for another's chunk)."""
        try:
            batch.parts[k] = self.tokenizing.encode(texts)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer through the batch's future
            batch.fail(exc)
            return
        with batch.lock:
            batch.left -= 1
            last = batch.left == 0
        if last:
            self._finish(batch)

    def _finish(self, batch: _Batch) -> None:
        try:
            parts = [p for p in batch.parts if p is not None]
            flat = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, dtype=np.int32)
            counts = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(counts)])
            at = 0
            for due in batch.turns:
                if due.where is not None:
                    n = len(due.texts)
                    rng = _window_rng(self.spec, self.source, self._starts[due.reader][0], *due.where)
                    due.docs = _Window(flat[offsets[at]:offsets[at + n]], counts[at:at + n], rng.permutation,
                                       self.spec.bos_id, self.spec.eos_id)
                    at += n
                    due.texts = []
            batch.done.set_result(batch.turns)
        except BaseException as exc:  # noqa: BLE001
            batch.fail(exc)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self, reader: int) -> tuple:
        """The next window for reader `reader`: (epoch, unit position, window, _Window) or FINISHED."""
        while not self._ready:
            if self._ended:
                return FINISHED
            got = self._queue.get()
            if got is None:  # the schedule is over: every reader has finished
                self._ended = True
                return FINISHED
            if isinstance(got, BaseException):
                raise got
            self._ready.extend(got.result())
        due = self._ready.popleft()
        if due.reader != reader:
            raise RuntimeError(f"data feed of {self.source.name}: reader {reader} asked, reader {due.reader} due")
        return FINISHED if due.where is None else (*due.where, due.docs)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Held:
    """The rest of a document a row is in the middle of: it continues that row in the next batches."""

    source: int
    shard: int
    where: list[int]  # epoch, unit position, window, row of the window's text
    offset: int  # tokens of the document's layout already emitted
    rest: np.ndarray

    def state(self, spec: StreamSpec) -> dict:
        return {"source": spec.sources[self.source].name, "shard": self.shard, "doc": list(self.where),
                "offset": self.offset}


class ShardReader:
    """One logical shard of one source; holds at most one window of tokenized documents."""

    def __init__(self, source: Source, source_index: int, shard: int, spec: StreamSpec, stats: Stats, cursor=None):
        self.source, self.source_index, self.shard, self.spec, self.stats = source, source_index, shard, spec, stats
        self.index = 0  # its place among the source's readers on this worker (the feed's turn order)
        self.cursor = list(cursor) if cursor is not None else [0, 0, 0, 0, 0]
        self.feed: WindowFeed | None = None
        self._docs: _Window | None = None
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
        got = self.feed.next(self.index)
        if got is FINISHED:
            self.cursor[:] = [self.spec.epochs or 0, 0, 0, 0, 0]
            return False
        epoch, unit_pos, window, docs = got
        if self.cursor[:3] != [epoch, unit_pos, window]:  # a fresh window (not the one a restore is inside)
            self.cursor[:] = [epoch, unit_pos, window, 0, 0]
        self.stats.empty_docs += docs.empty
        self._docs = docs
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
    state: dict | None = None
    rows: int = 1
    threads: int = 1
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        self.tokenizing = Tokenizing(self.spec.tokenizer, self.threads)
        saved = self.state or {}
        self.sources: list[_SourceState] = []
        for index, source in enumerate(self.spec.sources):
            mine = saved.get("sources", {}).get(source.name, {})
            cursors = mine.get("shards", {})
            shards = range(self.worker, self.spec.n_shards, self.n_workers)
            readers = [ShardReader(source, index, s, self.spec, self.stats, cursors.get(str(s))) for s in shards]
            readers = [r for r in readers if r.has_units]
            if not readers:
                raise DataError(
                    f"dataset {source.name}: its {len(source.units)} row groups cannot feed data worker "
                    f"{self.worker} of {self.n_workers}; write it with smaller row groups "
                    "(python -m trainer.data convert --row-group-rows ...) or use fewer workers"
                )
            for i, reader in enumerate(readers):
                reader.index = i
            self.sources.append(_SourceState(readers, mine.get("turn", 0) % len(readers), mine.get("tokens", 0),
                                             live=not all(r.finished for r in readers)))
        self.stats.docs = saved.get("docs", 0)
        self.stats.empty_docs = saved.get("empty_docs", 0)
        self.weights = np.array(list(self.spec.weights.values()), dtype=np.float64)
        names = {s.name: i for i, s in enumerate(self.spec.sources)}
        # Held documents of sources no longer in the mix are dropped; lanes beyond this batch size queue up.
        self.lanes: list[Held | None] = [None] * self.rows
        self.pending: deque[Held] = deque()
        for lane, saved_held in enumerate(saved.get("lanes", [])):
            if saved_held is not None and saved_held["source"] in names:
                held = self._rebuild(saved_held, names)
                if lane < self.rows:
                    self.lanes[lane] = held
                else:
                    self.pending.append(held)
        self.pending.extend(self._rebuild(h, names) for h in saved.get("pending", []) if h["source"] in names)
        self._cursors = [{str(r.shard): list(r.cursor) for r in src.readers} for src in self.sources]
        self._touched: set[ShardReader] = set()
        for src in self.sources:
            src.feed = WindowFeed(src.readers[0].source, self.spec, self.tokenizing,
                                  [(r.shard, r.cursor) for r in src.readers], src.turn)
            for reader in src.readers:
                reader.feed = src.feed

    def _rebuild(self, saved: dict, names: dict[str, int]) -> Held:
        """A held document from its saved place: the one window it came from is read again, one text encoded."""
        source = self.spec.sources[names[saved["source"]]]
        epoch, unit_pos, window, row = saved["doc"]
        units = source.shard_units(saved["shard"], self.spec.n_shards, epoch, self.spec.seed)
        texts = next(source.read_windows(source.units[units[unit_pos]], self.spec.window, window), None)
        if texts is None or row >= len(texts):
            raise DataError(f"dataset {source.name}: the document a checkpointed row was in the middle of "
                            f"(row group {units[unit_pos]}, window {window}, row {row}) is no longer there: "
                            "the dataset changed under the job; restore it or start a new job")
        # The document as the stream lays it out ([BOS] ids EOS): a window of this one document.
        layout = _Window(*self.tokenizing.encode([texts[row]]), np.arange, self.spec.bos_id, self.spec.eos_id).tokens
        return Held(names[saved["source"]], saved["shard"], list(saved["doc"]), saved["offset"],
                    layout[saved["offset"]:])

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

    def state_dict(self) -> dict:
        # Sent with every batch: only the cursors of readers used since the last call are copied again.
        for reader in self._touched:
            self._cursors[reader.source_index][str(reader.shard)] = list(reader.cursor)
        self._touched.clear()
        return {
            "sources": {
                spec.name: {"shards": dict(cursors), "turn": s.turn, "tokens": s.tokens}
                for spec, s, cursors in zip(self.spec.sources, self.sources, self._cursors, strict=True)
            },
            "weights": self.spec.weights,
            "lanes": [None if h is None else h.state(self.spec) for h in self.lanes],
            "pending": [h.state(self.spec) for h in self.pending],
            "docs": self.stats.docs,
            "empty_docs": self.stats.empty_docs,
        }

