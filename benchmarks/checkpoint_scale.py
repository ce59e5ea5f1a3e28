"""A checkpoint's metadata and files at a scale nothing here can run, made by DCP's own planning functions in one
process: every rank's save plan (its FSDP/HSDP shard of each weight and of AdamW's two moments, the step counters,
the training position, its loader state), deduplicated and merged into the global `Metadata` exactly as
`dcp.save` does, then measured (pickled, as DCP writes `.metadata`) and checked to cover every tensor once.

    python benchmarks/checkpoint_scale.py --flavor llama3-8B --vocab 128256 --ranks 64 1024 4096 [--replicate 1]

Tensor parallelism is not simulated (FSDP over `ranks / replicate`, replicas deduplicated as DCP does).
tests/test_checkpoint.py runs the check at a small scale.
"""

from __future__ import annotations

import argparse
import functools
import pickle
import time

import torch
from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import BytesIOWriteData, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from trainer.core.config import ModelConfig
from trainer.train.checkpoint import LOADER_PREFIX
from trainer.train.model import Transformer


def parameter_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        built = Transformer(model, 16)
    return {name: tuple(p.shape) for name, p in built.named_parameters()}


@functools.cache
def _chunk(shape: tuple[int, ...], replicate: int, shard: int, coordinate: tuple[int, int]) -> tuple[tuple, tuple]:
    sizes, offsets = _compute_local_shape_and_global_offset(shape, (replicate, shard), list(coordinate),
                                                            [Replicate(), Shard(0)])
    return tuple(sizes), tuple(offsets)


def save_plans(shapes: dict[str, tuple[int, ...]], ranks: int, replicate: int = 1) -> list[SavePlan]:
    """What each rank offers to write: a SHARD item per sharded tensor, the replicated ones (step counters, the
    training position) on every rank (deduplicated later, as DCP does), and its own loader state."""
    shard = ranks // replicate
    fp32 = TensorProperties(dtype=torch.float32)
    plans = []
    for rank in range(ranks):
        coordinate = (rank // shard, rank % shard)
        items = []
        for name, shape in shapes.items():
            sizes, offsets = _chunk(shape, replicate, shard, coordinate)
            for fqn in (f"model.{name}", f"optim.state.{name}.exp_avg", f"optim.state.{name}.exp_avg_sq"):
                items.append(WriteItem(MetadataIndex(fqn, offsets), WriteItemType.SHARD, tensor_data=TensorWriteData(
                    ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)), fp32, torch.Size(shape))))
            step = f"optim.state.{name}.step"
            items.append(WriteItem(MetadataIndex(step, (0,) * 0), WriteItemType.TENSOR, tensor_data=TensorWriteData(
                ChunkStorageMetadata(torch.Size(()), torch.Size(())), fp32, torch.Size(()))))
        items.append(WriteItem(MetadataIndex("train"), WriteItemType.BYTE_IO, bytes_io_data=BytesIOWriteData(0)))
        items.append(WriteItem(MetadataIndex(f"{LOADER_PREFIX}{coordinate[0] * shard + coordinate[1]}"),
                               WriteItemType.BYTE_IO, bytes_io_data=BytesIOWriteData(0)))
        plans.append(SavePlan(items))
    return plans


def global_metadata(plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
    """DCP's own deduplication and merge (what the coordinator does in `dcp.save`)."""
    return create_default_global_save_plan(dedup_save_plans(plans))


def coverage_problems(metadata: Metadata, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Each saved tensor's chunks must tile it exactly: no element missing or written twice."""
    problems = []
    for name, shape in shapes.items():
        for fqn in (f"model.{name}", f"optim.state.{name}.exp_avg", f"optim.state.{name}.exp_avg_sq"):
            entry = metadata.state_dict_metadata.get(fqn)
            if entry is None:
                problems.append(f"{fqn} is missing")
                continue
            rows = sorted((c.offsets[0], c.offsets[0] + c.sizes[0]) for c in entry.chunks if c.sizes[0])
            covered, end = 0, 0
            for start, stop in rows:
                if start != end:
                    problems.append(f"{fqn}: rows {end}..{start} " + ("missing" if start > end else "twice"))
                covered, end = covered + stop - start, stop
            if end != shape[0]:
                problems.append(f"{fqn}: {shape[0] - end} rows missing at the end")
    return problems


def main() -> None:
    from trainer.core.layers import load_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavor", default="llama3-8B")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 1024, 4096])
    p.add_argument("--replicate", type=int, default=1)
    args = p.parse_args()
    cfg = load_config(None, ["job.name=x", f"model.flavor={args.flavor}", f"model.vocab_size={args.vocab}"])
    shapes = parameter_shapes(cfg.model)
    print(f"{args.flavor} ({len(shapes)} parameter tensors), FSDP over ranks / {args.replicate} replica(s):")
    for ranks in args.ranks:
        started = time.perf_counter()
        plans, metadata = global_metadata(save_plans(shapes, ranks, args.replicate))
        elapsed = time.perf_counter() - started
        size = len(pickle.dumps(metadata))
        writers = sum(1 for plan in plans if plan.items)
        chunks = sum(len(getattr(m, "chunks", ())) for m in metadata.state_dict_metadata.values())
        problems = coverage_problems(metadata, shapes)
        print(f"  {ranks:>5} ranks: {writers} data files + .metadata, {chunks:,} chunks, .metadata {size / 2**20:.1f} "
              f"MiB, planned in {elapsed:.1f} s; " + ("every tensor covered once" if not problems else problems[0]))


if __name__ == "__main__":
    main()
