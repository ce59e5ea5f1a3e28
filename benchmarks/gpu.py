"""The device run's measurements, one part per process (`benchmarks/gpu.sh` runs them in order); each result is
appended to `<out>/results.jsonl` the moment it is measured, so a part that dies or runs out of time loses only itself.

    python benchmarks/gpu.py anvil|torchtitan|loader|checkpoint|summary --out DIR [--work DIR] [--smoke]

- `anvil`: a 1B-class Llama (llama3-1B's shape, untied head, vocabulary 128,256, 2,048 tokens a row) trained by
  `Trainer.train_step` in bf16 with compiled blocks: tokens/s, MFU against the device's dense bf16 peak, peak memory,
  for Liger off and on and each activation-checkpointing mode (a mode that does not fit says so); on the first variant,
  the host syncs of one step (each call site, its count and the time the host waited in it).
- `torchtitan`: torchtitan's own Llama 3 model and per-block compile on the same shape, batch, precision and
  optimizer, in a loop like its trainer's (forward, fp32 cross-entropy, backward, clip, fused AdamW): the reference
  the ratio is taken against. torchtitan is carried as a wheel for this only (`benchmarks/gpu_wheels.sh`); where it
  is not installed the part says so.
- `loader`: the Parquet loader's tokens/s (tokenizing on the fly) with 0 to 8 workers.
- `checkpoint`: the stall a save adds against the step time: the background save's call, the step trained while it
  writes, and a blocking save (last: a 1B model's checkpoint with AdamW is about 15 GB to write).
- `summary`: the table of everything in results.jsonl, with Anvil's tokens/s over torchtitan's.

`--smoke`: every part at toy size on the CPU (a few seconds each), as the test suite runs it, so the script cannot
rot unnoticed. On a CPU, MFU is not computed (no peak to divide by) and memory is the process's resident peak.
Results go to `--out` (a handful of files: what the device tool brings back); the corpus, compile caches and
checkpoints to `--work` (scratch).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.core.costs import flops_per_token  # noqa: E402
from trainer.core.jobdir import JobDir  # noqa: E402
from trainer.core.layers import load_config  # noqa: E402
from trainer.data.loader import build_loader  # noqa: E402
from trainer.data.tools import build_demo  # noqa: E402
from trainer.train.metrics import memory_gib  # noqa: E402

FULL = SimpleNamespace(dim=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256, seq=2048, batch=4,
                       warmup=2, steps=8, workers=[0, 1, 2, 4, 8], loader_batches=200, variants=4, compile=True)
SMOKE = SimpleNamespace(dim=64, layers=2, heads=4, kv_heads=2, ffn=192, vocab=512, seq=64, batch=2,
                        warmup=1, steps=2, workers=[0, 1], loader_batches=4, variants=2, compile=False)
"""The smoke run is eager: compiling costs a CPU ~15 s a variant, and the suite tests compile in the training path
itself (tests/test_train.py)."""
VARIANTS = [("none", False), ("none", True), ("selective", False), ("full", False)]
"""(activation checkpointing, Liger): the first is the one torchtitan is compared with and syncs are counted on; the
smoke run takes the first two (each compiles anew: a CPU pays seconds for each)."""
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "MI250X": 191.5, "MI300X": 1307.0}
"""Dense bf16 peak per device (no sparsity), by a word of the device's name."""


def device(shape: SimpleNamespace) -> torch.device:
    """The GPU; the CPU for the smoke run, even where there is a GPU."""
    return torch.device("cuda") if torch.cuda.is_available() and shape is FULL else torch.device("cpu")


def peak_tflops(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((peak for word, peak in PEAK_TFLOPS.items() if word in name), None)


def record(out: Path, **result) -> None:
    """One result, appended and flushed at once, and printed."""
    result.setdefault("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)


def corpus(work: Path, shape: SimpleNamespace) -> Path:
    """The demo corpus (real text, real tokenizer), built once per scratch folder."""
    where = work / "corpus"
    if not (where / "tokenizer.json").exists():
        build_demo(where, max_mb=4 if shape is FULL else 1, vocab_size=min(shape.vocab, 8192))
    return where


def config(shape: SimpleNamespace, data: Path, dev: torch.device, ac: str, liger: bool):
    return load_config(None, [
        "job.name=gpu-bench", f"model.dim={shape.dim}", f"model.n_layers={shape.layers}",
        f"model.n_heads={shape.heads}", f"model.n_kv_heads={shape.kv_heads}", f"model.ffn_dim={shape.ffn}",
        f"model.vocab_size={shape.vocab}", "model.rope_theta=500000.0", "model.tie_embeddings=false",
        f"data.seq_len={shape.seq}", "data.num_workers=0", "data.logical_shards=8",
        f"data.datasets=[{{path: {data / 'train'}}}]", f"data.tokenizer={data / 'tokenizer.json'}",
        f"train.global_batch_size={shape.batch}", f"train.micro_batch_size={shape.batch}",
        "train.mixed_precision=bf16", "train.steps=100000", f"train.liger={str(liger).lower()}",
        "optim.warmup_steps=0", "optim.schedule=constant", f"parallel.compile={str(shape.compile).lower()}",
        f"parallel.activation_checkpoint={ac}", f"cluster.device={'cuda' if dev.type == 'cuda' else 'cpu'}",
        "cluster.device_memory_gib=80", "checkpoint.async_save=true",
    ])


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def random_batch(shape: SimpleNamespace, seed: int) -> dict[str, torch.Tensor]:
    """Token ids drawn at random (never zeros): the speed of a step does not depend on the text."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), generator=g)
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def timed_steps(step, shape: SimpleNamespace, dev: torch.device) -> tuple[float, float]:
    """Median and spread (max - min) of the step time over `steps` steps, after `warmup` (compile, allocator)."""
    for i in range(shape.warmup):
        step(random_batch(shape, i))
    synchronize(dev)
    times = []
    for i in range(shape.steps):
        batch = random_batch(shape, 1000 + i)
        started = time.perf_counter()
        step(batch)
        synchronize(dev)
        times.append(time.perf_counter() - started)
    return statistics.median(times), max(times) - min(times)


def throughput(shape: SimpleNamespace, model_cfg, median: float, dev: torch.device) -> dict:
    tokens = shape.batch * shape.seq / median
    peak = peak_tflops(dev)
    mfu = tokens * flops_per_token(model_cfg, shape.seq) / (peak * 1e12) if peak else None
    memory = memory_gib(dev)  # the CUDA allocator's peak on a GPU, the resident set's on a CPU
    return {"tokens_per_s": round(tokens, 1), "step_s": round(median, 5),
            "mfu": None if mfu is None else round(mfu, 4), "peak_memory_gib": round(memory, 2)}


def init_world(dev: torch.device) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29655"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")


def part_anvil(out: Path, work: Path, shape: SimpleNamespace) -> None:
    dev = device(shape)
    data = corpus(work, shape)
    init_world(dev)
    for index, (ac, liger) in enumerate(VARIANTS[:shape.variants]):
        name = f"anvil bf16{' compiled' if shape.compile else ''}, AC {ac}, Liger {'on' if liger else 'off'}"
        try:
            anvil_variant(out, work, shape, config(shape, data, dev, ac, liger), name, dev, first=index == 0)
        except torch.OutOfMemoryError:
            record(out, part="anvil", variant=name, ac=ac, liger=liger, fits=False)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    dist.destroy_process_group()


def trainer_for(cfg, work: Path, dev: torch.device):
    from trainer.train.loop import Trainer
    from trainer.train.parallelize import build_layout

    job = JobDir(Path(tempfile.mkdtemp(prefix="job-", dir=work)))
    return Trainer(cfg, job, 0, build_layout(cfg, dev.type), dev)


def anvil_variant(out: Path, work: Path, shape: SimpleNamespace, cfg, name: str, dev: torch.device,
                  first: bool) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    trainer = trainer_for(cfg, work, dev)
    started = time.perf_counter()
    trainer.train_step([random_batch(shape, 0)])  # compiles
    synchronize(dev)
    first_step = time.perf_counter() - started
    median, spread = timed_steps(lambda b: trainer.train_step([b]), shape, dev)
    p = cfg.parallel
    record(out, part="anvil", variant=name, ac=p.activation_checkpoint, liger=cfg.train.liger,
           first_step_s=round(first_step, 2), spread_s=round(spread, 5), **throughput(shape, cfg.model, median, dev))
    if first:
        host_syncs(out, trainer, shape, dev, median)


class HostSyncs(TorchFunctionMode):
    """Every call that makes the host wait for a tensor's value (`.item()`, `.tolist()`, `int()`, `float()`, a
    truth value, `.cpu()`), on a tensor of `device`, by the first line of Anvil's code on the stack, with the time
    the call took (on a GPU: the wait for the queued work to finish). On a CPU nothing waits, but the sites are the
    same, so the smoke run exercises this."""

    METHODS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}

    def __init__(self, dev: torch.device):
        super().__init__()
        self.dev, self.sites = dev, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in self.METHODS or not args or not isinstance(args[0], torch.Tensor) \
                or args[0].device.type != self.dev.type:
            return func(*args, **kwargs)
        started = time.perf_counter()
        result = func(*args, **kwargs)
        elapsed = time.perf_counter() - started
        frames = [f for f in traceback.extract_stack() if f"{REPO}/trainer/" in f.filename]
        site = f"{Path(frames[-1].filename).relative_to(REPO)}:{frames[-1].lineno} .{name}" if frames else f".{name}"
        count, waited = self.sites.get(site, (0, 0.0))
        self.sites[site] = (count + 1, waited + elapsed)
        return result


def host_syncs(out: Path, trainer, shape: SimpleNamespace, dev: torch.device, step_s: float) -> None:
    """The host syncs of one training step, by call site. Compiled blocks hold none (they compile whole, and a sync
    would break the graph), so the step runs eager here (`set_stance`) to let the mode see every call."""
    batch = random_batch(shape, 7)
    synchronize(dev)
    syncs = HostSyncs(dev)
    with torch.compiler.set_stance("force_eager"), syncs:
        trainer.train_step([batch])
    synchronize(dev)
    record(out, part="syncs", step_s=round(step_s, 5), syncs=sum(c for c, _ in syncs.sites.values()),
           sites={site: {"count": c, "host_wait_s": round(w, 6)} for site, (c, w) in syncs.sites.items()})


def part_checkpoint(out: Path, work: Path, shape: SimpleNamespace) -> None:
    """What a save costs the training loop: the call itself (staging to host memory in the background mode; the
    whole write in the blocking one) and the next step's time while the background write runs, against a step's
    time alone. The first variant's model (its compiled blocks come from the cache the `anvil` part filled)."""
    dev = device(shape)
    init_world(dev)
    trainer = trainer_for(config(shape, corpus(work, shape), dev, *VARIANTS[0]), work, dev)
    step_s, _ = timed_steps(lambda b: trainer.train_step([b]), shape, dev)
    trainer.step = 1
    started = time.perf_counter()
    trainer.save()  # background: stages, returns, writes on a thread
    background_call = time.perf_counter() - started
    started = time.perf_counter()
    trainer.train_step([random_batch(shape, 8)])
    synchronize(dev)
    step_during = time.perf_counter() - started
    started = time.perf_counter()
    trainer.finish_pending_save()
    wait_left = time.perf_counter() - started
    trainer.step = 2
    started = time.perf_counter()
    trainer.save(wait=True)
    blocking = time.perf_counter() - started
    record(out, part="checkpoint", step_s=round(step_s, 5), background_call_s=round(background_call, 4),
           step_during_write_s=round(step_during, 5), write_left_after_step_s=round(wait_left, 4),
           blocking_save_s=round(blocking, 4), gib=round(_size(trainer.job.checkpoints) / 2**30, 3))
    shutil.rmtree(trainer.job.checkpoints, ignore_errors=True)
    dist.destroy_process_group()


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def part_torchtitan(out: Path, work: Path, shape: SimpleNamespace) -> None:
    """torchtitan's model and compile, our loop (the same steps its trainer takes on one device: autocast bf16)."""
    dev = device(shape)
    try:
        import torchtitan
        from torchtitan.models.llama3.infra.parallelize import apply_compile
        from torchtitan.models.llama3.model.args import TransformerModelArgs
        from torchtitan.models.llama3.model.model import Transformer
    except ImportError as exc:
        record(out, part="torchtitan", skipped=f"torchtitan is not importable ({exc}); carry it with "
                                              "benchmarks/gpu_wheels.sh")
        return
    version = getattr(torchtitan, "__version__", None) or _distribution_version("torchtitan")
    # torchtitan sizes the SwiGLU as 8/3 · dim · multiplier rounded up to multiple_of: 1.5 and 256 give 8,192 for
    # llama3-1B; at the smoke size the multiple is the hidden size itself.
    multiple = 256 if shape is FULL else shape.ffn
    args = TransformerModelArgs(dim=shape.dim, n_layers=shape.layers, n_heads=shape.heads, n_kv_heads=shape.kv_heads,
                                vocab_size=shape.vocab, multiple_of=multiple,
                                ffn_dim_multiplier=1.5 if shape is FULL else None, rope_theta=500000,
                                max_seq_len=shape.seq)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=dev)
    with torch.no_grad():
        model.init_weights(buffer_device=dev)
    hidden = model.layers["0"].feed_forward.w1.weight.shape[0]
    assert hidden == shape.ffn, f"torchtitan's SwiGLU is {hidden} wide, not {shape.ffn}: not the same shape"
    if shape.compile:
        apply_compile(model, SimpleNamespace(backend="inductor"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=dev.type == "cuda")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)

    def step(batch: dict[str, torch.Tensor]) -> None:
        tokens, labels = (batch[k].to(dev, non_blocking=True) for k in ("input_ids", "labels"))
        with autocast:
            logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        del logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    started = time.perf_counter()
    step(random_batch(shape, 0))
    synchronize(dev)
    compiled_s = time.perf_counter() - started
    median, spread = timed_steps(step, shape, dev)
    from trainer.core.config import ModelConfig

    model_cfg = ModelConfig(dim=shape.dim, n_layers=shape.layers, n_heads=shape.heads, n_kv_heads=shape.kv_heads,
                            ffn_dim=shape.ffn, vocab_size=shape.vocab, tie_embeddings=False)
    record(out, part="torchtitan", version=version,
           variant=f"torchtitan {version} bf16{' compiled' if shape.compile else ''}, AC none",
           first_step_s=round(compiled_s, 2), spread_s=round(spread, 5), **throughput(shape, model_cfg, median, dev))


def _distribution_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        return version(name)
    return None


def part_loader(out: Path, work: Path, shape: SimpleNamespace) -> None:
    """Tokens/s of the loader alone (Parquet read, tokenizing, packing rows) for each number of workers."""
    dev = device(shape)
    data = corpus(work, shape)
    cfg = config(shape, data, dev, "none", False)
    for workers in shape.workers:
        data_cfg = cfg.data.model_copy(update={"num_workers": workers})
        batches = iter(build_loader(data_cfg, 0, 0, 1, shape.batch))
        next(batches)  # workers started, first documents read
        started = time.perf_counter()
        tokens = sum(int(next(batches)["input_ids"].numel()) for _ in range(shape.loader_batches))
        elapsed = time.perf_counter() - started
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        record(out, part="loader", workers=workers, tokens_per_s=round(tokens / elapsed, 1), cores=os.cpu_count())


def part_summary(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    titan = next((r["tokens_per_s"] for r in rows if r["part"] == "torchtitan" and "tokens_per_s" in r), None)
    where = next((r["device"] for r in rows if "device" in r), "?")
    table = Table(title=f"device run: {where}")
    for column in ("what", "tokens/s", "MFU", "peak GiB", "vs torchtitan", "notes"):
        table.add_column(column, justify="left" if column in ("what", "notes") else "right")
    for r in rows:
        if r["part"] in ("anvil", "torchtitan"):
            if "tokens_per_s" not in r:
                table.add_row(r.get("variant", r["part"]), "", "", "", "", r.get("skipped", "does not fit"))
                continue
            ratio = f"{r['tokens_per_s'] / titan:.3f}" if titan and r["part"] == "anvil" else ""
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
            table.add_row(r["variant"], f"{r['tokens_per_s']:,.0f}", mfu, f"{r['peak_memory_gib']:.1f}", ratio,
                          f"first step {r['first_step_s']} s")
        elif r["part"] == "syncs":
            sites = "; ".join(f"{site} ×{v['count']} {v['host_wait_s'] * 1e3:.2f} ms" for site, v in r["sites"].items())
            table.add_row("host syncs in one step", "", "", "", "", f"{r['syncs']}: {sites}")
        elif r["part"] == "checkpoint":
            table.add_row("checkpoint stall", "", "", "", "",
                          f"background save call {r['background_call_s']} s, next step {r['step_during_write_s']} s "
                          f"(alone {r['step_s']} s), blocking save {r['blocking_save_s']} s, {r['gib']} GiB")
        elif r["part"] == "loader":
            table.add_row(f"loader, {r['workers']} workers", f"{r['tokens_per_s']:,.0f}", "", "", "", "")
        elif r["part"] == "tests":
            table.add_row("GPU test subset", "", "", "", "", r["summary"])
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["anvil", "torchtitan", "loader", "checkpoint", "summary"])
    parser.add_argument("--out", type=Path, required=True, help="results (results.jsonl)")
    parser.add_argument("--work", type=Path, help="scratch: corpus, checkpoints (default: a folder under --out)")
    parser.add_argument("--smoke", action="store_true", help="toy size on the CPU (the test suite's run)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shape = SMOKE if args.smoke else FULL
    if not args.smoke and device(shape).type != "cuda":
        raise SystemExit("benchmarks/gpu.py: no GPU here; --smoke runs every part at toy size on the CPU")
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    {"anvil": part_anvil, "torchtitan": part_torchtitan, "loader": part_loader, "checkpoint": part_checkpoint,
     "summary": lambda out, _, __: part_summary(out)}[args.part](args.out, work, shape)


if __name__ == "__main__":
    main()
