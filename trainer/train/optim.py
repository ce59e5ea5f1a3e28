"""AdamW with one parameter group per muP multiplier pair, the learning-rate schedules, and gradient clipping.

Groups are built from `model.named_parameters()` after parallelization (FSDP2 turns parameters into
DTensors in place; names do not change) and `param_plan()`, so muP needs no tensor attributes.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.lr_scheduler import LambdaLR

from trainer.core.config import ModelConfig, OptimConfig
from trainer.train.model import param_plan, plain_name


def build_optimizer(model: nn.Module, model_cfg: ModelConfig, optim: OptimConfig, fused: bool = False
                    ) -> torch.optim.AdamW:
    plan = param_plan(model_cfg)
    groups: dict[tuple[float, float], list[nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        entry = plan.get(plain_name(name))
        if entry is None:
            raise KeyError(f"parameter {name} has no muP role in trainer.train.model.param_plan")
        groups[(entry.lr_mult, entry.wd_mult)].append(param)
    param_groups = [
        {"params": params, "lr": optim.lr * lr_mult, "weight_decay": optim.weight_decay * wd_mult, "lr_mult": lr_mult}
        for (lr_mult, wd_mult), params in sorted(groups.items(), key=lambda kv: kv[0])
    ]
    return torch.optim.AdamW(param_groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused or None)


def lr_factor(step: int, total: int, optim: OptimConfig) -> float:
    """Multiplier on each group's peak LR at `step` (0-based: the step about to be taken)."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    floor = optim.min_lr_ratio
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "cosine":
        span = max(total - optim.warmup_steps, 1)
        progress = min((step - optim.warmup_steps) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay = optim.decay_steps or max(int(0.2 * total), 1)
    start = total - decay
    if step < start:
        return 1.0
    progress = min((step - start) / decay, 1.0)
    shape = progress if optim.decay_shape == "linear" else math.sqrt(progress)
    return floor + (1 - floor) * (1 - shape)


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, optim: OptimConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, total, optim))


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float, pipeline: dist.ProcessGroup | None = None
                   ) -> torch.Tensor:
    """`clip_grad_norm_` for parameters that live on different device meshes (experts not split over TP next to
    TP-split weights, which one foreach norm refuses): each mesh's norm made whole, then combined; with `pipeline`,
    over the stages of every rank of that group too. Returns the total norm, a plain tensor."""
    groups: dict[object, list[nn.Parameter]] = defaultdict(list)
    for param in parameters:
        if param.grad is not None:
            groups[param.grad.device_mesh if isinstance(param.grad, DTensor) else None].append(param)
    norms = []
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if pipeline is not None:  # each rank holds some stages: the model's norm is over all of them
        squared = total.square()
        dist.all_reduce(squared, group=pipeline)
        total = squared.sqrt()
    for mesh, params in groups.items():
        whole = total if mesh is None else DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, whole, foreach=True)
    return total
