"""Expert parallelism: each MoE layer's experts split over the `ep` ranks of the mesh, tokens sent to their experts'
ranks and their outputs sent back with two all-to-alls of variable sizes.

Applied by `build_model` after TP and before activation checkpointing, compile and FSDP. The EP ranks are data-parallel
ranks (the mesh splits `dp_shard` into `dp_shard_mod_ep × ep`): each routes its own tokens, each holds
`experts / ep` experts, and FSDP then shards what it holds over the other data-parallel ranks. The model stays plain:
only the experts' forward is replaced (dispatch, the local experts' compute, combine), as Liger replaces kernels.

Gradients: an expert's weights gather, through the all-to-all's backward, the contributions of every token routed to
them from the whole EP group; FSDP then averages over the `dp_size / ep` ranks that hold the same experts, while every
loss is scaled for an average over all `dp_size` ranks, so the experts' weights scale their gradient by `1 / ep`.
A rank whose experts receive no tokens still takes part in both all-to-alls (with empty parts). The planner traces
an even split (its fake tensors hold no routing).
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn import Parameter

from trainer.train.model import GroupedExperts, Transformer


class _ScaleGrad(torch.autograd.Function):
    """The identity forward; the gradient times `factor` backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def apply_ep(model: Transformer, ep_mesh: DeviceMesh) -> None:
    """Every MoE layer's experts split over `ep_mesh` (dimension 0 of the stacked weights: whole experts per rank),
    and their forward made the dispatch → local experts → combine of `expert_parallel_forward`."""
    for moe in model.mixtures():
        experts = moe.grouped
        for name in ("w1", "w2", "w3"):
            param = getattr(experts, name)
            setattr(experts, name, Parameter(distribute_tensor(param.data, ep_mesh, [Shard(0)]),
                                             requires_grad=param.requires_grad))
        experts.ep_group = ep_mesh.get_group()
        experts.sent = torch.zeros(ep_mesh.size(), dtype=torch.long)
        experts.forward = types.MethodType(expert_parallel_forward, experts)


def expert_parallel_forward(self: GroupedExperts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`x`: this rank's token rows sorted by (global) expert, `counts[e]` for expert e; returns each row's output, in
    the same order. Leaves `sent` (rows this rank sent to each EP rank, itself included) for the tests."""
    group = self.ep_group
    ep = dist.get_world_size(group)
    local = counts.shape[0] // ep
    # How many rows each rank sends each of my experts: one all-to-all of the per-expert counts, then to the host
    # (the all-to-all of rows needs its split sizes there: one sync per MoE layer, as in every EP implementation).
    if self.even_split:  # the planner's fake tensors hold no counts: every rank sends each rank an equal share
        total = x.shape[0]
        send = [total // ep + (r < total % ep) for r in range(ep)]
        mine = send[dist.get_rank(group)]
        recv = [mine] * ep
        received = torch.full((ep, local), mine // local, dtype=counts.dtype, device=counts.device)
        received[:, : mine % local] += 1
        order = torch.arange(sum(recv), device=x.device)  # the rows' order costs the same memory whatever it is
    else:
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=group)
        received = received.view(ep, local)  # [source rank, my expert]
        send, recv = torch.stack([counts.view(ep, local).sum(1), received.sum(1)]).tolist()
        expert_of = torch.repeat_interleave(torch.arange(local, device=x.device).repeat(ep), received.flatten())
        order = expert_of.argsort(stable=True)  # the received rows by (my expert, source)
    self.sent = torch.tensor(send)
    rows = all_to_all_single_autograd(x.contiguous(), recv, send, group)  # ordered by (source, my expert)
    weights = [_ScaleGrad.apply(w.to_local() if isinstance(w, DTensor) else w, 1 / ep)
               for w in (self.w1, self.w2, self.w3)]
    out = self.compute(rows[order], received.sum(0), *weights)
    back = torch.empty_like(out).index_copy(0, order, out)  # by (source, my expert) again
    return all_to_all_single_autograd(back, send, recv, group)
