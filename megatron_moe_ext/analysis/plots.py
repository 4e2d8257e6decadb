"""Routing-analysis figures: PNGs drawn from :class:`summary.Summary` data with matplotlib's Agg renderer.

matplotlib is an optional dependency (the ``plots`` extra), imported inside each function. Figures are built on
a bare :class:`matplotlib.figure.Figure` with an Agg canvas rather than through pyplot, so no global backend is
switched and no figure outlives its function (no pyplot figure registry to leak).

Legend: L traced layers, N experts in a layer, B load-histogram bins (<= 256), E top experts, V labels,
M models, La / Lb layers with hidden states.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from megatron_moe_ext.analysis.summary import (
    CKAResult,
    LayerSummary,
    Summary,
    bin_counts,
)

_DPI = 100
_ANNOTATE_LIMIT = 12  # annotate CKA cells with their value when both sides have at most this many layers


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("routing-analysis plots need matplotlib; fix: pip install 'megatron-moe-ext[plots]'") from e
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def plot_expert_load(summary: Summary, path: str | os.PathLike[str], *, max_bins: int = 256,
                     title: str = "") -> str:
    """Heatmap of layers (rows) x experts (columns): each row is one layer's counts_N summed over
    min(N, max_bins) contiguous expert-id bins (one column per expert when N <= max_bins), shown as the load of
    the bin's average expert relative to the layer mean (1 = balanced, 0 = dead). Layers with different N share
    the x axis as the fraction of the expert-id range. Returns ``path``."""
    L = len(summary.layers)
    fig = _figure(10, 1.6 + 0.6 * max(L, 2))
    ax = fig.add_subplot(1, 1, 1)
    rel_rows = []
    for s in summary.layers:
        edges_B1, sums_B = bin_counts(s.load.counts_N, max_bins)
        mean = s.load.counts_N.sum() / s.num_experts
        # Relative load per expert in the bin, so bins of unequal width and layers of unequal N are comparable.
        rel_rows.append((edges_B1 / s.num_experts, sums_B / np.diff(edges_B1) / mean if mean > 0
                         else np.zeros(sums_B.shape)))
    vmax = max([float(r.max()) for _, r in rel_rows] + [2.0])
    mesh = None
    for row, (x_B1, rel_B) in enumerate(rel_rows):
        mesh = ax.pcolormesh(x_B1, [row, row + 1], rel_B[None, :], cmap="viridis", vmin=0.0, vmax=vmax)
    ax.set_yticks(np.arange(L) + 0.5)
    ax.set_yticklabels([f"layer {s.layer} (N={s.num_experts}, "
                        f"{min(s.num_experts, max_bins)} bins)" for s in summary.layers])
    ax.set_ylim(0, L)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("expert id / N (contiguous bins)")
    ax.set_title(title or "expert load relative to the layer mean (1 = balanced)")
    if mesh is not None:
        fig.colorbar(mesh, ax=ax, label="load / mean load")
    fig.tight_layout()
    return _save(fig, path)


def _grouped_bars(ax: Any, groups: list[str], series: Mapping[str, list[float | None]]) -> None:
    """Bars grouped by x position (groups), one bar per series (model) in each group; None -> no bar."""
    M = max(len(series), 1)
    width = 0.8 / M
    x = np.arange(len(groups))
    for m, (name, values) in enumerate(series.items()):
        heights = [np.nan if v is None else v for v in values]
        ax.bar(x - 0.4 + width * (m + 0.5), heights, width, label=name)
    ax.set_xticks(x)
    ax.set_xlim(-0.5, len(groups) - 0.5)  # NaN bars (a model without that layer) would otherwise shrink the axis
    ax.set_xticklabels(groups, rotation=30 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center")
    if len(series) > 1:
        ax.legend(fontsize="small")


def plot_load_balance(summaries: Mapping[str, Summary], path: str | os.PathLike[str], *, title: str = "") -> str:
    """Two panels of bars per traced layer, one bar per model (side by side in compare mode): MaxVio (0 =
    perfectly balanced) and normalised load entropy (1 = uniform). Returns ``path``."""
    layers = sorted({s.layer for summ in summaries.values() for s in summ.layers})
    groups = [f"layer {l}" for l in layers]

    def series(field: str) -> dict[str, list[float | None]]:
        out = {}
        for name, summ in summaries.items():
            by = {s.layer: getattr(s.load, field) for s in summ.layers}
            out[name] = [by.get(l) for l in layers]
        return out

    fig = _figure(min(16, max(7, 1.2 * len(layers) * max(len(summaries), 1))), 7)
    ax1 = fig.add_subplot(2, 1, 1)
    _grouped_bars(ax1, groups, series("max_violation"))
    ax1.set_ylabel("MaxVio")
    ax1.set_title(title or "load balance per layer")
    ax2 = fig.add_subplot(2, 1, 2)
    _grouped_bars(ax2, groups, series("entropy_normalized"))
    ax2.set_ylabel("load entropy / log N")
    ax2.set_ylim(0, 1.05)
    fig.tight_layout()
    return _save(fig, path)


def plot_path_diversity(summaries: Mapping[str, Summary], path: str | os.PathLike[str], *,
                        title: str = "") -> str:
    """Bars of normalised path diversity (distinct top-1 paths / min(tokens, possible paths)) per layer window
    (all traced layers, then consecutive pairs), one bar per model. Returns ``path``."""
    windows: list[tuple[int, ...]] = []
    for summ in summaries.values():
        for p in summ.paths:
            if tuple(p.layers) not in windows:
                windows.append(tuple(p.layers))
    series = {}
    for name, summ in summaries.items():
        by = {tuple(p.layers): p.diversity.of_max for p in summ.paths}
        series[name] = [by.get(w) for w in windows]
    fig = _figure(min(16, max(7, 1.2 * len(windows) * max(len(summaries), 1))), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    _grouped_bars(ax, ["layers " + "-".join(map(str, w)) for w in windows], series)
    ax.set_ylabel("distinct paths / min(tokens, possible)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or "path diversity (top-1 paths)")
    fig.tight_layout()
    return _save(fig, path)


def plot_specialisation(layer: LayerSummary, path: str | os.PathLike[str], *, title: str = "",
                        label_names: Sequence[str] = ()) -> str:
    """Heatmap of the layer's expert x label matrix (top experts by load as rows, labels as columns), each row
    normalised to sum 1: row e is the label mix of the tokens that selected expert e (a one-hot row = a
    specialised expert). Raises ValueError when the layer has no label matrix (trace without labels)."""
    if layer.label_matrix is None:
        raise ValueError(f"layer {layer.layer} has no expert x label matrix (the trace has no labels); fix: trace "
                         f"with has_labels=True, or skip this plot")
    m = layer.label_matrix
    counts_EV = m.counts_EV.astype(np.float64)
    rows_E = counts_EV.sum(1, keepdims=True)
    share_EV = np.divide(counts_EV, rows_E, out=np.zeros_like(counts_EV), where=rows_E > 0)
    E, V = share_EV.shape
    fig = _figure(max(6, 2.5 + 0.35 * V), max(5, 1.5 + 0.22 * E))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share_EV, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(np.arange(V))
    names = [label_names[v] if 0 <= v < len(label_names) else str(v) for v in m.labels]
    ax.set_xticklabels(names, rotation=90 if V > 12 or max(map(len, names)) > 8 else 0)
    ax.set_yticks(np.arange(E))
    ax.set_yticklabels([str(e) for e in m.experts], fontsize="x-small" if E > 16 else "small")
    ax.set_xlabel("label")
    ax.set_ylabel("expert (top by load)")
    ax.set_title(title or f"layer {layer.layer}: label share per expert")
    fig.colorbar(im, ax=ax, label="share of the expert's selections")
    fig.tight_layout()
    return _save(fig, path)


def plot_cka(cka: CKAResult, path: str | os.PathLike[str], *, name_a: str = "a", name_b: str = "b",
             title: str = "") -> str:
    """Heatmap of a CKA matrix (rows: layers of model a, columns: layers of model b; 1 = same representation up
    to rotation and scale), values written in the cells when both sides have <= 12 layers. Returns ``path``."""
    cka_LaLb = np.asarray(cka.cka_LaLb, dtype=np.float64)
    La, Lb = cka_LaLb.shape
    fig = _figure(max(6, 2.5 + 0.6 * Lb), max(5, 1.8 + 0.5 * La))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(cka_LaLb, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(np.arange(Lb))
    ax.set_xticklabels([str(l) for l in cka.layers_b])
    ax.set_yticks(np.arange(La))
    ax.set_yticklabels([str(l) for l in cka.layers_a])
    ax.set_xlabel(f"{name_b} layer")
    ax.set_ylabel(f"{name_a} layer")
    if La <= _ANNOTATE_LIMIT and Lb <= _ANNOTATE_LIMIT:
        for i in range(La):
            for j in range(Lb):
                v = cka_LaLb[i, j]
                ax.text(j, i, "n/a" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center",
                        color="black" if np.isfinite(v) and v > 0.6 else "white", fontsize="small")
    ax.set_title(title or f"linear CKA: {name_a} vs {name_b}")
    fig.colorbar(im, ax=ax, label="linear CKA")
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["plot_cka", "plot_expert_load", "plot_load_balance", "plot_path_diversity", "plot_specialisation"]


def plot_dynamics(doc: Mapping[str, Any], path: str | os.PathLike[str], *, title: str = "") -> str:
    """Three panels against training tokens, one line per layer: router saturation (share of each token's top-k
    the final checkpoint also selects; dotted: chance k / N), total-variation distance of the load from the final
    load, and the corrected top-1 expert / label MI. ``doc`` is :func:`dynamics.dynamics_json`. Returns ``path``."""
    fig = _figure(8, 9)
    tokens = np.asarray(doc["tokens"], dtype=np.float64)
    panels = (("saturation", "router saturation (top-k overlap with final)"),
              ("load_distance", "load: TV distance from final"),
              ("label_mi_corrected", "label MI of top-1 expert (nats, corrected)"))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(3, 1, i + 1)
        for j, (layer, curves) in enumerate(doc["layers"].items()):
            y = np.array([np.nan if v is None else v for v in curves[key]], dtype=np.float64)
            line = ax.plot(tokens, y, marker="o", label=f"layer {layer}")[0]
            if key == "saturation" and curves["chance_saturation"] is not None:
                ax.axhline(curves["chance_saturation"], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_ylabel(label, fontsize="small")
        if key == "saturation":
            ax.set_ylim(0, 1.05)
            ax.legend(fontsize="small")
    ax.set_xlabel("training tokens (iteration x global batch x sequence length)")
    fig.suptitle(title or "routing over training")
    return _save(fig, path)
