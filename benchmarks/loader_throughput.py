"""Tokens/s of the Anvil data loader against the tokenizer's own `encode_batch` and HF `datasets` streaming.

    python benchmarks/loader_throughput.py [--max-mb 8] [--short-docs 200000] [--workers 0,1,2] [--rounds 3]
        [--compare CHECKOUT] [--docs 1000000]

Two tables, each on the same text and the same cores: the demo corpus (built from this machine's own text as
`python -m trainer.data demo` does) and `--short-docs` one-line documents (lines of this machine's text, where
per-document work weighs most). Rows: `encode_batch` and `encode_batch_fast` are the tokenizer alone over the
documents already in memory, in batches of ~1,000, with all cores (RAYON default) — the ceiling; `anvil
loader` is `build_loader(...)` iterated over exactly one epoch (epochs=1) with each `--workers` count (0:
in-process, the tokenizer gets every core; N: N worker processes share them), Parquet reads, shuffling, packing
into 512+1 windows and batches of 8 included; with `--compare`, the same rows for another checkout's loader
(before/after side by side in one run); `HF datasets` (demo corpus only) is the common baseline:
`load_dataset("parquet", streaming=True)`, a shuffle buffer of the same size, a batched `map` with the same
`tokenizers` object, and packing into 512+1 windows. Tokens are those of the packed stream (document tokens plus
one EOS each); the packers emit the non-padding `input_ids`.

Every measurement runs in a fresh Python process (the tokenizer's thread pool is sized once per process,
and one used before a fork is unsafe in the child), round by round so machine noise hits every row alike;
each round runs the variants in a new (seeded) order; tokens/s are medians, with the spread of the
rounds, and each ratio is the median of the rounds' own ratios (this VM's speed drifts by +-20 % within minutes:
two runs of one round share more of it than two medians do). Timed: from opening the data to the last
batch (worker start-up included); not timed: interpreter start, imports, and what follows the last batch
(worker shutdown), nor the fixed 5 s `datasets` 5.x sleeps when a Parquet stream ends. Goals: loader >= 0.9 x
encode_batch_fast with 0 and 1 workers, and >= 1.0 x HF datasets.

Restore: ~1,000,000 one-line documents (lines of this machine's text, repeated as needed) are read once
with the loader, then the pickled `state_dict()` size and, in fresh processes, the time of `build_loader`
and of `load_state_dict` + the first batch, with the same worker count (checked exact against the batch
the uninterrupted run gave next) and with the others (rescaled).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import pickle
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

SEQ_LEN, BATCH = 512, 8


# ---------------------------------------------------------------- children: one measurement per process


def _texts(corpus: str) -> list[str]:
    from trainer.data.tools import iter_texts

    return list(iter_texts(corpus))


def child_encode(job: dict) -> dict:
    from tokenizers import Tokenizer

    texts = _texts(job["corpus"])
    tokenizer = Tokenizer.from_file(job["tokenizer"])
    encode = getattr(tokenizer, job["method"])
    step = job["batch_docs"]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), step):
        tokens += sum(len(e.ids) + 1 for e in encode(texts[i:i + step], add_special_tokens=False))  # + EOS
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "docs": len(texts)}


def _data(job: dict, workers: int, epochs: int | None):
    from trainer.core.config import DataConfig, DatasetSpec

    return DataConfig(datasets=[DatasetSpec(path=job["corpus"])], tokenizer=job["tokenizer"], seq_len=SEQ_LEN,
                      num_workers=workers, shuffle_window=job["window"], epochs=epochs)


def _emitted(batch: dict) -> int:
    """Non-padding input_ids: padding (only at the very end of a finite run) is where labels are -100,
    plus the one position per padded row whose label is -100 but whose input is a real token."""
    pad = batch["labels"] == -100
    return batch["input_ids"].numel() - int(pad.sum()) + int(pad.any(dim=1).sum())


def child_loader(job: dict) -> dict:
    from trainer.data.loader import build_loader

    start = time.perf_counter()
    loader = build_loader(_data(job, job["workers"], 1), 0, 0, 1, BATCH)
    tokens, last = 0, start
    for batch in loader:
        tokens += _emitted(batch)
        last = time.perf_counter()
    return {"tokens": tokens, "seconds": last - start, "teardown": time.perf_counter() - last}


def child_hf(job: dict) -> dict:
    import numpy as np
    import torch
    from datasets import load_dataset
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(job["tokenizer"])
    eos = tokenizer.token_to_id("<|endoftext|>")
    files = sorted(str(p) for p in Path(job["corpus"]).rglob("*.parquet"))
    size = SEQ_LEN + 1

    def tokenize(batch: dict) -> dict:
        return {"ids": [e.ids + [eos] for e in tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)]}

    slept = 0.0  # datasets 5.x sleeps a fixed 5 s when a Parquet stream ends (before the shuffle buffer drains)
    real_sleep = time.sleep

    def counted_sleep(seconds: float) -> None:
        nonlocal slept
        began = time.perf_counter()
        real_sleep(seconds)
        slept += time.perf_counter() - began

    time.sleep = counted_sleep
    start = time.perf_counter()
    ds = load_dataset("parquet", data_files=files, split="train", streaming=True)
    ds = ds.shuffle(seed=0, buffer_size=job["window"]).map(tokenize, batched=True, batch_size=job["batch_docs"],
                                                           remove_columns=ds.column_names)
    tokens, buffer, rows = 0, [], []

    def emit(final: bool = False) -> int:
        nonlocal rows
        if len(rows) == BATCH or (final and rows):
            window = torch.from_numpy(np.array(rows, dtype=np.int64))
            rows = []
            return window[:, :-1].numel()
        return 0

    for example in ds:
        buffer.extend(example["ids"])
        while len(buffer) >= size:
            rows.append(buffer[:size])
            del buffer[:size]
            tokens += emit()
    tokens += emit(final=True)
    if buffer:  # the last, short window (padded in a real batch)
        tokens += len(buffer)
    return {"tokens": tokens, "seconds": time.perf_counter() - start - slept, "slept": slept}


def child_readthrough(job: dict) -> dict:
    """Read ~every document once (infinite loader, stopped once `docs` counts reach the corpus size)."""
    from trainer.data.loader import build_loader

    start = time.perf_counter()
    loader = build_loader(_data(job, job["workers"], None), 0, 0, 1, BATCH)
    it = iter(loader)
    tokens = docs = 0
    for n, batch in enumerate(it, 1):
        tokens += _emitted(batch)
        if n % 25 == 0:
            docs = sum(w["docs"] for w in loader.state_dict()["workers"].values())
            if docs >= job["target_docs"]:
                break
    seconds = time.perf_counter() - start
    state = loader.state_dict()
    docs = sum(w["docs"] for w in state["workers"].values())
    blob = pickle.dumps(state)
    Path(job["state_file"]).write_bytes(blob)
    expected = _digest(next(it)["input_ids"])
    it.close()
    return {"tokens": tokens, "seconds": seconds, "docs": docs, "state_bytes": len(blob), "expected": expected}


def _digest(tensor) -> str:
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()[:16]


def child_restore(job: dict) -> dict:
    from trainer.data.loader import build_loader

    states = [pickle.loads(Path(job["state_file"]).read_bytes())]  # every DP rank's state: here one
    start = time.perf_counter()
    loader = build_loader(_data(job, job["workers"], None), 0, 0, 1, BATCH)
    built = time.perf_counter()
    loader.load_state_dict(states)
    it = iter(loader)
    first = next(it)
    done = time.perf_counter()
    it.close()
    return {"build": built - start, "restore": done - built, "digest": _digest(first["input_ids"])}


CHILDREN = {"encode": child_encode, "loader": child_loader, "hf": child_hf, "readthrough": child_readthrough,
            "restore": child_restore}


# ---------------------------------------------------------------- parent


def run_child(job: dict, timeout: float) -> dict:
    """One measurement in a fresh process (its own session, so a hung worker tree can be ended as a group)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    script = job.pop("script", __file__)  # another checkout's copy of this script imports that checkout
    proc = subprocess.Popen([sys.executable, script, "--child", json.dumps(job)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"no result within {timeout:.0f} s (hung?)"}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = (err.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {last}"}
    return json.loads(lines[-1])


def hf_available() -> str | None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return "datasets is not installed (pip install datasets)"
    return None


def one_line_docs(n: int) -> tuple[list[str], int]:
    """n short documents: lines of this machine's text (>= 20 characters), cycled when there are fewer."""
    from trainer.data.tools import machine_texts

    lines = [s for text in machine_texts(40_000_000) for line in text.splitlines() if len(s := line.strip()) >= 20]
    return list(itertools.islice(itertools.cycle(lines), n)), len(lines)


def fmt_rate(x: float) -> str:
    return f"{x / 1e3:,.0f}k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-mb", type=float, default=8,
                        help="size of the demo corpus (text; 8 MB is what `python -m trainer.data demo` builds)")
    parser.add_argument("--short-docs", type=int, default=200_000,
                        help="one-line documents for the second table (0: skip it)")
    parser.add_argument("--workers", default="0,1,2", help="loader num_workers values, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=1024, help="shuffle window (loader) and shuffle buffer (HF)")
    parser.add_argument("--batch-docs", type=int, default=1000, help="documents per encode_batch / map batch")
    parser.add_argument("--compare", metavar="CHECKOUT", default=None,
                        help="another Anvil checkout (e.g. a git worktree of the previous commit): its loader gets "
                             "rows of its own in the same interleaved rounds")
    parser.add_argument("--docs", type=int, default=1_000_000, help="one-line documents for the restore part (0: skip)")
    parser.add_argument("--restore-workers", type=int, default=0, help="num_workers of the read-through")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a measurement counts as hung")
    parser.add_argument("--dir", default=None, help="where to build the corpora (default: the system temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(CHILDREN[job["kind"]](job)), flush=True)
        return

    from trainer.data.tools import build_demo, write_parquet

    workers = [int(w) for w in args.workers.split(",")]
    cores = len(os.sched_getaffinity(0))
    console = Console(highlight=False, width=150)
    root = Path(tempfile.mkdtemp(prefix="anvil-loader-bench-", dir=args.dir))
    compare = None
    if args.compare:
        compare = Path(args.compare).resolve() / "benchmarks" / "loader_throughput.py"
        if not compare.is_file():
            parser.error(f"--compare {args.compare}: no benchmarks/loader_throughput.py there")
    try:
        summary = build_demo(root / "demo", args.max_mb)
        console.print(f"demo corpus: {summary['train_docs']:,} train documents, {summary['bytes'] / 1e6:.1f} MB "
                      f"of text; {cores} cores (sched_getaffinity)", markup=False, soft_wrap=True)
        common = {"corpus": str(root / "demo" / "train"), "tokenizer": str(root / "demo" / "tokenizer.json"),
                  "window": args.window, "batch_docs": args.batch_docs}
        corpora = [(f"{summary['train_docs']:,} documents ({args.max_mb:g} MB demo corpus)", common, True)]
        if args.short_docs > 0:
            docs, unique = one_line_docs(args.short_docs)
            write_parquet(docs, root / "lines", rows_per_file=100_000, row_group_rows=1024)
            del docs
            corpora.append((f"{args.short_docs:,} one-line documents ({unique:,} distinct lines)",
                            {**common, "corpus": str(root / "lines")}, False))
        for title, job, with_hf in corpora:
            throughput_table(args, console, title, job, workers, compare, with_hf, cores)
        if args.docs > 0:
            restore_part(args, root, common, workers, console, write_parquet)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def throughput_table(args, console: Console, title: str, common: dict, workers: list[int], compare: Path | None,
                     with_hf: bool, cores: int) -> None:
    """Every variant on one corpus, in interleaved rounds, each in a fresh process; medians and ratios."""
    rows: dict[str, dict] = {
        "encode_batch": {"kind": "encode", "method": "encode_batch"},
        "encode_batch_fast": {"kind": "encode", "method": "encode_batch_fast"},
        **{f"anvil loader, num_workers={w}": {"kind": "loader", "workers": w} for w in workers},
    }
    if compare is not None:
        rows.update({f"compared checkout's loader, num_workers={w}": {"kind": "loader", "workers": w,
                                                                       "script": str(compare)} for w in workers})
    hf_name = "HF datasets streaming + map + pack"
    hf_missing = hf_available() if with_hf else "not run on this corpus"
    if hf_missing is None:
        rows[hf_name] = {"kind": "hf"}
    results: dict[str, list[dict]] = {name: [] for name in rows}
    shuffle = random.Random(0)
    for r in range(args.rounds):  # interleaved rounds: machine noise hits every variant alike
        order = list(rows)
        shuffle.shuffle(order)  # a new order each round: no variant always runs after the same one
        for name in order:
            results[name].append(run_child({**common, **rows[name]}, args.timeout))
        console.print(f"{title}: round {r + 1}/{args.rounds} done", markup=False, soft_wrap=True)

    def rate(got: dict) -> float | None:
        return None if "error" in got else got["tokens"] / got["seconds"]

    rates: dict[str, float | None] = {}
    for name, got in results.items():
        ok = [x for x in map(rate, got) if x is not None]
        rates[name] = statistics.median(ok) if ok else None
    refs = {"encode_batch": "encode_batch", "encode_batch_fast": "encode_batch_fast", "HF datasets": hf_name}
    refs = {label: name for label, name in refs.items() if rates.get(name)}

    def paired(name: str, ref: str) -> list[float]:
        """The variant's rate over the reference's, round by round: this VM's speed drifts by +-20 % within
        minutes, and a ratio of two runs minutes apart carries that drift; two runs of one round do much less."""
        pairs = zip(map(rate, results[name]), map(rate, results[ref]), strict=True)
        return [a / b for a, b in pairs if a is not None and b is not None]

    table = Table(title=f"{title}, seq_len {SEQ_LEN}, batch {BATCH}, {args.rounds} rounds ({cores} cores); "
                        "ratios: median of the rounds' own ratios, their range in brackets")
    for column in ("variant", "tokens", "seconds", "tokens/s", "range of rounds", *(f"× {r}" for r in refs)):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, got in results.items():
        ok = [g for g in got if "error" not in g]
        errors = [g["error"] for g in got if "error" in g]
        note = f" ({len(errors)} of {len(got)} failed: {errors[0]})" if errors else ""
        if rates[name] is None:
            table.add_row(name + note, *["-"] * (4 + len(refs)))
            continue
        spread = [g["tokens"] / g["seconds"] for g in ok]
        cells = []
        for ref in refs.values():
            ratios = paired(name, ref)
            cells.append(f"{statistics.median(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}]" if ratios else "-")
        table.add_row(name + note, f"{ok[0]['tokens']:,}", f"{statistics.median(g['seconds'] for g in ok):.2f}",
                      fmt_rate(rates[name]), f"{fmt_rate(min(spread))}–{fmt_rate(max(spread))}", *cells)
    if hf_missing:
        table.add_row(f"HF datasets: {hf_missing}", *["-"] * (4 + len(refs)))
    console.print(table)

    names = {w: f"anvil loader, num_workers={w}" for w in workers}
    if 1 in workers and 2 in workers and rates[names[1]] and rates[names[2]]:
        scaling = statistics.median(paired(names[2], names[1]))
        console.print(f"scaling, num_workers 1 -> 2 on {cores} cores: x{scaling:.2f}", markup=False, soft_wrap=True)
    goals = (("encode_batch_fast", 0.9, "the call the loader makes"), ("HF datasets", 1.0, "the common baseline"))
    for label, goal, why in goals:
        if label not in refs:
            continue
        ratios = {w: statistics.median(r) for w, name in names.items() if (r := paired(name, refs[label]))}
        met = [f"num_workers={w} ({r:.2f})" for w, r in ratios.items() if r >= goal]
        missed = [f"num_workers={w} ({r:.2f})" for w, r in ratios.items() if r < goal]
        console.print(f"loader >= {goal} x {label} ({why}): {'meets' if met else 'misses'}; "
                      f"met by: {', '.join(met) or 'none'}; missed by: {', '.join(missed) or 'none'}",
                      markup=False, soft_wrap=True)


def restore_part(args, root: Path, common: dict, workers: list[int], console: Console, write_parquet) -> None:
    start = time.perf_counter()
    docs, unique = one_line_docs(args.docs)
    chars = sum(map(len, docs))
    write_parquet(docs, root / "short", rows_per_file=100_000, row_group_rows=1024)
    del docs
    console.print(f"restore corpus: {args.docs:,} one-line documents ({unique:,} distinct lines, {chars / 1e6:.1f} MB, "
                  f"row groups of 1,024) written in {time.perf_counter() - start:.1f} s", markup=False,
                  soft_wrap=True)
    short = {**common, "corpus": str(root / "short"), "state_file": str(root / "state.pkl")}
    read = run_child({**short, "kind": "readthrough", "workers": args.restore_workers, "target_docs": args.docs},
                     args.timeout)
    if "error" in read:
        console.print(f"read-through failed: {read['error']}", markup=False, soft_wrap=True)
        return
    enc = run_child({**short, "kind": "encode", "method": "encode_batch_fast"}, args.timeout)
    table = Table(title=f"{args.docs:,} one-line documents, read once with num_workers={args.restore_workers}, "
                        f"then restored in fresh processes (one run each)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    read_rate = read["tokens"] / read["seconds"]
    table.add_row(f"loader read-through ({read['docs']:,} documents, {read['tokens']:,} tokens)",
                  f"{read['seconds']:.1f} s, {fmt_rate(read_rate)} tokens/s")
    if "error" not in enc:
        enc_rate = enc["tokens"] / enc["seconds"]
        table.add_row("encode_batch_fast on the same documents (all cores)",
                      f"{enc['seconds']:.1f} s, {fmt_rate(enc_rate)} tokens/s")
        table.add_row("loader / encode_batch_fast on one-line documents", f"{read_rate / enc_rate:.2f}")
    table.add_row("pickled state_dict() of the DP rank", f"{read['state_bytes']:,} bytes")
    for w in workers:
        got = run_child({**short, "kind": "restore", "workers": w}, args.timeout)
        how = "exact" if w == args.restore_workers else "rescaled"
        if "error" in got:
            table.add_row(f"restore onto num_workers={w} ({how})", got["error"])
            continue
        check = ""
        if w == args.restore_workers:
            check = ", first batch = the uninterrupted run's next" if got["digest"] == read["expected"] else \
                ", FIRST BATCH DIFFERS from the uninterrupted run's next"
        table.add_row(f"restore onto num_workers={w} ({how}{check})",
                      f"build {got['build']:.2f} s + load_state_dict & first batch {got['restore']:.2f} s")
    console.print(table)


if __name__ == "__main__":
    main()
