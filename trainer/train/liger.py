"""Liger's Triton kernels for the model's RMSNorm, SwiGLU and RoPE, and its fused linear cross-entropy (GPU only).

Applied to module instances by `build_model` before any parallelism wraps them (so compile sees the kernels); the
model stays plain PyTorch and parameter names (and therefore checkpoints) do not change. Not combined with tensor
parallelism: the kernels take plain tensors, and TP hands them DTensors. Verified on CPU only as far as the switch
and its message go; the kernels themselves need a GPU (see README, "What was verified where").
"""

from __future__ import annotations

import types

import torch

from trainer.train.gpu import GpuPaths
from trainer.train.model import Attention, FeedForward, RMSNorm, Transformer, apply_rope


def liger_problem(device: torch.device, tp: int) -> str | None:
    """Why Liger cannot be used here, or None."""
    if not GpuPaths.of(device).liger:
        return "Liger's Triton kernels need a GPU; this CPU job uses the plain PyTorch path"
    if tp > 1:
        return ("Liger's kernels take plain tensors, not tensor-parallel DTensors; "
                "using the plain path with parallel.tp > 1")
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed (pip install liger-kernel); using the plain path"
    return None


def apply_liger(model: Transformer) -> None:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    def rms_norm(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        return LigerRMSNormFunction.apply(x, self.weight, self.eps, 0.0, "llama", False)

    def swiglu(self: FeedForward, x: torch.Tensor) -> torch.Tensor:
        return self.w2(LigerSiLUMulFunction.apply(self.w1(x), self.w3(x)))

    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        if cos.dim() == 2:  # one table for the whole batch: the fused kernel
            return liger_rotary_pos_emb(q, k, cos.unsqueeze(0).to(q.dtype), sin.unsqueeze(0).to(q.dtype))
        return apply_rope(q, k, cos, sin)  # per-document positions

    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.forward = types.MethodType(rms_norm, module)
        elif isinstance(module, FeedForward):
            module.forward = types.MethodType(swiglu, module)
        elif isinstance(module, Attention):
            module.rope = rope


def fused_linear_cross_entropy():
    """Loss straight from hidden states and the head's weight: the full logits are never materialised."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")
