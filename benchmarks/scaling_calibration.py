"""How often the scaling study's verdict is right, on synthetic studies whose truth is known: the default grid of
plots/scaling.py (5 widths × 3 budgets, N and D of its real models), final losses drawn from a law with a run-to-run
scatter, the largest width held out and predicted at 95 %. Printed side by side with the nominal rates:

- calibration: the share of held-out runs inside their interval (nominal 95 %) and of studies whose verdict passes
  when the law is right (3 correlated runs: somewhat below);
- power (the control): the share of studies failed when the truth is a law of another form (the largest models
  better than any power law in N says, by `--bend` at the held-out size).

    python benchmarks/scaling_calibration.py [--studies 40] [--noise 0.003] [--bend 0.03]   # ~90 s on 2 cores
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np

from trainer.core.costs import num_params
from trainer.research.scaling import StudySpec, runs
from trainer.research.scaling_law import Law, predict_held_out

TRUTH = Law(E=1.6, A=60.0, alpha=0.32, B=150.0, beta=0.45)
"""A law of the size the default study measured (bits per byte of a 512-token vocabulary)."""


def study(args: tuple[int, float, float]) -> list[bool]:
    """One synthetic study: each held-out run inside its interval?"""
    seed, noise, bend = args
    spec = StudySpec()
    rng = np.random.default_rng(seed)
    n, d, loss, held = [], [], [], []
    largest = float(num_params(spec.model(max(spec.widths)), embeddings=False))
    for r in runs(spec):
        size = float(num_params(spec.model(r.width), embeddings=False))
        tokens = float(r.steps * spec.batch * spec.seq_len)
        truth = float(TRUTH.loss(size, tokens)) * (1 - bend * (size / largest) ** 3)
        n.append(size), d.append(tokens), held.append(r.held_out)
        loss.append(truth * float(np.exp(rng.normal(0, noise))))
    _, predictions = predict_held_out(n, d, loss, held, replicates=200, seed=seed)
    return [p.inside for p in predictions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--noise", type=float, default=0.003, help="run-to-run scatter (log-normal σ)")
    parser.add_argument("--bend", type=float, default=0.03, help="the control's departure at the held-out size")
    args = parser.parse_args()
    started = time.monotonic()
    with multiprocessing.Pool(2) as pool:
        right = pool.map(study, [(s, args.noise, 0.0) for s in range(args.studies)])
        wrong = pool.map(study, [(s, args.noise, args.bend) for s in range(args.studies)])
    runs_inside = float(np.mean([x for found in right for x in found]))
    passed = float(np.mean([all(found) for found in right]))
    caught = float(np.mean([not all(found) for found in wrong]))
    print(f"{args.studies} studies per case, scatter {args.noise:.2%}, {time.monotonic() - started:.0f} s")
    print("| measure | found | nominal | ratio |")
    print("|---|---|---|---|")
    print(f"| held-out runs inside their 95 % interval (law right) | {runs_inside:.1%} | 95 % | "
          f"{runs_inside / 0.95:.2f} |")
    print(f"| studies passed (law right) | {passed:.1%} | 95 % per run, 3 runs | {passed / 0.95:.2f} |")
    print(f"| studies failed (law {args.bend:.0%} off at the held-out size: the control) | {caught:.1%} | "
          f"100 % | {caught:.2f} |")


if __name__ == "__main__":
    main()
