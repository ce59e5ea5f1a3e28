"""A job's memory per rank, measured by PyTorch's own tracker on one training step run under fake tensors.

The real model, its parallelisms in `build_model`'s order, the optimizer and one step (`trainer.train.step`, as the
Trainer runs it) execute in one process under `FakeTensorMode` with a fake process group of the job's world size: no
accelerator, no memory, no peer. `FSDPMemTracker` (`MemTracker` without FSDP) records every tensor alive on rank 0
by what it is (parameters, gradients, optimizer state, activations, temporaries, collectives' buffers) and the peak.

Two terms are models, not measurements: the allocator's fragmentation on top of the peak and the runtime's own
memory (context, NCCL/RCCL buffers), both from `cluster.plan`. A large model is traced at two small depths and the
figures extrapolated linearly in the number of blocks (every block is the same, so each figure is affine in it; a
test holds extrapolation to a full trace). Kernels are those of this host: a GPU's FlexAttention document mask is
traced as the plain causal attention (its block mask is a few KB), the experts' loop as an even split of the rows,
compiled blocks as eager ones (an upper bound: fusion saves activations).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.tensor import DTensor

from trainer.core.config import AnvilConfig
from trainer.train.gpu import GpuPaths
from trainer.train.optim import build_optimizer, clip_grad_norm
from trainer.train.parallelize import build_layout, materialise, parallelized
from trainer.train.step import autocast_for, micro_step, sync_gradients, train_balance

GIB = 2**30

CATEGORIES = {
    "parameters": ("SHARDED_PARAM", "PARAM", "BUFFER"),
    "gradients": ("SHARDED_GRAD", "GRAD"),
    "optimizer": ("OPT",),
    "activations": ("ACT", "INP"),
    "gathered": ("UNSHARDED_PARAM", "UNSHARDED_GRAD", "ALL_GATHER", "REDUCE_SCATTER"),
    "temporary": ("TEMP",),
}
"""What the plan reports, from the tracker's kinds: `gathered` is FSDP's all-gathered parameters, unsharded gradients
and the collectives' buffers (a block or two at a time); `temporary` what an operation frees when it ends."""

LOW, HIGH = 3, 4
"""Deeper models are traced at these depths and extrapolated; shallower ones whole. Below 3 blocks the figures are not
yet affine in the depth: FSDP's prefetch gathers one block fewer, and the peak falls elsewhere in backward."""


@dataclass
class Memory:
    """Bytes on one rank (rank 0), at the step's peak and at rest."""

    phases: dict[str, dict[str, float]]
    """The peak of each phase by category (`CATEGORIES`, and `total`): the micro-batches' forward and backward
    (`passes`), the optimizer step (`step`). Each is affine in the depth; their maximum is not, so they extrapolate
    apart."""
    resident: dict[str, float]
    """What stays between steps: parameters and optimizer state (before the step), gradients (after backward)."""
    traced_layers: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda phase: self.phases[phase]["total"])

    @property
    def peak(self) -> float:
        """The largest total of live tensors during the step (the tracker's peak)."""
        return self.phases[self.peak_phase]["total"]

    @property
    def at_peak(self) -> dict[str, float]:
        """That peak by category."""
        return {k: v for k, v in self.phases[self.peak_phase].items() if k != "total"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"peak": self.peak, "peak_phase": self.peak_phase, "at_peak": self.at_peak}

    def plan_dict(self) -> dict[str, Any]:
        """What a plan keeps: the figures, not how long they took (a plan of the same config is the same plan)."""
        return {k: v for k, v in self.to_dict().items() if k != "seconds"}


def _categories(snapshot: dict) -> dict[str, float]:
    """One device's tracker snapshot → bytes per reported category (and `total`)."""
    by_kind = {}
    for device_snapshot in snapshot.values():
        for kind, size in device_snapshot.items():
            name = str(kind).rpartition(".")[2]
            by_kind[name] = by_kind.get(name, 0) + size
    out = {category: float(sum(by_kind.get(k, 0) for k in kinds)) for category, kinds in CATEGORIES.items()}
    out["total"] = float(by_kind.get("Total", sum(out.values())))
    return out


def _fake_world(size: int) -> None:
    """A fake process group of `size` ranks, this process rank 0 (replacing one of another size)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_world_size() == size and dist.get_backend() == "fake":
            return
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)


def trace(cfg: AnvilConfig, fake: bool = True) -> Memory:
    """One training step of `cfg` on rank 0, under fake tensors (a fake process group of its world size is made).
    `fake=False`: the same step on real tensors, in a process group this process has joined (what the planner's
    figures are tested against)."""
    started = time.perf_counter()
    if fake:
        _fake_world(cfg.world_size)
    layout = build_layout(cfg, "cpu")
    device = torch.device("cpu")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    t, micro = cfg.train, cfg.train.micro_batch_size
    accum = t.global_batch_size // (micro * layout.dp_size)
    # The parallelisms are applied to the meta model before tensors turn fake (the device meshes they build compute
    # their coordinates with real tensors); allow_non_fake_inputs: the meta model becomes fake as it materialises.
    # Compiled blocks are traced eager: compiling under fake tensors would cost minutes, and a compiled block's fused
    # kernels save activations, so the eager figure is the bound.
    parallel = cfg.parallel.model_copy(update={"compile": False}) if fake else cfg.parallel
    # Expert parallelism: both trace an even routing (fake tensors hold none, and the real step is held to the same
    # computation); a router's imbalance moves a rank's peak by its share of the dispatched rows.
    model = parallelized(cfg.model, parallel, layout, device, dtype, seq_len=cfg.data.seq_len,
                         planning=fake or cfg.parallel.ep > 1)
    train_balance(model, cfg.model, layout.dp_size, t.global_batch_size)
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        materialise(model, layout, device, seed=0, fake=fake)
        gpu = GpuPaths.of_cluster(cfg.cluster.device)
        optimizer = build_optimizer(model, cfg.model, cfg.optim, fused=gpu.fused_adamw)
        params = [p for p in model.parameters() if p.requires_grad]
        for param in params:  # the optimizer's state, as it is from the second step on
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        batch = {"input_ids": torch.randint(0, cfg.model.vocab_size, (micro, cfg.data.seq_len)),
                 "labels": torch.randint(0, cfg.model.vocab_size, (micro, cfg.data.seq_len))}
        # Document masks: an explicit mask where the job will hold one; FlexAttention's block mask is negligible.
        if cfg.data.document_positions and not gpu.flex_attention:
            batch["positions"] = torch.arange(cfg.data.seq_len).repeat(micro, 1)
        if layout.fsdp:
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs(tuple(batch.values()))
        else:
            tracker = MemTracker()
            tracker.track_external(model, optimizer)
        autocast = autocast_for(layout, device, dtype)
        with tracker:  # forward and backward
            at_rest = _categories(tracker.get_tracker_snapshot())
            # Two micro-batches where there are several: the second runs with the first one's gradients held.
            passes = min(accum, 2)
            for i in range(passes):
                if i:
                    tracker.reset_mod_stats()  # per-module figures are per pass; the peak stays
                sync_gradients(model, layout, last=i == passes - 1)
                micro_step(model, batch, micro * cfg.data.seq_len, layout.dp_size, autocast, t.global_batch_size)
            passes_peak = _categories(tracker.get_tracker_snapshot("peak"))
            after_backward = _categories(tracker.get_tracker_snapshot())
        if fake:
            # What the step holds besides its own work, as measured after backward; its work on the local shards.
            step_peak = after_backward | {k: v for k, v in _local_step_peak(params, optimizer, cfg).items()
                                          if k in ("optimizer", "temporary")}
            step_peak["total"] = sum(v for k, v in step_peak.items() if k != "total")
        else:
            with tracker:  # the optimizer step (entering again starts a new peak)
                clip_grad_norm(params, cfg.optim.grad_clip or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_peak = _categories(tracker.get_tracker_snapshot("peak"))
    resident = {"parameters": at_rest["parameters"], "optimizer": at_rest["optimizer"],
                "gradients": after_backward["gradients"]}
    return Memory({"passes": passes_peak, "step": step_peak}, resident, [cfg.model.n_layers],
                  time.perf_counter() - started)


def _local_step_peak(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, cfg: AnvilConfig
                     ) -> dict[str, float]:
    """The optimizer step's peak on rank 0's local shards: the same optimizer class and groups on plain tensors of
    the local shapes. (Under fake tensors, DTensor works out each foreach operation's output on the global shape, and
    the tracker counts those as memory: a whole model's worth that no real step holds.)"""
    local = {id(p): torch.nn.Parameter(torch.empty_like(p.to_local() if isinstance(p, DTensor) else p))
             for p in params}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [local[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    step = type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in ("fused", "foreach")})
    for param in local.values():
        param.grad = torch.zeros_like(param)
    step.step()  # its state, as from the second step on
    tracker = MemTracker()
    tracker.track_external(torch.nn.ParameterList(local.values()), step)
    with tracker:
        torch.nn.utils.clip_grad_norm_(list(local.values()), cfg.optim.grad_clip or float("inf"), foreach=True)
        step.step()
        step.zero_grad(set_to_none=True)
        found = _categories(tracker.get_tracker_snapshot("peak"))
    return {k: v for k, v in found.items() if k != "total"}


def _with_layers(cfg: AnvilConfig, layers: int) -> AnvilConfig:
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"n_layers": layers})})


def _affine(low: dict, high: dict, steps: int) -> dict:
    return {k: low[k] + steps * (high[k] - low[k]) for k in low}


def plan_memory(cfg: AnvilConfig) -> Memory:
    """Rank 0's memory for `cfg`: traced whole, or at `LOW` and `HIGH` blocks and extrapolated to `model.n_layers`."""
    layers = cfg.model.n_layers
    if layers <= HIGH:
        return trace(cfg)
    low, high = trace(_with_layers(cfg, LOW)), trace(_with_layers(cfg, HIGH))
    steps = layers - LOW
    phases = {phase: _affine(low.phases[phase], high.phases[phase], steps) for phase in low.phases}
    return Memory(phases, _affine(low.resident, high.resident, steps), [LOW, HIGH], low.seconds + high.seconds)
