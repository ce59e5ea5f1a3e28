"""What a batch is made of: rows from many documents on a heavy-tailed corpus, and a changed data mix that follows
its new weights from the step of the change (sources added, reweighted, removed)."""

from __future__ import annotations

import itertools
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.data_helpers import data_config, full_sequences, write_corpus, write_tokenizer
from trainer.data.loader import build_loader

SEQ, ROWS = 128, 16


def heavy_tailed(tmp_path: Path, n_docs: int = 800, seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    """Documents whose every token is the document's own id token `d<i>`: most a few hundred tokens, a few
    tens of thousands (log-normal lengths), so any token of a row says which document it came from."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=5.3, sigma=1.2, size=n_docs), 5, 40_000).astype(int)
    lengths[rng.choice(n_docs, 6, replace=False)] = rng.integers(10_000, 40_000, 6)  # the tail, for sure
    tokenizer = write_tokenizer(tmp_path / "tok.json", n_docs, words=())
    out = tmp_path / "heavy"
    out.mkdir()
    texts = [" ".join([f"d{i}"] * int(n)) for i, n in enumerate(lengths)]
    for f, chunk in enumerate(np.array_split(np.arange(n_docs), 4)):
        pq.write_table(pa.table({"text": [texts[i] for i in chunk]}), out / f"part-{f}.parquet", row_group_size=50)
    return out, tokenizer, lengths


def row_documents(batch: dict, first_id: int) -> list[set[int]]:
    ids = full_sequences(batch)
    return [set((row[row >= first_id] - first_id).tolist()) for row in ids]


def pair_share(batches: list[list[set[int]]]) -> float:
    shared = pairs = 0
    for rows in batches:
        for a, b in itertools.combinations(rows, 2):
            pairs += 1
            shared += bool(a & b)
    return shared / pairs


def random_pair_share(lengths: np.ndarray) -> float:
    """Two sequences drawn uniformly from the packed corpus share a document with probability
    sum_d C(n_d, 2) / C(N, 2), n_d the sequences document d touches (two disjoint sequences share at most one)."""
    size = SEQ + 1
    ends = np.cumsum(lengths + 1)  # each document and its EOS
    starts = ends - lengths - 1
    touched = (ends - 1) // size - starts // size + 1
    total = int(np.ceil(ends[-1] / size))
    return float((touched * (touched - 1) / 2).sum() / (total * (total - 1) / 2))


def test_rows_of_a_batch_come_from_many_documents(tmp_path: Path) -> None:
    corpus, tokenizer, lengths = heavy_tailed(tmp_path)
    cfg = data_config([(corpus, 1.0)], tokenizer, seq_len=SEQ, shuffle_window=64, logical_shards=16)
    batches = [row_documents(b, 2) for b in itertools.islice(build_loader(cfg, 0, 0, 1, ROWS), 120)]
    assert all(len(rows) == ROWS for rows in batches)
    seen = pair_share(batches)
    uniform = random_pair_share(lengths)
    most = max(max(Counter(d for row in rows for d in row).values()) for rows in batches)
    print(f"row pairs sharing a document: {seen:.4%} in the loader's batches, {uniform:.4%} if sequences were "
          f"drawn uniformly at random; most rows of one batch from one document: {most}")
    assert seen <= 2 * uniform
    assert most <= 3

    # The control: rows taken as consecutive sequences of one packed stream (what batches were before) fail both.
    stream = [row_documents(b, 2)[0] for b in itertools.islice(build_loader(cfg, 0, 0, 1, 1), 120 * ROWS)]
    consecutive = [stream[i:i + ROWS] for i in range(0, len(stream), ROWS)]
    worst = max(max(Counter(d for row in rows for d in row).values()) for rows in consecutive)
    print(f"control, consecutive rows: {pair_share(consecutive):.2%} of pairs, up to {worst} rows of one document")
    assert pair_share(consecutive) > 2 * uniform and worst > 3


def test_a_held_document_resumes_exactly_and_rescales_once(tmp_path: Path) -> None:
    """A row in the middle of a long document at checkpoint time goes on with it after a restore — onto the same
    shape exactly, onto another one with every token of the corpus emitted exactly once."""
    corpus, tokenizer, lengths = heavy_tailed(tmp_path, n_docs=300, seed=1)
    cfg = data_config([(corpus, 1.0)], tokenizer, seq_len=SEQ, shuffle_window=32, logical_shards=8, epochs=1)
    first = [build_loader(cfg, 3, r, 2, 4) for r in range(2)]
    iters = [iter(loader) for loader in first]
    seen = [b for it in iters for b in itertools.islice(it, 25)]
    states = pickle.loads(pickle.dumps([loader.state_dict() for loader in first]))
    assert any(h for s in states for w in s["workers"].values() for h in w["lanes"]), "a row holds a document"
    expected = [list(itertools.islice(it, 5)) for it in iters]
    for want, rank in zip(expected, range(2), strict=True):
        loader = build_loader(cfg, 3, rank, 2, 4)
        loader.load_state_dict(states)
        for a, b in zip(want, itertools.islice(iter(loader), 5), strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"])
    for rank in range(3):  # 2 ranks -> 3, to the end of the epoch
        loader = build_loader(cfg, 3, rank, 3, 4)
        loader.load_state_dict(states)
        seen += list(loader)
    counts = Counter()
    for batch in seen:
        ids = full_sequences(batch)
        counts.update((ids[ids >= 2] - 2).tolist())
    assert counts == Counter({i: int(n) for i, n in enumerate(lengths)}), "every token once"


# --- a changed mix ---------------------------------------------------------------------------------------


def two_sources(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(tmp_path / "tok.json", 8000, words=("a", "b", "c"))
    web = write_corpus(tmp_path / "A", range(0, 3000), word="a", row_group_rows=50)
    code = write_corpus(tmp_path / "B", range(3000, 6000), word="b", row_group_rows=50, seed=1)
    extra = write_corpus(tmp_path / "C", range(6000, 8000), word="c", row_group_rows=50, seed=2)
    return tokenizer, web, code, extra


def source_tokens(batches: list[dict]) -> dict[str, int]:
    """Tokens per source: A's documents use marker ids d0..d2999 and word a, B's d3000.., C's d6000.."""
    ids = torch.cat([full_sequences(b).flatten() for b in batches])
    first = 5  # eos, bos, a, b, c
    return {"A": int(((ids == 2) | ((ids >= first) & (ids < first + 3000))).sum()),
            "B": int(((ids == 3) | ((ids >= first + 3000) & (ids < first + 6000))).sum()),
            "C": int(((ids == 4) | (ids >= first + 6000)).sum())}


def shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()}


def run_then_change(tmp_path: Path, before: list, after: list, steps: int, then: int, workers: int = 0,
                    hide_change: bool = False):
    """`steps` batches with the mix `before`, then a restore with the mix `after` and `then` batches. With
    `hide_change` the checkpoint claims it already had the new mix (the control: counters are not restarted)."""
    tokenizer, *paths = two_sources(tmp_path)
    by_name = dict(zip("ABC", paths, strict=True))
    common = {"seq_len": 128, "num_workers": workers, "shuffle_window": 32}
    cfg = data_config([(by_name[n], w) for n, w in before], tokenizer, **common)
    loader = build_loader(cfg, 0, 0, 1, 8)
    it = iter(loader)
    list(itertools.islice(it, steps))
    state = pickle.loads(pickle.dumps([loader.state_dict()]))
    it.close()
    if hide_change:
        total = sum(w for _, w in after)
        for worker in state[0]["workers"].values():
            worker["weights"] = {n: w / total for n, w in after}
    resumed = build_loader(data_config([(by_name[n], w) for n, w in after], tokenizer, **common), 0, 0, 1, 8)
    resumed.load_state_dict(state)
    return resumed, list(itertools.islice(iter(resumed), then))


def test_adding_a_source_follows_the_new_weights_from_the_change(tmp_path: Path) -> None:
    loader, batches = run_then_change(tmp_path, [("A", 1.0)], [("A", 3.0), ("B", 1.0)], 200, 50)
    got = shares(source_tokens(batches))
    print(f"after adding B at 3:1, the next 50 batches: {got}")
    assert abs(got["B"] - 0.25) <= 0.03, got
    change = loader.mix_change.describe()
    assert "A 1 -> 0.75" in change and "B 0 -> 0.25 (new: starts at its beginning)" in change, change
    # The control, the old behaviour: shares counted since step 0 give B every batch until it catches up.
    _, hidden = run_then_change(tmp_path / "control", [("A", 1.0)], [("A", 3.0), ("B", 1.0)], 200, 50,
                                hide_change=True)
    assert shares(source_tokens(hidden))["B"] > 0.9
    # B starts at its beginning: its documents after the change are the first ones a B-only run reads.
    tokenizer = tmp_path / "tok.json"
    fresh = build_loader(data_config([(tmp_path / "B", 1.0)], tokenizer, seq_len=128, shuffle_window=32), 0, 0, 1, 8)
    seen_b = {d for d in marker_order(batches) if d >= 3000}
    first_b = marker_order(list(itertools.islice(iter(fresh), 40)))
    assert seen_b and seen_b <= set(first_b[:len(seen_b) + 16])


def marker_order(batches: list[dict]) -> list[int]:
    """Document ids (marker tokens d<i>) in order of first appearance."""
    order: dict[int, None] = {}
    for batch in batches:
        ids = full_sequences(batch)
        for d in (ids[ids >= 5] - 5).flatten().tolist():
            order.setdefault(d, None)
    return list(order)


def test_reweighting_and_removing_sources(tmp_path: Path) -> None:
    _, batches = run_then_change(tmp_path / "re", [("A", 1.0), ("B", 1.0)], [("A", 1.0), ("B", 3.0)], 150, 50)
    got = shares(source_tokens(batches))
    assert abs(got["B"] - 0.75) <= 0.03, got
    loader, batches = run_then_change(tmp_path / "rm", [("A", 1.0), ("B", 1.0), ("C", 2.0)], [("A", 1.0), ("C", 1.0)],
                                      150, 50)
    got = source_tokens(batches)
    assert got["B"] == 0 and abs(shares(got)["A"] - 0.5) <= 0.03, got
    assert "B 0.25 -> 0 (removed)" in loader.mix_change.describe()


@pytest.mark.parametrize("workers", [0, 2])
def test_realised_shares_after_a_change_over_a_million_tokens(tmp_path: Path, workers: int) -> None:
    _, batches = run_then_change(tmp_path, [("A", 1.0)], [("A", 1.0), ("B", 1.0), ("C", 2.0)], 100, 1100, workers)
    counts = source_tokens(batches)
    assert sum(counts.values()) >= 1_000_000
    got = shares(counts)
    assert abs(got["A"] - 0.25) <= 0.01 and abs(got["B"] - 0.25) <= 0.01 and abs(got["C"] - 0.5) <= 0.01, got


def test_an_unchanged_mix_is_no_change(tmp_path: Path) -> None:
    """The control: same weights (written differently: 2:2 is 1:1) → no change reported, exact resume."""
    loader, batches = run_then_change(tmp_path, [("A", 1.0), ("B", 1.0)], [("A", 2.0), ("B", 2.0)], 30, 5)
    assert loader.mix_change is None


def test_a_mix_change_is_logged_and_recorded_by_the_trainer(tmp_path: Path) -> None:
    from tests.train_helpers import make_job, run_trainer
    from trainer.core.jobdir import JobDir, read_events

    tokenizer, web, code, _ = two_sources(tmp_path)
    data = [f"data.tokenizer={tokenizer}", "data.seq_len=32", "model.vocab_size=8005", "train.steps=4",
            "checkpoint.interval=4"]
    job = make_job(tmp_path / "jobs", "mix", tmp_path, *data, f"data.datasets=[{{path: {web}, name: A}}]")
    first = run_trainer(job)
    assert first.returncode == 0, first.stderr[-2000:]
    config = json.loads((job / "config.json").read_text())
    config["data"]["datasets"].append({**config["data"]["datasets"][0], "path": str(code), "name": "B"})
    config["train"]["steps"] = 6
    (job / "config.json").write_text(json.dumps(config))
    second = run_trainer(job)
    assert second.returncode == 0, second.stderr[-2000:]
    said = "data mix changed (shares of the tokens): A 1 -> 0.5, B 0 -> 0.5 (new: starts at its beginning)"
    assert f"step 4: {said}" in second.stdout + second.stderr
    events = [e for e in read_events(JobDir(job)) if e["event"] == "data_mix"]
    assert len(events) == 1 and said in events[0]["reason"], events


def test_a_rescale_from_1024_to_4096_ranks_owns_every_shard_once() -> None:
    """What no machine here can run, simulated on the loader's typed state: 1,024 DP ranks × 4 workers, saved as a
    checkpoint stores them, restored onto 4,096 × 4: every shard's cursor and every held document lands on exactly
    one worker, the one that owns its shard (benchmarks/loader_rescale.py prints the bytes and times). Controls: a
    cursor moved to another worker, and a held document dropped, are both found."""
    from benchmarks.loader_rescale import checkpoint_states, owned_once, restore_all, spec

    stream = spec(shards=16384, units=20000)
    saved = checkpoint_states(stream, 1024, 4, rows=2)
    shares = restore_all(saved, stream, 4096, 4)
    assert len(shares) == 4096 * 4
    assert owned_once(saved, shares, 4096 * 4) == []
    moved = shares[5].sources["web"].shards.popitem()
    shares[6].sources["web"].shards[moved[0]] = moved[1]
    assert any("went to worker 6" in p for p in owned_once(saved, shares, 4096 * 4))
    shares[6].sources["web"].shards.pop(moved[0])
    shares[5].sources["web"].shards[moved[0]] = moved[1]
    assert owned_once(saved, shares, 4096 * 4) == []
    next(w for w in shares.values() if w.pending).pending.pop()
    assert any("held documents" in p for p in owned_once(saved, shares, 4096 * 4))
