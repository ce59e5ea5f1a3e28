"""Every path the trainer takes only on a GPU, decided in one place: `GpuPaths.of(device)`.

Each field is one switch that the code taking that path reads, and nothing else decides it; a CPU run takes none of
them. The README's "What was verified where" lists them by these names: which ran on a CPU (a test turns FlexAttention
on there, whose forward torch can run), which only on a GPU, which never yet.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class GpuPaths:
    nccl: bool
    """NCCL (RCCL on ROCm) process groups for training; gloo otherwise. Checkpoint writers keep a gloo group."""
    flex_attention: bool
    """Document masks as one compiled FlexAttention block mask per forward; an explicit mask otherwise."""
    liger: bool
    """Liger's Triton kernels may run (`train.liger` asks for them)."""
    fused_adamw: bool
    """AdamW's fused kernel."""
    pinned_batches: bool
    """Batches in pinned host memory, copied to the device without a sync."""
    async_save_default: bool
    """Checkpoints written in the background unless `checkpoint.async_save` says otherwise."""
    cuda_memory: bool
    """Peak memory from the CUDA allocator, and a CUDA memory snapshot with each profile; the resident set size
    otherwise."""

    @classmethod
    def of(cls, device: torch.device | str) -> GpuPaths:
        gpu = torch.device(device).type == "cuda"  # ROCm's torch calls its devices cuda too
        return cls(**{f.name: gpu for f in fields(cls)})

    @classmethod
    def of_cluster(cls, device: str) -> GpuPaths:
        """For a job's `cluster.device` ('cpu', 'cuda' or 'rocm'), before any device is set up."""
        return cls.of("cpu" if device == "cpu" else "cuda")
