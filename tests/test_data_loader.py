"""The Parquet loader: exact resume, rescale without loss or repeats, mixing, DP disjointness, errors."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import pytest
import torch

from tests.data_helpers import data_config, full_sequences, markers, write_corpus, write_tokenizer
from trainer.data.loader import build_loader, build_spec
from trainer.data.sources import DataError

N_DOCS = 1200


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("corpus")
    tokenizer = write_tokenizer(root / "tokenizer.json", N_DOCS)
    return write_corpus(root / "web", range(N_DOCS)), tokenizer


def loaders(cfg, dp_size: int, batch_size: int = 4) -> list:
    return [build_loader(cfg, seed=7, dp_rank=r, dp_size=dp_size, batch_size=batch_size) for r in range(dp_size)]


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(loader, n))


@pytest.mark.parametrize(("dp_size", "workers"), [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_exact_resume(corpus, dp_size: int, workers: int) -> None:
    path, tokenizer = corpus
    cfg = data_config([(path, 1.0)], tokenizer, num_workers=workers)
    first = loaders(cfg, dp_size)
    iters = [iter(loader) for loader in first]
    for it in iters:
        take(it, 7)  # odd: the next batch is due from the second worker
    states = [loader.state_dict() for loader in first]
    expected = [take(it, 9) for it in iters]

    resumed = loaders(cfg, dp_size)
    for loader in resumed:
        loader.load_state_dict(pickle.loads(pickle.dumps(states)))  # as it travels through a checkpoint
    for want, loader in zip(expected, resumed, strict=True):
        got = take(iter(loader), 9)
        for a, b in zip(want, got, strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_the_state_is_typed_records_read_back_as_written(corpus) -> None:
    """`state_dict()` is the typed records' one plain form: through JSON (as a checkpoint stores it) and back it is
    the same records, held documents included; a state this Anvil cannot read is refused by name (controls: the
    retired version 1, a record with a field missing)."""
    import json

    from trainer.data.sources import DataError
    from trainer.data.state import HeldDoc, RankState

    path, tokenizer = corpus
    loader = build_loader(data_config([(path, 1.0)], tokenizer, num_workers=2), 0, 0, 1, 4)
    take(iter(loader), 20)  # both workers have sent a chunk (of 8 batches here)
    written = loader.state_dict()
    read = RankState.from_dict(json.loads(json.dumps(written)))
    assert read.to_dict() == written and set(read.workers) == {0, 1}
    held = [h for w in read.workers.values() for h in w.lanes if h is not None]
    assert held and all(isinstance(h, HeldDoc) and len(h.doc) == 4 for h in held)
    with pytest.raises(DataError, match="loader state version 1 cannot be read by this Anvil"):
        RankState.from_dict({**written, "version": 1})
    broken = json.loads(json.dumps(written))
    del broken["workers"]["0"]["sources"]
    with pytest.raises(DataError, match="the checkpoint's loader state is malformed"):
        RankState.from_dict(broken)


def test_state_is_small(corpus) -> None:
    path, tokenizer = corpus
    loader = build_loader(data_config([(path, 1.0)], tokenizer, logical_shards=256, num_workers=2), 0, 0, 1, 4)
    take(iter(loader), 20)
    assert len(pickle.dumps(loader.state_dict())) < 16_000  # cursors and counters, no buffered text


def run_to_end(loader) -> list[dict]:
    return list(iter(loader))


@pytest.mark.parametrize(("before", "after"), [(2, 1), (2, 4), (4, 2), (1, 3)])
@pytest.mark.parametrize("workers", [0, 2])
def test_rescale_sees_every_document_exactly_once(corpus, before: int, after: int, workers: int) -> None:
    path, tokenizer = corpus
    cfg = data_config([(path, 1.0)], tokenizer, epochs=1, num_workers=workers)
    first = loaders(cfg, before)
    seen = []
    for loader in first:
        seen += take(iter(loader), 11)
    states = [loader.state_dict() for loader in first]
    for loader in loaders(cfg, after):
        loader.load_state_dict(states)
        seen += run_to_end(loader)
    counts = markers(seen, tokenizer)
    assert sorted(counts) == list(range(N_DOCS)), "every document seen"
    assert set(counts.values()) == {1}, f"repeated: {[d for d, c in counts.items() if c > 1][:10]}"


def test_one_epoch_without_interruption_is_every_document_once(corpus) -> None:
    path, tokenizer = corpus
    counts = markers(run_to_end(build_loader(data_config([(path, 1.0)], tokenizer, epochs=1), 0, 0, 1, 8)),
                     tokenizer)
    assert sorted(counts) == list(range(N_DOCS)) and set(counts.values()) == {1}


def test_dp_ranks_are_disjoint_and_tp_ranks_identical(corpus) -> None:
    path, tokenizer = corpus
    cfg = data_config([(path, 1.0)], tokenizer, num_workers=2)
    rank0, rank1 = (take(iter(loader), 30) for loader in loaders(cfg, 2))
    assert not set(markers(rank0, tokenizer)) & set(markers(rank1, tokenizer))
    twin = take(iter(build_loader(cfg, seed=7, dp_rank=0, dp_size=2, batch_size=4)), 30)  # a TP peer of rank 0
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rank0, twin, strict=True))


def test_epochs_reshuffle_and_go_on(corpus) -> None:
    path, tokenizer = corpus
    loader = build_loader(data_config([(path, 1.0)], tokenizer), 0, 0, 1, 8)
    batches = take(iter(loader), 400)  # several epochs of the 1,200-document corpus
    counts = markers(batches, tokenizer)
    assert min(counts.values()) >= 2
    epochs = [c[0] for c in loader.state_dict()["workers"][0]["sources"]["web"]["shards"].values()]
    assert min(epochs) >= 2


def test_mixing_follows_the_weights(tmp_path: Path) -> None:
    tokenizer = write_tokenizer(tmp_path / "tok.json", 4000, words=("a", "b"))
    web = write_corpus(tmp_path / "web", range(0, 2000), word="a", row_group_rows=50)
    code = write_corpus(tmp_path / "code", range(2000, 4000), word="b", row_group_rows=50, seed=1)
    cfg = data_config([(web, 3.0), (code, 1.0)], tokenizer, seq_len=512, num_workers=2)
    loader = build_loader(cfg, seed=0, dp_rank=0, dp_size=1, batch_size=8)
    batches = take(iter(loader), 250)  # ~1M tokens
    ids = torch.cat([full_sequences(b).flatten() for b in batches])
    assert ids.numel() >= 1_000_000
    first = 4 + 0  # token ids: eos 0, bos 1, a 2, b 3, d0 = 4
    web_tokens = ((ids == 2) | ((ids >= first) & (ids < first + 2000))).sum().item()
    code_tokens = ((ids == 3) | (ids >= first + 2000)).sum().item()
    assert abs(web_tokens / (web_tokens + code_tokens) - 0.75) < 0.01
    reported = {k: v["tokens"] for w in loader.state_dict()["workers"].values() for k, v in w["sources"].items()}
    assert abs(sum(v for k, v in reported.items() if k == "web") / sum(reported.values()) - 0.75) < 0.01


def test_document_positions_restart_at_each_document(corpus) -> None:
    path, tokenizer = corpus
    batch = next(iter(build_loader(data_config([(path, 1.0)], tokenizer, document_positions=True), 0, 0, 1, 2)))
    starts = (batch["positions"] == 0).nonzero()
    assert batch["positions"].shape == batch["input_ids"].shape and len(starts) >= 2
    ids, pos = batch["input_ids"], batch["positions"]
    for row in range(ids.shape[0]):
        assert pos[row, 0] == 0  # a sequence starts a fresh position count
        for col in range(1, ids.shape[1]):
            after_eos = ids[row, col - 1].item() == 0  # the previous token ends a document
            assert pos[row, col].item() == (0 if after_eos else pos[row, col - 1].item() + 1), (row, col)


@pytest.mark.parametrize("sources", [1, 2])
def test_batches_do_not_depend_on_the_tokenizing_threads(tmp_path: Path, corpus, monkeypatch, sources: int) -> None:
    """Texts are tokenized in chunks on several threads and windows built as chunks finish: what comes out must be
    the same whatever the thread count (1, 2 or 5) and however the windows are cut into chunks."""
    from trainer.data import windows
    from trainer.data.loader import TokenLoader

    path, tokenizer = corpus
    datasets = [(path, 1.0)]
    if sources == 2:
        datasets.append((write_corpus(tmp_path / "code", range(600), word="b", row_group_rows=20, seed=3), 0.5))
    spec = build_spec(data_config(datasets, tokenizer, epochs=1), 3)

    def run(cores: int) -> list[dict]:
        return run_to_end(TokenLoader(spec, 0, 1, 4, num_workers=0, cores=cores))

    want = run(1)
    monkeypatch.setattr(windows, "CHUNK_CHARS", 64)  # several chunks per window: windows wait for their chunks
    for cores in (2, 5):
        got = run(cores)
        assert len(got) == len(want)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(want, got, strict=True))


def test_no_threads_are_left_behind(corpus) -> None:
    import threading

    path, tokenizer = corpus
    loader = build_loader(data_config([(path, 1.0)], tokenizer, num_workers=0), 0, 0, 1, 4)
    for _ in range(3):
        it = iter(loader)
        take(it, 5)
        it.close()  # what dropping the iterator does, now
    run_to_end(build_loader(data_config([(path, 1.0)], tokenizer, num_workers=0, epochs=1), 0, 0, 1, 4))
    left = [t.name for t in threading.enumerate() if t.name.startswith("anvil-")]
    assert not left, left


def test_a_file_rewritten_in_place_is_read_anew(tmp_path: Path) -> None:
    """Open files are kept between row groups; one replaced under the same name must not be read from the old
    handle."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.data.sources import OpenFiles, open_source

    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["old"] * 4}), path, row_group_size=2)
    source = open_source("x", str(path), "text", 1.0)
    files = OpenFiles()
    assert next(source.read_windows(source.units[0], 8, 0, files)) == ["old", "old"]
    pq.write_table(pa.table({"text": ["newer"] * 4}), path, row_group_size=2)
    assert next(source.read_windows(source.units[1], 8, 0, files)) == ["newer", "newer"]
    path.unlink()
    with pytest.raises(DataError, match=r"x\.parquet vanished"):
        next(source.read_windows(source.units[0], 8, 0, files))
    files.close()


def test_empty_documents_are_skipped_and_counted(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = write_tokenizer(tmp_path / "tok.json", 10)
    (tmp_path / "ds").mkdir()
    texts = ["d0 a a", "", "   ", "d1 a", "\n\n", "d2 a a a"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "ds" / "x.parquet")
    loader = build_loader(data_config([(tmp_path / "ds", 1.0)], tokenizer, epochs=1, logical_shards=1), 0, 0, 1, 2)
    counts = markers(run_to_end(loader), tokenizer)
    assert sorted(counts) == [0, 1, 2]
    state = loader.state_dict()["workers"][0]
    assert state["empty_docs"] == 3 and state["docs"] == 3


# --- bad input: a clear DataError naming the file, raised in the main process or from a worker ---

def bad(tmp_path: Path, table=None, raw: bytes | None = None, column: str = "text"):
    import pyarrow.parquet as pq

    tokenizer = write_tokenizer(tmp_path / "tok.json", 10)
    ds = tmp_path / "ds"
    ds.mkdir(exist_ok=True)
    if table is not None:
        pq.write_table(table, ds / "x.parquet")
    if raw is not None:
        (ds / "x.parquet").write_bytes(raw)
    return data_config([(ds, 1.0)], tokenizer, logical_shards=1, num_workers=2)


def first_batch(cfg):
    try:
        return next(iter(build_loader(cfg, 0, 0, 1, 2)))
    except DataError as exc:
        assert "Traceback" not in str(exc) and "\n" not in str(exc), str(exc)
        raise


def test_missing_column(tmp_path: Path) -> None:
    import pyarrow as pa

    cfg = bad(tmp_path, pa.table({"content": ["d0 a"]}))
    with pytest.raises(DataError, match=r"x\.parquet has no column 'text' \(columns: content\)"):
        first_batch(cfg)


def test_empty_dataset(tmp_path: Path) -> None:
    import pyarrow as pa

    with pytest.raises(DataError, match="hold no rows"):
        first_batch(bad(tmp_path, pa.table({"text": pa.array([], pa.string())})))
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(DataError, match="no Parquet file"):
        build_spec(data_config([(empty, 1.0)], tmp_path / "tok.json"), 0)


def test_corrupt_and_truncated_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(DataError, match=r"x\.parquet is not a readable Parquet file"):
        first_batch(bad(tmp_path, raw=b"PAR1 this is not parquet at all PAR1"))
    pq.write_table(pa.table({"text": ["d0 a " * 50] * 200}), tmp_path / "whole.parquet")
    data = (tmp_path / "whole.parquet").read_bytes()
    with pytest.raises(DataError, match=r"x\.parquet is not a readable Parquet file"):
        first_batch(bad(tmp_path, raw=data[: len(data) // 2]))
    # Footer intact, pages damaged: found when the row group is read, in a worker process.
    damaged = bytearray(data)
    damaged[8:400] = b"\xff" * 392
    with pytest.raises(DataError, match=r"x\.parquet \(row group 0\)"):
        first_batch(bad(tmp_path, raw=bytes(damaged)))


def test_null_and_non_utf8_text(tmp_path: Path) -> None:
    import pyarrow as pa

    with pytest.raises(DataError, match=r"x\.parquet \(row group 0\): null text"):
        first_batch(bad(tmp_path, pa.table({"text": ["d0 a", None]})))
    with pytest.raises(DataError, match=r"x\.parquet \(row group 0\): text is not valid UTF-8"):
        first_batch(bad(tmp_path, pa.table({"text": pa.array([b"d0 a", b"\xff\xfe"], pa.binary())})))


def test_missing_tokenizer_and_unknown_eos(tmp_path: Path, corpus) -> None:
    path, tokenizer = corpus
    with pytest.raises(DataError, match="data.tokenizer: .*does not exist"):
        build_spec(data_config([(path, 1.0)], tmp_path / "nope.json"), 0)
    with pytest.raises(DataError, match="data.eos_token: '<eos>' is not a token"):
        build_spec(data_config([(path, 1.0)], tokenizer, eos_token="<eos>"), 0)


def test_too_few_row_groups_for_the_workers(tmp_path: Path) -> None:
    tokenizer = write_tokenizer(tmp_path / "tok.json", 20)
    ds = write_corpus(tmp_path / "tiny", range(20), row_group_rows=10, files=1)  # 2 row groups
    cfg = data_config([(ds, 1.0)], tokenizer, num_workers=0)
    with pytest.raises(DataError, match="2 row groups cannot feed data worker 2 of 3"):
        first_batch_at(cfg, dp_rank=2, dp_size=3)


def first_batch_at(cfg, dp_rank: int, dp_size: int):
    return next(iter(build_loader(cfg, 0, dp_rank, dp_size, 2)))


def test_file_vanishing_between_epochs(tmp_path: Path) -> None:
    tokenizer = write_tokenizer(tmp_path / "tok.json", 60)
    ds = write_corpus(tmp_path / "ds", range(60), row_group_rows=10, files=2)
    loader = iter(build_loader(data_config([(ds, 1.0)], tokenizer, logical_shards=2), 0, 0, 1, 4))
    take(loader, 3)
    (ds / "part-1.parquet").unlink()
    with pytest.raises(DataError, match=r"part-1\.parquet vanished"):
        take(loader, 2000)  # past what the reading thread has read ahead


def test_default_dataset_names(tmp_path: Path, corpus) -> None:
    from trainer.core.config import DataConfig, DatasetSpec

    path, tokenizer = corpus
    cfg = DataConfig(datasets=[DatasetSpec(path=str(path)), DatasetSpec(path=f"{path}/*.parquet", weight=2)],
                     tokenizer=str(tokenizer))
    with pytest.raises(DataError, match="names must differ"):  # both would be called 'web'
        build_spec(cfg, 0)
    cfg = DataConfig(datasets=[DatasetSpec(path=f"{path}/*.parquet"), DatasetSpec(path=str(path / "part-0.parquet"))],
                     tokenizer=str(tokenizer))
    assert [s.name for s in build_spec(cfg, 0).sources] == ["web", "part-0"]


def test_data_seed_holds_the_data_order_while_train_seed_varies(corpus) -> None:
    """`train.seed` seeds the data order too, unless `data.seed` is set: then a seed axis varies the initialisation
    alone."""
    from trainer.core.layers import load_config

    path, tokenizer = corpus

    def first_batches(*overrides: str) -> torch.Tensor:
        cfg = load_config(None, ["job.name=x", f"data.datasets=[{{path: {path}}}]", f"data.tokenizer={tokenizer}",
                                 "data.num_workers=0", "data.seq_len=64", *overrides])
        return torch.cat([b["input_ids"] for b in take(build_loader(cfg.data, cfg.data_seed, 0, 1, 4), 3)])

    base = first_batches()
    assert torch.equal(first_batches("train.seed=5", "data.seed=0"), base)
    assert not torch.equal(first_batches("train.seed=5"), base)  # the control: train.seed alone moves the data
