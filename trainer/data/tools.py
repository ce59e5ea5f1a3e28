"""Data tools: convert jsonl/txt to Parquet, train a BPE tokenizer, build the demo corpus, inspect a dataset.

`python -m trainer.data {convert,tokenizer,demo,inspect} --help`. Nothing is downloaded: the demo corpus
is built from text that ships with every machine (the Python standard library's sources and the licence
texts and copyright notices in /usr/share).
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trainer.data.sources import DataError, open_source

SPECIAL_TOKENS = ["<|endoftext|>", "<|bos|>", "<|pad|>"]


def write_parquet(docs: Iterable[str], out_dir: Path, rows_per_file: int = 20_000, row_group_rows: int = 512,
                  prefix: str = "part") -> list[Path]:
    """Documents → Parquet files with columns `id` (unique, in order) and `text`, small row groups so that
    many data workers can share even a small dataset."""
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.int64()), ("text", pa.large_string())])
    written: list[Path] = []
    batch: list[str] = []
    next_id = 0

    def flush() -> None:
        nonlocal batch, next_id
        path = out_dir / f"{prefix}-{len(written):05d}.parquet"
        table = pa.table({"id": range(next_id, next_id + len(batch)), "text": batch}, schema=schema)
        pq.write_table(table, path, row_group_size=row_group_rows)
        written.append(path)
        next_id += len(batch)
        batch = []

    for doc in docs:
        batch.append(doc)
        if len(batch) == rows_per_file:
            flush()
    if batch:
        flush()
    if not written:
        raise DataError("no documents to write")
    return written


def read_inputs(paths: list[Path], text_field: str = "text") -> Iterator[str]:
    """`.jsonl` (one JSON object per line, text in `text_field`) or any other file as one document."""
    for path in paths:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{number}: not JSON ({exc.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise DataError(f"{path}:{number}: expected an object with a string '{text_field}'")
                    yield record[text_field]
        else:
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}: not UTF-8 text") from None


def iter_texts(path: str, text_column: str = "text", limit_bytes: int | None = None) -> Iterator[str]:
    """Every document of a Parquet dataset, in file order (for tokenizer training and inspection); with
    `limit_bytes`, the documents up to the first one that reaches that much UTF-8 text in all."""
    source = open_source(Path(path).name, path, text_column, 1.0)
    seen = 0
    for unit in source.units:
        for window in source.read_windows(unit, 1024):
            for text in window:
                yield text
                seen += len(text.encode("utf-8"))
                if limit_bytes is not None and seen >= limit_bytes:
                    return


def train_tokenizer(texts: Iterable[str], out: Path, vocab_size: int = 8192) -> Path:
    """A byte-level BPE tokenizer (any text encodes; no unknown tokens) with Anvil's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    return out


def machine_texts(max_bytes: int) -> list[str]:
    """Real text every Debian machine with Python has: stdlib sources, licences, copyright notices."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path("/usr/share/common-licenses"), Path("/usr/share/doc")]
    docs, total = [], 0
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if total >= max_bytes:
                return docs
            if not path.is_file() or path.is_symlink() or "test" in path.parts or path.suffix in (".pyc", ".gz"):
                continue
            if root.name == "doc" and path.name != "copyright":
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if 200 <= len(text) <= 200_000:
                parts = _paragraph_groups(text)
                docs += parts
                total += sum(map(len, parts))
    return docs


def _paragraph_groups(text: str, target: int = 3000) -> list[str]:
    """Long files become several documents of whole paragraphs (~`target` characters each)."""
    groups, current = [], ""
    for paragraph in text.split("\n\n"):
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= target:
            groups.append(current)
            current = ""
    if current.strip():
        groups.append(current)
    return groups


def build_demo(out: Path, max_mb: float = 8, vocab_size: int = 8192, val_fraction: float = 0.02) -> dict:
    """The demo corpus: train/ and val/ Parquet plus tokenizer.json, from this machine's own text."""
    docs = machine_texts(int(max_mb * 1e6))
    if len(docs) < 100:
        raise DataError("too little text found on this machine for the demo corpus")
    n_val = max(int(len(docs) * val_fraction), 10)
    val, train = docs[::len(docs) // n_val][:n_val], [d for i, d in enumerate(docs) if i % (len(docs) // n_val)]
    write_parquet(train, out / "train", row_group_rows=64)
    write_parquet(val, out / "val", row_group_rows=16)
    train_tokenizer(train, out / "tokenizer.json", vocab_size)
    return {"train_docs": len(train), "val_docs": len(val), "bytes": sum(map(len, docs))}


def inspect(path: str, text_column: str = "text", tokenizer: str | None = None) -> dict:
    """Files, row groups, rows and bytes of a dataset; tokens estimated from a sample when a tokenizer is given."""
    source = open_source(Path(path).name, path, text_column, 1.0)
    files = []
    for index, file in enumerate(source.files):
        meta = pq.ParquetFile(file).metadata
        files.append({"file": str(file), "rows": meta.num_rows, "row_groups": meta.num_row_groups,
                      "bytes": file.stat().st_size, "units": sum(1 for u in source.units if u.file == index)})
    result = {"files": files, "rows": source.rows, "row_groups": len(source.units),
              "bytes": sum(f["bytes"] for f in files)}
    if tokenizer is not None:
        from tokenizers import Tokenizer

        sample = list(iter_texts(path, text_column, limit_bytes=2_000_000))
        tokens = sum(len(e.ids) for e in Tokenizer.from_file(tokenizer).encode_batch_fast(sample))
        result["estimated_tokens"] = int(tokens / max(len(sample), 1) * source.rows)
    return result
