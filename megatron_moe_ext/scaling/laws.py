"""Fine-grained MoE scaling laws as pure functions, and the presets holding published coefficients.

Legend: N non-embedding parameters (which count, active or total, is a property of the law: ``Law.params``),
D training tokens, G granularity (d_ff / d_expert), E experts (joint law), C training FLOPs.

krajewski2024 -- Krajewski, Ludziejewski et al. 2024, "Scaling Laws for Fine-Grained Mixture of Experts"
(arXiv 2402.07871), Eq. 9:

    L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta

In the paper N is the TOTAL number of non-embedding parameters (Sec. 5 and Sec. 6.1: N = d_model^2 (8E + 4)
n_blocks at expansion rate E = 64). Our results tables carry ACTIVE parameters in ``params`` (the sweep
contract); at a fixed expansion rate total = const x active, which only rescales a and g, so a law fitted
on active parameters is as valid, but its coefficients are not comparable to Table 1. ``Law.params`` says
which one a law means, and ``plan`` feeds it the matching count.

joint2025 -- the functional form of Ludziejewski et al. 2025, "Joint MoE Scaling Laws: Mixture of Experts
Can Be Memory Efficient" (arXiv 2502.05172, ICML 2025), with the plain expert count E in place of the
paper's transformed count (E-hat):

    L(N, D, E) = c + a E^delta / N^(alpha + gamma ln E) + b E^omega / D^(beta + zeta ln E)

(dense models are E = 1: ln E = 0 leaves Chinchilla's law). We write the exponents with a positive sign
(the paper writes N^(alpha + gamma ln E) with negative alpha). No preset: the paper's fitted coefficients
and its E-hat transform were not available to us when this was written, so joint2025 laws come only from
``fit``; we do not invent published values.

Both laws are sums of exponentials of functions LINEAR in the transformed coefficients (log a, alpha,
log b, ...), which is what the Hoffmann et al. (2022, Sec. D.2) log-sum-exp fit needs: ``features``
returns, per term, the matrix F_t with log(term_t) = F_t @ theta.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

LAWS = ("krajewski2024", "joint2025")

# Coefficient names in the order of the fit vector theta; LOG_SCALED are fitted as their logarithm.
COEFFICIENTS = {
    "krajewski2024": ("a", "alpha", "b", "beta", "g", "gamma", "c"),
    "joint2025": ("a", "alpha", "b", "beta", "c", "delta", "gamma", "omega", "zeta"),
}
LOG_SCALED = frozenset({"a", "b", "g", "c"})
# Which distinct-value counts identify which coefficients (used by results_table and the fit's refusals).
NEEDS = {
    "krajewski2024": {"alpha": ("params", 2), "beta": ("tokens", 2), "gamma": ("granularity", 3)},
    "joint2025": {"alpha": ("params", 2), "beta": ("tokens", 2), "delta": ("experts", 2),
                  "gamma": ("experts", 2), "omega": ("experts", 2), "zeta": ("experts", 2)},
}
COLUMNS = {"krajewski2024": ("params", "tokens", "granularity"), "joint2025": ("params", "tokens", "experts")}


@dataclasses.dataclass(frozen=True)
class Law:
    """A scaling law with concrete coefficients: which formula, its values, which N it takes, its source."""

    law: str
    coefficients: dict[str, float]
    params: str = "active"  # "active" or "total" non-embedding parameters
    source: str = ""

    def __post_init__(self) -> None:
        if self.law not in LAWS:
            raise ValueError(f"law={self.law!r} is unknown; choose from {', '.join(LAWS)}")
        missing = [k for k in COEFFICIENTS[self.law] if k not in self.coefficients]
        if missing:
            raise ValueError(f"{self.law} needs coefficients {', '.join(missing)} (has {sorted(self.coefficients)}); "
                             f"fix: write them with `megatron-moe-ext fit ... --law {self.law} --json`")
        if self.params not in ("active", "total"):
            raise ValueError(f"params={self.params!r} must be 'active' or 'total'")

    def loss(self, params: float | np.ndarray, tokens: float | np.ndarray, *, granularity=1.0, experts=1.0):
        """Predicted loss (``krajewski2024_loss`` / ``joint2025_loss``)."""
        if self.law == "krajewski2024":
            return krajewski2024_loss(params, tokens, granularity, **self.coefficients)
        return joint2025_loss(params, tokens, experts, **self.coefficients)


def krajewski2024_loss(params, tokens, granularity, *, a, alpha, b, beta, g, gamma, c):
    """L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta (Krajewski et al. 2024, Eq. 9)."""
    n, d, gr = (np.asarray(x, dtype=float) for x in (params, tokens, granularity))
    return c + (g / gr**gamma + a) / n**alpha + b / d**beta


def joint2025_loss(params, tokens, experts, *, a, alpha, b, beta, c, delta, gamma, omega, zeta):
    """L(N, D, E) = c + a E^delta / N^(alpha + gamma ln E) + b E^omega / D^(beta + zeta ln E) (the form of
    Ludziejewski et al. 2025's joint law with plain E; see the module docstring)."""
    n, d, e = (np.asarray(x, dtype=float) for x in (params, tokens, experts))
    le = np.log(e)
    return c + a * e**delta / n ** (alpha + gamma * le) + b * e**omega / d ** (beta + zeta * le)


def features(law: str, params: np.ndarray, tokens: np.ndarray, other: np.ndarray) -> list[np.ndarray]:
    """Per term t, F_t (n_points x n_coefficients) with log(term_t) = F_t @ theta, theta ordered as
    ``COEFFICIENTS[law]`` with LOG_SCALED entries as logarithms; ``other`` is G (krajewski) or E (joint)."""
    names = COEFFICIENTS[law]
    ln_n, ln_d, ln_x = np.log(params), np.log(tokens), np.log(other)
    n = len(ln_n)

    def term(**cols: np.ndarray | float) -> np.ndarray:
        f = np.zeros((n, len(names)))
        for name, col in cols.items():
            f[:, names.index(name)] = col
        return f

    if law == "krajewski2024":
        return [term(c=1.0), term(a=1.0, alpha=-ln_n), term(g=1.0, gamma=-ln_x, alpha=-ln_n), term(b=1.0, beta=-ln_d)]
    return [term(c=1.0), term(a=1.0, delta=ln_x, alpha=-ln_n, gamma=-ln_x * ln_n),
            term(b=1.0, omega=ln_x, beta=-ln_d, zeta=-ln_x * ln_d)]


def to_theta(law: str, coefficients: dict[str, float]) -> np.ndarray:
    """Coefficients -> fit vector (log of LOG_SCALED ones)."""
    # A fitted coefficient can underflow to 0.0 (e.g. c of a law with no floor in the data); its log is then
    # the smallest float's, so a refit can start from it.
    return np.array([math.log(max(coefficients[k], 1e-300)) if k in LOG_SCALED else coefficients[k]
                     for k in COEFFICIENTS[law]])


def from_theta(law: str, theta: np.ndarray) -> dict[str, float]:
    """Fit vector -> coefficients. A log-scaled coefficient the data cannot pin (e.g. in a bootstrap resample)
    can run off towards +-inf; its logarithm is clipped to +-MAX_LOG so the value stays a finite float (and the
    percentile interval then shows it unbounded) instead of overflowing."""
    return {k: float(math.exp(min(max(v, -MAX_LOG), MAX_LOG)) if k in LOG_SCALED else v)
            for k, v in zip(COEFFICIENTS[law], theta)}


MAX_LOG = 700.0  # exp(700) ~ 1e304, below float64's overflow at exp(709.8)


# --- Krajewski et al. 2024's compute model (Sec. 6.1-6.2, Eq. 10) ---------------------------------------
# FLOPs per active parameter outside routing (c_f) and inside routing (c_r), Appendix E of the paper; the
# values are those of the authors' code (llm-random, research/scaling_laws: ff_const = 6*12 = c_f x 12,
# router_const = 14), and they reproduce Table 2's FLOPs column (tests/unit/test_scaling_plan.py).
KRAJEWSKI_C_F = 6.0
KRAJEWSKI_C_R = 14.0
KRAJEWSKI_ASPECT = 64.0  # d_model = 64 n_blocks (Sec. 6.1)
KRAJEWSKI_EXPANSION = 64  # E = 64 throughout the paper's fits and Table 2


def krajewski2024_flops(n_blocks: float, tokens: float, granularity: float, *, expansion: float = KRAJEWSKI_EXPANSION,
                        c_f: float = KRAJEWSKI_C_F, c_r: float = KRAJEWSKI_C_R, aspect: float = KRAJEWSKI_ASPECT) -> float:
    """F = (12 d_model^2 c_f + d_model E G c_r) D n_blocks with d_model = 64 n_blocks (Krajewski et al. 2024,
    Eq. 10 and Sec. 6.1; embeddings excluded, following Hoffmann et al. 2022)."""
    d = aspect * n_blocks
    return (12.0 * d * d * c_f + d * expansion * granularity * c_r) * tokens * n_blocks


def krajewski2024_params(n_blocks: float, *, expansion: float = KRAJEWSKI_EXPANSION,
                         aspect: float = KRAJEWSKI_ASPECT) -> tuple[float, float]:
    """(total, active) non-embedding parameters of the paper's shape: total N = d_model^2 (8E + 4) n_blocks
    (Sec. 6.1, routing excluded), active = 12 d_model^2 n_blocks (Sec. 6.1: 4 d^2 attention + 8 d^2 FFN)."""
    d = aspect * n_blocks
    return d * d * (8.0 * expansion + 4.0) * n_blocks, 12.0 * d * d * n_blocks


PRESETS: dict[str, Law] = {
    "krajewski2024": Law(
        law="krajewski2024",
        coefficients={"a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147, "g": 2.1, "gamma": 0.58, "c": 0.47},
        params="total",
        source="Krajewski, Ludziejewski et al. 2024, Scaling Laws for Fine-Grained Mixture of Experts "
               "(arXiv 2402.07871), Table 1 (MoE row), law Eq. 9; N = total non-embedding parameters, E = 64",
    ),
}
"""Named presets. ``krajewski2024``: Table 1 of Krajewski et al. 2024 (MoE row: a = 18.1, alpha = 0.115,
b = 30.8, beta = 0.147, g = 2.1, gamma = 0.58, c = 0.47), fitted at expansion rate E = 64 on total
non-embedding parameters. Its compute-optimal allocation under Eq. 10 reproduces the optimal G of Table 2
(8, 16, 16, 32, 32, 64, 64 at 2.95e18 ... 4.97e25 FLOPs). No joint2025 preset (see the module docstring)."""
