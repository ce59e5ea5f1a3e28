"""Run under torchrun by tests/test_train.py: 10 optimizer steps of the trainer's own `train_step` on one
fixed global batch sequence, whatever the parallel layout, so layouts can be compared number for number (several
jobs of one world size in one launch: see `main`).

Every rank reads the same global batches (a one-rank loader) and takes its data-parallel slice, as the
loader would hand it; rank 0 writes the losses and gradient norms as JSON (and, with metrics.mup_monitors, what
the muP monitors measured at each step, to `<out>.monitors`).

Under expert parallelism, each step's rows sent by every rank to every EP rank and its routers' counts per expert
(the last micro-batch's) go to `<out>.experts`: `[step][rank] = {"ep_rank", "sent": [layer][ep rank],
"load": [layer][expert]}`.

A third argument names a control (one for every job, or comma-separated, one per job): `fp32-parameters`, for the
bf16 tests: FSDP's mixed-precision policy is built with fp32 parameters whatever the trainer asks, as a policy gone
wrong would (the job asks for bf16 and silently trains in fp32); `local-routing`, for expert parallelism: every
router strongly prefers this rank's own experts, so no token needs to travel; `first-half`: every router strongly
prefers the first half of the experts, whatever the layout (under EP 2 the second EP rank's experts get no token);
for pipelines, `stages-reversed`: the stages hold their layers in the wrong order (the first stage the last layers),
and `microbatch-dropped`: the last micro-batch of every step reaches the schedule without its labels; `nan-in-stages`:
the last stage's loss is NaN at step 3, and the first stage's gradients at step 5 (each rank records the steps its
guard rejected, to `<out>.rejected`: `[rank][step]`); `positions-first-stage-only`: the document positions reach the
first stage and no other. For experts, `balance-untrained`: no layer sends its balancing loss's gradient back.

With experts, each step's loads summed over the data-parallel ranks (`[step][layer][expert]`, the whole model's
layers, as the trainer's step returns them) go to `<out>.loads`."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

from trainer.core.jobdir import JobDir
from trainer.data.loader import build_loader
from trainer.train import loop, pipeline
from trainer.train.distributed import init_distributed
from trainer.train.guard import StepRejected
from trainer.train.loop import Trainer
from trainer.train.model import Transformer
from trainer.train.parallelize import build_layout


def main(job_dirs: str, outs: str, control: str = "") -> None:
    """`job_dirs`, `outs`: comma-separated, one output per job; the jobs run one after another in this launch (one
    process start for several runs of a layout: they must share its world size)."""
    jobs = job_dirs.split(",")
    controls = control.split(",") if "," in control else [control] * len(jobs)
    if "fp32-parameters" in controls:
        from trainer.train import parallelize

        policy = parallelize.MixedPrecisionPolicy
        parallelize.MixedPrecisionPolicy = lambda **kw: policy(**{**kw, "param_dtype": torch.float32})
    ranks = init_distributed(JobDir(Path(jobs[0])).read_config())
    for job_dir, out, job_control in zip(jobs, outs.split(","), controls, strict=True):
        run(JobDir(Path(job_dir)), out, ranks.rank, job_control)
    dist.destroy_process_group()


def run(job: JobDir, out: str, rank: int, control: str, steps: int = 10) -> None:
    with contextlib.ExitStack() as stack:
        if control == "stages-reversed":
            layers = pipeline.stage_layers
            stack.enter_context(mock.patch.object(pipeline, "stage_layers", lambda cfg: layers(cfg)[::-1]))
        if control == "microbatch-dropped":
            step = pipeline.Pipeline.step

            def dropped(self, micros, *args):
                last = {**micros[-1], "labels": torch.full_like(micros[-1]["labels"], -100)}
                return step(self, [*micros[:-1], last], *args)
            stack.enter_context(mock.patch.object(pipeline.Pipeline, "step", dropped))
        if control == "balance-untrained":
            stack.enter_context(mock.patch.object(loop, "train_balance", lambda *args: None))
        if control == "positions-first-stage-only":
            forward = Transformer.forward

            def first_only(self, tokens, positions=None, labels=None):
                return forward(self, tokens, positions if self.tok_embeddings is not None else None, labels)
            stack.enter_context(mock.patch.object(Transformer, "forward", first_only))
        if control == "nan-in-stages":
            stack.enter_context(mock.patch.object(pipeline.Pipeline, "step", _poisoned(pipeline.Pipeline.step)))
        _run(job, out, rank, control, steps)


def _poisoned(step):
    """`Pipeline.step` that makes the last stage's logits (so its loss) NaN on its 3rd call, the first stage's
    gradients on its 5th."""
    calls = [0]

    def poisoned(self, micros, *args):
        calls[0] += 1
        hooks = [stage.submod.output.register_forward_hook(lambda module, inputs, out: out * float("nan"))
                 for stage in self.stages if calls[0] == 3 and stage.submod.output is not None]
        try:
            loss = step(self, micros, *args)
        finally:
            for hook in hooks:
                hook.remove()
        if calls[0] == 5 and self.first:
            next(p for p in self.stages[0].submod.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return loss
    return poisoned


def _run(job: JobDir, out: str, rank: int, control: str, steps: int) -> None:
    cfg = job.read_config()
    torch.manual_seed(cfg.train.seed)
    layout = build_layout(cfg, "cpu")
    trainer = Trainer(cfg, job, rank, layout, torch.device("cpu"))
    t = cfg.train
    per_rank = t.global_batch_size // layout.dp_size
    batches = iter(build_loader(cfg.data, t.seed, 0, 1, t.global_batch_size))
    if control in ("local-routing", "first-half"):
        _prefer(trainer, layout, local=control == "local-routing")
    record, monitored, experts, rejected, loads = [], [], [], [], []
    for number in range(1, steps + 1):
        batch = next(batches)
        mine = {k: v[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank] for k, v in batch.items()}
        micro = [{k: v[i:i + t.micro_batch_size] for k, v in mine.items()}
                 for i in range(0, per_rank, t.micro_batch_size)]
        if trainer.monitor is not None:  # metrics.mup_monitors: every step is watched here
            trainer.monitor.arm()
        try:
            result = trainer.train_step(micro)
        except StepRejected:
            rejected.append(number)
            continue
        record.append([result["loss"], result["grad_norm"]])  # both global already
        if result["expert_load"] is not None:
            loads.append(trainer._reduce_dp(result["expert_load"].clone()).tolist())
        if trainer.monitor is not None:
            monitored.append(trainer.monitor.collect())
        if layout.ep > 1:
            mine = {"ep_rank": layout.mesh.get_local_rank("ep"),
                    "sent": [m.grouped.sent.tolist() for m in trainer.model.mixtures()],
                    "load": [m.load.tolist() for m in trainer.model.mixtures()]}
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
            experts.append(everyone)
    everyone_rejected = [None] * dist.get_world_size()
    dist.all_gather_object(everyone_rejected, rejected)
    if rank == 0:
        Path(out).write_text(json.dumps(record))
        if any(everyone_rejected):
            Path(f"{out}.rejected").write_text(json.dumps(everyone_rejected))
        if monitored:
            Path(f"{out}.monitors").write_text(json.dumps(monitored))
        if experts:
            Path(f"{out}.experts").write_text(json.dumps(experts))
        if loads:
            Path(f"{out}.loads").write_text(json.dumps(loads))


def _prefer(trainer: Trainer, layout, local: bool) -> None:
    """Each router's logits raised far above the others for this rank's own experts (`local`) or the first half."""
    for moe in trainer.model.mixtures():
        size = moe.experts // layout.ep if local else moe.experts // 2
        first = layout.mesh.get_local_rank("ep") * size if local else 0
        bias = torch.zeros(moe.experts)
        bias[first:first + size] = 1e4

        def hook(module, args, output, bias=bias):
            return output + bias.to(output.dtype)

        moe.router.register_forward_hook(hook)


if __name__ == "__main__":
    main(*sys.argv[1:4])
