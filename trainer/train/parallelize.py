"""Parallelisms applied to the plain model, in torchtitan's fixed order: the pipeline stage's layers kept → kernels
(the device's: Liger, the experts' matmul) → TP/SP → EP → activation checkpointing → per-block compile → FSDP2 / HSDP;
then materialise and initialise. Nothing changes the model after `build_model`.

One 5-D DeviceMesh `(pp, dp_replicate, dp_shard_mod_ep, ep, tp)` describes every layout, with `dp_shard` the
flattened `dp_shard_mod_ep × ep` (expert parallelism splits the FSDP ranks: experts over `ep`, their shards over the
rest); TP ranks of one data-parallel group, and the pipeline ranks of one, read the same batches. Initialisation
fills each parameter from its full, seeded value (see `model.initial_value`), so every layout starts from the same
model, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from trainer.core.config import AnvilConfig, ModelConfig, ParallelConfig
from trainer.core.errors import AnvilError
from trainer.train import liger
from trainer.train.expert_parallel import apply_ep
from trainer.train.gpu import GpuPaths
from trainer.train.model import GroupedExperts, MoE, Transformer, grouped_mm_runs

MESH_DIMS = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "tp")


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: its mesh, and its place among the data-parallel ranks."""

    mesh: DeviceMesh
    dp_rank: int
    dp_size: int
    tp_rank: int
    tp: int
    replicate: int = 1
    """HSDP's replicas (`parallel.dp_replicate`)."""
    ep: int = 1
    pp: int = 1
    pp_rank: int = 0

    @property
    def fsdp(self) -> bool:
        return self.dp_size > 1

    def dp_groups(self) -> list:
        """Process groups to sum over for a data-parallel reduction (the dimensions larger than one)."""
        sizes = {"dp_replicate": self.replicate, "dp_shard": self.dp_size // self.replicate}
        return [self.mesh[d].get_group() for d, size in sizes.items() if size > 1]

    def fsdp_mesh(self, experts: bool = False) -> DeviceMesh:
        """What FSDP shards over: every data-parallel rank (HSDP: replicas × shards); for experts under expert
        parallelism, the ranks that hold the same experts."""
        shard = "dp_shard_mod_ep" if experts else "dp_shard"
        return self.mesh["dp_replicate", shard] if self.replicate > 1 else self.mesh[shard]

    def describe(self) -> str:
        sizes = {"pp": self.pp, "dp_replicate": self.replicate, "dp_shard": self.dp_size // self.replicate,
                 "ep": self.ep, "tp": self.tp}
        return f"mesh {'×'.join(sizes)} = {'×'.join(map(str, sizes.values()))}"


def build_layout(cfg: AnvilConfig, device_type: str) -> Layout:
    p = cfg.parallel
    shape = (p.pp, p.dp_replicate, cfg.dp_shard // p.ep, p.ep, p.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
    pp_rank, replicate, shard, tp_rank = (mesh.get_local_rank(d) for d in ("pp", "dp_replicate", "dp_shard", "tp"))
    return Layout(mesh, dp_rank=replicate * cfg.dp_shard + shard, dp_size=p.dp_replicate * cfg.dp_shard,
                  tp_rank=tp_rank, tp=p.tp, replicate=p.dp_replicate, ep=p.ep, pp=p.pp, pp_rank=pp_rank)


def apply_tp(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP with sequence parallelism: activations between blocks are sharded on the sequence."""
    plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    # A pipeline stage holds what it holds; between stages, the sequence-sharded hidden states travel as they are.
    model.sequence_shards = tp_mesh.size()
    parallelize_module(model, tp_mesh, {name: style for name, style in plan.items()
                                        if getattr(model, name) is not None})
    for block in model.layers.values():
        if block.attention.q_norm is not None:
            # Each rank holds whole heads (dimension 2 of [batch, seq, heads, head size]); the shared gains are
            # replicated, and their gradients summed over the TP ranks by DTensor.
            parallelize_module(block, tp_mesh, {
                "attention.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
                "attention.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
            })
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
        })
        if isinstance(block.feed_forward, MoE):
            # No expert parallelism: each TP rank routes the whole (gathered) sequence through all experts, whose
            # weights are not split over TP (FSDP still shards them over the data-parallel ranks); identical
            # inputs make identical gradients, so nothing is summed over TP. The output keeps this rank's part.
            parallelize_module(block, tp_mesh, {"feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)})
            parallelize_module(block, tp_mesh, {"feed_forward": PrepareModuleOutput(
                output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True)})
        else:
            parallelize_module(block, tp_mesh, {
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            })


_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.higher_order.flex_attention,  # document masks on a GPU
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the expensive outputs (matmuls, attention); recompute the cheap elementwise ones."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    for name, block in list(model.layers.items()):
        if mode == "full":
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
        elif mode == "selective":
            context = partial(create_selective_checkpoint_contexts, _selective_policy)
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=context)


def apply_compile(model: Transformer) -> None:
    """Each block on its own: one graph reused by every layer keeps compile time low."""
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, fullgraph=True)


def apply_fsdp(model: Transformer, layout: Layout, param_dtype: torch.dtype) -> None:
    """FSDP2 per block, then the root (embeddings, final norm, head); HSDP when dp_replicate > 1. Under expert
    parallelism each layer's experts first, over the ranks that hold the same experts."""
    mesh = layout.fsdp_mesh()
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if layout.ep > 1:
        for moe in model.mixtures():
            fully_shard(moe.grouped, mesh=layout.fsdp_mesh(experts=True), mp_policy=policy)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def place_full_value(param: nn.Parameter, full: torch.Tensor) -> None:
    """Copy a full (unsharded) value into this rank's part of `param`: slicing only, no communication."""
    if isinstance(param, DTensor):
        replicated = DTensor.from_local(full, param.device_mesh, [Replicate()] * param.device_mesh.ndim,
                                        run_check=False)
        param.to_local().copy_(replicated.redistribute(param.device_mesh, param.placements).to_local())
    else:
        param.copy_(full)


def apply_kernels(model: Transformer, parallel: ParallelConfig, tp: int, device: torch.device,
                  param_dtype: torch.dtype, use_liger: bool, say: Callable[[str], None],
                  planning: bool = False) -> None:
    """The device's kernels, on the plain model before anything wraps it (so compile sees them): FlexAttention for
    document masks on a GPU; the experts' loop where the device has no bf16 grouped matmul; Liger's where asked for
    and possible (else said why not). With
    `planning` (fake tensors, trainer/plan), the experts' loop splits their rows evenly."""
    model.flex_attention = GpuPaths.of(device).flex_attention
    if planning:
        for module in model.modules():
            if isinstance(module, GroupedExperts):
                module.even_split = True
    if model.mixtures() and param_dtype == torch.bfloat16 and not grouped_mm_runs(device):
        if parallel.compile:
            raise AnvilError(f"parallel.compile: experts compile as one grouped matmul, which torch "
                             f"{torch.__version__} cannot run in bf16 on this {device.type} device; set "
                             "parallel.compile=false (the experts then run one after another)")
        say("model.moe: no bf16 grouped matmul on this device; the experts run one after another")
        for module in model.modules():
            if isinstance(module, GroupedExperts):
                module.grouped_mm = False
    if use_liger:
        problem = liger.liger_problem(device, tp)
        if problem:
            say(f"train.liger: {problem}")
        else:
            liger.apply_liger(model)
            model.fused_loss = liger.fused_linear_cross_entropy()
            say("Liger kernels on: RMSNorm, SwiGLU, RoPE, fused linear cross-entropy")


def build_model(model_cfg: ModelConfig, parallel: ParallelConfig, layout: Layout, device: torch.device,
                param_dtype: torch.dtype, *, seq_len: int, seed: int, use_liger: bool = False,
                say: Callable[[str], None] = lambda _: None, stage: tuple[range, bool, bool] | None = None
                ) -> Transformer:
    """Meta model → kernels → parallelisms in order → memory on `device` → the weights seeded by `seed`. `say`
    hears what the kernels step decided; `stage`: one pipeline stage's layers, and whether it is the first and the
    last (`Transformer.keep_stage`)."""
    model = parallelized(model_cfg, parallel, layout, device, param_dtype, seq_len=seq_len, use_liger=use_liger,
                         say=say, stage=stage)
    materialise(model, layout, device, seed)
    return model


def parallelized(model_cfg: ModelConfig, parallel: ParallelConfig, layout: Layout, device: torch.device,
                 param_dtype: torch.dtype, *, seq_len: int, use_liger: bool = False,
                 say: Callable[[str], None] = lambda _: None, planning: bool = False,
                 stage: tuple[range, bool, bool] | None = None) -> Transformer:
    """The first half of `build_model`: the model on the meta device with every parallelism applied, no memory yet.
    `planning`: for the planner, which materialises it under fake tensors."""
    with torch.device("meta"):
        model = Transformer(model_cfg, seq_len)
    if stage is not None:
        model.keep_stage(*stage)
    apply_kernels(model, parallel, layout.tp, device, param_dtype, use_liger, say, planning)
    if layout.tp > 1:
        apply_tp(model, layout.mesh["tp"])
    if layout.ep > 1:
        apply_ep(model, layout.mesh["ep"])
    if parallel.activation_checkpoint != "none":
        apply_activation_checkpointing(model, parallel.activation_checkpoint)
    if parallel.compile:
        apply_compile(model)
    if layout.fsdp:
        apply_fsdp(model, layout, param_dtype)
    return model


def materialise(model: Transformer, layout: Layout, device: torch.device, seed: int, fake: bool = False) -> None:
    """The second half: memory on `device` (`fake`: under the planner's fake tensors), then the seeded weights."""
    if fake and not layout.fsdp:
        _fake_materialise(model, device)
    else:
        model.to_empty(device=device)
    model.init_weights(seed, place=place_full_value)


def _fake_materialise(model: nn.Module, device: torch.device) -> None:
    """`to_empty` for a model without FSDP under fake tensors, where `to_empty` cannot swap a meta parameter for a
    fake one (the fake mode holds a weak reference to it): each parameter and buffer replaced by a new empty one."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = nn.Parameter(torch.empty_like(param, device=device),
                                                        requires_grad=param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = torch.empty_like(buffer, device=device)
