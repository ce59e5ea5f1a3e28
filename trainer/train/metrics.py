"""Where training metrics go (rank 0 only): `metrics.jsonl` in the job directory, one console line, and wandb.

The wandb run id is kept in the job directory, so every attempt of a requeued job continues one run.
On resume, `metrics.jsonl` is cut back to the restored step: the history reads as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from trainer.core.config import MetricsConfig, ModelConfig
from trainer.core.costs import num_params
from trainer.core.files import write_atomic
from trainer.core.jobdir import JobDir
from trainer.train.checkpoint import STORAGE_ERRNOS, StorageError, newest_whole
from trainer.train.distributed import log
from trainer.train.gpu import GpuPaths
from trainer.train.model import Transformer, param_plan


def memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: device memory on GPU, resident set size on CPU."""
    if GpuPaths.of(device).cuda_memory:
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # this process's own peak; ru_maxrss can carry the peak of the process that forked it
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's peak (None without a peak)."""
    if not peak_tflops:
        return None
    return tokens_per_s_per_device * flops_per_token / (peak_tflops * 1e12)


class StepWindow:
    """What the next log line averages over: the steps since the last one (their tokens, data wait, loss, the MoE
    balancing loss and each expert's token count). Emptied by the row it gives, and by a rollback."""

    def __init__(self, device: torch.device, tp: int, flops_per_token: float, peak_tflops: float | None,
                 experts: tuple[int, int], reduce_dp: Callable[[torch.Tensor], torch.Tensor], ep: int = 1):
        self.device, self.tp, self.flops, self.peak, self.ep = device, tp, flops_per_token, peak_tflops, ep
        self.reduce_dp = reduce_dp
        self.load = torch.zeros(experts, dtype=torch.long, device=device)
        """Token-expert assignments per MoE layer and expert (this rank's)."""
        self.reset()

    def reset(self) -> None:
        self.start, self.tokens, self.data_wait, self.loss, self.steps = time.perf_counter(), 0, 0.0, 0.0, 0
        self.balance = torch.zeros((), device=self.device)
        self.load.zero_()

    def add(self, out: dict) -> None:
        """One step's results (`Trainer.train_step`'s)."""
        self.tokens += out["tokens"]
        self.loss += out["loss"]
        self.balance += out["balance"]
        if out["expert_load"] is not None:
            self.load += out["expert_load"]
        self.steps += 1

    def row(self, step: int, out: dict, tokens_seen: int, monitors: dict) -> dict[str, Any]:
        """The log row of `step` over the window, which starts again. Collective over the data-parallel ranks."""
        elapsed = time.perf_counter() - self.start
        per_device = self.tokens / elapsed / torch.distributed.get_world_size() * self.tp
        row = {"step": step, "loss": self.loss / self.steps, "grad_norm": out["grad_norm"], "lr": out["lr"],
               "tokens_seen": tokens_seen, "tokens_per_s": self.tokens / elapsed,
               "tokens_per_s_per_device": per_device, "mfu": mfu(per_device / self.tp, self.flops, self.peak),
               "memory_gib": memory_gib(self.device), "data_wait": self.data_wait / elapsed,
               "step_time_s": elapsed / self.steps, **monitors, **self._experts()}
        self.reset()
        return row

    def _experts(self) -> dict[str, float]:
        """Per MoE layer, the smallest and largest share of the token-expert assignments an expert got (1/experts
        each when balanced), under expert parallelism the same for the EP ranks (each computes its experts' share:
        1/ep when balanced), and the balancing loss (1 when balanced); nothing for a dense model."""
        if not len(self.load):
            return {}
        load = self.reduce_dp(self.load.clone()).double()
        share = load / load.sum(dim=1, keepdim=True).clamp(min=1)
        row = {"moe/balance_loss": self.reduce_dp(self.balance.clone()).item() / self.steps}
        per_rank = share.view(share.shape[0], self.ep, -1).sum(-1).tolist()
        for i, (layer, ranks) in enumerate(zip(share.tolist(), per_rank, strict=True)):
            row[f"moe/layer{i}/load_min"], row[f"moe/layer{i}/load_max"] = min(layer), max(layer)
            if self.ep > 1:
                row[f"moe/layer{i}/ep_rank_min"], row[f"moe/layer{i}/ep_rank_max"] = min(ranks), max(ranks)
        return row


class MetricsLogger:
    def __init__(self, cfg: MetricsConfig, job: JobDir, *, steps: int, enabled: bool, name: str = "",
                 run_config: dict | None = None):
        """`steps`: the run's length (the console line's `step N/steps`); `name` and `run_config`: what the wandb
        run is called and records."""
        self.cfg, self.job, self.steps, self.enabled = cfg, job, steps, enabled
        self.name, self.run_config = name or job.path.name, run_config or {}
        self.path = job.metrics
        self.console = Console(highlight=False, soft_wrap=True)
        self.run = None

    def line(self, message: str) -> None:
        if self.enabled:
            log(0, message)

    def start(self, resumed_step: int) -> None:
        """Cut history back to the restored step and open (or continue) the wandb run."""
        if not self.enabled:
            return
        self.rewind(resumed_step)
        if self.cfg.wandb.enabled:
            self.run = self._wandb_run()

    def rewind(self, step: int) -> None:
        """Drop the rows after `step` (a resume or a rollback to it): the history reads as one run."""
        if not self.enabled or not self.path.exists():
            return
        kept = [row for row in self.path.read_text().splitlines()
                if row.strip() and json.loads(row).get("step", 0) <= step]
        with self._storage(self.path):
            write_atomic(self.path, "".join(f"{row}\n" for row in kept))

    @contextlib.contextmanager
    def _storage(self, path) -> Iterator[None]:
        """metrics.jsonl on a full or failing disk: the run stops with the disk's reason, as a failed save does."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in STORAGE_ERRNOS:
                raise
            raise StorageError(f"writing {path} failed: {os.strerror(exc.errno)} (errno {exc.errno}); "
                               f"{newest_whole(self.job.checkpoints)}. Free space or fix the file system, then "
                               "resubmit: the job resumes from there") from None

    def _append(self, row: dict[str, Any]) -> None:
        with self._storage(self.path), self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _wandb_run(self):
        import wandb  # imported only when enabled: it takes a second and spawns a service process

        id_file = self.job.wandb_id
        if not id_file.exists():
            write_atomic(id_file, uuid.uuid4().hex[:12] + "\n")  # wandb run ids: lowercase letters and digits
        w = self.cfg.wandb
        run = wandb.init(project=w.project, entity=w.entity, mode=w.mode, id=id_file.read_text().strip(),
                         resume="allow", name=self.name, dir=str(self.job.path), config=self.run_config)
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(row)
        self._wandb("log", row)
        parts = [f"step {row['step']}/{self.steps}", f"loss {row['loss']:.4f}",
                 f"grad {row['grad_norm']:.3f}", f"lr {row['lr']:.2e}", f"{row['tokens_per_s']:,.0f} tok/s"]
        if row.get("mfu") is not None:
            parts.append(f"mfu {100 * row['mfu']:.1f}%")
        parts += [f"mem {row['memory_gib']:.2f} GiB", f"data {100 * row['data_wait']:.0f}%"]
        self.line("  ".join(parts))

    def log_eval(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.log_event(step, values)
        self.line(f"step {step} eval  " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))

    def log_event(self, step: int, values: dict[str, Any]) -> None:
        """A row of other values at a step (an evaluation, a rollback), in metrics.jsonl and wandb."""
        if not self.enabled:
            return
        row = {"step": step, **values}
        self._append(row)
        self._wandb("log", row)

    def _wandb(self, call: str, *args: Any) -> None:
        """A call to the wandb run that can never stop training: wandb's service is a process of its own, which a
        scancel's TERM ends at once; from then on metrics go to metrics.jsonl only (the next attempt continues the
        wandb run)."""
        if self.run is None:
            return
        try:
            getattr(self.run, call)(*args)
        except Exception as exc:  # noqa: BLE001 - whatever the lost service raises
            self.run = None
            self.line(f"wandb stopped working ({type(exc).__name__}: {exc}); metrics go on to {self.path} only")

    def finish(self) -> None:
        self._wandb("finish")
        self.run = None

    def print_plan(self, model: ModelConfig) -> None:
        """The muP plan, one row per role: what each kind of parameter of the whole model gets (whatever part of it
        this rank holds: shapes from a model on the meta device)."""
        if not self.enabled:
            return
        with torch.device("meta"):
            shapes = {name: tuple(p.shape) for name, p in Transformer(model, 1).named_parameters()}
        table = Table(title="parameter plan (muP)" if model.mup.enabled else "parameter plan (SP)")
        for column in ("role", "tensors", "parameters", "init std", "lr mult", "wd mult"):
            table.add_column(column, justify="left" if column == "role" else "right")
        rows: dict[tuple, list[int]] = {}
        for name, entry in param_plan(model).items():
            key = (entry.role, entry.init_std, entry.lr_mult, entry.wd_mult)
            count = rows.setdefault(key, [0, 0])
            count[0] += 1
            count[1] += math.prod(shapes[name])
        for (role, std, lr, wd), (tensors, params) in rows.items():
            table.add_row(role, str(tensors), f"{params:,}", "ones" if std is None else f"{std:.4g}",
                          f"{lr:.4g}", f"{wd:.4g}")
        self.console.print(table)


def model_size(model: ModelConfig, flops_per_token: float) -> str:
    """The model's parameters (and active ones, with experts) and FLOPs per token, as the log's first line says."""
    moe = model.moe
    active = (f" ({num_params(model, active=True) / 1e6:.1f}M active: {moe.top_k} of {moe.experts} experts)"
              if moe.experts else "")
    return f"model {num_params(model) / 1e6:.1f}M parameters{active}, {flops_per_token / 1e9:.3f} GFLOP/token"
