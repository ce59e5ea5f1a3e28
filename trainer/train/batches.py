"""The batches of each training step: the loader's batch for a step split into micro-batches, a skipped step's data
drawn and thrown away, and the end of a finite dataset agreed by every rank."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist


class StepBatches:
    """One loader batch is this rank's rows of a whole step, split into micro-batches here: the loader keeps the rows
    of a batch independent (no document in two rows), so that holds for the step, not only for each micro-batch."""

    def __init__(self, loader, micro_batch_size: int, accum: int, device: torch.device, finite: bool):
        self.loader, self.rows, self.accum, self.device, self.finite = loader, micro_batch_size, accum, device, finite
        self.batches: Iterator | None = None

    def open(self) -> None:
        """Start iterating the loader from its current state (at the start, and again after a rollback)."""
        self.batches = iter(self.loader)

    def close(self) -> None:
        """End the loader's iteration now (its threads and worker processes), not when the interpreter exits."""
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()
        self.batches = None

    def next_step(self, step: int, skip: set[int], say: Callable[[str], None]) -> list[dict] | None:
        """Step `step`'s micro-batches, or None when the data ended (on every rank alike). The data of a skipped
        step (train.skip_steps, a rollback's) is drawn first and thrown away."""
        if step in skip:
            say(f"step {step}: its data is skipped (train.skip_steps or a rollback); it trains on the next batch")
            if self._next() is None:
                return None
        return self._next()

    def _next(self) -> list[dict] | None:
        batch = next(self.batches, None)
        whole = batch is not None and batch["input_ids"].shape[0] == self.rows * self.accum
        found = [dict(zip(batch, parts, strict=True))
                 for parts in zip(*(v.split(self.rows) for v in batch.values()), strict=True)] if whole else []
        if not self.finite:  # only a finite run can end early; an endless one asks no peer (and never syncs a GPU)
            return found if whole else None
        exhausted = torch.tensor([0.0 if whole else 1.0], device=self.device)
        dist.all_reduce(exhausted, op=dist.ReduceOp.MAX)  # all ranks must agree
        return None if exhausted.item() else found
