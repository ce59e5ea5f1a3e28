"""Training faults: a non-finite loss or gradient norm, or a loss spike, rolls the run back to its newest whole
checkpoint and skips the data of the step that caused it — at most `train.rollback.max` times per job.

A spike is a loss more than `spike_sigma` standard deviations above the mean of the last `spike_window` steps *and*
more than `spike_rise` (a fraction) above that mean. The defaults (6σ and +10 % over 50 steps) leave the ordinary
step-to-step noise of pretraining (a few per cent of the loss) and the fast early descent (a wide window) alone, and
catch the jumps that precede divergence (PaLM and OLMo report spikes of tens of per cent). The window is part of the
checkpoint, so a resumed run judges its steps as the uninterrupted run would have.

Which data is skipped: the batch of the step whose loss or gradient was bad — the replayed steps before it
reproduce the same state exactly, so only that batch is drawn again and thrown away. Every other document is still
seen exactly once. The decisions are recorded as `rollback` events in events.jsonl (with the skipped step), so a
later attempt, or a resume from an older checkpoint, skips the same data.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from trainer.core.config import RollbackConfig
from trainer.core.errors import AnvilError
from trainer.core.jobdir import JobDir, read_events

ROLLBACK_EVENT = "rollback"


class DivergedError(AnvilError):
    """The loss stayed non-finite or spiking after the allowed rollbacks (or there is no checkpoint to go back to)."""


class StepRejected(Exception):
    """A step whose loss or gradient norm is bad: nothing of it was applied; the loop rolls back."""

    def __init__(self, step: int, problem: str):
        super().__init__(f"step {step}: {problem}")
        self.step, self.problem = step, problem


class StepGuard:
    def __init__(self, cfg: RollbackConfig, skip: set[int], job: JobDir):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=max(cfg.spike_window, 1))
        records = [e for e in read_events(job) if e["event"] == ROLLBACK_EVENT and isinstance(e.get("skip"), int)]
        self.rollbacks = len(records)
        self.skip = set(skip) | {e["skip"] for e in records}

    def problem(self, step: int, loss: float, grad_norm: float) -> str | None:
        """What is wrong with step `step`'s global loss and gradient norm, or None."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"loss {loss:g}, gradient norm {grad_norm:g}"
        window = self.cfg.spike_window
        if window and len(self.history) == window:
            mean, std = statistics.fmean(self.history), statistics.pstdev(self.history)
            if loss > mean + self.cfg.spike_sigma * std and loss > mean * (1 + self.cfg.spike_rise):
                sigmas = (loss - mean) / std if std > 0 else math.inf
                return (f"loss spike: {loss:.4f} is {sigmas:.1f} standard deviations and {loss / mean - 1:.0%} above "
                        f"the mean {mean:.4f} of the last {window} steps")
        return None

    def passed(self, loss: float) -> None:
        self.history.append(loss)

    def check_budget(self, step: int, problem: str, newest: int | None) -> None:
        """Raise DivergedError when no rollback is left (or nothing to roll back to); else count this one."""
        advice = "Lower optim.lr, raise optim.warmup_steps or set optim.grad_clip, and resubmit"
        if newest is None:
            raise DivergedError(f"step {step}: {problem}. Nothing was saved from this state, and there is no "
                                f"checkpoint to roll back to. {advice}")
        if self.rollbacks >= self.cfg.max:
            raise DivergedError(f"step {step}: {problem}, after {self.rollbacks} rollback(s) (train.rollback.max = "
                                f"{self.cfg.max}). Nothing was saved from this state; the newest whole checkpoint is "
                                f"step-{newest}. {advice} (or raise train.rollback.max)")
        self.rollbacks += 1
        self.skip.add(step)

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state.get("history", []))
