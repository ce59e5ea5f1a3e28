"""Learning-rate transfer (research/mup.md §4): the width × learning-rate grid for muP and for SP as one sweep,
each width's optimum from a quadratic fit in log2(lr) around the grid's best point, and a verdict that can fail —
muP's optimum stays put (≤ 0.5 octave) across widths and wider is not worse, while SP's optimum (or its instability
edge) moves by an octave or more: the control that shows the grid had the power to tell.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer.core.commands import command
from trainer.launch.sweep.results import history
from trainer.launch.sweep.state import SweepState
from trainer.research.figures import add_replot, add_sweep_options, ensure_corpus, replotted, save

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MUP_SHIFT = 0.5
"""The most muP's optimum may move, in octaves of learning rate, across the widths."""
SP_SHIFT = 1.0
"""The least SP's optimum, or its instability edge, must move for the run to have shown anything."""
EDGE = 0.5
"""A learning rate above the optimum whose loss is this much (nats) worse than the best, or that diverged, marks the
instability edge: often the clearest sign of whether a rule transfers (research/mup.md §4.1)."""


@dataclass(frozen=True)
class TransferSpec:
    widths: tuple[int, ...] = (64, 128, 256)
    log2_lrs: tuple[int, ...] = tuple(range(-12, -3))
    steps: int = 150
    head_dim: int = 32
    n_layers: int = 2
    seq_len: int = 64
    batch: int = 8
    warmup: int = 10
    seeds: int = 2
    """Each point's final loss is the mean over these seeds (one seed leaves ±0.05 nats of noise between widths)."""

    def sweep_file(self, name: str, corpus: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
        """The sweep: muP and SP × width (heads of `head_dim` grow with it) × learning rate. muP runs with its
        plain initialisation (no zero readout): over a 150-step horizon, Adam's sign-like first updates of a zero
        readout cost this model about 0.9 nats on BPE text (4.57 against 3.68 at step 135, width 64, where muP and
        SP are otherwise the same model), which would confound the comparison."""
        return {
            "name": name,
            "overrides": [
                f"model.n_layers={self.n_layers}", f"model.mup.base_dim={min(self.widths)}",
                f"data.seq_len={self.seq_len}", "data.num_workers=0",
                "data.logical_shards=8", f"data.datasets=[{{path: {corpus / 'train'}}}]",
                f"data.tokenizer={corpus / 'tokenizer.json'}", "model.vocab_size=512",
                f"train.steps={self.steps}", f"train.global_batch_size={self.batch}",
                f"train.micro_batch_size={self.batch}", "train.mixed_precision=fp32",
                f"optim.warmup_steps={self.warmup}", "optim.schedule=constant", "optim.weight_decay=0",
                "metrics.log_every=5", f"checkpoint.interval={self.steps}", "checkpoint.keep=1",
                "cluster.env={OMP_NUM_THREADS: '1'}", *extra,
            ],
            "axes": {"model.mup.enabled": [True, False], "optim.lr": [2.0 ** k for k in self.log2_lrs],
                     "train.seed": list(range(self.seeds))},
            "zip": [{"model.dim": list(self.widths), "model.n_heads": [w // self.head_dim for w in self.widths],
                     "model.ffn_dim": [4 * w for w in self.widths]}],
        }


def final_loss(rows: Sequence[dict[str, Any]], steps: int) -> float | None:
    """The mean training loss over the last 10% of the steps (None when the run did not get there)."""
    tail = [r["loss"] for r in rows if "loss" in r and r["step"] > 0.9 * steps]
    last = max((r["step"] for r in rows if "loss" in r), default=0)
    if last < steps or not tail:
        return None
    value = float(np.mean(tail))
    return value if math.isfinite(value) else None


def optimum(log2_lrs: Sequence[float], losses: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(log2 of the best learning rate, the best loss): a parabola through the grid's best point and its two
    neighbours gives the vertex; at an edge of the grid (or with a diverged neighbour) the grid point itself."""
    finite = [(x, y) for x, y in zip(log2_lrs, losses, strict=True) if y is not None]
    if not finite:
        return None, None
    i = min(range(len(losses)), key=lambda j: math.inf if losses[j] is None else losses[j])
    best = losses[i]
    if 0 < i < len(losses) - 1 and losses[i - 1] is not None and losses[i + 1] is not None:
        a, b, _ = np.polyfit(log2_lrs[i - 1:i + 2], [losses[i - 1], best, losses[i + 1]], 2)
        if a > 0:
            return float(np.clip(-b / (2 * a), log2_lrs[i - 1], log2_lrs[i + 1])), float(best)
    return float(log2_lrs[i]), float(best)


def edge(log2_lrs: Sequence[float], losses: Sequence[float | None]) -> float | None:
    """The smallest learning rate (log2) above the grid's best one whose run diverged or ended EDGE nats worse
    than the best; None if none did."""
    finite = [y for y in losses if y is not None]
    if not finite:
        return None
    best = min(finite)
    start = losses.index(best)
    return next((x for x, y in zip(log2_lrs[start:], losses[start:], strict=True) if y is None or y > best + EDGE),
                None)


@dataclass
class Curve:
    width: int
    losses: list[float | None]
    log2_opt: float | None
    best: float | None
    edge: float | None


@dataclass
class Verdict:
    log2_lrs: list[float]
    curves: dict[str, list[Curve]] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def to_json(self) -> str:
        return json.dumps({"pass": self.passed, **asdict(self)}, indent=1) + "\n"


def analyse(state: SweepState, spec: TransferSpec) -> Verdict:
    """Every point's final loss, each width's optimum, and the checks of the protocol."""
    log2_lrs = [float(k) for k in spec.log2_lrs]
    verdict = Verdict(log2_lrs)
    runs: dict[tuple[bool, int, float], dict[int, float | None]] = {}
    for record in state.points.values():
        v = record.values
        key = (bool(v["model.mup.enabled"]), int(v["model.dim"]), math.log2(float(v["optim.lr"])))
        runs.setdefault(key, {})[int(v.get("train.seed", 0))] = final_loss(history(record.job), spec.steps)
    # A point's loss is the mean over its seeds; diverged (or unfinished) in any seed counts as diverged.
    table = {key: None if None in found.values() else float(np.mean(list(found.values())))
             for key, found in runs.items()}
    for mup in (True, False):
        name = "muP" if mup else "SP"
        curves = []
        for width in spec.widths:
            losses = [table.get((mup, width, x)) for x in log2_lrs]
            opt, best = optimum(log2_lrs, losses)
            curves.append(Curve(width, losses, opt, best, edge(log2_lrs, losses)))
        verdict.curves[name] = curves
    mup_opts = [c.log2_opt for c in verdict.curves["muP"]]
    sp_opts = [c.log2_opt for c in verdict.curves["SP"]]
    if None in mup_opts or None in sp_opts:
        verdict.notes.append("some width has no finished run: run the same command again to finish the grid")
        verdict.checks["grid complete"] = False
        return verdict
    shift = max(abs(o - mup_opts[0]) for o in mup_opts)
    verdict.checks[f"muP optimum moves <= {MUP_SHIFT} octave"] = shift <= MUP_SHIFT
    wider = [_paired(runs, verdict.log2_lrs, c1, c2) for c1, c2 in zip(verdict.curves["muP"],
                                                                        verdict.curves["muP"][1:], strict=False)]
    verdict.checks["muP best loss does not worsen with width (beyond the noise between seeds)"] = all(
        change <= max(2 * noise, 0.01) for change, noise in wider)
    verdict.notes.append("muP best loss with width: " + ", ".join(
        f"{c1.width}->{c2.width} {change:+.3f} ± {noise:.3f}" for (change, noise), c1, c2 in
        zip(wider, verdict.curves["muP"], verdict.curves["muP"][1:], strict=False)))
    sp_shift = max(abs(o - sp_opts[0]) for o in sp_opts)
    beyond = log2_lrs[-1] + 1  # a width that never diverged: its edge lies past the grid (a lower bound)
    edges = [beyond if c.edge is None else c.edge for c in verdict.curves["SP"]]
    edge_shift = max(edges) - min(edges)
    verdict.checks[f"SP optimum or instability edge moves >= {SP_SHIFT} octave (the control)"] = max(
        sp_shift, edge_shift) >= SP_SHIFT
    verdict.notes.append(f"muP optimum shift {shift:.2f} octave; SP optimum shift {sp_shift:.2f}, instability edge "
                         f"shift {edge_shift:.2f}")
    return verdict


def _paired(runs: dict, log2_lrs: Sequence[float], narrow: Curve, wide: Curve) -> tuple[float, float]:
    """How much worse the wider width's best grid point is than the narrower's: the mean of the per-seed
    differences (each seed trains both widths on the same data order), and its standard error (0 with one seed)."""
    def best_point(curve: Curve) -> float:
        return log2_lrs[min(range(len(curve.losses)), key=lambda i: math.inf if curve.losses[i] is None
                            else curve.losses[i])]

    a, b = runs[(True, narrow.width, best_point(narrow))], runs[(True, wide.width, best_point(wide))]
    diffs = [b[seed] - a[seed] for seed in sorted(set(a) & set(b))]
    noise = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else 0.0
    return float(np.mean(diffs)), noise


def build_figure(verdict: Verdict) -> Figure:
    """Loss against learning rate, a curve per width (the colour) with its optimum (star on a dotted line) and
    instability edge (dashed) marked, muP and SP side by side; the legend explains every mark and the title states
    the verdict with its numbers, so the figure reads without the README. Returns the Figure."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(verdict.curves), figsize=(14, 7), sharey=True, squeeze=False,
                             layout="constrained")
    widths: dict[int, str] = {}
    for ax, (name, curves) in zip(axes[0], verdict.curves.items(), strict=True):
        for curve in curves:
            colour = widths.setdefault(curve.width, f"C{len(widths) % 10}")
            xs = [x for x, y in zip(verdict.log2_lrs, curve.losses, strict=True) if y is not None]
            ys = [y for y in curve.losses if y is not None]
            ax.plot(xs, ys, marker="o", markersize=3, color=colour)
            lost = [x for x, y in zip(verdict.log2_lrs, curve.losses, strict=True) if y is None]
            ax.plot(lost, [0.97] * len(lost), marker="x", color=colour, linestyle="none",
                    transform=ax.get_xaxis_transform())  # no loss to draw: marked along the top
            if curve.log2_opt is not None:
                ax.axvline(curve.log2_opt, color=colour, linestyle=":", linewidth=1)
                ax.plot([curve.log2_opt], [curve.best], marker="*", markersize=12, color=colour, linestyle="none")
            if curve.edge is not None:
                ax.axvline(curve.edge, color=colour, linestyle="--", linewidth=0.8, alpha=0.6)
        ax.set_title(name if name != "SP" else "SP (standard parametrization): the control")
        ax.set_xticks(verdict.log2_lrs, [f"$2^{{{x:g}}}$" for x in verdict.log2_lrs])
        ax.set_xlabel("learning rate (log2 scale, one tick per octave)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final training loss, nats (mean of the last 10% of steps and of the seeds)")
    marks = [Line2D([], [], color=c, marker="o", markersize=3) for c in widths.values()] + [
        Line2D([], [], color="grey", marker="*", markersize=12, linestyle=":", linewidth=1),
        Line2D([], [], color="grey", linestyle="--", linewidth=0.8)]
    labels = [f"width {w}" for w in widths] + [
        "optimum: the width's best learning rate\n(parabola fit in log2 lr around the\n"
        "best grid point; star at that loss)",
        f"instability edge: the first learning rate\nabove the best one that diverged or\n"
        f"ended {EDGE} nats worse than the best"]
    if any(None in c.losses for curves in verdict.curves.values() for c in curves):
        marks.append(Line2D([], [], color="grey", marker="x", linestyle="none"))
        labels.append("diverged or unfinished\n(no final loss)")
    fig.legend(marks, labels, loc="outside lower center", ncol=len(labels), fontsize=9, frameon=False)
    checks = "   ".join(f"{'✓' if ok else '✗'} {check}" for check, ok in verdict.checks.items())
    fig.suptitle("\n".join([
        "Learning-rate transfer: final training loss against learning rate, one curve per width, muP and SP",
        ("PASS: the optimum transfers across widths under muP, not under SP: " if verdict.passed else "FAIL: ")
        + (verdict.notes[-1] if verdict.notes else "no runs"), *textwrap.wrap(checks, 180), *verdict.notes[:-1]]),
        fontsize=10)
    return fig


def figure(verdict: Verdict, out: Path) -> Path:
    """The figure of `build_figure`, written to `out`."""
    return save(build_figure(verdict), out)


def replot(saved: Path, out: Path) -> Path:
    """Redraw the figure from a saved verdict (.json), without the grid's runs."""
    data = json.loads(saved.read_text())
    curves = {name: [Curve(**c) for c in found] for name, found in data["curves"].items()}
    return figure(Verdict(data["log2_lrs"], curves, data["checks"], data["notes"]), out)


def _short(value: float | None, digits: int) -> str:
    return "none" if value is None else f"{value:.{digits}f}"


def main(argv: Sequence[str] | None = None) -> int:
    """`plots/lr_transfer.py`: run (or finish) the grid through sweep.py, then fit, plot and judge."""
    import argparse
    import time

    from trainer.core.states import PREEMPTED_EXIT
    from trainer.launch.executors import executor_for
    from trainer.launch.sweep.cli import main as sweep_main
    from trainer.launch.sweep.state import read_state, sweep_path, sweeps_root

    parser = argparse.ArgumentParser(prog="plots/lr_transfer.py", description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=list(TransferSpec.widths))
    parser.add_argument("--lrs", type=int, nargs="+", metavar="LOG2", default=list(TransferSpec.log2_lrs),
                        help="log2 of each learning rate (default -12 ... -4)")
    parser.add_argument("--steps", type=int, default=TransferSpec.steps)
    parser.add_argument("--seeds", type=int, default=TransferSpec.seeds)
    parser.add_argument("--name", default="lr-transfer", help="the sweep's name (sweeps/<name>/)")
    add_sweep_options(parser, wait="with SLURM: wait for the grid instead of exiting")
    add_replot(parser, "plots/lr_transfer.json")
    args = parser.parse_args(argv)
    if replotted(args, replot):
        return 0
    spec = TransferSpec(tuple(sorted(args.widths)), tuple(sorted(args.lrs)), args.steps, seeds=args.seeds)
    corpus = ensure_corpus(args.corpus)
    folder = sweep_path(sweeps_root(), args.name)
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "source.yaml"  # inside the sweep's folder: generated, never tracked
    extra = [f"cluster.profile={args.cluster}", *args.overrides]
    source.write_text(json.dumps(spec.sweep_file(args.name, corpus, extra), indent=1) + "\n")
    started = time.monotonic()
    code = sweep_main(["submit", str(source), "--executor", args.executor])
    if code not in (0, PREEMPTED_EXIT):  # stopped at a checkpoint: the grid goes on later
        return code
    state = read_state(folder)
    executor = executor_for(state.executor)
    jobs = [record.job for record in state.points.values()]
    while args.wait and any(s.active for s in executor.states(jobs).values()):
        time.sleep(30)
    if any(s.active for s in executor.states(jobs).values()):
        print(f"the grid is still running: {command('sweep')} status {folder}; run this again when it is done")
        return 0
    verdict = analyse(state, spec)
    args.out.mkdir(parents=True, exist_ok=True)
    figure(verdict, args.out / "lr_transfer.png")
    (args.out / "lr_transfer.json").write_text(verdict.to_json())
    for name, curves in verdict.curves.items():
        found = [f"width {c.width}: log2 lr* {_short(c.log2_opt, 2)} (loss {_short(c.best, 3)})" for c in curves]
        print(f"{name}: " + ", ".join(found))
    for check, ok in verdict.checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {check}")
    print(f"{'; '.join(verdict.notes)}; {time.monotonic() - started:.0f} s; wrote {args.out / 'lr_transfer.png'}")
    return 0 if verdict.passed else 1
