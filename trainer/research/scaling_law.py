"""A scaling law fitted to final losses: L(N, D) = E + A / N^α + B / D^β (N non-embedding parameters, D training
tokens; Hoffmann et al. 2022, approach 3), its uncertainty, the compute-optimal split of a FLOP budget, and the
check that makes it science: a held-out run's loss predicted from the others, with an interval it must fall in.

The fit minimises a Huber loss (δ = 1e-3) between log L and the law's log-sum-exp form, with L-BFGS from a grid of
starts (the objective has many local minima), as Chinchilla did and Besiroglu et al. 2024 re-checked: robust to a
stray point, and in log space so that each point weighs by its relative error. Uncertainty comes from a bootstrap
over the points (each replicate refitted); a prediction's interval adds, to that, the scatter of one run about the
law (a residual drawn from the fit's own). No torch here: numbers in, numbers out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber, logsumexp

HUBER_DELTA = 1e-3
"""Residuals in log-loss above this count linearly: a diverged or unlucky run moves the fit little."""

STARTS = {"e": (-1.0, 1.0), "a": (0.0, 6.0, 12.0), "b": (0.0, 6.0, 12.0), "alpha": (0.2, 0.6), "beta": (0.2, 0.6)}
"""The grid of starting points for (log E, log A, log B, α, β): the best of the fits from each is kept."""


@dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^α + B / D^β."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def compute_optimal(self, flops: float, flops_per_param_token: float = 6.0) -> tuple[float, float]:
        """The parameters N and tokens D that minimise the loss at a budget of `flops` = k·N·D (k: training FLOPs
        per parameter and token, 6 for the usual count): N = G·(C/k)^(β/(α+β)), D = (C/k)/N with
        G = (αA / βB)^(1/(α+β))."""
        budget = flops / flops_per_param_token
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * budget ** (self.beta / (self.alpha + self.beta))
        return n, budget / n

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray
               ) -> tuple[float, np.ndarray]:
    """The Huber objective and its gradient in (log E, log A, log B, α, β)."""
    e, a, b, alpha, beta = theta
    terms = np.stack([np.full_like(log_n, e), a - alpha * log_n, b - beta * log_d])
    predicted = logsumexp(terms, axis=0)
    weights = np.exp(terms - predicted)  # d predicted / d each term
    residual = predicted - log_l
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)  # the Huber loss's derivative
    grad = np.array([np.sum(slope * weights[0]), np.sum(slope * weights[1]), np.sum(slope * weights[2]),
                     -np.sum(slope * weights[1] * log_n), -np.sum(slope * weights[2] * log_d)])
    return float(np.sum(huber(HUBER_DELTA, residual))), grad


def _fit_from(starts: Sequence[np.ndarray], log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> Law:
    """The best of a short descent from each start, then descended to convergence."""

    def descend(start: np.ndarray, steps: int):
        return minimize(_objective, start, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B",
                        options={"ftol": 1e-12, "gtol": 1e-9, "maxiter": steps})

    best = min((descend(start, 100) for start in starts), key=lambda found: found.fun)
    e, a, b, alpha, beta = descend(best.x, 5000).x
    return Law(E=math.exp(e), A=math.exp(a), alpha=float(alpha), B=math.exp(b), beta=float(beta))


def fit(n: Sequence[float], d: Sequence[float], loss: Sequence[float]) -> Law:
    """The law that fits these final losses best (the Huber objective, from every start of `STARTS`)."""
    log_n, log_d, log_l = (np.log(np.asarray(x, dtype=float)) for x in (n, d, loss))
    if len(log_l) < 5:
        raise ValueError(f"a fit of 5 parameters needs at least 5 points, got {len(log_l)}")
    starts = [np.array(s, dtype=float) for s in itertools.product(*STARTS.values())]
    return _fit_from(starts, log_n, log_d, log_l)


@dataclass(frozen=True)
class Fit:
    """A law, its bootstrap replicates and the fit's residuals in log loss."""

    law: Law
    replicates: list[Law]
    residuals: np.ndarray

    def predict(self, n: float, d: float, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
        """The law's loss at (N, D) and an interval holding a new run's loss with probability `level`: each
        bootstrap replicate's prediction times the scatter of one run (a residual of the fit, drawn at random)."""
        rng = np.random.default_rng(seed)
        draws = np.array([r.loss(n, d) for r in self.replicates]) * np.exp(
            rng.choice(self.residuals, size=len(self.replicates)))
        low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
        return float(self.law.loss(n, d)), float(low), float(high)

    def spread(self) -> dict[str, tuple[float, float]]:
        """Each parameter's 95 % bootstrap interval."""
        values = {k: np.array([r.as_dict()[k] for r in self.replicates]) for k in self.law.as_dict()}
        return {k: (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) for k, v in values.items()}


def fit_with_bootstrap(n: Sequence[float], d: Sequence[float], loss: Sequence[float], replicates: int = 200,
                       seed: int = 0) -> Fit:
    """`fit`, and the same fit on `replicates` resamplings of the points with replacement (each started from the
    full fit and the grid's best few corners: a resample's optimum is near the full one's)."""
    law = fit(n, d, loss)
    log_n, log_d, log_l = (np.log(np.asarray(x, dtype=float)) for x in (n, d, loss))
    rng = np.random.default_rng(seed)
    start = np.array([math.log(law.E), math.log(law.A), math.log(law.B), law.alpha, law.beta])
    laws = []
    for _ in range(replicates):
        pick = rng.integers(0, len(log_l), len(log_l))
        laws.append(_fit_from([start], log_n[pick], log_d[pick], log_l[pick]))
    residuals = log_l - np.log(law.loss(np.exp(log_n), np.exp(log_d)))
    return Fit(law, laws, residuals)


@dataclass(frozen=True)
class Prediction:
    """A held-out run: its size, tokens and measured loss against the law's prediction and interval."""

    n: float
    d: float
    measured: float
    predicted: float
    low: float
    high: float

    @property
    def inside(self) -> bool:
        return self.low <= self.measured <= self.high


def predict_held_out(n: Sequence[float], d: Sequence[float], loss: Sequence[float], held: Sequence[bool],
                     replicates: int = 200, level: float = 0.95, seed: int = 0) -> tuple[Fit, list[Prediction]]:
    """The law fitted to the points not `held` (with its bootstrap), and each held point's loss predicted from it:
    the verdict of a study is that every measurement falls inside its interval."""
    keep = [not h for h in held]
    pick = [np.asarray(x, dtype=float)[keep] for x in (n, d, loss)]
    law = fit_with_bootstrap(*pick, replicates=replicates, seed=seed)
    predictions = [Prediction(float(ni), float(di), float(li), *law.predict(ni, di, level, seed))
                   for ni, di, li, h in zip(n, d, loss, held, strict=True) if h]
    return law, predictions
