"""CPU step time of the Anvil trainer against a bare PyTorch loop and HF `LlamaForCausalLM`, and the stall a
checkpoint save adds per step at the default interval.

    python benchmarks/train_step.py [--dim 256] [--layers 4] [--seq 256] [--batch 8] [--rounds 7] [--steps 5]

One process, one model shape, one batch (real text from the demo corpus, tokenized by the trainer's loader);
fp32, AdamW, gradient clipping at 1.0 in all three:
- `anvil train_step`: `Trainer.train_step` as the trainer runs it (a world-1 gloo process group, token
  count, loss normalisation, clipping, AdamW with muP groups, schedule);
- `bare PyTorch`: the same `Transformer` module in a hand-written loop (forward, cross-entropy, backward,
  clip, AdamW, zero_grad): the floor;
- `HF LlamaForCausalLM`: transformers' Llama of the same shape (sdpa attention), the same loop.
- `anvil train_step + muP monitors`: the same step as a log step with `metrics.mup_monitors` on (activation
  hooks, a copy of the weights, the sums): its cost is paid once per `metrics.log_every` steps.
Rounds interleave them so this noisy VM's drift hits each alike; the table shows medians and spreads.
Goals: anvil <= 1.03 x bare; HF / anvil >= 1.0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from trainer.core.jobdir import JobDir
from trainer.core.layers import load_config
from trainer.data.loader import build_loader
from trainer.data.tools import build_demo
from trainer.train.loop import Trainer
from trainer.train.model import Transformer
from trainer.train.monitors import MupMonitor
from trainer.train.parallelize import build_layout


def bare_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, hf: bool = False) -> None:
    logits = model(batch["input_ids"]).logits if hf else model(batch["input_ids"])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def hf_model(cfg) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_hidden,
                         num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                         num_key_value_heads=m.n_kv_heads or m.n_heads, rms_norm_eps=m.norm_eps,
                         rope_theta=m.rope_theta, max_position_embeddings=cfg.data.seq_len,
                         tie_word_embeddings=m.tie_embeddings, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="anvil-bench-"))
    build_demo(work / "corpus", max_mb=2, vocab_size=8192)
    cfg = load_config(None, [
        "job.name=bench", f"model.dim={args.dim}", f"model.n_layers={args.layers}", "model.n_heads=4",
        "model.vocab_size=8192", f"data.seq_len={args.seq}", "data.num_workers=0", "data.logical_shards=8",
        f"data.datasets=[{{path: {work / 'corpus' / 'train'}}}]",
        f"data.tokenizer={work / 'corpus' / 'tokenizer.json'}",
        f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
        "train.mixed_precision=fp32", "optim.warmup_steps=0", "optim.schedule=constant",
    ])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29611", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo")
    batch = next(iter(build_loader(cfg.data, 0, 0, 1, args.batch)))
    job = JobDir(work / "job")
    job.path.mkdir()
    trainer = Trainer(cfg, job, 0, build_layout(cfg, "cpu"), torch.device("cpu"))

    bare = Transformer(cfg.model, args.seq)
    bare.init_weights(0)
    bare_opt = torch.optim.AdamW(bare.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    hf = hf_model(cfg)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    monitor = MupMonitor(trainer.model, cfg.model)

    def monitored_step() -> None:
        monitor.arm()
        trainer.train_step([batch])
        monitor.collect()

    rows = {
        "anvil train_step": lambda: trainer.train_step([batch]),
        "anvil train_step + muP monitors (a log step)": monitored_step,
        "bare PyTorch (same model)": lambda: bare_step(bare, bare_opt, batch),
        "HF LlamaForCausalLM (sdpa)": lambda: bare_step(hf, hf_opt, batch, hf=True),
    }
    for fn in rows.values():  # warm-up: allocator, optimizer state
        fn()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            times[name].append(timed(fn, args.steps))

    # Checkpoint stall: a synchronous save of model + optimizer + loader state, per step at the default interval.
    saves = []
    for i in range(3):
        trainer.step = i + 1
        start = time.perf_counter()
        trainer.save()
        saves.append(time.perf_counter() - start)
    interval = type(cfg.checkpoint)().interval
    dist.destroy_process_group()

    anvil = statistics.median(times["anvil train_step"])
    table = Table(title=f"CPU step time: dim {args.dim}, {args.layers} layers, seq {args.seq}, batch {args.batch}, "
                        f"{torch.get_num_threads()} threads, fp32 ({args.rounds} rounds × {args.steps} steps)")
    for column in ("implementation", "median step", "spread", "time / anvil", "anvil speed vs it"):
        table.add_column(column, justify="left" if column == "implementation" else "right")
    for name, values in times.items():
        median = statistics.median(values)
        table.add_row(name, f"{median * 1000:.1f} ms", f"{min(values) * 1000:.0f}–{max(values) * 1000:.0f} ms",
                      f"{median / anvil:.3f}", f"{median / anvil:.2f}×")
    console = Console(width=130)
    console.print(table)
    stall = statistics.median(saves)
    console.print(f"checkpoint save (sync, {job.checkpoints}): median "
                  f"{stall * 1000:.0f} ms = {100 * stall / (interval * anvil):.2f}% of step time at the default "
                  f"interval of {interval} steps")
    monitored = statistics.median(times["anvil train_step + muP monitors (a log step)"])
    console.print(f"muP monitors: +{100 * (monitored / anvil - 1):.1f}% on a log step, "
                  f"+{10 * (monitored / anvil - 1):.2f}% of step time at metrics.log_every = 10")
    console.print(f"anvil / bare = {anvil / statistics.median(times['bare PyTorch (same model)']):.3f} (goal ≤ 1.03); "
                  f"HF / anvil = {statistics.median(times['HF LlamaForCausalLM (sdpa)']) / anvil:.3f} (goal ≥ 1.0)")


if __name__ == "__main__":
    main()
