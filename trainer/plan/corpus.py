"""How many tokens a job's datasets hold, estimated without reading them: rows, row groups and text bytes from the
Parquet footers, tokens per byte from a sample of documents tokenized by the job's tokenizer. And whether their row
groups can feed every data worker (each worker reads whole row groups of its own). torch-free."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

from trainer.data.sources import dataset_files

SAMPLE_DOCS = 256
"""Documents tokenized per dataset for its tokens per byte."""
SAMPLE_GROUPS = 32
"""Row groups they are drawn from, spread over the dataset's files (at most this many files are opened)."""


@dataclass
class DatasetSize:
    name: str
    path: str
    files: int
    row_groups: int
    rows: int
    text_bytes: int
    """Bytes of text (the column's uncompressed size, less its 4-byte offsets)."""
    tokens_per_byte: float | None
    """From the sample (None without a tokenizer)."""
    tokens: float | None
    """Estimated tokens, a document separator each included."""

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=256)
def _footer(path: str, mtime_ns: int, column: str) -> tuple[int, int, int]:
    """(row groups with rows, rows, text bytes) of one file, once per file version."""
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    index = names.index(column) if column in names else None
    groups = rows = size = 0
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        if group.num_rows:
            groups += 1
            rows += group.num_rows
            if index is not None:
                size += max(group.column(index).total_uncompressed_size - 4 * group.num_rows, 0)
    return groups, rows, size


def _sample(files: list[Path], column: str) -> list[str]:
    """About SAMPLE_DOCS documents from up to SAMPLE_GROUPS row groups spread evenly over the files (the first
    documents of each, a batch at a time): one row group alone can be a single kind of text."""
    groups = [(file, rg) for file in files for rg in range(pq.ParquetFile(file).metadata.num_row_groups)]
    if not groups:
        return []
    step = max(len(groups) / SAMPLE_GROUPS, 1.0)
    chosen = [groups[int(i * step)] for i in range(min(SAMPLE_GROUPS, len(groups)))]
    per_group = max(SAMPLE_DOCS // len(chosen), 1)
    texts: list[str] = []
    for file, rg in chosen:
        batch = next(pq.ParquetFile(file).iter_batches(batch_size=per_group, row_groups=[rg], columns=[column]), None)
        if batch is not None:
            texts += [t for t in batch.column(0).to_pylist() if isinstance(t, str)]
    return texts


def dataset_size(name: str, path: str, column: str, tokenizer: str | None, separators: int) -> DatasetSize:
    """One dataset's size; `separators`: tokens added per document (EOS, and BOS where set)."""
    files = dataset_files(path)
    versions = tuple((str(f), f.stat().st_mtime_ns) for f in files)
    stamp = Path(tokenizer).stat().st_mtime_ns if tokenizer else None
    return _size(name, path, column, tokenizer, stamp, separators, versions)


@functools.lru_cache(maxsize=64)
def _size(name: str, path: str, column: str, tokenizer: str | None, stamp: int | None, separators: int,
          versions: tuple[tuple[str, int], ...]) -> DatasetSize:
    """Once per dataset, tokenizer and file versions (a sweep plans every point against the same data)."""
    groups = rows = size = 0
    for file, mtime in versions:
        g, r, s = _footer(file, mtime, column)
        groups, rows, size = groups + g, rows + r, size + s
    per_byte = tokens = None
    if tokenizer is not None and versions and size:
        texts = _sample([Path(f) for f, _ in versions], column)
        sample_bytes = sum(len(t.encode()) for t in texts)
        if sample_bytes:
            per_byte = _count_tokens(tokenizer, texts) / sample_bytes
            tokens = size * per_byte + rows * separators
    return DatasetSize(name, path, len(versions), groups, rows, size, per_byte, tokens)


def _count_tokens(tokenizer: str, texts: list[str]) -> int:
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_file(tokenizer)
    return sum(len(e.ids) for e in encoder.encode_batch(texts, add_special_tokens=False))
