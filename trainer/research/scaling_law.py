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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from threadpoolctl import threadpool_limits

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

    def compute_optimal(self, flops: float, flops_per_token: Callable[[float], float] = lambda n: 6.0 * n
                        ) -> tuple[float, float]:
        """The parameters N and tokens D that minimise the loss at a budget of `flops`, where a model of N
        parameters costs `flops_per_token(N)` per training token (6·N by default, the textbook count; a study passes
        its own model family's count, readout and attention included, so that its FLOPs mean what MFU's do):
        N* = argmin_N L(N, C / flops_per_token(N)), found in log N (one minimum: the N term falls, the D term
        rises)."""
        def loss_at(log_n: float) -> float:
            n = math.exp(log_n)
            return float(self.loss(n, flops / flops_per_token(n)))

        found = minimize_scalar(loss_at, bounds=(0.0, math.log(1e15)), method="bounded",
                                options={"xatol": 1e-6})
        n = math.exp(found.x)
        return n, flops / flops_per_token(n)

    def frontier(self, flops: Sequence[float], flops_per_token: Callable[[float], float] = lambda n: 6.0 * n
                 ) -> np.ndarray:
        """The least loss each compute budget reaches (its compute-optimal N and D): the efficient frontier."""
        return np.array([self.loss(*self.compute_optimal(c, flops_per_token)) for c in flops])

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray
               ) -> tuple[float, np.ndarray]:
    """The Huber objective and its gradient in (log E, log A, log B, α, β). Plain numpy (scipy's logsumexp and huber
    cost five times as much on a study's dozen points, and a bootstrap calls this a million times)."""
    e, a, b, alpha, beta = theta
    t1, t2 = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(t1, t2), e)
    w0, w1, w2 = np.exp(e - top), np.exp(t1 - top), np.exp(t2 - top)
    total = w0 + w1 + w2
    residual = top + np.log(total) - log_l
    w0, w1, w2 = w0 / total, w1 / total, w2 / total  # d predicted / d each term
    size = np.abs(residual)
    loss = np.where(size <= HUBER_DELTA, 0.5 * residual ** 2, HUBER_DELTA * (size - 0.5 * HUBER_DELTA))
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)  # the Huber loss's derivative
    grad = np.array([np.sum(slope * w0), np.sum(slope * w1), np.sum(slope * w2),
                     -np.sum(slope * w1 * log_n), -np.sum(slope * w2 * log_d)])
    return float(np.sum(loss)), grad


def _fit_from(starts: Sequence[np.ndarray], log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> Law:
    """The best of a short descent from each start, then descended to convergence."""

    def descend(start: np.ndarray, steps: int):
        return minimize(_objective, start, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B",
                        options={"ftol": 1e-12, "gtol": 1e-9, "maxiter": steps})

    # L-BFGS-B calls BLAS on 5-vectors: OpenBLAS's threads only spin there, 10-40x slower beside any other load.
    with threadpool_limits(1, user_api="blas"):
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
    full fit: a resample's optimum is near the full one's), and the residuals a new run scatters by."""
    law = fit(n, d, loss)
    log_n, log_d, log_l = (np.log(np.asarray(x, dtype=float)) for x in (n, d, loss))
    rng = np.random.default_rng(seed)
    start = np.array([math.log(law.E), math.log(law.A), math.log(law.B), law.alpha, law.beta])
    laws = []
    for _ in range(replicates):
        pick = rng.integers(0, len(log_l), len(log_l))
        laws.append(_fit_from([start], log_n[pick], log_d[pick], log_l[pick]))
    # A fit's own residuals are smaller than a new run's scatter about the law (5 parameters were fitted to these
    # very points): scaled by sqrt(n / (n - 5)), their variance is the unbiased estimate.
    residuals = log_l - np.log(law.loss(np.exp(log_n), np.exp(log_d)))
    residuals = residuals * math.sqrt(len(log_l) / max(len(log_l) - 5, 1))
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
