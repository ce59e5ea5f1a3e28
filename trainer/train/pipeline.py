"""Pipeline parallelism: this rank's stages of the model, each built by `build_model` (its layers kept, then every
other parallelism in the usual order), a schedule of torch.distributed.pipelining that runs a step's micro-batches
through the stages of all pipeline ranks, and `Stages`, one module with the whole model's names over this rank's
stages: the optimizer's groups (muP's, by name), checkpoints (DCP reshards them to any other pipeline, or none) and
the plan see one model whatever the split.

The loss is the trainer's (a sum over every token of the global batch divided by their count, times the
data-parallel scale), computed by the last stage for each micro-batch; the schedule's own gradient scaling is off.
A mixture's balancing loss trains where its layer runs (`MoE.balance_grad`), and each stage's statistics (balancing
loss, expert loads) are collected after every forward through it and summed over the pipeline with the loss.
Document positions reach every stage as the schedule's keyword arguments. Which layers each stage holds and which
rank holds which stages come from the config (`trainer.core.stages`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)

from trainer.core.config import PP_SCHEDULES, AnvilConfig
from trainer.core.stages import rank_stages, stage_layers
from trainer.train.model import MoE, Transformer, mixture_layers
from trainer.train.parallelize import Layout, build_model

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B,
             "looped-bfs": ScheduleLoopedBFS, "interleaved-zero-bubble": ScheduleInterleavedZeroBubble,
             "zbv-zero-bubble": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}
"""`parallel.pp_schedule` → torch's class."""


class Stages(nn.Module):
    """This rank's stages as one module named as the whole model is (`layers.{i}` keep their indices): what the
    optimizer, checkpoints and the log see. The stages themselves run only through the schedule."""

    def __init__(self, parts: list[Transformer]):
        super().__init__()
        self.tok_embeddings = next((p.tok_embeddings for p in parts if p.tok_embeddings is not None), None)
        self.layers = nn.ModuleDict({name: layer for part in parts for name, layer in part.layers.items()})
        self.norm = next((p.norm for p in parts if p.norm is not None), None)
        self.output = next((p.output for p in parts if p.output is not None), None)
        object.__setattr__(self, "parts", parts)  # not submodules: their parameters are named above

    def mixtures(self) -> list[MoE]:
        return list(mixture_layers(self).values())


class Pipeline:
    """The schedule over this rank's stages, and one optimizer step's forward and backward through it."""

    def __init__(self, cfg: AnvilConfig, layout: Layout, parts: list[Transformer], stage_ids: list[int],
                 device: torch.device):
        group = layout.mesh["pp"].get_group()
        self.stages = [PipelineStage(part, sid, cfg.pp_stages, device, group=group)
                       for part, sid in zip(parts, stage_ids, strict=True)]
        schedule = SCHEDULES[cfg.parallel.pp_schedule]
        single = PP_SCHEDULES[cfg.parallel.pp_schedule] == "single"
        self.schedule = schedule(self.stages[0] if single else self.stages, n_microbatches=cfg.accumulation,
                                 loss_fn=self._loss, scale_grads=False)
        self.first, self.last = 0 in stage_ids, cfg.pp_stages - 1 in stage_ids
        self.scale = layout.dp_size
        self.global_tokens = 1
        self.group, self.micro_batches = group, cfg.accumulation
        self.layers, self.experts = (cfg.model.n_layers, cfg.model.moe.experts) if cfg.model.moe.experts else (0, 0)
        self.batch_size = cfg.train.global_batch_size
        self.seen: list[list[tuple[torch.Tensor, dict[int, torch.Tensor]]]] = [[] for _ in parts]
        """Per stage, each forward's balancing loss (summed over its layers) and loads by layer, in order."""
        for i, part in enumerate(parts if self.layers else []):
            part.register_forward_hook(lambda module, args, out, i=i: self._collect(i, module))

    def receive_buffers(self) -> list[torch.Tensor]:
        """What this rank's stages keep to receive every micro-batch's activations and gradients into (after the
        first step, which makes them; torch's own fields: the planner's real measurement counts them)."""
        return [info.buffer for stage in self.stages
                for infos in (*stage.args_recv_info.values(), *stage.grad_recv_info.values())
                for info in infos if isinstance(getattr(info, "buffer", None), torch.Tensor)]

    def _collect(self, stage: int, part: Transformer) -> None:
        """After a forward through a stage, its layers' statistics of that micro-batch (an activation-checkpointing
        recompute runs the layers again in backward, not the stage: it adds nothing)."""
        layers = mixture_layers(part)
        self.seen[stage].append((sum(m.balance.detach() for m in layers.values()),
                                 {index: m.load for index, m in layers.items()}))

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch's share of the step's mean loss, times the data-parallel scale (as `step.micro_step`)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               reduction="sum") / self.global_tokens * self.scale

    def step(self, micro_batches: list[dict[str, torch.Tensor]], global_tokens: int,
             autocast: contextlib.AbstractContextManager
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Forward and backward of the step's micro-batches (already on the device) through every stage. Returns,
        summed over the pipeline's ranks (one all-reduce): this data-parallel rank's part of the step's mean loss,
        with experts its balancing loss (as `micro_step`'s, summed over the micro-batches) and the loads of every
        MoE layer of the model (`[layers, experts]`, as the window logs them), else None."""
        self.global_tokens = global_tokens
        device = micro_batches[0]["input_ids"].device
        tokens = torch.cat([mb["input_ids"] for mb in micro_batches])
        labels = torch.cat([mb["labels"] for mb in micro_batches])
        kwargs = ({"positions": torch.cat([mb["positions"] for mb in micro_batches])}
                  if "positions" in micro_batches[0] else {})
        losses: list[torch.Tensor] = []
        for seen in self.seen:
            seen.clear()
        with autocast:
            # return_outputs=False: the last stage would keep every micro-batch's logits to hand them back
            self.schedule.step(*((tokens,) if self.first else ()), target=labels if self.last else None,
                               losses=losses, return_outputs=False, **kwargs)
        loss = torch.stack([loss.detach().float() for loss in losses]).sum() / self.scale if losses else \
            torch.zeros((), device=device)
        load = torch.zeros(self.layers, self.experts, device=device, dtype=torch.float64)
        balance = torch.zeros((), device=device)
        for seen in self.seen:  # the first step's forward that infers the stages' shapes came first: not counted
            for micro_balance, loads in seen[-self.micro_batches:]:
                balance += micro_balance / (self.layers * self.batch_size)
                for index, layer in loads.items():
                    load[index] += layer
        total = torch.cat([torch.stack([loss, balance]).double(), load.flatten()])
        dist.all_reduce(total, group=self.group)
        return (total[0].float(), total[1].float(),
                total[2:].view(self.layers, self.experts).long() if self.layers else None)


@dataclass
class _StageShape:
    """What a schedule reads of a stage to lay out every rank's computations: no module, no process group."""

    stage_index: int
    num_stages: int
    group_size: int
    group_rank: int
    submod: nn.Module = field(default_factory=nn.Module)

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1


def schedule_order(cfg: AnvilConfig, pp_rank: int) -> list[tuple[str, int, int]]:
    """The computations pipeline rank `pp_rank` runs in one step, in the order its schedule runs them:
    `(kind, stage, micro-batch)`, kind `F` (forward), `B` (backward), `I` / `W` (a zero-bubble schedule's backward
    for the input, then for the weights); overlapped pairs in turn. GPipe and 1F1B as their loops run (all forwards
    first; or `pp − rank` of them, then a backward and a forward in turn); the others run the order torch lays out
    for every rank from the stages' places alone, which these stand-ins carry."""
    micro, schedule = cfg.accumulation, cfg.parallel.pp_schedule
    if PP_SCHEDULES[schedule] == "single":
        warm = micro if schedule == "gpipe" else min(micro, cfg.parallel.pp - pp_rank)
        order = [("F", pp_rank, i) for i in range(warm)]
        for i in range(micro):
            order += [("B", pp_rank, i)] + ([("F", pp_rank, warm + i)] if warm + i < micro else [])
        return order
    stages = [_StageShape(i, cfg.pp_stages, cfg.parallel.pp, pp_rank) for i in rank_stages(cfg, pp_rank)]
    schedule = SCHEDULES[schedule](stages, n_microbatches=micro, loss_fn=lambda out, target: out, scale_grads=False)
    order = []
    for action in schedule.pipeline_order[pp_rank]:
        for part in (action.sub_actions or (action,)) if action is not None else ():
            if part.computation_type.value in ("F", "B", "I", "W"):
                order.append((part.computation_type.value, part.stage_index, part.microbatch_index))
    return order


def build_pipeline(cfg: AnvilConfig, layout: Layout, device: torch.device, param_dtype: torch.dtype,
                   say: Callable[[str], None]) -> tuple[Stages, Pipeline]:
    """This rank's stages, each built and initialised as its part of the one seeded model, and their schedule."""
    layers, ids = stage_layers(cfg), rank_stages(cfg, layout.pp_rank)
    parts = [build_model(cfg.model, cfg.parallel, layout, device, param_dtype, seq_len=cfg.data.seq_len,
                         seed=cfg.train.seed, use_liger=cfg.train.liger, say=say,
                         stage=(layers[i], i == 0, i == cfg.pp_stages - 1)) for i in ids]
    return Stages(parts), Pipeline(cfg, layout, parts, ids, device)
