"""A source's windows, read and tokenized ahead of the packer: the turn schedule of its shard readers, the reading
thread, the tokenizing threads and their per-batch futures, and the tokenized window (`Window`) the packer slices.

Readers take turns, one window a turn, so the order of the windows is a pure function of the cursors (`state.py`);
`stream.py` mixes and packs what comes out.
"""

from __future__ import annotations

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
from trainer.data.state import StreamSpec


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


class Window:
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

@dataclass
class Turn:
    """One turn of a feed's schedule: reader `reader`'s next window (read as `texts`, then tokenized as `docs`),
    or, with `where` None, the news that this reader's shard has reached the epoch limit."""

    reader: int
    where: tuple[int, int, int] | None  # epoch, unit position, window
    texts: list[str] = field(default_factory=list)
    docs: Window | None = None


class _Batch:
    """A batch of turns whose texts are being encoded in chunks: the chunks' results, how many are still out, and
    the future the feed's consumer waits on."""

    def __init__(self, turns: list[Turn], chunks: int):
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
        self._ready: deque[Turn] = deque()
        self._ended = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"anvil-read-{source.name}", daemon=True)
        self._thread.start()

    def _schedule(self) -> Iterator[Turn]:
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
                        yield Turn(i, None)
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
                    yield Turn(i, (epoch, unit_pos, window), texts)
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

    def _submit(self, turns: list[Turn]) -> Future:
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
                    due.docs = Window(flat[offsets[at]:offsets[at + n]], counts[at:at + n], rng.permutation,
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

    def next(self, reader: int) -> Turn:
        """Reader `reader`'s next turn: its next window, or (`where` None) the news that it has finished."""
        while not self._ready:
            if self._ended:
                return Turn(reader, None)
            got = self._queue.get()
            if got is None:  # the schedule is over: every reader has finished
                self._ended = True
                return Turn(reader, None)
            if isinstance(got, BaseException):
                raise got
            self._ready.extend(got.result())
        due = self._ready.popleft()
        if due.reader != reader:
            raise RuntimeError(f"data feed of {self.source.name}: reader {reader} asked, reader {due.reader} due")
        return due

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
