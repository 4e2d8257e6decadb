"""Fit a scaling law to (N, D, G or E, loss) points: Huber on log-loss, L-BFGS from a grid, bootstrap, LOO.

Legend: n points; theta the fit vector (``laws.COEFFICIENTS`` order, log a / log b / log g / log c);
F_t (n x p) the feature matrix of term t (``laws.features``); r_n the log-space residuals.

Method (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", Sec. 3.3 and App. D.2, as
used by Krajewski et al. 2024, Sec. 5.3): minimise

    sum_n Huber_delta( LSE_t(F_t[n] @ theta) - log L_n ) / delta^2,   delta = 1e-3

with L-BFGS-B (scipy.optimize.minimize, analytic gradient) from every start of a grid of initialisations,
keeping the lowest objective. Huber = scipy.special.huber, LSE = scipy.special.logsumexp.
Intervals: percentile bootstrap (rows resampled with replacement, refit from the full-data optimum),
[q, 1 - q] with q = (1 - confidence) / 2. Held-out error: leave-one-out RMSE of the loss (each point
predicted by the law refitted without it). RMSE is in loss units (not log).
Coefficients the data cannot identify are not fitted but held at a value the caller states (``fixed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber, logsumexp, softmax

from megatron_moe_ext.scaling import laws

HUBER_DELTA = 1e-3


def single_threaded_blas() -> contextlib.AbstractContextManager:
    """BLAS limited to one thread while fitting (threadpoolctl, when installed): the fit is thousands of tiny
    L-BFGS-B steps, and a threaded BLAS only adds contention (measured 10-20x slower on a busy 2-core host)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")

# Start grid per coefficient (log-scaled ones as the coefficient itself; converted to logs): 128 starts for
# krajewski2024; "small" (16 starts) for tests and quick looks.
_GRID = {
    "a": (2.0, 20.0), "b": (2.0, 20.0), "g": (0.5, 5.0), "c": (0.5, 1.5),
    "alpha": (0.1, 0.3), "beta": (0.1, 0.3), "gamma": (0.3, 0.8),
    "delta": (0.0,), "omega": (0.0,), "zeta": (0.0,),
}
_SMALL_GRID = {"a": (2.0, 20.0), "b": (2.0, 20.0), "g": (2.0,), "c": (1.0,), "alpha": (0.1, 0.3),
               "beta": (0.1, 0.3), "gamma": (0.5,), "delta": (0.0,), "omega": (0.0,), "zeta": (0.0,)}


@dataclasses.dataclass(frozen=True)
class Points:
    """Fit inputs: N, D and G (krajewski2024) or E (joint2025), loss; all 1-D float arrays of one length."""

    params: np.ndarray
    tokens: np.ndarray
    other: np.ndarray
    loss: np.ndarray

    def take(self, index: np.ndarray) -> Points:
        return Points(self.params[index], self.tokens[index], self.other[index], self.loss[index])

    def __len__(self) -> int:
        return len(self.loss)


@dataclasses.dataclass(frozen=True)
class FitResult:
    law: str
    coefficients: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    confidence: float
    rmse: float
    heldout_rmse: float
    n_points: int
    fixed: dict[str, float]
    objective: float
    predicted: np.ndarray  # fitted loss per point (the full-data fit)


def _objective(free: np.ndarray, feats: list[np.ndarray], offsets: list[np.ndarray], log_y: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Huber objective (scaled by 1 / delta^2) and its gradient in the free coefficients; feats are the free
    columns of each F_t, offsets the held coefficients' contribution to each term. Products are elementwise
    sums rather than matmuls (tiny matrices)."""
    z_nt = np.stack([(f * free[None, :]).sum(axis=1) + o for f, o in zip(feats, offsets)], axis=1)
    r_n = logsumexp(z_nt, axis=1) - log_y
    # Scaled by 1 / delta^2 (same argmin) so L-BFGS-B's stopping rule, relative to max(|f|, 1), is meaningful.
    value = float(np.sum(huber(delta, r_n))) / delta**2
    dr_n = np.clip(r_n, -delta, delta) / delta**2  # d Huber / d r, scaled alike
    w_nt = softmax(z_nt, axis=1) * dr_n[:, None]
    return value, sum((f * w_nt[:, t, None]).sum(axis=0) for t, f in enumerate(feats))


def _starts(law: str, free_names: list[str], grid: dict) -> list[dict[str, float]]:
    values = [grid[k] for k in free_names]
    return [dict(zip(free_names, combo)) for combo in itertools.product(*values)]


def fit_points(law: str, points: Points, *, fixed: dict[str, float] | None = None, grid: str = "full",
               start: dict[str, float] | None = None, delta: float = HUBER_DELTA) -> tuple[dict[str, float], float]:
    """Best coefficients and objective over the start grid, or from ``start`` alone (``_fit_points``)."""
    with single_threaded_blas():
        return _fit_points(law, points, fixed=fixed, grid=grid, start=start, delta=delta)


def _fit_points(law: str, points: Points, *, fixed: dict[str, float] | None, grid: str,
                start: dict[str, float] | None, delta: float) -> tuple[dict[str, float], float]:
    """Best coefficients (and objective, sum of Huber / delta^2) over the start grid (or from ``start`` alone:
    a local refit, as the bootstrap and leave-one-out do from the full-data optimum)."""
    fixed = dict(fixed or {})
    names = laws.COEFFICIENTS[law]
    unknown = sorted(set(fixed) - set(names))
    if unknown:
        raise ValueError(f"--fix names {', '.join(unknown)}, which {law} does not have; fix: choose from {', '.join(names)}")
    free_names = [k for k in names if k not in fixed]
    free_idx = np.array([names.index(k) for k in free_names], dtype=int)
    all_feats = laws.features(law, points.params, points.tokens, points.other)
    fixed_idx = np.array([names.index(k) for k in names if k in fixed], dtype=int)
    fixed_theta = laws.to_theta(law, {**{k: 1.0 for k in names}, **fixed})[fixed_idx]
    feats = [f[:, free_idx] for f in all_feats]
    offsets = [f[:, fixed_idx] @ fixed_theta for f in all_feats]
    log_y = np.log(points.loss)
    starts = [start] if start is not None else _starts(law, free_names, _GRID if grid == "full" else _SMALL_GRID)
    best: tuple[float, np.ndarray] | None = None
    for s in starts:
        coeffs = {**{k: _GRID[k][0] for k in names}, **(s or {}), **fixed}
        theta0 = laws.to_theta(law, coeffs)
        res = minimize(_objective, theta0[free_idx], jac=True, method="L-BFGS-B", args=(feats, offsets, log_y, delta),
                       options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-8})
        if not np.isfinite(res.fun):
            continue
        if best is None or res.fun < best[0]:
            theta = theta0.copy()
            theta[free_idx] = res.x
            best = (float(res.fun), theta)
    if best is None:
        raise ValueError(f"no start of the {law} fit converged to a finite objective on {len(points)} points; "
                         "fix: check the loss column (it must be the model's cross-entropy, > 0)")
    return laws.from_theta(law, best[1]), best[0]


def predict(law: str, coefficients: dict[str, float], points: Points) -> np.ndarray:
    if law == "krajewski2024":
        return laws.krajewski2024_loss(points.params, points.tokens, points.other, **coefficients)
    return laws.joint2025_loss(points.params, points.tokens, points.other, **coefficients)


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def fit_law(law: str, points: Points, *, fixed: dict[str, float] | None = None, bootstrap: int = 200,
            confidence: float = 0.9, seed: int = 0, grid: str = "full") -> FitResult:
    """Full fit, percentile-bootstrap intervals and leave-one-out RMSE (module docstring)."""
    with single_threaded_blas():
        return _fit_law(law, points, fixed=fixed, bootstrap=bootstrap, confidence=confidence, seed=seed, grid=grid)


def _fit_law(law: str, points: Points, *, fixed: dict[str, float] | None, bootstrap: int, confidence: float,
             seed: int, grid: str) -> FitResult:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must be in (0, 1); fix: e.g. --confidence 0.9")
    if bootstrap < 0:
        raise ValueError(f"bootstrap={bootstrap} must be >= 0")
    fixed = dict(fixed or {})
    coeffs, objective = fit_points(law, points, fixed=fixed, grid=grid)
    predicted = predict(law, coeffs, points)
    free = [k for k in laws.COEFFICIENTS[law] if k not in fixed]
    start = {k: coeffs[k] for k in free}
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        index = rng.integers(0, len(points), len(points))
        sample, _ = fit_points(law, points.take(index), fixed=fixed, start=start)
        samples.append([sample[k] for k in laws.COEFFICIENTS[law]])
    q = (1.0 - confidence) / 2.0
    intervals: dict[str, tuple[float, float]] = {}
    for j, k in enumerate(laws.COEFFICIENTS[law]):
        if k in fixed or not samples:
            intervals[k] = (coeffs[k], coeffs[k])
        else:
            col = np.array(samples)[:, j]
            intervals[k] = (float(np.quantile(col, q)), float(np.quantile(col, 1.0 - q)))
    heldout = []
    for i in range(len(points)):
        keep = np.array([j for j in range(len(points)) if j != i])
        loo, _ = fit_points(law, points.take(keep), fixed=fixed, start=start)
        heldout.append(float(predict(law, loo, points.take(np.array([i])))[0]))
    return FitResult(
        law=law, coefficients=coeffs, intervals=intervals, confidence=confidence,
        rmse=rmse(predicted, points.loss), heldout_rmse=rmse(heldout, points.loss), n_points=len(points),
        fixed=fixed, objective=objective, predicted=predicted,
    )


# A term whose scale coefficient falls below this (relative to the loss scale ~1), or whose exponent makes it grow
# with its variable, is not a term the data identified.
VANISHING = 1e-6


def degenerate_terms(law: str, coefficients: dict[str, float]) -> list[str]:
    """The terms of a fitted law the data did not identify: a scale coefficient that collapsed below VANISHING
    (the fit explains the losses without the term), or a size exponent <= 0 (loss growing with model size or
    tokens, which no scaling law describes). Krajewski et al. 2024's terms: 'N' (a/N^alpha), 'G' (g/(G^gamma
    N^alpha)), 'D' (b/D^beta), 'floor' (c). For the joint law: 'N' (a...), 'D' (b...), 'floor' (c)."""
    c = coefficients
    out = []
    if c["a"] < VANISHING or c["alpha"] <= 0:
        out.append(f"N (a = {c['a']:.3g}, alpha = {c['alpha']:.3g})")
    if law == "krajewski2024" and (c["g"] < VANISHING or c["alpha"] <= 0):
        out.append(f"G (g = {c['g']:.3g}, gamma = {c['gamma']:.3g})")
    if c["b"] < VANISHING or c["beta"] <= 0:
        out.append(f"D (b = {c['b']:.3g}, beta = {c['beta']:.3g})")
    if c["c"] < VANISHING:
        out.append(f"floor (c = {c['c']:.3g})")
    return out


def parse_fixed(items: list[str], law: str) -> dict[str, float]:
    """``["alpha=0.115", ...]`` -> {"alpha": 0.115}; ValueError naming the item and the fix."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not math.isfinite(number):
            raise ValueError(f"--fix {item!r} is not NAME=VALUE; fix: e.g. --fix alpha=0.115")
        if name not in laws.COEFFICIENTS[law]:
            raise ValueError(f"--fix {item!r}: {law} has no coefficient {name!r}; choose from "
                             f"{', '.join(laws.COEFFICIENTS[law])}")
        if name in laws.LOG_SCALED and number <= 0:
            raise ValueError(f"--fix {item!r}: {name} must be > 0")
        out[name] = number
    return out
