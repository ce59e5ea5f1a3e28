"""The smallest changes that make a job fit: candidates drawn from what a person would try (activation checkpointing,
a smaller micro-batch at the same global batch, more sharding, tensor parallelism, more nodes), each one planned by
tracing it, never guessed. torch-free: the candidates are configs; the caller measures them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from trainer.core.checks import data_problems, parallel_problems
from trainer.core.config import AnvilConfig
from trainer.core.layers import ConfigError, changed

Changes = dict[str, Any]


def single_changes(cfg: AnvilConfig) -> Iterator[tuple[str, Changes]]:
    """One change at a time, cheapest to the run first: (why, dotted changes)."""
    p, t, c = cfg.parallel, cfg.train, cfg.cluster
    if p.activation_checkpoint != "full":
        yield ("recompute every block in backward (about a third more compute)",
               {"parallel.activation_checkpoint": "full"})
    micro = t.micro_batch_size // 2
    while micro >= 1:
        yield (f"micro-batches of {micro}, the same global batch (more accumulation)",
               {"train.micro_batch_size": micro})
        micro //= 2
    if p.dp_replicate > 1:
        yield "shard over every data-parallel rank instead of replicating (HSDP → FSDP)", {
            "parallel.dp_replicate": 1, "parallel.dp_shard": -1}
    tp = p.tp * 2
    while tp <= c.devices_per_node:
        yield f"tensor parallelism over {tp} devices of a node", {"parallel.tp": tp, "parallel.dp_shard": -1}
        tp *= 2
    if p.pp > 1:
        yield f"a pipeline of {2 * p.pp} ranks (each holding half the layers it did)", {
            "parallel.pp": 2 * p.pp, "parallel.dp_shard": -1}
    yield f"twice the nodes ({2 * c.nodes}), sharding over twice the ranks", {
        "cluster.nodes": 2 * c.nodes, "parallel.dp_shard": -1}


def candidates(cfg: AnvilConfig) -> Iterator[tuple[str, AnvilConfig, bool]]:
    """Valid configs to try, (why, config, combined): each single change, then full activation checkpointing
    together with each other one (worth trying only where checkpointing alone does not fit)."""
    singles = list(single_changes(cfg))
    tried = [(why, changes, False) for why, changes in singles]
    if cfg.parallel.activation_checkpoint != "full":
        full = {"parallel.activation_checkpoint": "full"}
        tried += [(f"full activation checkpointing and {why}", {**full, **changes}, True)
                  for why, changes in singles if changes != full]
    for why, changes, combined in tried:
        try:
            alternative = changed(cfg, changes)
        except ConfigError:
            continue
        if not parallel_problems(alternative) and not data_problems(alternative):
            yield why, alternative, combined


def as_overrides(base: AnvilConfig, alternative: AnvilConfig) -> list[str]:
    """The command-line overrides that turn `base` into `alternative` (the fields an alternative may change)."""
    old, new = _layout_fields(base), _layout_fields(alternative)
    return [f"{k}={v}" for k, v in new.items() if old.get(k) != v]


def _layout_fields(cfg: AnvilConfig) -> Changes:
    return {"parallel.activation_checkpoint": cfg.parallel.activation_checkpoint,
            "train.micro_batch_size": cfg.train.micro_batch_size, "parallel.dp_replicate": cfg.parallel.dp_replicate,
            "parallel.dp_shard": cfg.parallel.dp_shard, "parallel.tp": cfg.parallel.tp, "parallel.pp": cfg.parallel.pp,
            "cluster.nodes": cfg.cluster.nodes}
