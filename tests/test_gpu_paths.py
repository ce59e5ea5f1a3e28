"""The GPU paths' kernels on every device torch sees here: the CPU always, a GPU where there is one (this file is the
GPU test subset `benchmarks/gpu.sh` runs first on a lent device). Each compares a fast path with the plain one it
replaces, on fresh random inputs, and each has a control that breaks the fast path and is caught.

- FlexAttention's document block mask against the explicit mask (torch 2.13 runs FlexAttention's forward on a CPU
  through Inductor's C++ kernel, but has no backward there: training on a CPU uses the explicit mask);
- the experts' grouped matmul in bf16 against the loop over experts;
- the switches: a CPU takes no GPU path, a GPU takes every one (`GpuPaths`);
- and `benchmarks/gpu.sh --smoke`, the device run at toy size (only collected, not run, by the device run itself).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.train_helpers import free_port
from trainer.core.config import ModelConfig, MoeConfig
from trainer.train.gpu import GpuPaths
from trainer.train.model import (
    Transformer,
    document_block_mask,
    document_ids,
    document_mask,
    flex_document_attention,
    grouped_mm_runs,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
REPO = Path(__file__).resolve().parent.parent


def random_documents(generator: torch.Generator, batch: int, length: int) -> torch.Tensor:
    """Per-token positions of rows packed with documents of random lengths (1 token up to a whole row)."""
    rows = []
    for _ in range(batch):
        parts, left = [], length
        while left:
            size = int(torch.randint(1, left + 1, (), generator=generator)) if len(parts) < 6 else left
            parts.append(torch.arange(size))
            left -= size
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@pytest.mark.parametrize("device", DEVICES)
def test_flex_document_mask_equals_the_explicit_mask(device: str) -> None:
    """Three blocks of 128 per row, documents crossing block edges and one a single token: FlexAttention with the
    block mask (grouped keys too) gives the explicit mask's attention. Control: the same block mask with its
    fully-visible blocks dropped (what a wrong block list does) differs."""
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    batch, heads, kv_heads, length, head_dim = 2, 4, 2, 384, 32
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(batch, h, length, head_dim, generator=generator).to(device, dtype)
               for h in (heads, kv_heads, kv_heads))
    positions = random_documents(generator, batch, length)
    positions[0, :300] = torch.arange(300)  # a document over two whole blocks: a fully visible block to drop below
    documents = document_ids(positions.to(device))
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=document_mask(documents),
                                          scale=0.2, enable_gqa=True)
    mask = document_block_mask(documents)
    assert mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum() < batch * 3 * 4  # blocks are skipped
    assert mask.full_kv_num_blocks.sum() > 0
    got = flex_document_attention(q, k, v, mask, 0.2).float()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: 8 significant bits
    assert (got - want).norm() / want.norm() < tolerance
    broken = flex_document_attention(q, k, v, _without_full_blocks(mask), 0.2).float()
    assert (broken - want).norm() / want.norm() > 10 * tolerance


def _without_full_blocks(mask):
    """The block mask with no fully-visible block listed: those blocks are skipped."""
    from torch.nn.attention.flex_attention import BlockMask

    return BlockMask(mask.seq_lengths, mask.kv_num_blocks, mask.kv_indices, torch.zeros_like(mask.full_kv_num_blocks),
                     mask.full_kv_indices, mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks,
                     mask.full_q_indices, mask.BLOCK_SIZE, mask.mask_mod)


@pytest.mark.parametrize("device", DEVICES)
def test_a_packed_row_under_flex_attention_gives_each_document_its_own_logits(device: str) -> None:
    """The model's switch end to end (forward): a row of two documents with FlexAttention on equals each document
    alone, and equals the explicit-mask path."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128)
    with torch.device("meta"):
        model = Transformer(cfg, 256)
    model.to_empty(device=device)
    model.init_weights(0)
    generator = torch.Generator().manual_seed(5)
    first, second = (torch.randint(0, 128, (1, n), generator=generator).to(device) for n in (100, 156))
    row = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(100), torch.arange(156)]).unsqueeze(0).to(device)
    with torch.no_grad():
        explicit = model(row, positions)
        model.flex_attention = True
        flex = model(row, positions)
        alone = torch.cat([model(first), model(second)], dim=1)
    assert (flex - explicit).abs().max() < 1e-4
    assert (flex - alone).abs().max() < 1e-4


if torch.cuda.is_available():  # FlexAttention has a backward on a GPU only (torch 2.13)

    @pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
    def test_flex_attention_trains_like_the_explicit_mask_on_a_gpu(checkpointing: str) -> None:
        """Gradients through the block mask, under each activation-checkpointing mode (selective keeps FlexAttention's
        output), equal those of the explicit mask in fp32."""
        from trainer.train.parallelize import apply_activation_checkpointing

        cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128)
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
        tokens = torch.randint(0, 128, (2, 256), generator=generator).cuda()
        positions = random_documents(generator, 2, 256).cuda()
        grads = []
        for flex in (False, True):
            with torch.device("meta"):
                model = Transformer(cfg, 256)
            model.to_empty(device="cuda")
            model.init_weights(0)
            model.flex_attention = flex
            apply_activation_checkpointing(model, checkpointing)
            F.cross_entropy(model(tokens, positions).flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert (grads[1] - grads[0]).norm() / grads[0].norm() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_experts_run_alike_as_one_grouped_matmul_and_one_by_one(device: str, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """bf16: the grouped matmul (a GPU's path; the CPU has one too) and the loop (where a device lacks it) agree to
    bf16 rounding, an expert without tokens included; the probe says whether the device has it (control: a torch
    without it)."""
    assert grouped_mm_runs(torch.device(device))
    from tests.test_model import build

    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=64, moe=MoeConfig(experts=4, top_k=2, expert_dim=32))
    experts = build(cfg).layers["0"].feed_forward.grouped.to(device)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    counts = torch.tensor([7, 0, 20, 5], device=device)
    x = torch.randn(int(counts.sum()), cfg.dim, generator=generator).to(device, torch.bfloat16)
    grouped = experts(x, counts).float()
    experts.grouped_mm = False
    loop = experts(x, counts).float()
    assert (grouped - loop).norm() / loop.norm() < 1e-2
    shuffled = experts(x, counts.flip(0)).float()  # control: rows handed to the wrong experts
    assert (shuffled - loop).norm() / loop.norm() > 0.1

    def missing(*args, **kwargs):
        raise RuntimeError("grouped gemm is not supported on ROCM")

    monkeypatch.setattr(torch, "_grouped_mm", missing)
    assert not grouped_mm_runs(torch.device(device))


@pytest.mark.parametrize("device", DEVICES)
def test_a_cpu_takes_no_gpu_path_and_a_gpu_takes_every_one(device: str) -> None:
    paths = GpuPaths.of(device)
    assert {getattr(paths, f.name) for f in fields(GpuPaths)} == {device == "cuda"}
    assert GpuPaths.of_cluster("rocm") == GpuPaths.of_cluster("cuda") == GpuPaths.of("cuda")
    assert GpuPaths.of_cluster("cpu") == GpuPaths.of("cpu")


def test_the_device_run_runs_every_part_at_toy_size(tmp_path: Path) -> None:
    """`benchmarks/gpu.sh --smoke`: every part of the prepared device run on this CPU, each result where the device
    run puts it, so the script cannot rot before a GPU is lent. torchtitan is carried to the device only; here its
    part says it is not importable (or measures, where it is installed)."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    done = subprocess.run([str(REPO / "benchmarks" / "gpu.sh"), "--smoke", "--out", str(out), "--work",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    parts = [r["part"] for r in rows]
    assert parts == ["tests", "anvil", "syncs", "anvil", "torchtitan", "loader", "loader", "checkpoint"], parts
    assert re.fullmatch(r"\d+/\d+ tests collected \(1 deselected\) in .*", rows[0]["summary"]), rows[0]
    for r in rows[1], rows[3]:
        assert r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0 and r["mfu"] is None  # no peak on a CPU
    assert [(r["ac"], r["liger"]) for r in (rows[1], rows[3])] == [("none", False), ("none", True)]
    # The sites of host syncs are Anvil's lines: the loss and norm fetched once per step among them.
    assert any(site.startswith("trainer/train/loop.py:") and site.endswith(".tolist") for site in rows[2]["sites"])
    assert "tokens_per_s" in rows[4] or "not importable" in rows[4]["skipped"]
    assert [r["workers"] for r in rows[5:7]] == [0, 1] and all(r["tokens_per_s"] > 0 for r in rows[5:7])
    assert rows[7]["blocking_save_s"] > 0 and rows[7]["gib"] > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(  # what comes back from the device: 8 files at most
        ["results.jsonl", "summary.txt", "versions.log", "tests.log", "anvil.log", "torchtitan.log", "loader.log",
         "checkpoint.log"])
    assert "host syncs in one step" in (out / "summary.txt").read_text()
