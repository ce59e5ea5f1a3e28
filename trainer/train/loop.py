"""The training loop: what each rank runs once `rank.py` has set it up.

Builds the loader and the parallelized model (`build_model`, in its fixed order), restores (`checkpoint.restore`),
trains; checkpoints every `checkpoint.interval` steps, on preemption (then exits with `PREEMPTED_EXIT` so the batch
shell requeues) and at the end; a bad step rolls back to the newest whole checkpoint (`guard.py`).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time

import torch
import torch.distributed as dist

from trainer.core import jobdir, states
from trainer.core.config import AnvilConfig
from trainer.core.costs import flops_per_token
from trainer.core.jobdir import JobDir
from trainer.data.loader import build_loader
from trainer.train import checkpoint
from trainer.train.batches import StepBatches
from trainer.train.gpu import GpuPaths
from trainer.train.guard import ROLLBACK_EVENT, StepGuard, StepRejected
from trainer.train.heldout import EvalError, heldout_bits_per_byte, heldout_set
from trainer.train.metrics import MetricsLogger, StepWindow, model_size
from trainer.train.model import mixture_layers
from trainer.train.monitors import MupMonitor
from trainer.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from trainer.train.parallelize import Layout, build_model
from trainer.train.pipeline import Pipeline, build_pipeline
from trainer.train.preemption import PreemptionWatch
from trainer.train.profiling import StepProfiler
from trainer.train.step import autocast_for, micro_step, sync_gradients, train_balance
from trainer.train.watchdog import Watchdog


class Trainer:
    def __init__(self, cfg: AnvilConfig, job: JobDir, rank: int, layout: Layout, device: torch.device,
                 watchdog: Watchdog | None = None):
        self.cfg, self.job, self.rank, self.layout, self.device = cfg, job, rank, layout, device
        self.watchdog = watchdog
        self.gpu = GpuPaths.of(device)
        t = cfg.train
        self.metrics = MetricsLogger(cfg.metrics, job, steps=t.steps, enabled=rank == 0, name=cfg.job.name,
                                     run_config=cfg.model_dump(mode="json"))
        self.guard = StepGuard(t.rollback, t.skipped(), job)
        self.accum = t.global_batch_size // (t.micro_batch_size * layout.dp_size)
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        loader = build_loader(cfg.data, cfg.data_seed, layout.dp_rank, layout.dp_size,
                              t.micro_batch_size * self.accum, pin_memory=self.gpu.pinned_batches)
        self.data = StepBatches(loader, t.micro_batch_size, self.accum, device, finite=cfg.data.epochs is not None)
        self.pipeline: Pipeline | None = None
        if layout.pp > 1:  # this rank's stages, named as one model, and the schedule that runs them
            self.model, self.pipeline = build_pipeline(cfg, layout, device, self.dtype, self.metrics.line)
        else:
            self.model = build_model(cfg.model, cfg.parallel, layout, device, self.dtype,
                                     seq_len=cfg.data.seq_len, seed=t.seed, use_liger=t.liger, say=self.metrics.line)
        train_balance(self.model, cfg.model, layout.dp_size, t.global_batch_size)
        self.optimizer = build_optimizer(self.model, cfg.model, cfg.optim, fused=self.gpu.fused_adamw)
        self.scheduler = build_scheduler(self.optimizer, t.steps, cfg.optim)
        self.parts = checkpoint.Parts(self.model, self.optimizer, self.scheduler, loader, self.metrics.line,
                                      self._record)
        self.watch = PreemptionWatch(job, device)
        self.monitor = MupMonitor(self.model, cfg.model, layout.tp) if cfg.metrics.mup_monitors else None
        self.profiler = StepProfiler(cfg.metrics.profile_steps, job, rank, device, self.metrics.line)
        self.flops = flops_per_token(cfg.model, cfg.data.seq_len)
        self.window = StepWindow(device, layout.tp, self.flops, cfg.cluster.mfu_peak_tflops,
                                 (cfg.model.n_layers if cfg.model.moe.experts else 0, cfg.model.moe.experts),
                                 self._reduce_dp,
                                 layout.ep)
        try:
            self.heldout = heldout_set(cfg) if cfg.eval.every else None
        except EvalError as exc:
            raise EvalError(f"eval.every is set, but {exc}") from None
        self.step = 0
        self.tokens_seen = 0
        self.saved_step: int | None = None  # known to every rank alike (the marker file may lag on others)
        self.pending: checkpoint.PendingSave | None = None
        async_save = cfg.checkpoint.async_save if cfg.checkpoint.async_save is not None else self.gpu.async_save_default
        # The background writer gets a gloo group of its own: it must never share one with training collectives.
        self.async_group = dist.new_group(backend="gloo") if async_save else None
        self.autocast = autocast_for(layout, device, self.dtype)

    def _record(self, event: str, message: str) -> None:
        if self.rank == 0:
            jobdir.append_event(self.job, event, os.environ.get("SLURM_JOB_ID", ""), message)

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """Tell the watchdog that a long phase (save, eval, restore) runs, and when it ends."""
        return self.watchdog.during(self.step, name) if self.watchdog is not None else contextlib.nullcontext()

    def evaluate(self) -> None:
        with self.phase("eval"), torch.no_grad(), self.autocast:
            bpb = heldout_bits_per_byte(self.model, self.heldout, self.cfg.data.seq_len, self.device)
        self.metrics.log_eval(self.step, {"heldout_bits_per_byte": bpb})

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save(self, wait: bool = False) -> None:
        """Checkpoint the current step; in the background when async saving is on, unless `wait`. Refused before
        anything is written when the file system has no room for it; a write that fails on the storage all the same
        removes the partial step. Either way: StorageError, and the newest whole checkpoint is untouched."""
        started, root = time.perf_counter(), self.job.checkpoints
        with self.phase("save"):
            self.finish_pending_save()
            state = self.parts.state({"step": self.step, "tokens_seen": self.tokens_seen,
                                      "scheduler": self.scheduler.state_dict(), "guard": self.guard.state_dict()})
            first = self.layout.tp_rank == 0 and self.layout.pp_rank == 0  # one copy of each data-parallel rank's
            loader_states = {self.layout.dp_rank: self.data.loader.state_dict()} if first else {}
            checkpoint.check_space(root, self.step, state)
            with checkpoint.storage_errors(root, self.step):
                self.pending = checkpoint.save(root, self.step, state, loader_states, keep=self.cfg.checkpoint.keep,
                                               pinned=self.cfg.checkpoint.keep_steps,
                                               async_group=self.async_group)
            self.saved_step = self.step
            if self.pending is not None and wait:
                self.finish_pending_save()
        how = "saved" if self.pending is None else "staged (writing in the background)"
        self.metrics.line(f"checkpoint {jobdir.step_dir(root, self.step).name} {how} in "
                          f"{time.perf_counter() - started:.2f} s")

    def finish_pending_save(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            with checkpoint.storage_errors(self.job.checkpoints, pending.step):
                pending.finish()

    def _resumed(self, train: dict) -> None:
        if train:
            self.step, self.tokens_seen = train["step"], train["tokens_seen"]
            self.guard.load_state_dict(train.get("guard", {}))

    def restore(self) -> None:
        """This job's newest whole checkpoint, or the parts of another's that `checkpoint.init_from` names."""
        with self.phase("restore"):
            train, own = checkpoint.restore(self.job.checkpoints, self.cfg.checkpoint, self.cfg.train.steps,
                                            self.parts)
        self._resumed(train)
        if own:
            self.saved_step = self.step

    def _roll_back(self, rejected: StepRejected) -> None:
        """Back to the newest whole checkpoint, the rejected step's data to be skipped (see guard.py); or
        DivergedError when no rollback is left."""
        self.data.close()
        self.finish_pending_save()
        newest = checkpoint.resume_point(self.job.checkpoints, self.metrics.line, self._record)
        self.guard.check_budget(rejected.step, rejected.problem, newest)
        with self.phase("restore"):
            self._resumed(checkpoint.load_parts(self.job.checkpoints, newest, set(checkpoint.RESTORABLE),
                                                self.parts))
        self.saved_step = self.step
        self.window.reset()
        self.data.open()
        message = (f"step {rejected.step}: {rejected.problem}; rolled back to step-{newest} (rollback "
                   f"{self.guard.rollbacks} of at most {self.cfg.train.rollback.max}), the data of step "
                   f"{rejected.step} will be skipped")
        self.metrics.line(message)
        if self.rank == 0:
            jobdir.append_event(self.job, ROLLBACK_EVENT, reason=message, skip=rejected.step, to=newest)
            self.metrics.rewind(newest)
            self.metrics.log_event(newest, {"rollbacks": self.guard.rollbacks, "rollback_from_step": rejected.step})

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

    # -- one optimizer step ----------------------------------------------------------------------------------

    def _reduce_dp(self, value: torch.Tensor) -> torch.Tensor:
        for group in self.layout.dp_groups():
            dist.all_reduce(value, group=group)
        return value

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict:
        """Forward/backward over the micro-batches, clip, check, step. Returns the step's global loss, the gradient
        norm, the learning rate used, the global token count, the balancing loss and this rank's expert loads. A
        non-finite loss or gradient norm, or a loss spike (`StepGuard`), raises StepRejected with nothing applied."""
        local_tokens = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)
        # The loss is a sum over every token of the global batch divided by their count: exact under
        # gradient accumulation, uneven padding and any number of data-parallel ranks.
        global_tokens = local_tokens if self.layout.dp_size == 1 else int(self._reduce_dp(
            torch.tensor([local_tokens], device=self.device, dtype=torch.float64)).item())  # a sync with the GPU
        loss_sum, balance_sum = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        load = None
        if self.pipeline is not None:  # the loss is the last stage's: summed over the pipeline's ranks
            micros = [{k: v.to(self.device, non_blocking=True) for k, v in mb.items()} for mb in micro_batches]
            loss_sum, balance_sum, load = self.pipeline.step(micros, global_tokens, self.autocast)
        else:
            for i, mb in enumerate(micro_batches):
                sync_gradients(self.model, self.layout, last=i == len(micro_batches) - 1)
                micro = {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}
                out = micro_step(self.model, micro, global_tokens, self.layout.dp_size, self.autocast,
                                 self.cfg.train.global_batch_size)
                loss_sum += out.loss
                if out.load is not None:
                    balance_sum += out.balance
                    load = out.load if load is None else load + out.load
        grad_norm = clip_grad_norm(list(self.model.parameters()), self.cfg.optim.grad_clip or math.inf,
                                   self.layout.mesh["pp"].get_group() if self.layout.pp > 1 else None)
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
        if load is not None and self.cfg.model.moe.bias_update_rate:  # loss-free balancing, by the global load
            total = self._reduce_dp(load.clone())
            for index, moe in mixture_layers(self.model).items():  # a pipeline rank's layers, or all
                moe.update_bias(total[index])  # the same sums on every rank: the biases stay identical
        return {"loss": loss, "grad_norm": norm, "lr": lr, "tokens": global_tokens, "balance": balance_sum,
                "expert_load": load}

    # -- the loop --------------------------------------------------------------------------------------------

    def _announce(self) -> None:
        if self.step == 0:
            self.metrics.print_plan(self.cfg.model)
        self.metrics.line(
            f"{model_size(self.cfg.model, self.flops)}; {self.layout.describe()}; {self.dtype} compute; "
            f"{self.accum} micro-batch(es) of "
            f"{self.cfg.train.micro_batch_size} per step; training steps {self.step + 1}..{self.cfg.train.steps}")

    def run(self) -> int:
        steps = self.cfg.train.steps
        self.restore()
        self.metrics.start(self.step)
        self._announce()
        if self.watchdog is not None:
            self.watchdog.progress(self.step, "start")  # a long phase: the first step compiles
        self.data.open()
        self.window.reset()
        gc.disable()
        try:
            while self.step < steps:
                if self.watch.requested():
                    return self._stop_for_preemption()
                self.profiler.begin(self.step + 1)
                fetch = time.perf_counter()
                micro_batches = self.data.next_step(self.step + 1, self.guard.skip, self.metrics.line)
                self.window.data_wait += time.perf_counter() - fetch
                if micro_batches is None:
                    self.metrics.line(f"the data ended (data.epochs = {self.cfg.data.epochs}) after step {self.step}")
                    break
                logged = self.step + 1 == steps or (self.step + 1) % self.cfg.metrics.log_every == 0
                if self.monitor is not None and logged:
                    self.monitor.arm()
                try:
                    out = self.train_step(micro_batches)
                except StepRejected as rejected:
                    self._roll_back(rejected)
                    continue
                self.step += 1
                self._after_step(out, logged)
            else:
                self.metrics.line(f"finished {self.step} steps")
        finally:
            self.data.close()
        if self.saved_step != self.step:
            self.save()
        self.finish_pending_save()
        return 0

    def _after_step(self, out: dict, logged: bool) -> None:
        """Account for the step just taken: metrics, the watchdog, evaluation and the periodic checkpoint."""
        cfg = self.cfg
        if self.watchdog is not None:
            self.watchdog.progress(self.step)
        self.profiler.end(self.step)
        monitors = self.monitor.collect() if self.monitor is not None and logged else {}
        if self.pending is not None and self.pending.done():  # mark a background save complete promptly
            self.finish_pending_save()
        self.tokens_seen += out["tokens"]
        self.window.add(out)
        if self.step % cfg.train.gc_every == 0:
            gc.collect(1)
        if logged:
            self.metrics.log(self.window.row(self.step, out, self.tokens_seen, monitors))
        if cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == cfg.train.steps):
            self.evaluate()
        if (self.step % cfg.checkpoint.interval == 0 or self.step == cfg.train.steps
                or self.step in cfg.checkpoint.keep_steps):
            self.save()
