"""Corpora for loader tests: real Parquet, a real `tokenizers` WordLevel tokenizer, and documents that
carry a unique marker token (`d<id>`) as their first token, so tests can count what the loader emits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from trainer.core.config import DataConfig, DatasetSpec

EOS = "<|endoftext|>"


def write_tokenizer(path: Path, n_docs: int, words: tuple[str, ...] = ("a", "b", "c")) -> Path:
    vocab = {EOS: 0, "<|bos|>": 1, **{w: 2 + i for i, w in enumerate(words)}}
    vocab.update({f"d{i}": len(vocab) + i for i in range(n_docs)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


def write_corpus(out: Path, ids: range, word: str = "a", row_group_rows: int = 25, files: int = 3,
                 seed: int = 0, mean_words: int = 30) -> Path:
    """Documents `d<id> word word ...` of varied length (some longer than a sequence), over several files."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    ids = list(ids)
    for f, chunk in enumerate(np.array_split(np.array(ids), files)):
        texts = [f"d{i} " + " ".join([word] * int(rng.integers(1, 2 * mean_words))) for i in chunk]
        table = pa.table({"id": pa.array(chunk, pa.int64()), "text": texts})
        pq.write_table(table, out / f"part-{f}.parquet", row_group_size=row_group_rows)
    return out


def data_config(datasets: list[tuple[Path, float]], tokenizer: Path, **kw) -> DataConfig:
    specs = [DatasetSpec(path=str(p), weight=w, name=p.name) for p, w in datasets]
    defaults = {"seq_len": 32, "shuffle_window": 16, "logical_shards": 16, "num_workers": 0}
    return DataConfig(datasets=specs, tokenizer=str(tokenizer), **{**defaults, **kw})


def full_sequences(batch: dict) -> torch.Tensor:
    """The packed `seq_len + 1` tokens behind a batch: inputs plus the last label (-100 where padded)."""
    return torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)


def markers(batches: list[dict], tokenizer: Path) -> Counter:
    """How often each document's marker token was emitted."""
    tok = Tokenizer.from_file(str(tokenizer))
    first = tok.token_to_id("d0")
    counts: Counter = Counter()
    for batch in batches:
        ids = full_sequences(batch)
        counts.update((ids[ids >= first] - first).tolist())
    return counts
