"""The loader's state at a scale nothing here can run, simulated in one process: a checkpoint's loader states of
OLD DP ranks × W workers (every shard's cursor, every held document) serialised as a checkpoint stores them, restored
onto NEW DP ranks, and every cursor and held document checked to be owned exactly once.

    python benchmarks/loader_rescale.py [--old 1024] [--new 4096] [--workers 4] [--shards 16384] [--units 20000]

Prints the state's bytes per rank, the time one new rank takes to restore its part (read every old rank's state,
pool, take its share), and the time to hand out every rank's share. tests/test_data_batches.py runs the check.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from trainer.data.sources import Source, Unit
from trainer.data.state import HeldDoc, PooledState, RankState, SourcePosition, StreamSpec, WorkerState


def spec(shards: int, units: int) -> StreamSpec:
    source = Source(name="web", files=[Path("web.parquet")], units=[Unit(0, i, 1000) for i in range(units)],
                    text_column="text", weight=1.0)
    return StreamSpec([source], Path("tokenizer.json"), seq_len=4096, eos_id=0, bos_id=None, window=1024,
                      n_shards=shards, seed=0)


def checkpoint_states(stream: StreamSpec, dp_size: int, workers: int, rows: int, seed: int = 0) -> list[dict]:
    """Every DP rank's loader state as a checkpoint stores it (`RankState.to_dict`), at a point mid-run: each shard
    that holds row groups has a cursor, each row of each worker holds a document, a few wait as pending."""
    rng = np.random.default_rng(seed)
    total = dp_size * workers
    used = min(stream.n_shards, len(stream.sources[0].units))
    states = []
    for rank in range(dp_size):
        state = RankState(rank, dp_size, workers, stream.n_shards, next_worker=int(rng.integers(workers)))
        for gid in range(rank * workers, (rank + 1) * workers):
            mine = list(range(gid, used, total))
            cursors = {s: [0, int(rng.integers(2)), int(rng.integers(4)), int(rng.integers(1024)),
                           int(rng.integers(4096))] for s in mine}
            held = [HeldDoc("web", int(rng.choice(mine)), [0, int(rng.integers(2)), int(rng.integers(4)),
                                                             int(rng.integers(1024))], int(rng.integers(4096)))
                    for _ in range(rows + int(rng.integers(2)))] if mine else []
            state.workers[gid] = WorkerState({"web": SourcePosition(cursors, int(rng.integers(8)),
                                                                    int(rng.integers(10**9)))},
                                             stream.weights, held[:rows], held[rows:], int(rng.integers(10**6)), 0)
        states.append(state.to_dict())
    return states


def restore_all(saved: list[dict], stream: StreamSpec, dp_size: int, workers: int) -> dict[int, WorkerState]:
    """Every new rank's share, as each new rank computes its own (the pool built once here)."""
    pool = PooledState.of([RankState.from_dict(s) for s in saved])
    shares: dict[int, WorkerState] = {}
    for rank in range(dp_size):
        shares.update(pool.share(rank, dp_size, workers, stream))
    return shares


def owned_once(saved: list[dict], shares: dict[int, WorkerState], total_workers: int) -> list[str]:
    """What is lost, doubled or misplaced after the rescale (nothing, when it is right)."""
    problems = []
    before = {}
    held_before = []
    for data in saved:
        state = RankState.from_dict(data)
        for worker in state.workers.values():
            before.update(worker.sources["web"].shards)
            held_before += [(h.shard, tuple(h.doc), h.offset) for h in [*worker.lanes, *worker.pending]]
    after: dict[int, list] = {}
    held_after = []
    for gid, worker in shares.items():
        for shard, cursor in worker.sources["web"].shards.items():
            if shard % total_workers != gid:
                problems.append(f"shard {shard} went to worker {gid}")
            if shard in after:
                problems.append(f"shard {shard} is owned twice")
            after[shard] = cursor
        for h in worker.pending:
            if h.shard % total_workers != gid:
                problems.append(f"a held document of shard {h.shard} went to worker {gid}")
            held_after.append((h.shard, tuple(h.doc), h.offset))
    if after != before:
        problems.append(f"{len(set(before) - set(after))} cursors lost, "
                        f"{sum(before[s] != after.get(s, before[s]) for s in before)} changed")
    if sorted(held_after) != sorted(held_before):
        problems.append(f"held documents: {len(held_before)} before, {len(held_after)} after")
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=int, default=1024)
    p.add_argument("--new", type=int, default=4096)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--shards", type=int, default=16384)
    p.add_argument("--units", type=int, default=20000, help="row groups of the simulated corpus")
    p.add_argument("--rows", type=int, default=2, help="rows per worker batch (documents held)")
    args = p.parse_args()
    stream = spec(args.shards, args.units)
    started = time.perf_counter()
    saved = checkpoint_states(stream, args.old, args.workers, args.rows)
    sizes = [len(json.dumps(s)) for s in saved]
    print(f"{args.old} DP ranks × {args.workers} workers, {args.shards} logical shards, {args.units} row groups: "
          f"state {np.mean(sizes):,.0f} bytes per rank (JSON), {sum(sizes) / 2**20:.1f} MiB in all "
          f"(built in {time.perf_counter() - started:.1f} s)")
    started = time.perf_counter()
    pool = PooledState.of([RankState.from_dict(s) for s in saved])
    pool.share(args.new - 1, args.new, args.workers, stream)
    one = time.perf_counter() - started
    started = time.perf_counter()
    shares = restore_all(saved, stream, args.new, args.workers)
    every = time.perf_counter() - started
    problems = owned_once(saved, shares, args.new * args.workers)
    print(f"restore onto {args.new} DP ranks × {args.workers}: {one:.2f} s for one rank (read all {args.old} states, "
          f"pool, take its share); {every:.1f} s for all {args.new} shares in one process")
    print("every cursor and held document owned exactly once" if not problems else "\n".join(problems[:10]))


if __name__ == "__main__":
    main()
