"""A job's plan: what it costs and whether it fits, from its config, its cluster profile's assumptions, its datasets'
footers and (from `trainer.plan.memory`, in a process with torch) its measured memory. torch-free, so that the
launch side composes, prints and stores it (`jobs/<name>/plan.json`).

What is measured: memory (PyTorch's tracker under fake tensors), FLOPs per token (the count torch's FLOP counter
agrees with), the corpus's rows and bytes; what is counted: the bytes expert parallelism's all-to-alls move (what a
real step sends, under an even routing). What is assumed, and said with every plan: the MFU a job reaches, the
checkpoint file system's bandwidth, the runtime's memory outside tensors and the allocator's fragmentation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.core.checks import parallel_problems
from trainer.core.config import AnvilConfig
from trainer.core.costs import flops_per_token, num_params
from trainer.core.stages import bubble, rank_stages, stage_layers
from trainer.plan.corpus import dataset_size

GIB = 2**30

RECOMPUTE = {"none": 1.0, "selective": 1.0, "full": 4 / 3}
"""Compute per step relative to no recomputation: `full` runs every block's forward twice (forward is a third of a
step's FLOPs); `selective` keeps the matmul and attention outputs and recomputes only elementwise work (not counted)."""

CHECKPOINT_BYTES_PER_PARAM = 12
"""What a checkpoint stores per parameter: fp32 weights and AdamW's two fp32 moments (the loader's state is KBs)."""


@dataclass
class Plan:
    job: str
    world_size: int
    layout: str
    precision: str
    activation_checkpoint: str
    compile: bool
    micro_batch_size: int
    accumulation: int
    parameters: int
    active_parameters: int
    flops_per_token: float
    tokens_per_step: int
    steps: int
    step_seconds: float | None = None
    tokens_per_second: float | None = None
    wall_hours: float | None = None
    device_hours: float | None = None
    checkpoint_gib: float = 0.0
    checkpoint_seconds: float = 0.0
    pipeline: dict[str, Any] | None = None
    """With `parallel.pp` > 1: each stage's layers, which stages each pipeline rank holds, the schedule, its
    micro-batches and the share of a step a rank idles (`stages.bubble`)."""
    all_to_all_gib: float = 0.0
    """What each rank sends to other ranks by expert parallelism's all-to-alls per step (and receives about as much):
    `all_to_all_bytes`."""
    data: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    memory_skipped: str | None = None
    """Why memory was not planned (no torch here, no device memory in the profile...)."""
    fits: bool | None = None
    """Predicted peak within the device's memory (None: not known)."""
    problems: list[str] = field(default_factory=list)
    """What stops the job (it does not fit; its data cannot feed its workers)."""
    alternatives: list[dict[str, Any]] = field(default_factory=list)
    """Planned changes that fit: {why, overrides, peak_gib}."""
    searched: bool = False
    """Whether changes that fit were looked for (`alternatives` empty and this true: none of those tried fits)."""
    assumptions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def stops(self, force: bool) -> bool:
        """Whether the plan stops a submission: any problem, unless `force` and the one problem is the fit (data that
        cannot feed its workers would fail at the first step whatever is forced)."""
        return bool(self.problems) and not (force and self.fits is False and len(self.problems) == 1)


def all_to_all_bytes(cfg: AnvilConfig, micro_batches: int | None = None) -> int:
    """Bytes rank 0 sends to other ranks by all-to-all in `micro_batches` forward and backward passes (default: one
    step's) under expert parallelism, routing evenly (the planner's assumption): in each MoE layer a dispatch sends
    the rows of its tokens (one per chosen expert: micro-batch × seq_len × top_k rows of `dim` activations, an equal
    share to each EP rank) and a combine sends back the rows it received; backward sends the gradients of both the
    other way, and activation checkpointing (full or selective) runs the forward's pair again. 0 without EP."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    if p.ep == 1 or not m.moe.experts:
        return 0
    if micro_batches is None:
        micro_batches = cfg.accumulation
    rows = t.micro_batch_size * cfg.data.seq_len * m.moe.top_k
    kept = -(-rows // p.ep)  # rank 0's own share (the even split gives the first ranks the remainder)
    pair = (rows - kept) + (p.ep - 1) * kept  # a dispatch and a combine
    passes = 3 if p.activation_checkpoint != "none" else 2
    element = 2 if cfg.precision == "bf16" else 4
    return m.n_layers * micro_batches * passes * pair * m.dim * element


def layout_text(cfg: AnvilConfig) -> str:
    p = cfg.parallel
    parts = []
    if p.dp_replicate > 1:
        parts.append(f"HSDP {p.dp_replicate}×{cfg.dp_shard}")
    elif cfg.dp_shard > 1:
        parts.append(f"FSDP {cfg.dp_shard}")
    if p.ep > 1:
        parts.append(f"EP {p.ep} (experts over {p.ep} of them)")
    if p.pp > 1:
        parts.insert(0, f"PP {p.pp}")
    if p.tp > 1:
        parts.append(f"TP {p.tp}")
    return " × ".join(parts) or "one rank, whole model"


def predicted_peak(cfg: AnvilConfig, tracked: float) -> float:
    """The device memory a tracked peak needs: the allocator's fragmentation and the runtime's reserve (models)."""
    a = cfg.cluster.plan
    return tracked * (1 + a.fragmentation) + a.reserve_gib * GIB


def base_plan(cfg: AnvilConfig) -> Plan:
    """Everything but memory: FLOPs, time and cost at the assumed MFU, checkpoint, data."""
    t, c, a = cfg.train, cfg.cluster, cfg.cluster.plan
    tokens = t.global_batch_size * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    plan = Plan(
        job=cfg.job.name, world_size=cfg.world_size, layout=layout_text(cfg), precision=cfg.precision,
        activation_checkpoint=cfg.parallel.activation_checkpoint, compile=cfg.parallel.compile,
        micro_batch_size=t.micro_batch_size, accumulation=cfg.accumulation,
        parameters=num_params(cfg.model), active_parameters=num_params(cfg.model, active=True),
        flops_per_token=flops, tokens_per_step=tokens, steps=t.steps,
        assumptions={"mfu": a.mfu, "peak_tflops": c.mfu_peak_tflops, "checkpoint_gbps": a.checkpoint_gbps,
                     "reserve_gib": a.reserve_gib, "fragmentation": a.fragmentation,
                     "device_memory_gib": c.device_memory_gib})
    if c.mfu_peak_tflops:
        work = tokens * flops * RECOMPUTE[cfg.parallel.activation_checkpoint]
        plan.step_seconds = work / (cfg.world_size * c.mfu_peak_tflops * 1e12 * a.mfu)
        plan.tokens_per_second = tokens / plan.step_seconds
        plan.wall_hours = plan.step_seconds * t.steps / 3600
        plan.device_hours = plan.wall_hours * cfg.world_size
    size = CHECKPOINT_BYTES_PER_PARAM * plan.parameters
    plan.checkpoint_gib = size / GIB
    plan.checkpoint_seconds = size / (a.checkpoint_gbps * 1e9)
    plan.all_to_all_gib = all_to_all_bytes(cfg) / GIB
    if cfg.parallel.pp > 1 and not parallel_problems(cfg):
        fraction, how = bubble(cfg)
        plan.pipeline = {"schedule": cfg.parallel.pp_schedule, "microbatches": cfg.accumulation,
                         "stages": [[r.start, r.stop - 1] for r in stage_layers(cfg)],
                         "ranks": [rank_stages(cfg, r) for r in range(cfg.parallel.pp)], "bubble": fraction,
                         "bubble_how": how}
    plan.data = data_plan(cfg)
    plan.problems += row_group_problems(cfg, plan.data)
    return plan


def data_plan(cfg: AnvilConfig) -> dict[str, Any] | None:
    """Tokens the run needs against what each dataset holds (its share by weight): epochs of each."""
    d = cfg.data
    if not d.datasets:
        return None
    separators = 1 + (d.bos_token is not None)
    total_weight = sum(ds.weight for ds in d.datasets)
    needed = cfg.train.steps * cfg.train.global_batch_size * d.seq_len
    datasets = []
    for name, ds in zip(d.dataset_names(), d.datasets, strict=True):
        tokenizer = d.tokenizer if d.tokenizer and Path(d.tokenizer).is_file() else None
        size = dataset_size(name, ds.path, ds.text_column, tokenizer, separators)
        share = needed * ds.weight / total_weight
        entry = size.to_dict() | {"tokens_needed": share,
                                  "epochs": share / size.tokens if size.tokens else None}
        datasets.append(entry)
    return {"tokens_needed": needed, "datasets": datasets}


def row_group_problems(cfg: AnvilConfig, data: dict[str, Any] | None) -> list[str]:
    """Each data worker reads whole row groups of its own: a dataset with fewer than DP ranks × workers cannot feed
    them all (the first step would fail on the worker that has none)."""
    if data is None:
        return []
    workers = cfg.dp_size * max(cfg.data.num_workers, 1)
    return [f"data.datasets.{i}: {ds['name']} has {ds['row_groups']} row groups, fewer than the {workers} data "
            f"workers ({cfg.dp_size} data-parallel ranks × {max(cfg.data.num_workers, 1)}) that each read row groups "
            "of their own; rewrite it with smaller row groups (python -m trainer.data convert --row-group-rows N), or "
            "lower data.num_workers"
            for i, ds in enumerate(data["datasets"]) if ds["files"] and ds["row_groups"] < workers]


def with_memory(plan: Plan, cfg: AnvilConfig, memory: dict[str, Any]) -> Plan:
    """The plan with rank 0's measured memory, the predicted device peak and the verdict."""
    peak = predicted_peak(cfg, memory["peak"])
    plan.memory = memory | {"predicted_peak": peak}
    limit = cfg.cluster.device_memory_gib
    if limit is None:
        plan.fits = None
        return plan
    plan.fits = peak <= limit * GIB
    if not plan.fits:
        plan.problems.append(
            f"memory: the predicted peak is {peak / GIB:.1f} GiB per device, over the {limit:g} GiB of "
            f"cluster.device_memory_gib ({cfg.cluster.profile})" + (
                "; each change listed below is planned to fit" if plan.alternatives else
                "; none of the changes tried fits (activation checkpointing, smaller micro-batches, more sharding, "
                "TP, twice the nodes, and checkpointing with each): use more nodes, a smaller model or a shorter "
                "data.seq_len" if plan.searched else ""))
    return plan
