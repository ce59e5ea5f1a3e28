"""The muP coordinate check: the trainer's own model — its config, parallelisms, init and optimizer groups, not a
copy — trained at several widths for a few steps at a large learning rate on one fixed batch, with the size of
every activation recorded per step. Under muP the sizes do not depend on the width; under standard
parametrization (SP) they grow with it. The slope of log2(size) against log2(width) (per octave of width, least
squares over every width) says which, and a verdict that can fail says so.

Recorded (mean |x|, averaged over seeds): the embedding output, each block's attention logits, attention output
and MLP output (with experts: also how far training moved the router's logits), and the output logits. Runs on one
process or under torchrun (FSDP over the ranks: the plan is layout-independent, so the numbers agree).
"""

from __future__ import annotations

import functools
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.core.config import AnvilConfig
from trainer.core.jobdir import CODE_DIR
from trainer.core.layers import load_config
from trainer.data.tools import machine_texts
from trainer.research.figures import add_replot, replotted, save
from trainer.train.distributed import process_group
from trainer.train.model import MoE
from trainer.train.optim import build_optimizer
from trainer.train.parallelize import build_layout, build_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BOUND = 0.25
"""|slope| per octave of width that muP must stay under at every step from the second on (research/mup.md §3.3)."""
WATCHED = ("logits", "attn_logits")
"""Where SP must fail the bound: the negative control that shows the check has power."""


@dataclass(frozen=True)
class CoordSpec:
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    steps: int = 10
    seeds: int = 2
    lr: float = 3e-3
    """Large (SP's activations blow up within steps), but not so large that Adam's sign-like first updates leave a
    finite-width drift: at 1e-2 the second block's attention logits drift by -0.4 per octave at step 3 under muP
    (the 1/sqrt(width) part of an update), at 3e-3 every module stays within about 0.15."""
    n_layers: int = 2
    head_dim: int = 32
    grow: str = "heads"
    """How width grows: `heads` (more heads of `head_dim`) or `head_dim` (wider heads, width / head_dim heads at the
    base width): the second exercises muP's 1/head-dim attention rule."""
    batch: int = 4
    seq_len: int = 64

    @property
    def base_dim(self) -> int:
        return min(self.widths)


def config(spec: CoordSpec, width: int, mup: bool, seed: int, world: int = 1, extra: Sequence[str] = ()
           ) -> AnvilConfig:
    """The job config of one run, through the config layers every job goes through."""
    heads = width // spec.head_dim if spec.grow == "heads" else spec.base_dim // spec.head_dim
    overrides = [
        "job.name=coord", f"model.dim={width}", f"model.n_heads={heads}", f"model.n_layers={spec.n_layers}",
        "model.vocab_size=256", f"model.ffn_dim={4 * width}", f"model.mup.enabled={str(mup).lower()}",
        f"model.mup.base_dim={spec.base_dim}", f"data.seq_len={spec.seq_len}", f"optim.lr={spec.lr}",
        "optim.eps=1e-12", "optim.weight_decay=0", "optim.grad_clip=null", "optim.warmup_steps=0",
        "optim.schedule=constant", f"train.seed={seed}", "train.mixed_precision=fp32",
        f"cluster.devices_per_node={world}", f"train.global_batch_size={spec.batch}",
        f"train.micro_batch_size={spec.batch // world}",
    ]
    if mup:  # muP's zero initialisations make step 1 width-independent too (mup.md §3.1)
        overrides += ["model.mup.zero_readout=true"]
        if spec.grow == "head_dim":
            overrides += [f"model.mup.base_head_dim={spec.head_dim}", "model.mup.zero_query=true"]
    return load_config(None, [*overrides, *extra], environ={})


@functools.lru_cache(maxsize=1)
def _text() -> bytes:
    return "\n\n".join(machine_texts(200_000)).encode("utf-8")


def fixed_batch(spec: CoordSpec) -> torch.Tensor:
    """`batch` rows of `seq_len + 1` bytes of this machine's own text (vocabulary 256: no tokenizer needed)."""
    text = _text()
    need = spec.batch * (spec.seq_len + 1)
    data = torch.tensor(list(text[:need]), dtype=torch.long)
    return data.view(spec.batch, spec.seq_len + 1)


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_one(cfg: AnvilConfig, batch: torch.Tensor, steps: int) -> dict[int, dict[str, float]]:
    """Train `steps` steps on the fixed batch; returns {step: {module: mean |x|}}, step 1 being before any update."""
    rank, world = _world()
    layout = build_layout(cfg, "cpu")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.parallel, layout, torch.device("cpu"), torch.float32, seq_len=cfg.data.seq_len,
                        seed=cfg.train.seed)
    optimizer = build_optimizer(model, cfg.model, cfg.optim)
    sums: dict[str, torch.Tensor] = {}

    def watch(name: str):
        def hook(module, inputs, output) -> None:
            sums[name] = output.detach().abs().mean().reshape(1)
        return hook

    def watch_router(name: str, mult: float):
        """How far training has moved the router's logits (multiplier included): `mult · (W - W_1) x`. The logits
        themselves also hold the init's part, which muP lets vanish as 1/sqrt(m) (an output-like weight, like the
        readout, whose zero init the check uses instead); the update's part is what muP keeps width-independent."""
        first: list[torch.Tensor] = []

        def hook(module, inputs, output) -> None:
            weight = module.weight.detach()  # unsharded during its module's forward, also under FSDP
            if not first:
                first.append(weight.clone())
            sums[name] = (F.linear(inputs[0].detach(), weight - first[0]).abs().mean() * mult).reshape(1)
        return hook

    def watch_attention_logits(name: str):
        """The attention logits of the causal positions, recomputed from the attention's inputs (the forward never
        materialises them)."""
        def hook(module, inputs, output) -> None:
            with torch.no_grad():
                q, k = module.queries_and_keys(*inputs[:3])
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                causal = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool, device=q.device).tril()
                sums[name] = (q @ k.transpose(-2, -1) * module.scale)[..., causal].abs().mean().reshape(1)
        return hook

    handles = [model.embedded.register_forward_hook(watch("embedding")),
               model.logits.register_forward_hook(watch("logits"))]
    for i, block in model.layers.items():
        handles += [block.attention.register_forward_hook(watch_attention_logits(f"layers.{i}.attn_logits")),
                    block.attention.register_forward_hook(watch(f"layers.{i}.attention")),
                    block.feed_forward.register_forward_hook(watch(f"layers.{i}.mlp"))]
        if isinstance(block.feed_forward, MoE):
            handles.append(block.feed_forward.router.register_forward_hook(
                watch_router(f"layers.{i}.router_update", block.feed_forward.router_mult)))
    rows = batch.shape[0] // world
    mine = batch[layout.dp_rank * rows:(layout.dp_rank + 1) * rows]
    record: dict[int, dict[str, float]] = {}
    try:
        for step in range(1, steps + 1):
            logits = model(mine[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten())
            names = sorted(sums)
            values = torch.cat([sums[n] for n in names])
            if world > 1:  # each rank saw an equal share of the batch
                dist.all_reduce(values)
                values /= world
            record[step] = dict(zip(names, values.tolist(), strict=True))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
    return record


@dataclass
class CoordResult:
    parametrization: str
    spec: dict
    l1: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """module -> step -> width -> mean |x| (over seeds)."""
    slopes: dict[str, dict[str, float]] = field(default_factory=dict)
    """module -> step -> slope of log2(mean |x|) against log2(width)."""
    failures: list[str] = field(default_factory=list)
    as_expected: bool = False
    """muP: every slope within the bound; SP (the negative control): the bound broken on the watched modules."""


def slope(widths: Sequence[int], values: Sequence[float]) -> float:
    """Least-squares slope of log2(value) against log2(width): 0 where every value is exactly 0 (a zero init that
    has not moved yet is width-independent), nan where only some are (or any is not finite)."""
    if all(v == 0 for v in values):
        return 0.0
    if any(v <= 0 or not math.isfinite(v) for v in values):
        return math.nan
    return float(np.polyfit(np.log2(widths), np.log2(values), 1)[0])


def measure(spec: CoordSpec, mup: bool, extra: Sequence[str] = ()) -> CoordResult:
    """Every width and seed; the slopes and the verdict (muP: every |slope| < BOUND from step 2 on; SP: expected
    to break it on the logits and the attention logits)."""
    _, world = _world()
    batch = fixed_batch(spec)
    runs: dict[int, list[dict[int, dict[str, float]]]] = defaultdict(list)
    for width in spec.widths:
        for seed in range(spec.seeds):
            runs[width].append(run_one(config(spec, width, mup, seed, world, extra), batch, spec.steps))
    result = CoordResult("muP" if mup else "SP", asdict(spec))
    modules = sorted(runs[spec.widths[0]][0][1])
    for module in modules:
        result.l1[module], result.slopes[module] = {}, {}
        for step in range(1, spec.steps + 1):
            means = [float(np.mean([r[step][module] for r in runs[w]])) for w in spec.widths]
            result.l1[module][str(step)] = dict(zip(map(str, spec.widths), means, strict=True))
            result.slopes[module][str(step)] = slope(spec.widths, means)
    return judge(result, mup)


def judge(result: CoordResult, mup: bool) -> CoordResult:
    """muP passes when every module's |slope| stays under BOUND at every step from the second on (a nan there —
    a zero that never moved — fails too); SP is expected to exceed it on the watched modules."""
    exceeded = []
    for module, by_step in result.slopes.items():
        for step, s in by_step.items():
            if int(step) >= 2 and not abs(s) < BOUND:
                exceeded.append(f"{module} at step {step}: slope {s:+.2f} per octave")
    result.failures = exceeded
    if mup:
        result.as_expected = not exceeded
    else:  # SP "passes" as a control when it shows, on the watched modules, the growth muP removes
        broke = {failure.split(" at step ")[0] for failure in exceeded}
        result.as_expected = all(any(m == w or m.endswith(f".{w}") for m in broke) for w in WATCHED)
    return result


def worst_slope(result: CoordResult, step: int | None = None) -> tuple[float, str]:
    """The slope of largest size (signed) and where it is, from step 2 on (what the verdict judges) or at one step:
    the number a reader checks against BOUND."""
    found = [(s, f"{m}, step {t}") for m, by in result.slopes.items() for t, s in by.items()
             if (int(t) == step if step else int(t) >= 2) and math.isfinite(s)]
    return max(found, key=lambda f: abs(f[0]), default=(math.nan, "no finite slope"))


def verdict_text(result: CoordResult) -> str:
    """One line of the verdict `judge` gave, with its numbers: the figure's title states it, so the figure reads
    on its own."""
    s, where = worst_slope(result)
    if result.parametrization == "muP" and result.as_expected:
        return (f"muP: PASS ✓ flat: every |slope| from step 2 under {BOUND} per octave "
                f"(largest {s:+.2f}: {where})")
    if result.parametrization == "muP":
        return (f"muP: FAIL ✗ not flat: {len(result.failures)} module-steps at |slope| ≥ {BOUND} per octave "
                f"(largest {s:+.2f}: {where})")
    if result.as_expected:
        return (f"SP, the negative control: PASS ✓ grows: past {BOUND} on the logits and the attention logits, "
                f"as it must (largest {s:+.2f} per octave: {where})")
    return (f"SP, the negative control: FAIL ✗ stays within {BOUND} on the logits or the attention logits, so the "
            f"check shows nothing here (largest {s:+.2f} per octave: {where})")


def _describe(module: str) -> str:
    """A legend label a reader without the code understands, keeping the name the JSON and failures use."""
    block, _, kind = module.rpartition(".")
    where = f"block {block.split('.')[-1]} " if block else ""
    what = {"embedding": "embedding output", "logits": "output logits", "attn_logits": "attention logits (q·k)",
            "attention": "attention output", "mlp": "MLP output", "router_update": "router logits' change"}
    return f"{where}{what.get(kind, kind)}  [{module}]"


def build_figure(results: Sequence[CoordResult], steps: Sequence[int] | None = None) -> Figure:
    """One panel per step (columns), one row per parametrization: mean |x| against width, a line per module (the
    same colour in every panel); the title states the experiment and each verdict. Returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    shown = list(steps or sorted({int(s) for s in next(iter(results[0].l1.values()))}))
    modules = list(dict.fromkeys(m for r in results for m in r.l1))
    colour = {m: f"C{i % 10}" for i, m in enumerate(modules)}
    fig, axes = plt.subplots(len(results), len(shown), figsize=(max(3.2 * len(shown), 15), 2.9 * len(results) + 2.2),
                             squeeze=False, sharex=True, layout="constrained")
    for row, result in enumerate(results):
        for col, step in enumerate(shown):
            ax = axes[row][col]
            zero = []
            for module, by_step in result.l1.items():
                widths = [int(w) for w in by_step[str(step)]]
                values = list(by_step[str(step)].values())
                if all(v > 0 for v in values):
                    ax.plot(widths, values, marker=".", linewidth=1, color=colour[module])
                elif all(v == 0 for v in values):  # a zero init not yet moved: no log, but width-independent
                    zero.append(module)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            title = f"{result.parametrization}, step {step}: max |slope| {abs(worst_slope(result, step)[0]):.2f}"
            ax.set_title(title + (f"\n(0 at every width, not drawn: {', '.join(zero)})" if zero else ""), fontsize=9)
            if row == len(results) - 1:
                ax.set_xlabel("width (model dim, log2)")
    spec = results[0].spec
    grow = f"more heads of {spec['head_dim']}" if spec["grow"] == "heads" else "wider heads"
    seeds = f"{spec['seeds']} seed" + ("s" if spec["seeds"] != 1 else "")
    fig.suptitle(
        "muP coordinate check: activation size against width, muP (top) vs standard parametrization (SP, bottom)\n"
        f"steps 1 (at init) to {spec['steps']} at lr {spec['lr']:g} on one fixed batch, {seeds}, width "
        f"grown by {grow}; slope = change of log2 size per doubling of width, muP's |slope| must stay under {BOUND} "
        "from step 2\n"
        + "\n".join(verdict_text(r) for r in results), fontsize=10)
    fig.supylabel("mean |activation| over the batch (log scale, mean of seeds)", fontsize=10)
    handles = [Line2D([], [], color=colour[m], marker=".", linewidth=1.5) for m in modules]
    fig.legend(handles, [_describe(m) for m in modules], loc="outside lower center", ncol=min(len(modules), 4),
               fontsize=9, title="activation [module]", title_fontsize=9, frameon=False)
    return fig


def figure(results: Sequence[CoordResult], out: Path, steps: Sequence[int] | None = None) -> Path:
    """The figure of `build_figure`, written to `out`."""
    return save(build_figure(results, steps), out)


def shown_steps(steps: int) -> list[int]:
    """The steps the figure shows: the first three (before and just after the first updates), 5, 10 and the last."""
    return sorted({s for s in (1, 2, 3, 5, 10, steps) if s <= steps})


def replot(saved: Path, out: Path) -> Path:
    """Redraw the figure from a saved verdict (.json), without training again."""
    results = [CoordResult(**r) for r in json.loads(saved.read_text())["results"]]
    return figure(results, out, shown_steps(int(results[0].spec["steps"])))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="plots/coord_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=list(CoordSpec.widths))
    parser.add_argument("--steps", type=int, default=CoordSpec.steps)
    parser.add_argument("--seeds", type=int, default=CoordSpec.seeds)
    parser.add_argument("--lr", type=float, default=CoordSpec.lr)
    parser.add_argument("--layers", type=int, default=CoordSpec.n_layers)
    parser.add_argument("--head-dim", type=int, default=CoordSpec.head_dim)
    parser.add_argument("--grow", choices=("heads", "head_dim"), default="heads")
    parser.add_argument("--out", type=Path, default=CODE_DIR / "plots")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run, e.g. model.moe.experts=4 model.moe.top_k=2")
    add_replot(parser, "plots/coord_check.json")
    args = parser.parse_args(argv)
    if replotted(args, replot):
        return 0
    process_group()
    spec = CoordSpec(tuple(sorted(args.widths)), args.steps, args.seeds, args.lr, args.layers, args.head_dim,
                     args.grow)
    results = [measure(spec, mup=True, extra=args.override), measure(spec, mup=False, extra=args.override)]
    rank, _ = _world()
    code = 0 if all(r.as_expected for r in results) else 1
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "coord_check" if args.grow == "heads" else "coord_check_head_dim"
        figure(results, args.out / f"{stem}.png", shown_steps(args.steps))
        verdict = {"pass": code == 0, "bound": BOUND, "results": [asdict(r) for r in results]}
        (args.out / f"{stem}.json").write_text(json.dumps(verdict, indent=1) + "\n")
        for r in results:
            worst = abs(worst_slope(r)[0])
            if r.parametrization == "muP":
                print(f"muP: {'PASS' if r.as_expected else 'FAIL'}: largest |slope| from step 2 {worst:.2f} per octave "
                      f"(bound {BOUND})")
            else:
                shown = ("breaks the bound, as it must" if r.as_expected else
                         "FAIL: stays within the bound on the logits, so the check shows nothing here")
                print(f"SP, the negative control: {shown} (largest |slope| {worst:.2f} per octave)")
        print(f"wrote {args.out / (stem + '.png')} and {args.out / (stem + '.json')}")
    dist.destroy_process_group()
    return code
