"""Parquet sources: discovery, validation from footers, per-epoch row-group order, windowed reads.

A dataset is a directory (searched recursively) or a glob of Parquet files. Its unit of work is a row
group; a read never holds more than one window of rows (`iter_batches`), so memory stays bounded even
when a row group is large. Every failure names the file (and row group) and what was expected.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.random import default_rng  # at import: numpy loads its random module lazily (~10 ms)

from trainer.core.errors import AnvilError


class DataError(AnvilError):
    """Bad or missing training data; the message names the file and what to do."""


@dataclass(frozen=True)
class Unit:
    """One row group of one file: the unit that is shuffled per epoch and assigned to a logical shard."""

    file: int
    row_group: int
    rows: int


@dataclass
class Source:
    name: str
    files: list[Path]
    units: list[Unit]
    text_column: str
    weight: float
    _orders: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        """Row-group order for an epoch: a permutation reseeded per epoch and per dataset (the last few are kept:
        every shard and every window turn asks for it)."""
        key = (epoch, seed)
        order = self._orders.get(key)
        if order is None:
            order = default_rng([seed, stable_hash(self.name), epoch]).permutation(len(self.units))
            order.flags.writeable = False
            while len(self._orders) >= 4:
                self._orders.pop(next(iter(self._orders)), None)
            self._orders[key] = order
        return order

    def shard_units(self, shard: int, n_shards: int, epoch: int, seed: int) -> np.ndarray:
        """The units logical shard `shard` reads in `epoch` (every unit belongs to exactly one shard)."""
        return self.epoch_order(epoch, seed)[shard::n_shards]

    def read_windows(self, unit: Unit, window: int, start: int = 0,
                     files: OpenFiles | None = None) -> Iterator[list[str]]:
        """The unit's text in windows of `window` rows, from window index `start` on. With `files`, the file is
        taken from (and left in) that set of open files instead of opened and closed for this unit alone."""
        path = self.files[unit.file]
        where = f"{path} (row group {unit.row_group})"
        reader = files.open(path) if files is not None else _open(path)
        try:
            # One thread: the loader reads on a thread of its own, beside the tokenizer's pool.
            batches = reader.iter_batches(batch_size=window, row_groups=[unit.row_group], columns=[self.text_column],
                                          use_threads=False)
            for index, batch in enumerate(batches):
                if index < start:
                    continue  # skipped windows are read (Parquet cannot seek inside a row group) but not decoded
                yield _texts(batch.column(0), where)
        except DataError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{where}: cannot be read (corrupt or truncated?): {_one_line(exc)}") from None
        finally:
            if files is None:
                reader.close()


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"{path} vanished: it existed when the job started; restore it or remove it "
                        "from the dataset and start a new job") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path} is not a readable Parquet file: {_one_line(exc)}") from None


class OpenFiles:
    """The Parquet files one reading thread used last, kept open: a file's footer is parsed once, not once per
    row group (a tenth of the reading time on small row groups). A file is checked (one stat) at every use: one that
    vanished is refused as before, one that changed is opened again. Not shared between threads."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._open: OrderedDict[Path, tuple[tuple[int, int, int], pq.ParquetFile]] = OrderedDict()

    def open(self, path: Path) -> pq.ParquetFile:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise DataError(f"{path} vanished: it existed when the job started; restore it or remove it "
                            "from the dataset and start a new job") from None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if path in self._open:
            seen, reader = self._open.pop(path)
            if seen == key:
                self._open[path] = (seen, reader)
                return reader
            reader.close()
        self._open[path] = (key, _open(path))
        while len(self._open) > self.keep:
            self._open.popitem(last=False)[1][1].close()
        return self._open[path][1]

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1][1].close()


def _texts(column: pa.Array, where: str) -> list[str]:
    if column.null_count:
        row = column.is_null().to_pylist().index(True)
        raise DataError(f"{where}: null text at row {row} of a read window; drop or fill null rows")
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        try:
            return [b.decode("utf-8") for b in column.to_pylist()]
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: text is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return column.to_pylist()


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def stable_hash(text: str) -> int:
    """A seed from a name, the same in every process and run (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def dataset_files(path: str) -> list[Path]:
    """The Parquet files of a dataset path: a glob, a directory (searched recursively) or one file; sorted."""
    if glob.has_magic(path):
        found = [Path(p) for p in glob.glob(path, recursive=True)]
    elif Path(path).is_dir():
        found = list(Path(path).rglob("*.parquet"))
    else:
        found = [Path(path)] if Path(path).exists() else []
    return sorted(p for p in found if p.is_file())


def open_source(name: str, path: str, text_column: str, weight: float) -> Source:
    """Read every file's footer: schema, row groups and row counts; nothing else."""
    files = dataset_files(path)
    if not files:
        raise DataError(f"dataset {name}: no Parquet file at '{path}'")
    units: list[Unit] = []
    for index, file in enumerate(files):
        try:
            meta = pq.ParquetFile(file)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"dataset {name}: {file} is not a readable Parquet file (corrupt or truncated?): "
                            f"{_one_line(exc)}") from None
        schema = meta.schema_arrow
        if text_column not in schema.names:
            raise DataError(f"dataset {name}: {file} has no column '{text_column}' (columns: "
                            f"{', '.join(schema.names)}); set text_column in data.datasets")
        kind = schema.field(text_column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
                or pa.types.is_large_binary(kind)):
            raise DataError(f"dataset {name}: {file} column '{text_column}' is {kind}, expected text (string)")
        for rg in range(meta.num_row_groups):
            rows = meta.metadata.row_group(rg).num_rows
            if rows:
                units.append(Unit(index, rg, rows))
        meta.close()
    if not units:
        raise DataError(f"dataset {name}: the {len(files)} file(s) at '{path}' hold no rows")
    return Source(name=name, files=files, units=units, text_column=text_column, weight=weight)
