"""One micro-batch's forward and backward, and when FSDP reduces gradients: the part of a training step the Trainer
runs for every micro-batch and the planner (trainer/plan) runs under fake tensors to measure its memory.

Gradients are reduce-scattered after every micro-batch, so each rank only ever holds its shard of them (FSDP's
`set_requires_gradient_sync(False)` would keep the whole model's unsharded fp32 gradients between micro-batches:
4 bytes per parameter on every rank, more than an 8B model's shard and its optimizer together). With HSDP, only the
all-reduce across replicas waits for the last micro-batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.core.config import ModelConfig
from trainer.train.model import Transformer
from trainer.train.parallelize import Layout


def autocast_for(layout: Layout, device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Without FSDP, bf16 comes from autocast; with it, from FSDP's mixed-precision policy."""
    if dtype != torch.float32 and not layout.fsdp:
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def sync_gradients(model: Transformer, layout: Layout, last: bool) -> None:
    """Before micro-batch backward passes: reduce-scatter every time; all-reduce across replicas on the last only."""
    if layout.fsdp and layout.replicate > 1:
        model.set_requires_all_reduce(last)


@dataclass
class MicroResult:
    loss: torch.Tensor
    """This micro-batch's share of the step's mean loss (detached)."""
    balance: torch.Tensor | None
    """Its balancing loss (detached), with experts."""
    load: torch.Tensor | None
    """Token-expert assignments per layer and expert, with experts."""


def train_balance(model: nn.Module, cfg: ModelConfig, scale: float, batch_size: int) -> None:
    """Every MoE layer of `model` (the whole model, or a pipeline rank's stages) sends its balancing loss's gradient
    back through its output: the objective's `balance_coef` × the mean over the global batch's sequences and the
    model's MoE layers of the sequence-wise balancing loss, times the loss's `scale` (as `micro_step`'s)."""
    for moe in model.mixtures():
        moe.balance_grad = cfg.moe.balance_coef * scale / (cfg.n_layers * batch_size)


def micro_step(model: Transformer, micro: dict[str, torch.Tensor], global_tokens: int, scale: float,
               autocast: contextlib.AbstractContextManager, batch_size: int) -> MicroResult:
    """Forward and backward of one micro-batch. The loss is a sum over every token of the global batch divided by
    their count (`global_tokens`): exact under gradient accumulation, uneven padding and any number of data-parallel
    ranks. `scale` multiplies what is differentiated (FSDP averages over data-parallel ranks; the gradients are to be
    summed, and gloo cannot reduce with a custom divide factor, so the scale goes on the loss). With experts, the
    balancing loss's gradient comes from the layers themselves (`train_balance`); its value is returned for the log."""
    tokens, labels, positions = micro["input_ids"], micro["labels"], micro.get("positions")
    with autocast:
        if model.fused_loss is not None:
            loss = model(tokens, positions, labels) / global_tokens
        else:
            logits = model(tokens, positions)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                   reduction="sum") / global_tokens
            del logits
    balance, load = None, None
    mixtures = model.mixtures()
    if mixtures:  # the balancing loss: its per-sequence values averaged over the global batch and layers
        balance = sum(m.balance.detach() for m in mixtures) / (len(mixtures) * batch_size)
        load = torch.stack([m.load for m in mixtures])
    (loss * scale).backward()
    return MicroResult(loss.detach(), balance, load)
