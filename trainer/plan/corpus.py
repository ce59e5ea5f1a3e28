"""How many tokens a job's datasets hold, estimated without reading them: rows, row groups and text bytes from the
Parquet footers, tokens per byte from a sample of documents tokenized by the job's tokenizer. And whether their row
groups can feed every data worker (each worker reads whole row groups of its own). torch-free."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

SAMPLE_DOCS = 256
"""Documents tokenized per dataset for its tokens per byte (from the first row groups of up to 4 files)."""


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


def _files(path: str) -> list[Path]:
    import glob

    if glob.has_magic(path):
        found = [Path(p) for p in glob.glob(path, recursive=True)]
    elif Path(path).is_dir():
        found = list(Path(path).rglob("*.parquet"))
    else:
        found = [Path(path)] if Path(path).exists() else []
    return sorted(p for p in found if p.is_file())


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
    texts: list[str] = []
    per_file = max(SAMPLE_DOCS // min(len(files), 4), 1)
    for file in files[:4]:
        reader = pq.ParquetFile(file)
        if reader.metadata.num_row_groups:
            table = reader.read_row_group(0, columns=[column])
            texts += [t for t in table.column(0).to_pylist()[:per_file] if isinstance(t, str)]
    return texts


def dataset_size(name: str, path: str, column: str, tokenizer: str | None, separators: int) -> DatasetSize:
    """One dataset's size; `separators`: tokens added per document (EOS, and BOS where set)."""
    files = _files(path)
    groups = rows = size = 0
    for file in files:
        g, r, s = _footer(str(file), file.stat().st_mtime_ns, column)
        groups, rows, size = groups + g, rows + r, size + s
    per_byte = tokens = None
    if tokenizer is not None and files and size:
        texts = _sample(files, column)
        sample_bytes = sum(len(t.encode()) for t in texts)
        if sample_bytes:
            per_byte = _count_tokens(tokenizer, tuple(texts)) / sample_bytes
            tokens = size * per_byte + rows * separators
    return DatasetSize(name, path, len(files), groups, rows, size, per_byte, tokens)


def _count_tokens(tokenizer: str, texts: tuple[str, ...]) -> int:
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_file(tokenizer)
    return sum(len(e.ids) for e in encoder.encode_batch(list(texts), add_special_tokens=False))
