"""Plot a law fit: loss vs compute per granularity (or expert count) with fitted curves, and the residuals.

Compute on the x axis is C = 6 N D (Kaplan et al. 2020's approximation; the plot's label says so), so that
published points without a FLOPs column plot the same way as ours. The fitted curve of each G (or E) is the
law's compute-optimal frontier at that G under C = 6 N D: min over N of L(N, C / (6 N), G). matplotlib is
imported inside the function (it is not needed to fit); the PNG is written atomically.
"""

from __future__ import annotations

import os

import numpy as np
from scipy.optimize import minimize_scalar

from megatron_moe_ext.scaling import laws
from megatron_moe_ext.scaling.fitting import Points


def _frontier(law: laws.Law, compute: np.ndarray, other: float) -> np.ndarray:
    out = []
    for c in compute:
        def loss(log_n: float) -> float:
            n = np.exp(log_n)
            return float(law.loss(n, c / (6.0 * n), granularity=other, experts=other))

        res = minimize_scalar(loss, bounds=(np.log(1e3), np.log(c / 6.0 / 1e3)), method="bounded")
        out.append(res.fun)
    return np.array(out)


def plot_fit(path: str, law: laws.Law, points: Points, predicted: np.ndarray, *, title: str = "") -> None:
    """Two panels: observed loss vs 6ND per G (E) with the law's frontier per value; residuals vs 6ND."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = "G" if law.law == "krajewski2024" else "E"
    compute = 6.0 * points.params * points.tokens
    values = np.unique(points.other)
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, len(values)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    grid = np.geomspace(compute.min() / 1.5, compute.max() * 1.5, 60)
    for value, color in zip(values, colors):
        sel = points.other == value
        top.scatter(compute[sel], points.loss[sel], color=color, s=18, label=f"{label}={value:g}")
        top.plot(grid, _frontier(law, grid, float(value)), color=color, lw=1)
        bottom.scatter(compute[sel], points.loss[sel] - predicted[sel], color=color, s=14)
    bottom.axhline(0.0, color="black", lw=0.8)
    for ax in (top, bottom):
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
    top.set_yscale("log")
    top.set_ylabel("loss")
    top.set_title(title or f"{law.law} fit (lines: compute-optimal frontier per {label})")
    top.legend(fontsize=8)
    bottom.set_ylabel("observed - fitted")
    bottom.set_xlabel("compute C = 6 N D (FLOPs)")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
