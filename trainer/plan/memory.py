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

A pipeline rank's step is its schedule's forwards and backwards in the schedule's order (no peer: the activations
and gradients it would receive are its stages' receive buffers), traced with the layers the rank holds; the real
schedule, with its sends and receives, is what a test holds this to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor

from trainer.core.config import AnvilConfig
from trainer.core.stages import rank_stages, stage_layers
from trainer.train.gpu import GpuPaths
from trainer.train.optim import build_optimizer, clip_grad_norm
from trainer.train.parallelize import build_layout, materialise, parallelized
from trainer.train.pipeline import Pipeline, Stages, schedule_order
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
    """The layers traced: the model's (or those extrapolated from); a pipeline rank's, per stage it holds."""
    seconds: float = 0.0
    pp_rank: int = 0
    """The pipeline rank traced (0 without a pipeline)."""

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


@contextlib.contextmanager
def _roots_run_again(tracker: MemTracker) -> Iterator[None]:
    """Let a root module run forward again before its backward (a pipeline stage, once per micro-batch it holds; a
    model, once per micro-batch), which torch's trackers refuse: each such call first forgets that module's and its
    submodules' statistics, as `reset_mod_stats` does for all between iterations (another stage on the rank keeps
    its own). The snapshots, the peak and the categories stay the tracker's. A global hook, made before the
    tracker's: it runs first."""

    def forget(module: torch.nn.Module, args: Any) -> None:
        if (module in tracker.memory_tracking and not tracker._mod_tracker.is_bw
                and tracker._mod_tracker.parents == {"Global"}):
            for sub in module.modules():
                if sub in tracker.memory_tracking:
                    del tracker.memory_tracking[sub]

    handle = torch.nn.modules.module.register_module_forward_pre_hook(forget)
    try:
        yield
    finally:
        handle.remove()


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


def trace(cfg: AnvilConfig, fake: bool = True, pp_rank: int = 0, stage_depths: list[int] | None = None) -> Memory:
    """One training step of `cfg` on rank 0 (taken for the first rank of pipeline rank `pp_rank`), under fake
    tensors (a fake process group of its world size is made). `fake=False`: the same step on real tensors, in a
    process group this process has joined, on this rank (what the planner's figures are tested against).
    `stage_depths`: the pipeline rank's stages traced with these many layers each (the first of each stage's own),
    not all of theirs."""
    started = time.perf_counter()
    if fake:
        _fake_world(cfg.world_size)
    layout = build_layout(cfg, "cpu")
    if fake:  # rank 0 of the fake group, as the first rank of pipeline rank `pp_rank` (no peer is ever reached)
        layout = dataclasses.replace(layout, pp_rank=pp_rank)
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
    # A pipeline rank: its stages, each parallelized as a whole model is (`Stages` names them as one).
    layers, stage_ids = stage_layers(cfg), rank_stages(cfg, layout.pp_rank) if layout.pp > 1 else [0]
    for i, depth in zip(stage_ids, stage_depths or [], strict=False):
        layers[i] = range(layers[i].start, layers[i].start + depth)
    parts = [parallelized(cfg.model, parallel, layout, device, dtype, seq_len=cfg.data.seq_len,
                          planning=fake or cfg.parallel.ep > 1,
                          stage=(layers[i], i == 0, i == cfg.pp_stages - 1) if layout.pp > 1 else None)
             for i in stage_ids]
    model = Stages(parts) if layout.pp > 1 else parts[0]
    train_balance(model, cfg.model, layout.dp_size, t.global_batch_size)
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        for part in parts:
            materialise(part, layout, device, seed=0, fake=fake)
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
        if layout.fsdp and len(parts) == 1:  # (FSDP's tracker takes one root: two stages on a rank are two)
            tracker = FSDPMemTracker(parts[0], optimizer)
            tracker.track_inputs(tuple(batch.values()))
        else:
            tracker = MemTracker()
            tracker.track_external(model, optimizer)
        autocast = autocast_for(layout, device, dtype)
        if layout.pp > 1 and fake:  # the buffers a pipeline rank's stages receive into, made before its step
            received, sent_back = _receive_buffers(cfg, layout, dict(zip(stage_ids, parts, strict=True)), dtype)
            tracker.track_external(*received.values(), *sent_back.values())
        elif layout.pp > 1:
            # The real schedule's first step sets up its sends and receives, running a forward and backward of its
            # own to learn the shapes (through autograd.grad, which the tracker cannot follow): the second step is
            # tracked, with the receive buffers the first one made.
            pipeline = Pipeline(cfg, layout, parts, stage_ids, device)
            pipeline.step([batch] * accum, micro * accum * cfg.data.seq_len, autocast)
            optimizer.zero_grad(set_to_none=True)
            tracker.track_external(*pipeline.receive_buffers())
        with _roots_run_again(tracker), tracker:  # forward and backward
            at_rest = _categories(tracker.get_tracker_snapshot())
            if layout.pp > 1 and fake:
                _pipeline_passes(cfg, layout, dict(zip(stage_ids, parts, strict=True)), batch, autocast, received,
                                 sent_back)
            elif layout.pp > 1:  # the real schedule, sending to and receiving from the other pipeline ranks
                pipeline.step([batch] * accum, micro * accum * cfg.data.seq_len, autocast)
            else:
                # Two micro-batches where there are several: the second runs with the first one's gradients held.
                passes = min(accum, 2)
                for i in range(passes):
                    sync_gradients(model, layout, last=i == passes - 1)
                    micro_step(model, batch, micro * cfg.data.seq_len, layout.dp_size, autocast, t.global_batch_size)
            passes_peak = _categories(tracker.get_tracker_snapshot("peak"))
            after_backward = _categories(tracker.get_tracker_snapshot())
        if fake:
            # What the step holds besides its own work, as measured after backward; its work on the local shards.
            step_peak = after_backward | {k: v for k, v in _local_step_peak(params, optimizer, cfg).items()
                                          if k in ("optimizer", "temporary")}
            # and what the tracker holds in no category (a pipeline's receive buffers)
            other = after_backward["total"] - sum(v for k, v in after_backward.items() if k != "total")
            step_peak["total"] = sum(v for k, v in step_peak.items() if k != "total") + other
        else:
            with tracker:  # the optimizer step (entering again starts a new peak)
                clip_grad_norm(params, cfg.optim.grad_clip or float("inf"),
                               layout.mesh["pp"].get_group() if layout.pp > 1 else None)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_peak = _categories(tracker.get_tracker_snapshot("peak"))
    resident = {"parameters": at_rest["parameters"], "optimizer": at_rest["optimizer"],
                "gradients": after_backward["gradients"]}
    held = [len(layers[i]) for i in stage_ids] if layout.pp > 1 else [cfg.model.n_layers]
    return Memory({"passes": passes_peak, "step": step_peak}, resident, held, time.perf_counter() - started,
                  pp_rank=layout.pp_rank)


Buffers = dict[tuple[int, int], torch.Tensor]


def _receive_buffers(cfg: AnvilConfig, layout, parts: dict[int, torch.nn.Module], dtype: torch.dtype
                     ) -> tuple[Buffers, Buffers]:
    """What torch's stages keep for every micro-batch, by (stage, micro-batch): the activations they receive (all but
    the first stage; made to require their gradient, as the stage does) and the gradients sent back to them (all
    but the last)."""
    last, micro, seq = cfg.pp_stages - 1, cfg.train.micro_batch_size, cfg.data.seq_len
    hidden = {s: (micro, seq // part.sequence_shards, cfg.model.dim) for s, part in parts.items()}
    act_dtype = dtype if layout.fsdp else torch.float32  # FSDP's policy computes in bf16; autocast keeps fp32 between
    received = {(s, m): torch.empty(hidden[s], dtype=act_dtype).requires_grad_()
                for s in parts if s > 0 for m in range(cfg.accumulation)}
    sent_back = {(s, m): torch.empty(hidden[s], dtype=act_dtype) for s in parts if s < last
                 for m in range(cfg.accumulation)}
    return received, sent_back


def _pipeline_passes(cfg: AnvilConfig, layout, parts: dict[int, torch.nn.Module], batch: dict[str, torch.Tensor],
                     autocast: contextlib.AbstractContextManager, received: Buffers, sent_back: Buffers) -> None:
    """This pipeline rank's forwards and backwards of one step in its schedule's order (`schedule_order`): a stage
    computes on the activation buffer of the micro-batch and sends back the gradient buffer's values; the last
    stage keeps each micro-batch's logits with its loss until its backward, as torch's stage does. With FSDP, as
    torch's stage runs it: no backward reduces or reshards (each stage holds its whole parameters and gradients
    through the step), the stage's end of the step does (torch's own `perform_reduce_grad`). A zero-bubble
    schedule's backward is traced whole at its weights' part (`W`), its input's part (`I`) holding everything till
    then: an upper bound."""
    last = cfg.pp_stages - 1
    kwargs = {"positions": batch["positions"]} if "positions" in batch else {}
    outputs = {}
    for part in parts.values():  # as torch's stage runs FSDP: every backward unsynced, nothing resharded till the end
        if isinstance(part, FSDPModule):
            part.set_is_last_backward(False)
            part.set_reshard_after_backward(False)
            part.set_requires_gradient_sync(False)
    for kind, stage, m in schedule_order(cfg, layout.pp_rank):
        if kind == "F":
            with autocast:
                out = parts[stage](batch["input_ids"] if stage == 0 else received[stage, m], **kwargs)
            if stage == last:
                loss = F.cross_entropy(out.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum")
                out = (loss, out)
            outputs[stage, m] = out
        elif kind in ("B", "W"):
            out = outputs.pop((stage, m))
            if stage == last:
                out[0].backward()
            else:
                out.backward(sent_back[stage, m])
    for part in parts.values():  # the stage's own end of the step: FSDP reduces the gradients
        PipelineStage.perform_reduce_grad(SimpleNamespace(submod=part), 1)


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
    """Rank 0's memory for `cfg`: traced whole, or at `LOW` and `HIGH` blocks and extrapolated to `model.n_layers`.
    A pipeline: the first and the last pipeline rank's, each traced with the layers it holds, whichever peaks
    higher (the first holds the embedding and the most micro-batches in flight, the last the head and its logits;
    a rank between holds fewer than the first of either)."""
    if cfg.parallel.pp > 1:
        first, last = _pipeline_rank_memory(cfg, 0), _pipeline_rank_memory(cfg, cfg.parallel.pp - 1)
        higher = max(first, last, key=lambda memory: memory.peak)
        higher.seconds = first.seconds + last.seconds
        return higher
    layers = cfg.model.n_layers
    if layers <= HIGH:
        return trace(cfg)
    low, high = trace(_with_layers(cfg, LOW)), trace(_with_layers(cfg, HIGH))
    steps = layers - LOW
    phases = {phase: _affine(low.phases[phase], high.phases[phase], steps) for phase in low.phases}
    return Memory(phases, _affine(low.resident, high.resident, steps), [LOW, HIGH], low.seconds + high.seconds)


def _pipeline_rank_memory(cfg: AnvilConfig, pp_rank: int) -> Memory:
    """A pipeline rank's memory: traced with all its stages' layers, or, where a stage holds more than `HIGH`, with
    each stage's depth lowered alike to `LOW` and to `HIGH` for its shallowest, and extrapolated (each figure is
    affine in the layers of each stage, so in a shift of all of them)."""
    depths = [len(stage_layers(cfg)[i]) for i in rank_stages(cfg, pp_rank)]
    if max(depths) <= HIGH:
        return trace(cfg, pp_rank=pp_rank)
    shift = min(depths)
    low = trace(cfg, pp_rank=pp_rank, stage_depths=[d - shift + LOW for d in depths])
    high = trace(cfg, pp_rank=pp_rank, stage_depths=[d - shift + HIGH for d in depths])
    steps = shift - LOW
    phases = {phase: _affine(low.phases[phase], high.phases[phase], steps) for phase in low.phases}
    return Memory(phases, _affine(low.resident, high.resident, steps), [LOW, HIGH], low.seconds + high.seconds,
                  pp_rank=pp_rank)
