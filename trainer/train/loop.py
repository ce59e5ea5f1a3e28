"""The training loop: what `python -m trainer.train jobs/<name>` (slurm.sh, on every rank) runs.

Reads only the job's `config.json`; builds the mesh, the loader and the parallelized model; resumes from
the newest complete checkpoint; trains; checkpoints every `checkpoint.interval` steps, on preemption
(then exits with `PREEMPTED_EXIT` so the batch shell requeues) and at the end.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from trainer.core import jobdir, states
from trainer.core.config import AnvilConfig
from trainer.core.errors import AnvilError
from trainer.core.jobdir import JobDir
from trainer.core.processes import node_name
from trainer.core.states import EXIT_REFUSED
from trainer.data.loader import build_loader
from trainer.train import checkpoint, liger
from trainer.train.distributed import init_distributed, log
from trainer.train.guard import ROLLBACK_EVENT, DivergedError, StepGuard, StepRejected
from trainer.train.heldout import EvalError, heldout_bits_per_byte, heldout_set
from trainer.train.metrics import MetricsLogger, memory_gib, mfu
from trainer.train.model import (
    GroupedExperts,
    flops_per_token,
    grouped_mm_runs,
    num_params,
    param_plan,
    plain_name,
)
from trainer.train.monitors import MupMonitor
from trainer.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from trainer.train.parallelize import Layout, build_layout, build_model
from trainer.train.preemption import PreemptionWatch
from trainer.train.profiling import StepProfiler
from trainer.train.watchdog import Watchdog, collective_failure, collective_timeout


class TrainingError(AnvilError):
    """A problem a person must fix (bad input): the trainer exits with EXIT_REFUSED, which a retry would meet again."""


def compute_dtype(cfg: AnvilConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


RESTORABLE = ("model", "optimizer", "scheduler", "data", "step")
"""The parts of a checkpoint (`checkpoint.init_restore` picks among them; a job's own resume takes all)."""


@dataclass
class LogWindow:
    """What the log line of the next logged step averages over: the steps since the last one."""

    start: float
    tokens: int = 0
    data_wait: float = 0.0
    loss: float = 0.0
    steps: int = 0
    balance: torch.Tensor | None = None

    @classmethod
    def fresh(cls, device: torch.device) -> LogWindow:
        return cls(time.perf_counter(), balance=torch.zeros((), device=device))


class Trainer:
    def __init__(self, cfg: AnvilConfig, job: JobDir, rank: int, layout: Layout, device: torch.device,
                 watchdog: Watchdog | None = None):
        self.cfg, self.job, self.rank, self.layout, self.device = cfg, job, rank, layout, device
        self.watchdog = watchdog
        self.guard = StepGuard(cfg.train.rollback, cfg.train.skipped(), job)
        self.ckpt_root = job.checkpoints
        self.metrics = MetricsLogger(cfg, job, enabled=rank == 0)
        t = cfg.train
        self.accum = t.global_batch_size // (t.micro_batch_size * layout.dp_size)
        self.dtype = compute_dtype(cfg)
        # One loader batch is this rank's rows of a whole step, split into micro-batches here: the loader keeps
        # the rows of a batch independent (no document in two rows), so that holds for the step, not only for
        # each micro-batch.
        self.loader = build_loader(cfg.data, cfg.data_seed, layout.dp_rank, layout.dp_size,
                                   t.micro_batch_size * self.accum, pin_memory=device.type == "cuda")
        self.model = build_model(cfg, layout, device, self.dtype)
        if self.model.mixtures() and self.dtype == torch.bfloat16 and not grouped_mm_runs(device):
            if cfg.parallel.compile:
                raise TrainingError(f"parallel.compile: experts compile as one grouped matmul, which torch "
                                    f"{torch.__version__} cannot run in bf16 on this {device.type} device; set "
                                    "parallel.compile=false (the experts then run one after another)")
            self.metrics.line("model.moe: no bf16 grouped matmul on this device; the experts run one after another")
            for module in self.model.modules():
                if isinstance(module, GroupedExperts):
                    module.grouped_mm = False
        if cfg.train.liger:
            problem = liger.liger_problem(device, layout.tp)
            if problem:
                self.metrics.line(f"train.liger: {problem}")
            else:
                liger.apply_liger(self.model)
                self.model.fused_loss = liger.fused_linear_cross_entropy()
                self.metrics.line("Liger kernels on: RMSNorm, SwiGLU, RoPE, fused linear cross-entropy")
        self.optimizer = build_optimizer(self.model, cfg.model, cfg.optim, fused=device.type == "cuda")
        self.scheduler = build_scheduler(self.optimizer, t.steps, cfg.optim)
        self.watch = PreemptionWatch(job, device)
        self.monitor = MupMonitor(self.model, cfg.model, layout.tp) if cfg.metrics.mup_monitors else None
        self.profiler = StepProfiler(cfg.metrics.profile_steps, job, rank, device, self.metrics.line)
        # Token-expert assignments per MoE layer and expert since the last log line (this rank's).
        self.expert_load = torch.zeros(len(self.model.mixtures()), cfg.model.moe.experts, dtype=torch.long,
                                       device=device)
        self.heldout = None
        if cfg.eval.every:
            try:
                self.heldout = heldout_set(cfg)
            except EvalError as exc:
                raise TrainingError(f"eval.every is set, but {exc}") from None
        self.step = 0
        self.tokens_seen = 0
        self.saved_step: int | None = None  # known to every rank alike (the marker file may lag on others)
        self.pending: checkpoint.PendingSave | None = None
        async_save = cfg.checkpoint.async_save if cfg.checkpoint.async_save is not None else device.type == "cuda"
        # The background writer gets a gloo group of its own: it must never share one with training collectives.
        self.async_group = dist.new_group(backend="gloo") if async_save else None
        # Without FSDP, bf16 comes from autocast; with it, from FSDP's mixed-precision policy.
        self.autocast = (torch.autocast(device.type, dtype=self.dtype)
                         if self.dtype != torch.float32 and not layout.fsdp else contextlib.nullcontext())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Tell the watchdog that a long phase (save, eval, restore) runs, and that it ended."""
        if self.watchdog is None:
            yield
            return
        before = self.watchdog.phase
        self.watchdog.progress(self.step, name)
        yield
        self.watchdog.progress(self.step, before)

    def evaluate(self) -> None:
        with self.phase("eval"), torch.no_grad(), self.autocast:
            bpb = heldout_bits_per_byte(self.model, self.heldout, self.cfg.data.seq_len, self.device)
        self.metrics.log_eval(self.step, {"heldout_bits_per_byte": bpb})

    # -- checkpoints ---------------------------------------------------------------------------------------

    def _train_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "scheduler": self.scheduler.state_dict(),
                "guard": self.guard.state_dict()}

    def save(self, wait: bool = False) -> None:
        """Checkpoint the current step; in the background when async saving is on, unless `wait`. Refused before
        anything is written when the file system has no room for it; a write that fails on the storage all the same
        removes the partial step. Either way: StorageError, and the newest whole checkpoint is untouched."""
        started = time.perf_counter()
        with self.phase("save"):
            self.finish_pending_save()
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            state = {"model": model_state, "optim": optim_state,
                     "train": json.dumps(self._train_state()).encode()}
            loader_states = {self.layout.dp_rank: self.loader.state_dict()} if self.layout.tp_rank == 0 else {}
            checkpoint.check_space(self.ckpt_root, self.step, state)
            with checkpoint.storage_errors(self.ckpt_root, self.step):
                self.pending = checkpoint.save(self.ckpt_root, self.step, state, loader_states,
                                               keep=self.cfg.checkpoint.keep, async_group=self.async_group)
            self.saved_step = self.step
            if self.pending is not None and wait:
                self.finish_pending_save()
        how = "saved" if self.pending is None else "staged (writing in the background)"
        self.metrics.line(f"checkpoint {jobdir.step_dir(self.ckpt_root, self.step).name} {how} in "
                          f"{time.perf_counter() - started:.2f} s")

    def finish_pending_save(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            with checkpoint.storage_errors(self.ckpt_root, pending.step):
                pending.finish()

    def _checkpoint_to_resume(self) -> int | None:
        """The newest complete step whose files are whole. Rank 0 checks, sets damaged newer steps aside (logged,
        and a `checkpoint_damaged` event) and tells every rank, so that all load the same step."""
        decision: list = [None]
        if self.rank == 0:
            for path in jobdir.interrupted_saves(self.ckpt_root):
                self.metrics.line(f"skipping {path}: incomplete (interrupted while saving)")
            found = checkpoint.newest_loadable(self.ckpt_root)
            if found.step is None and found.damaged:
                decision = [found.refusal(self.ckpt_root)]
            else:
                then = ("nothing older to resume from: starting from scratch" if found.step is None else
                        f"resuming from {jobdir.step_dir(self.ckpt_root, found.step).name}")
                for path, problem in found.damaged:
                    moved = jobdir.set_aside(path)
                    message = f"{path.name} is damaged ({problem}); set aside as {moved.name}, {then}"
                    self.metrics.line(message)
                    jobdir.append_event(self.job, "checkpoint_damaged", os.environ.get("SLURM_JOB_ID", ""), message)
                decision = [found.step]
        if dist.is_initialized():
            dist.broadcast_object_list(decision, src=0)
        if isinstance(decision[0], str):
            raise TrainingError(decision[0])
        return decision[0]

    def restore(self) -> None:
        """This job's newest whole checkpoint, all of it; else, with `checkpoint.init_from`, the parts of another
        job's checkpoint that `checkpoint.init_restore` names."""
        with self.phase("restore"):
            self._restore()

    def _restore(self) -> None:
        latest = self._checkpoint_to_resume()
        if latest is not None:
            try:
                self._load(self.ckpt_root, latest, set(RESTORABLE))
            except checkpoint.CheckpointError as exc:  # its files are whole: most likely another model's
                raise TrainingError(str(exc)) from None
            self.saved_step = self.step
            self.metrics.line(f"resumed from {jobdir.step_dir(self.ckpt_root, latest)} (step {self.step})")
            return
        if self.cfg.checkpoint.init_from is None:
            return
        parts = self.cfg.checkpoint.init_restore
        root, step = jobdir.checkpoint_source(Path(self.cfg.checkpoint.init_from))
        try:
            source, notes = checkpoint.pick(root, step)
            self._load(root, jobdir.step_of(source), set(parts))
        except checkpoint.CheckpointError as exc:
            raise TrainingError(f"checkpoint.init_from: {exc}") from None
        if self.step >= self.cfg.train.steps:
            raise TrainingError(f"checkpoint.init_from: the restored step {self.step} is not below train.steps = "
                                f"{self.cfg.train.steps}; raise train.steps, or leave step out of init_restore")
        for note in notes:
            self.metrics.line(f"checkpoint.init_from: {note}; taking {source.name}")
        fresh = [part for part in RESTORABLE if part not in parts]
        message = (f"restored {', '.join(parts)} from {source}"
                   + (f"; fresh: {', '.join(fresh)}" if fresh else "") + f" (starting at step {self.step + 1})")
        self.metrics.line(message)
        if self.rank == 0:
            jobdir.append_event(self.job, "init_from", os.environ.get("SLURM_JOB_ID", ""), message)

    def _load(self, root: Path, step: int, parts: set[str]) -> None:
        """Load the named parts of checkpoint `step` into this trainer (see `checkpoint.init_restore`)."""
        state: dict = {}
        if parts & {"model", "optimizer"}:
            state["model"], optim_state = get_state_dict(self.model, self.optimizer)
            if "optimizer" in parts:
                state["optim"] = optim_state
        if parts & {"scheduler", "step"}:
            state["train"] = b""
        loader_states = checkpoint.load(root, step, state)
        if "optimizer" in parts:
            # The moments come from the checkpoint; the hyperparameters stay this config's (and the learning rate
            # the restored schedule's, or the fresh one's).
            keep = ("weight_decay", "betas", "eps") + (() if "scheduler" in parts else ("lr", "initial_lr"))
            config = [{k: g[k] for k in keep if k in g} for g in self.optimizer.param_groups]
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
            for group, values in zip(self.optimizer.param_groups, config, strict=True):
                group.update(values)
        elif "model" in parts:
            set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=True))
        train = json.loads(state["train"]) if "train" in state else {}
        if "step" in parts:
            self.step, self.tokens_seen = train["step"], train["tokens_seen"]
            self.guard.load_state_dict(train.get("guard", {}))
        if "scheduler" in parts:
            self.scheduler.load_state_dict(train["scheduler"])
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
                group["lr"] = lr  # the schedule's position sets the next step's LR (a fresh optimizer's is warmup's)
        if "data" in parts:
            if not loader_states:
                raise checkpoint.CheckpointError(f"{jobdir.step_dir(root, step)} holds no data position")
            self.loader.load_state_dict(loader_states)
            if self.loader.mix_change is not None:
                message = self.loader.mix_change.describe()
                self.metrics.line(f"step {self.step}: {message}")
                if self.rank == 0:
                    jobdir.append_event(self.job, "data_mix", os.environ.get("SLURM_JOB_ID", ""),
                                        f"step {self.step}: {message}")

    def _expert_metrics(self, balance: torch.Tensor, steps: int) -> dict:
        """Per MoE layer, the smallest and largest share of the token-expert assignments an expert got over the log
        window (1/experts each when balanced), and the balancing loss (1 when balanced); nothing for a dense
        model. Collective over the data-parallel ranks."""
        if not len(self.expert_load):
            return {}
        load = self._reduce_dp(self.expert_load.clone()).double()
        share = load / load.sum(dim=1, keepdim=True).clamp(min=1)
        self.expert_load.zero_()
        row = {"moe/balance_loss": self._reduce_dp(balance.clone()).item() / steps}
        for i, layer in enumerate(share.tolist()):
            row[f"moe/layer{i}/load_min"], row[f"moe/layer{i}/load_max"] = min(layer), max(layer)
        return row

    # -- one optimizer step ----------------------------------------------------------------------------------

    def _reduce_dp(self, value: torch.Tensor) -> torch.Tensor:
        for group in self.layout.dp_groups():
            dist.all_reduce(value, group=group)
        return value

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict:
        """Forward/backward over the micro-batches, clip, check, step. Returns the step's global loss, the gradient
        norm, the learning rate used and the global token count. A non-finite loss or gradient norm, or a loss
        spike (`StepGuard`), raises StepRejected with nothing applied."""
        local_tokens = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)
        # The loss is a sum over every token of the global batch divided by their count: exact under
        # gradient accumulation, uneven padding and any number of data-parallel ranks.
        global_tokens = int(self._reduce_dp(torch.tensor([local_tokens], device=self.device,
                                                          dtype=torch.float64)).item())
        loss_sum = torch.zeros((), device=self.device)
        mixtures = self.model.mixtures()
        balance_sum = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro_batches):
            if self.layout.fsdp:
                self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            tokens = mb["input_ids"].to(self.device, non_blocking=True)
            labels = mb["labels"].to(self.device, non_blocking=True)
            positions = mb["positions"].to(self.device, non_blocking=True) if "positions" in mb else None
            with self.autocast:
                if self.model.fused_loss is not None:
                    loss = self.model(tokens, positions, labels) / global_tokens
                else:
                    logits = self.model(tokens, positions)
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                           reduction="sum") / global_tokens
                    del logits
            objective = loss
            if mixtures:  # the balancing loss: its per-sequence values averaged over the global batch and layers
                balance = sum(m.balance for m in mixtures) / (len(mixtures) * self.cfg.train.global_batch_size)
                objective = loss + self.cfg.model.moe.balance_coef * balance
                balance_sum += balance.detach()
                self.expert_load += torch.stack([m.load for m in mixtures])
            # FSDP averages gradients over the data-parallel ranks; they are to be summed (gloo cannot
            # reduce with a custom divide factor, so the scale goes on the loss).
            (objective * self.layout.dp_size).backward()
            loss_sum += loss.detach()
        clip = self.cfg.optim.grad_clip or math.inf
        grad_norm = clip_grad_norm(list(self.model.parameters()), clip)
        loss, norm = torch.stack([self._reduce_dp(loss_sum), grad_norm.float()]).tolist()  # one sync with the host
        problem = self.guard.problem(self.step + 1, loss, norm)
        if problem is not None:
            self.optimizer.zero_grad(set_to_none=True)
            raise StepRejected(self.step + 1, problem)
        self.guard.passed(loss)
        group = self.optimizer.param_groups[0]
        lr = group["lr"] / group["lr_mult"]  # the peak-relative LR, whatever muP does per group
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": norm, "lr": lr, "tokens": global_tokens, "balance": balance_sum}

    # -- the loop --------------------------------------------------------------------------------------------

    def _log_step(self, step: int) -> bool:
        return step % self.cfg.metrics.log_every == 0 or step == self.cfg.train.steps

    def _next_micro_batches(self, batches) -> list[dict] | None:
        batch = next(batches, None)
        rows = self.cfg.train.micro_batch_size
        whole = batch is not None and batch["input_ids"].shape[0] == rows * self.accum
        found = [dict(zip(batch, parts, strict=True)) for parts in zip(*(v.split(rows) for v in batch.values()),
                                                                       strict=True)] if whole else []
        exhausted = torch.tensor([0.0 if whole else 1.0], device=self.device)
        if self.cfg.data.epochs is not None:  # only a finite run can end early, and all ranks must agree
            dist.all_reduce(exhausted, op=dist.ReduceOp.MAX)
        return None if exhausted.item() else found

    def _batches_for_next_step(self, batches) -> list[dict] | None:
        """The next step's micro-batches; the data of a skipped step (train.skip_steps, a rollback's) is drawn
        first and thrown away."""
        step = self.step + 1
        if step in self.guard.skip:
            self.metrics.line(f"step {step}: its data is skipped (train.skip_steps or a rollback); it trains on the "
                              "next batch")
            if self._next_micro_batches(batches) is None:
                return None
        return self._next_micro_batches(batches)

    def _stop_for_preemption(self) -> int:
        """Checkpoint the step reached (unless it is the one just restored or saved) and exit for the batch shell."""
        if self.saved_step != self.step:
            self.save(wait=True)
        self.finish_pending_save()
        self.watch.mark_preempted(self.step)
        dist.barrier()  # nobody leaves before the marker is written: a launcher may end the others at the first exit
        self.metrics.line(f"preempted after step {self.step} ({self.watch.cause}); checkpoint saved, "
                          "exiting for the batch script")
        return states.PREEMPTED_EXIT

    def _roll_back(self, rejected: StepRejected) -> None:
        """Back to the newest whole checkpoint, the rejected step's data to be skipped (see guard.py); or
        DivergedError when no rollback is left."""
        self.finish_pending_save()
        newest = self._checkpoint_to_resume()
        self.guard.check_budget(rejected.step, rejected.problem, newest)
        with self.phase("restore"):
            self._load(self.ckpt_root, newest, set(RESTORABLE))
        self.saved_step = self.step
        self.expert_load.zero_()
        cfg = self.cfg.train.rollback
        message = (f"step {rejected.step}: {rejected.problem}; rolled back to step-{newest} (rollback "
                   f"{self.guard.rollbacks} of at most {cfg.max}), the data of step {rejected.step} will be skipped")
        self.metrics.line(message)
        if self.rank == 0:
            jobdir.append_event(self.job, ROLLBACK_EVENT, reason=message, skip=rejected.step, to=newest)
            self.metrics.rewind(newest)
            self.metrics.log_event(newest, {"rollbacks": self.guard.rollbacks, "rollback_from_step": rejected.step})

    def _log(self, out: dict, window: LogWindow, monitors: dict, flops: float) -> None:
        cfg = self.cfg
        elapsed = time.perf_counter() - window.start
        per_device = window.tokens / elapsed / dist.get_world_size() * self.layout.tp
        self.metrics.log({
            "step": self.step, "loss": window.loss / window.steps,
            "grad_norm": out["grad_norm"], "lr": out["lr"],
            "tokens_seen": self.tokens_seen, "tokens_per_s": window.tokens / elapsed,
            "tokens_per_s_per_device": per_device,
            "mfu": mfu(per_device / self.layout.tp, flops, cfg.cluster.mfu_peak_tflops),
            "memory_gib": memory_gib(self.device), "data_wait": window.data_wait / elapsed,
            "step_time_s": elapsed / window.steps, **monitors,
            **self._expert_metrics(window.balance, window.steps),
        })

    def _announce(self, flops: float) -> None:
        cfg = self.cfg
        shapes = {plain_name(n): tuple(p.shape) for n, p in self.model.named_parameters()}
        if self.step == 0:
            self.metrics.print_plan(param_plan(cfg.model), shapes)
        moe = cfg.model.moe
        active = (f" ({num_params(cfg.model, active=True) / 1e6:.1f}M active: {moe.top_k} of {moe.experts} experts)"
                  if moe.experts else "")
        self.metrics.line(
            f"model {num_params(cfg.model) / 1e6:.1f}M parameters{active}, {flops / 1e9:.3f} GFLOP/token; "
            f"mesh dp_replicate×dp_shard×tp = {'×'.join(map(str, self.layout.mesh.shape))}; "
            f"{self.dtype} compute; {self.accum} micro-batch(es) of {cfg.train.micro_batch_size} per step; "
            f"training steps {self.step + 1}..{cfg.train.steps}")

    def run(self) -> int:
        cfg = self.cfg
        self.restore()
        self.metrics.start(self.step)
        flops = flops_per_token(cfg.model, cfg.data.seq_len)
        self._announce(flops)
        if self.watchdog is not None:
            self.watchdog.progress(self.step, "start")  # a long phase: the first step compiles
        batches = iter(self.loader)
        window = LogWindow.fresh(self.device)
        gc.disable()
        try:
            while self.step < cfg.train.steps:
                if self.watch.requested():
                    return self._stop_for_preemption()
                self.profiler.begin(self.step + 1)
                fetch = time.perf_counter()
                micro_batches = self._batches_for_next_step(batches)
                window.data_wait += time.perf_counter() - fetch
                if micro_batches is None:
                    self.metrics.line(f"the data ended (data.epochs = {cfg.data.epochs}) after step {self.step}")
                    break
                logged = self._log_step(self.step + 1)
                if self.monitor is not None and logged:
                    self.monitor.arm()
                try:
                    out = self.train_step(micro_batches)
                except StepRejected as rejected:
                    _close(batches)
                    self._roll_back(rejected)
                    batches, window = iter(self.loader), LogWindow.fresh(self.device)
                    continue
                self.step += 1
                self._after_step(out, window, logged, flops)
                if logged:
                    window = LogWindow.fresh(self.device)
            else:
                self.metrics.line(f"finished {self.step} steps")
        finally:
            _close(batches)
        if self.saved_step != self.step:
            self.save()
        self.finish_pending_save()
        return 0

    def _after_step(self, out: dict, window: LogWindow, logged: bool, flops: float) -> None:
        """Account for the step just taken: metrics, the watchdog, evaluation and the periodic checkpoint."""
        cfg = self.cfg
        if self.watchdog is not None:
            self.watchdog.progress(self.step)
        self.profiler.end(self.step)
        monitors = self.monitor.collect() if self.monitor is not None and logged else {}
        if self.pending is not None and self.pending.done():  # mark a background save complete promptly
            self.finish_pending_save()
        self.tokens_seen += out["tokens"]
        window.tokens += out["tokens"]
        window.loss += out["loss"]
        window.balance += out["balance"]
        window.steps += 1
        if self.step % cfg.train.gc_every == 0:
            gc.collect(1)
        if logged:
            self._log(out, window, monitors, flops)
        if cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == cfg.train.steps):
            self.evaluate()
        if self.step % cfg.checkpoint.interval == 0 or self.step == cfg.train.steps:
            self.save()


def _close(batches: Iterator) -> None:
    """End a loader iteration now (its threads and worker processes), not when the interpreter exits."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        sys.exit("usage: python -m trainer.train jobs/<name>")
    job = JobDir(Path(argv[0]).resolve())
    try:
        cfg = job.read_config()
    except AnvilError as exc:  # before any rank exists: to stderr, as the batch script's error log shows it
        print(f"anvil: {exc}", file=sys.stderr)
        if job.path.is_dir():
            jobdir.write_error(job, "refused", str(exc))
        return EXIT_REFUSED
    ranks = init_distributed(cfg, timeout_s=collective_timeout(cfg.parallel).total_seconds())
    expected = cfg.world_size
    if ranks.world_size != expected:
        if ranks.rank == 0:
            message = (f"the allocation has {ranks.world_size} ranks but the config asks for cluster.nodes × "
                       f"cluster.devices_per_node = {expected}; fix the config (or the sbatch options you added)")
            log(0, message)
            jobdir.write_error(job, "refused", message)
        dist.destroy_process_group()
        return EXIT_REFUSED
    device = torch.device("cpu") if cfg.cluster.device == "cpu" else torch.device("cuda", ranks.local_rank)
    log(ranks.rank, f"rank {ranks.rank}/{ranks.world_size} on {device}; "
                    f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')}")
    torch.manual_seed(cfg.train.seed)
    watchdog = Watchdog(job, ranks.rank, ranks.world_size, cfg.parallel, lambda message: log(ranks.rank, message))
    watchdog.start()
    trainer = None
    try:
        layout = build_layout(cfg, device.type)
        trainer = Trainer(cfg, job, ranks.rank, layout, device, watchdog)
        code = trainer.run()
    except AnvilError as exc:  # refused input, a full disk, a run that kept diverging: one line, no traceback
        kind, code = ("disk", states.EXIT_DISK) if isinstance(exc, checkpoint.StorageError) else (
            "diverged" if isinstance(exc, DivergedError) else "refused", EXIT_REFUSED)
        log(ranks.rank, f"error: {exc}")
        jobdir.write_error(job, kind, f"rank {ranks.rank}: {exc}")
    except (torch.OutOfMemoryError, MemoryError) as exc:  # recorded, so that a retry knows it would repeat
        jobdir.write_error(job, "oom", f"rank {ranks.rank}: {type(exc).__name__}: {exc}")
        raise
    except Exception as exc:
        if collective_failure(exc):
            _end_after_lost_peer(job, ranks.rank, watchdog, exc)
        worker = DEAD_WORKER.search(str(exc))
        if worker:  # torch's DataLoader noticed that a worker process died (kill -9, the kernel's OOM killer)
            message = (f"rank {ranks.rank} on {node_name()}: its data worker (pid {worker[1]}) was killed by a "
                       f"signal ({worker[2]}: by hand, or by the kernel's out-of-memory killer)")
            log(ranks.rank, f"error: {message}")
            jobdir.write_error(job, "killed", message)
            code = 128 + signal.SIGKILL
        else:
            jobdir.write_error(job, "crash", f"rank {ranks.rank}: {type(exc).__name__}: {exc}")
            raise
    finally:
        watchdog.stop()
        if trainer is not None:
            trainer.profiler.close()
            trainer.metrics.finish()
    dist.destroy_process_group()
    return code


DEAD_WORKER = re.compile(r"DataLoader worker \(pid (\d+)\) is killed by signal: (\w+)")


def _end_after_lost_peer(job: JobDir, rank: int, watchdog: Watchdog, exc: BaseException) -> None:
    """A collective failed because a peer went away: name it (if it is gone rather than stopped on its own, which
    recorded its reason), and leave at once — a process group with a dead peer may hang when torn down."""
    reason = watchdog.lost(exc)
    if reason is None:
        log(rank, "stopping: a peer rank stopped (its reason is recorded in ERROR and in its own log)")
    else:
        recorded = jobdir.write_error(job, "lost", reason)
        log(rank, f"error: {reason}" + ("" if recorded else " (an earlier reason is recorded in ERROR)"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(states.EXIT_LOST)
