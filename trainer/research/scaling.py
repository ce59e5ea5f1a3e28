"""A scaling study: a law L(N, D) fitted to muP runs of several sizes and token budgets, its largest size predicted.

Model sizes from a base shape under muP are each trained once through the stable phase of a warmup-stable-decay
schedule, with a cooldown branch forked from that run at every shorter token budget; the law is fitted to the final
held-out losses; the largest size is held out, its losses predicted (frozen in a file before it starts) and then
measured; a figure and a verdict fail when a measurement falls outside its interval.

Every run is an ordinary job directory of one sweep (`sweeps/<study>/`, so `sweep.py status|retry|cancel` work on
it). A size's stable run is its largest budget (its own decay is that budget's cooldown) and keeps a checkpoint at
every fork (`checkpoint.keep_steps`); a budget T's branch restores model, optimizer, schedule position, data and step
from the fork at T − decay(T) (`checkpoint.init_from`) and decays over the rest — the same run as one configured with
that budget from the start (tests/test_scaling.py). Branches are submitted as their forks appear: the study's command
submits what is ready and, with `--wait` (or run again), goes on until the verdict.

N is the non-embedding parameter count and C the training FLOPs, both from `trainer.core.costs` (what MFU and the
planner count); the loss is the held-out bits per byte at the run's last step (`eval.every`), the same number lm-eval
reports on the export.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer.core.commands import command
from trainer.core.config import ModelConfig
from trainer.core.costs import flops_per_token, num_params
from trainer.core.files import write_atomic
from trainer.core.jobdir import CODE_DIR, JobDir, first_submission, is_complete, jobs_root, step_dir
from trainer.launch.sweep.results import history
from trainer.research.figures import add_replot, add_sweep_options, ensure_corpus, replotted, save
from trainer.research.scaling_law import Fit, Law, Prediction, fit_with_bootstrap

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LEVEL = 0.95
"""The probability each prediction interval is built to hold."""
RESTORE = ["model", "optimizer", "scheduler", "data", "step"]
"""What a branch takes from its fork: everything, so that it continues the stable run exactly."""
PREDICTION = "prediction.json"
"""In the sweep's folder: the law fitted without the held-out sizes and its predictions, written before any held-out
run is submitted and never rewritten."""


@dataclass(frozen=True)
class StudySpec:
    """The grid: widths (each its own model size) × budgets (optimizer steps of `batch` sequences of `seq_len`)."""

    widths: tuple[int, ...] = (64, 96, 128, 192, 256)
    budgets: tuple[int, ...] = (300, 600, 1200)
    held_out: int = 1
    """The largest widths held out of the fit: predicted from the others, then run."""
    lr: float = 2.0 ** -8.5
    """The peak learning rate at `base_dim` (muP carries it to every width)."""
    base_dim: int = 64
    head_dim: int = 32
    n_layers: int = 2
    """Layers at the smallest width."""
    depth_exponent: float = 0.0
    """Depth grows as (width / smallest width)^this (0: width alone, the direction muP's transfer is proven in)."""
    seq_len: int = 64
    batch: int = 8
    warmup: int = 20
    decay: float = 0.2
    """Each budget's final decay, as a fraction of its steps (WSD, 1-sqrt shape)."""
    vocab_size: int = 512

    def depth(self, width: float) -> int:
        return max(1, round(self.n_layers * (width / min(self.widths)) ** self.depth_exponent))

    def model(self, width: int) -> ModelConfig:
        return ModelConfig(dim=width, n_layers=self.depth(width), n_heads=width // self.head_dim,
                           ffn_dim=4 * width, vocab_size=self.vocab_size,
                           mup={"enabled": True, "base_dim": self.base_dim})

    def decay_steps(self, steps: int) -> int:
        return max(1, round(self.decay * steps))

    def fork(self, steps: int) -> int:
        """The step a budget's cooldown branches off its size's stable run."""
        return steps - self.decay_steps(steps)

    def problems(self) -> list[str]:
        """What makes this grid unrunnable or unfittable, each naming the option."""
        problems = []
        if self.held_out < 1:
            problems.append("--held-out: at least 1 width must be held out, predicted and then run (the check)")
        if len(set(self.budgets)) < 2:
            problems.append("--budgets: give at least 2 (the law's token term is fitted across them)")
        if len(set(self.widths)) < 2 + self.held_out:
            problems.append(f"--widths: {len(set(self.widths))} sizes leave fewer than 2 to fit after holding out "
                            f"{self.held_out}; give at least {2 + self.held_out}")
        fitted = (len(set(self.widths)) - self.held_out) * len(set(self.budgets))
        if fitted < 5:
            problems.append(f"--widths/--budgets: {fitted} fitted runs for a law of 5 parameters; give more sizes or "
                            "budgets")
        for w in self.widths:
            if w % self.head_dim or w < self.head_dim:
                problems.append(f"--widths: {w} is not a multiple of the head size {self.head_dim}")
        first = self.fork(min(self.budgets))
        if self.warmup >= first:
            problems.append(f"--warmup: {self.warmup} steps reach the first fork (step {first} of the "
                            f"{min(self.budgets)}-step budget): shorten the warmup or lengthen the budgets")
        return problems


@dataclass(frozen=True)
class Run:
    """One point of the study: a width at a budget; the largest budget is the width's stable run."""

    width: int
    steps: int
    held_out: bool

    @property
    def name(self) -> str:
        return f"dim-{self.width}_steps-{self.steps}"


def runs(spec: StudySpec) -> list[Run]:
    """Every point: stable runs first, then branches (the order the local executor runs them in), fitted sizes
    before the held-out ones."""
    held = set(sorted(set(spec.widths))[-spec.held_out:]) if spec.held_out else set()
    widths, budgets = sorted(set(spec.widths)), sorted(set(spec.budgets), reverse=True)
    return [Run(w, t, w in held) for out in (False, True) for t in budgets for w in widths if (w in held) == out]


def stable(spec: StudySpec, run: Run) -> Run:
    return replace(run, steps=max(spec.budgets))


def sweep_file(spec: StudySpec, name: str, corpus: Path, jobs: Path, points: Sequence[Run],
               extra: Sequence[str] = ()) -> dict[str, Any]:
    """The sweep of the given points: one zipped group (each point's size, budget and fork), named by width and
    budget. A stable run pins its forks; a branch restores everything from its fork."""
    top = max(spec.budgets)
    columns: dict[str, list[Any]] = {k: [] for k in (
        "model.dim", "model.n_layers", "model.n_heads", "model.ffn_dim", "train.steps", "optim.decay_steps",
        "eval.every", "checkpoint.interval", "checkpoint.keep_steps", "checkpoint.init_from",
        "checkpoint.init_restore")}
    for run in points:
        model = spec.model(run.width)
        branch = run.steps != top
        fork = step_dir(jobs / f"{name}.{stable(spec, run).name}" / "checkpoints", spec.fork(run.steps))
        values = {"model.dim": run.width, "model.n_layers": model.n_layers, "model.n_heads": model.n_heads,
                  "model.ffn_dim": model.ffn_dim, "train.steps": run.steps,
                  "optim.decay_steps": spec.decay_steps(run.steps), "eval.every": run.steps,
                  "checkpoint.interval": max(1, spec.decay_steps(run.steps) // 2) if branch else max(1, top // 5),
                  "checkpoint.keep_steps": [] if branch else sorted({spec.fork(t) for t in spec.budgets if t != top}),
                  "checkpoint.init_from": str(fork) if branch else None,
                  "checkpoint.init_restore": RESTORE if branch else ["model"]}
        for key, value in values.items():
            columns[key].append(value)
    return {
        "name": name,
        "overrides": [
            f"model.vocab_size={spec.vocab_size}", "model.mup.enabled=true", f"model.mup.base_dim={spec.base_dim}",
            f"data.seq_len={spec.seq_len}", "data.num_workers=0", "data.logical_shards=8",
            f"data.datasets=[{{path: {corpus / 'train'}}}]", f"data.tokenizer={corpus / 'tokenizer.json'}",
            f"eval.heldout={corpus / 'val'}", "eval.heldout_docs=200",
            "train.mixed_precision=fp32",
            f"train.global_batch_size={spec.batch}", f"train.micro_batch_size={spec.batch}",
            f"optim.lr={spec.lr}", "optim.schedule=wsd", f"optim.warmup_steps={spec.warmup}",
            "optim.weight_decay=0", "metrics.log_every=10", "checkpoint.keep=2",
            "cluster.env={OMP_NUM_THREADS: '1'}", *extra,
        ],
        "zip": [columns],
        "name_keys": ["model.dim", "train.steps"],
    }


@dataclass
class Point:
    """A finished (or not) run, as the fit sees it."""

    width: int
    n_layers: int
    steps: int
    held_out: bool
    n: float
    """Non-embedding parameters."""
    tokens: float
    flops: float
    loss: float | None
    """Held-out bits per byte at the last step (None: not there yet)."""
    job: str
    """Its job directory's name (under jobs/)."""


def measure(spec: StudySpec, name: str, jobs: Path, run: Run) -> Point:
    """A run's N, D and C from its size and budget (`core.costs`), and its final held-out loss if it got there."""
    model = spec.model(run.width)
    job = JobDir(jobs / f"{name}.{run.name}")
    tokens = run.steps * spec.batch * spec.seq_len
    final = [r["heldout_bits_per_byte"] for r in history(job) if r["step"] == run.steps
             and isinstance(r.get("heldout_bits_per_byte"), int | float)]
    loss = float(final[-1]) if final and math.isfinite(final[-1]) else None
    return Point(run.width, model.n_layers, run.steps, run.held_out, float(num_params(model, embeddings=False)),
                 float(tokens), flops_per_token(model, spec.seq_len) * tokens, loss, job.path.name)


def family_cost(spec: StudySpec) -> Callable[[float], float]:
    """FLOPs per token as a function of N along the study's family of shapes (widths in steps of a head, depth by
    its rule), interpolated in log-log: how the compute-optimal split and the frontier count a model between (and
    beyond) the grid's sizes. Past the table, FLOPs per parameter stay the last entry's."""
    table = []
    for k in range(1, 4097):
        model = spec.model(k * spec.head_dim)
        table.append((num_params(model, embeddings=False), flops_per_token(model, spec.seq_len)))
    log_n, log_f = np.log(np.array(table, dtype=float)).T

    def cost(n: float) -> float:
        x = math.log(n)
        if x <= log_n[-1]:
            return float(math.exp(np.interp(x, log_n, log_f)))
        return float(n * math.exp(log_f[-1] - log_n[-1]))

    return cost


@dataclass
class Verdict:
    spec: dict[str, Any]
    points: list[Point]
    law: dict[str, float] | None = None
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    predicted_at: str | None = None
    target: dict[str, float] | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def to_json(self) -> str:
        return json.dumps({"pass": self.passed, **asdict(self)}, indent=1) + "\n"


def fit_prediction(spec: StudySpec, points: Sequence[Point], replicates: int = 200) -> dict[str, Any]:
    """The law fitted to the finished points not held out (with its bootstrap), and the held-out points' predicted
    losses with their intervals: what `PREDICTION` freezes before the held-out runs start."""
    fitted = [p for p in points if not p.held_out]
    fit = fit_with_bootstrap([p.n for p in fitted], [p.tokens for p in fitted], [p.loss for p in fitted],
                             replicates=replicates)
    predictions = []
    for p in points:
        if p.held_out:
            predicted, low, high = fit.predict(p.n, p.tokens, LEVEL)
            predictions.append({"width": p.width, "steps": p.steps, "n": p.n, "tokens": p.tokens,
                                "predicted": predicted, "low": low, "high": high})
    return {"time": _now(), "spec": asdict(spec), "law": fit.law.as_dict(), "spread": fit.spread(),
            "residuals": fit.residuals.tolist(), "replicates": [r.as_dict() for r in fit.replicates],
            "predictions": predictions}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def saved_fit(saved: dict[str, Any]) -> Fit:
    return Fit(Law(**saved["law"]), [Law(**r) for r in saved["replicates"]], np.array(saved["residuals"]))


def analyse(spec: StudySpec, points: Sequence[Point], saved: dict[str, Any] | None, submitted_at: str | None,
            target_flops: float | None) -> Verdict:
    """The verdict: the frozen prediction against the held-out runs' measurements, and the target's prediction."""
    verdict = Verdict(asdict(spec), list(points))
    missing = [p for p in points if p.loss is None]
    if saved is None or missing:
        verdict.checks["study complete"] = False
        verdict.notes.append(f"{len(missing)} run(s) without a final held-out loss: run the same command again "
                             "(with --wait on SLURM) to finish the study")
        return verdict
    fit = saved_fit(saved)
    verdict.law, verdict.spread, verdict.predicted_at = saved["law"], saved["spread"], saved["time"]
    measured = {(p.width, p.steps): p.loss for p in points}
    inside = []
    for found in saved["predictions"]:
        loss = measured[(found["width"], found["steps"])]
        prediction = Prediction(found["n"], found["tokens"], loss, found["predicted"], found["low"], found["high"])
        verdict.predictions.append({**found, "measured": loss, "inside": prediction.inside,
                                    "error": loss / found["predicted"] - 1})
        inside.append(prediction.inside)
    verdict.checks[f"every held-out run inside its {LEVEL:.0%} interval"] = bool(inside) and all(inside)
    verdict.checks["prediction frozen before the held-out runs were submitted"] = (
        submitted_at is not None and saved["time"] <= submitted_at)
    cost = family_cost(spec)
    largest = max(p.flops for p in points)
    flops = target_flops or 10 * largest
    n, d = fit.law.compute_optimal(flops, cost)
    predicted, low, high = fit.predict(n, d, LEVEL)
    verdict.target = {"flops": flops, "n": n, "tokens": d, "predicted": predicted, "low": low, "high": high}
    worst = max(verdict.predictions, key=lambda p: abs(p["error"]))
    verdict.notes.append(f"held-out width {worst['width']}: measured {worst['measured']:.4f} vs predicted "
                         f"{worst['predicted']:.4f} [{worst['low']:.4f}, {worst['high']:.4f}] (worst of "
                         f"{len(verdict.predictions)}, {worst['error']:+.2%})")
    return verdict


def build_figure(verdict: Verdict) -> Figure:
    """Left: held-out loss against training compute, a colour per size, each fitted size's law along its budgets,
    the compute-optimal frontier, the held-out size's predicted intervals with its measurements, and the target.
    Right: each run's residual from the law, the held-out ones against their intervals. The title states the
    verdict and the law, so the figure reads without the README."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    spec = StudySpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in verdict.spec.items()})
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 7), layout="constrained",
                                      gridspec_kw={"width_ratios": [3, 2]})
    widths = sorted({p.width for p in verdict.points})
    colour = {w: f"C{i % 10}" for i, w in enumerate(widths)}
    law = Law(**verdict.law) if verdict.law else None
    cost = family_cost(spec)
    for w in widths:
        found = sorted((p for p in verdict.points if p.width == w and p.loss is not None), key=lambda p: p.flops)
        if not found:
            continue
        held = found[0].held_out
        left.plot([p.flops for p in found], [p.loss for p in found], marker="*" if held else "o",
                  markersize=12 if held else 6, linestyle="none", color=colour[w])
        if law is not None:
            tokens = np.geomspace(min(p.tokens for p in found) / 1.5, max(p.tokens for p in found) * 1.5, 50)
            per_token = found[0].flops / found[0].tokens
            left.plot(tokens * per_token, law.loss(found[0].n, tokens), color=colour[w],
                      linestyle="--" if held else "-", linewidth=1, alpha=0.7)
    for found in verdict.predictions:
        x = next(p.flops for p in verdict.points if p.width == found["width"] and p.steps == found["steps"])
        left.errorbar([x], [found["predicted"]], yerr=[[found["predicted"] - found["low"]],
                                                       [found["high"] - found["predicted"]]],
                      color="black", capsize=5, linewidth=1.5, marker="_", markersize=14)
    if law is not None:
        top = verdict.target["flops"] if verdict.target else max(p.flops for p in verdict.points)
        grid = np.geomspace(min(p.flops for p in verdict.points) / 1.5, top * 1.5, 80)
        left.plot(grid, law.frontier(grid, cost), color="black", linestyle=":", linewidth=1.5)
    if verdict.target:
        t = verdict.target
        left.errorbar([t["flops"]], [t["predicted"]], yerr=[[t["predicted"] - t["low"]], [t["high"] - t["predicted"]]],
                      color="C3", marker="D", markersize=8, capsize=5)
        left.annotate(f"target {t['flops']:.2g} FLOPs:\nN* = {t['n']:.3g}, D* = {t['tokens']:.3g} tokens\n"
                      f"predicted {t['predicted']:.3f} [{t['low']:.3f}, {t['high']:.3f}]",
                      (t["flops"], t["predicted"]), textcoords="offset points", xytext=(-20, -12), ha="right",
                      va="top", fontsize=8, color="C3")
    left.set_xscale("log")
    left.set_xlabel("training compute C, FLOPs (core.costs: what MFU counts; log scale)")
    left.set_ylabel("held-out bits per byte at the run's last step")
    left.grid(alpha=0.3, which="both")
    if law is not None:
        for p in verdict.points:
            if p.loss is None:
                continue
            residual = p.loss / float(law.loss(p.n, p.tokens)) - 1
            right.plot([p.flops], [100 * residual], marker="*" if p.held_out else "o",
                       markersize=12 if p.held_out else 6, color=colour[p.width], linestyle="none")
        for found in verdict.predictions:
            x = next(p.flops for p in verdict.points if p.width == found["width"] and p.steps == found["steps"])
            right.errorbar([x], [0], yerr=[[100 * (1 - found["low"] / found["predicted"])],
                                           [100 * (found["high"] / found["predicted"] - 1)]],
                           color="black", capsize=5, linewidth=1.5)
        right.axhline(0, color="black", linewidth=0.8)
    right.set_xscale("log")
    right.set_xlabel("training compute C, FLOPs")
    right.set_ylabel("residual: measured / law − 1 (%)")
    right.grid(alpha=0.3, which="both")
    marks = [Line2D([], [], color=colour[w], marker="o", linestyle="-", linewidth=1) for w in widths] + [
        Line2D([], [], color="grey", marker="*", markersize=12, linestyle="none"),
        Line2D([], [], color="black", marker="_", markersize=14, linewidth=1.5),
        Line2D([], [], color="black", linestyle=":", linewidth=1.5),
        Line2D([], [], color="C3", marker="D", linestyle="none")]
    sizes = {p.width: p for p in verdict.points}
    labels = [f"width {w} ({sizes[w].n_layers} layers, N = {sizes[w].n:.3g})" for w in widths] + [
        "held out: measured after the prediction", f"predicted {LEVEL:.0%} interval (fit without it)",
        "compute-optimal frontier", "target: compute-optimal N, D"]
    fig.legend(marks, labels, loc="outside lower center", ncol=4, fontsize=9, frameon=False)
    checks = "   ".join(f"{'✓' if ok else '✗'} {check}" for check, ok in verdict.checks.items())
    head = "Scaling study: held-out loss against compute, one WSD run per size with cooldown branches at each budget"
    if law is not None:
        spread = verdict.spread
        head += (f"\nL(N, D) = {law.E:.3f} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}"
                 f"   (95% bootstrap: α {spread['alpha'][0]:.2f}–{spread['alpha'][1]:.2f}, "
                 f"β {spread['beta'][0]:.2f}–{spread['beta'][1]:.2f}; N non-embedding, D tokens)")
    fig.suptitle("\n".join([head, ("PASS: " if verdict.passed else "FAIL: ") + (verdict.notes[-1] if verdict.notes
                                                                               else "no runs"),
                            *textwrap.wrap(checks, 180)]), fontsize=10)
    return fig


def figure(verdict: Verdict, out: Path) -> Path:
    return save(build_figure(verdict), out)


def replot(saved: Path, out: Path) -> Path:
    """Redraw the figure from a saved verdict (.json), without the study's runs."""
    data = json.loads(saved.read_text())
    data.pop("pass", None)
    data["points"] = [Point(**p) for p in data["points"]]
    return figure(Verdict(**data), out)


QUICK = {"widths": (32, 64, 96, 128, 192), "budgets": (100, 200, 400), "warmup": 10}
"""`--quick`: the grid on a laptop's CPU in minutes (4 fitted sizes and the held-out one, × 3 budgets)."""


def transferred_lr(saved: Path) -> tuple[float, int] | None:
    """The learning rate muP's transfer study found (the mean optimum over its widths) and its base width, from
    plots/lr_transfer.json when that study passed; None otherwise."""
    try:
        data = json.loads(saved.read_text())
        optima = [c["log2_opt"] for c in data["curves"]["muP"]]
        if not data["pass"] or None in optima:
            return None
        return 2.0 ** float(np.mean(optima)), min(c["width"] for c in data["curves"]["muP"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _spec(args: Any) -> StudySpec:
    chosen = {k: v for k, v in QUICK.items()} if args.quick else {}
    for key in ("widths", "budgets"):
        if getattr(args, key):
            chosen[key] = tuple(sorted(set(getattr(args, key))))
    for key in ("held_out", "depth_exponent", "batch", "seq_len", "warmup", "n_layers"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    found = transferred_lr(args.transfer)
    source = "--lr"
    if args.lr is not None:
        chosen["lr"] = args.lr
    elif found is not None:
        chosen["lr"], chosen["base_dim"] = found
        source = f"muP's optimum in {args.transfer}"
    else:
        source = f"the default: {args.transfer} is missing or its verdict failed"
    if args.base_dim is not None:
        chosen["base_dim"] = args.base_dim
    spec = StudySpec(**chosen)
    print(f"learning rate 2^{math.log2(spec.lr):.2f} = {spec.lr:.3g} at muP's base width {spec.base_dim} ({source})")
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    """`plots/scaling.py`: run (or go on with) the study through sweep.py, freeze the prediction, run the held-out
    size, then judge and plot. A refused option or grid is a message, not a traceback."""
    from trainer.core.errors import run_command

    return run_command(_study, argv)


def _study(argv: Sequence[str] | None) -> int:
    import argparse

    from trainer.core.layers import ConfigError
    from trainer.launch.executors import executor_for
    from trainer.launch.sweep.cli import main as sweep_main
    from trainer.launch.sweep.state import read_state, sweep_path, sweeps_root

    parser = argparse.ArgumentParser(prog="plots/scaling.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"the small grid (widths {QUICK['widths']}, budgets {QUICK['budgets']} steps): minutes")
    parser.add_argument("--widths", type=int, nargs="+", help=f"model widths (default {StudySpec.widths})")
    parser.add_argument("--budgets", type=int, nargs="+", metavar="STEPS",
                        help=f"token budgets in optimizer steps (default {StudySpec.budgets})")
    parser.add_argument("--held-out", type=int, help="the largest widths held out, predicted, then run (default 1)")
    parser.add_argument("--lr", type=float, help="peak learning rate at --base-dim (default: muP's optimum from "
                        "plots/lr_transfer.json, else 2^-8.5)")
    parser.add_argument("--base-dim", type=int, help="muP's base width (default: the transfer study's smallest)")
    parser.add_argument("--n-layers", type=int, help=f"layers at the smallest width (default {StudySpec.n_layers})")
    parser.add_argument("--depth-exponent", type=float, help="depth grows as (width / smallest)^this (default 0)")
    parser.add_argument("--batch", type=int, help=f"sequences per step (default {StudySpec.batch})")
    parser.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {StudySpec.seq_len})")
    parser.add_argument("--warmup", type=int, help=f"warmup steps (default {StudySpec.warmup})")
    parser.add_argument("--target-flops", type=float, help="the budget whose compute-optimal N, D and loss to "
                        "predict (default: 10 × the study's largest run)")
    parser.add_argument("--name", help="the sweep's name (default: scaling, or scaling-quick with --quick)")
    add_sweep_options(parser, wait="with SLURM: stay, submitting branches as their forks appear, until the verdict "
                      "(else: run the command again); the figure and verdict go to --out as <name>.png and .json")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between looks with --wait")
    parser.add_argument("--replicates", type=int, default=200, help="bootstrap replicates of the fit")
    parser.add_argument("--transfer", type=Path, default=CODE_DIR / "plots" / "lr_transfer.json",
                        help=argparse.SUPPRESS)
    add_replot(parser, "plots/scaling.json")
    args = parser.parse_args(argv)
    if replotted(args, replot):
        return 0
    spec = _spec(args)
    problems = spec.problems()
    if problems:
        raise ConfigError(problems, "invalid scaling study")
    name = args.name or ("scaling-quick" if args.quick else "scaling")
    corpus, jobs = ensure_corpus(args.corpus, spec.vocab_size), jobs_root()
    folder = sweep_path(sweeps_root(), name)
    folder.mkdir(parents=True, exist_ok=True)
    frozen = folder / PREDICTION
    saved = json.loads(frozen.read_text()) if frozen.is_file() else None
    if saved is not None and saved["spec"] != json.loads(json.dumps(asdict(spec))):
        raise ConfigError([f"{frozen}: this study's prediction was made for another grid ({saved['spec']}); "
                           "give the same options, or --name for a new study"], "invalid scaling study")
    plan = runs(spec)
    extra = [f"cluster.profile={args.cluster}", *args.overrides]

    def ready() -> list[Run]:
        """Runs that can start: fitted sizes' stable runs; branches whose fork is saved; the held-out size's once
        its prediction is frozen."""
        return [r for r in plan if (not r.held_out or saved is not None) and (
            r.steps == max(spec.budgets) or is_complete(step_dir(
                jobs / f"{name}.{stable(spec, r).name}" / "checkpoints", spec.fork(r.steps))))]

    started, submitted = time.monotonic(), 0
    while True:
        now = ready()
        if len(now) > submitted:
            source = folder / "source.yaml"  # inside the sweep's folder: generated, never tracked
            write_atomic(source, json.dumps(sweep_file(spec, name, corpus, jobs, now, extra), indent=1) + "\n")
            code = sweep_main(["submit", str(source), "--executor", args.executor])
            if code != 0:  # refused, or a local run stopped at a checkpoint (the study goes on when run again)
                return code
            submitted = len(now)
        state = read_state(folder)
        states = executor_for(state.executor).states([r.job for r in state.points.values()])
        points = [measure(spec, name, jobs, r) for r in plan]
        if saved is None and all(p.loss is not None for p in points if not p.held_out):
            saved = fit_prediction(spec, points, args.replicates)
            write_atomic(frozen, json.dumps(saved, indent=1) + "\n")
            for found in saved["predictions"]:
                print(f"predicted before running it: width {found['width']} at {found['steps']} steps: "
                      f"{found['predicted']:.4f} bits per byte [{found['low']:.4f}, {found['high']:.4f}]")
            continue
        if all(p.loss is not None for p in points):
            break
        if len(ready()) > submitted:  # a fork was saved meanwhile
            continue
        active = [n for n, r in state.points.items() if states[r.job.path].active]
        if active and args.wait:
            print(f"{len(active)} run(s) queued or running, {len(plan) - submitted} waiting for a fork or the "
                  f"prediction; next look in {args.poll:.0f} s", flush=True)
            time.sleep(args.poll)
            continue
        if active:
            print(f"the study is still running ({len(active)} run(s)): {command('sweep')} status {folder}; run "
                  "this again (or with --wait) to submit the branches as their forks appear and to finish it")
            return 0
        loss = {p.job: p.loss for p in points}
        ended = {n: states[r.job.path].state for n, r in state.points.items() if loss.get(r.job.path.name) is None}
        print("run(s) ended without a final held-out loss: " + ", ".join(f"{n} ({s})" for n, s in ended.items())
              + f"; see {command('sweep')} status {folder}, then {command('sweep')} retry {folder} and run this "
              "again")
        return 1
    times = [first_submission(JobDir(jobs / f"{name}.{r.name}")) for r in plan if r.held_out]
    verdict = analyse(spec, points, saved, None if None in times else min(times), args.target_flops)
    args.out.mkdir(parents=True, exist_ok=True)
    figure(verdict, args.out / f"{name}.png")  # named after the study: --quick never replaces the default's
    write_atomic(args.out / f"{name}.json", verdict.to_json())
    law = verdict.law
    print(f"law (fitted without the held-out size): L(N, D) = {law['E']:.4f} + {law['A']:.4g}/N^{law['alpha']:.4f}"
          f" + {law['B']:.4g}/D^{law['beta']:.4f}")
    for found in verdict.predictions:
        print(f"held out: width {found['width']} at {found['steps']} steps: measured {found['measured']:.4f}, "
              f"predicted {found['predicted']:.4f} [{found['low']:.4f}, {found['high']:.4f}] "
              f"{'inside' if found['inside'] else 'OUTSIDE'}")
    t = verdict.target
    print(f"target {t['flops']:.3g} FLOPs: compute-optimal N = {t['n']:.3g}, D = {t['tokens']:.3g} tokens, "
          f"predicted {t['predicted']:.4f} [{t['low']:.4f}, {t['high']:.4f}]")
    for check, ok in verdict.checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {check}")
    print(f"{time.monotonic() - started:.0f} s; wrote {args.out / f'{name}.png'}")
    return 0 if verdict.passed else 1
