"""Expert co-activation (``analyze --readouts coactivation``), from a routing trace alone: which experts a token
selects together within a layer, and which expert of the next layer follows which expert of this one.

Within a layer (OLMoE: Muennighoff et al. 2024, "OLMoE: Open Mixture-of-Experts Language Models", section 5,
"Co-activation"): with n_i the tokens that select expert i and n_ij the tokens that select both i and j,

    P(j | i) = n_ij / n_i          (i != j; the share of i's tokens that also go to j)

Across consecutive traced layers a -> b, with n_i^a the tokens selecting i in a and n_ij^ab those selecting i in
a and j in b: P(j in b | i in a) = n_ij^ab / n_i^a. The independence baseline is P(j) = n_j / T (j's share of
all tokens); lift = P(j | i) / P(j) (1: no association; Brin et al. 1997 call this ratio "interest"). Pairs are
ranked by lift among pairs with n_ij >= ``MIN_PAIR_TOKENS``, so rare pairs do not fill the list.

Counts are exact, accumulated chunk by chunk (bounded memory: an N x N count matrix per layer and per pair of
consecutive layers). Layers with more than ``MAX_EXPERTS`` experts (PEER, very fine-grained MoE) are
``not_applicable`` (an N x N matrix at N = 10^6 is not formed). Selections are sets: an expert a token selects
twice (two PEER heads) counts once.

Legend: T tokens, K (J) selections per token in layer a (b), N (M) experts in layer a (b), P top experts shown.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from megatron_moe_ext.analysis.trace_format import TraceReader

MAX_EXPERTS = 1024  # larger layers: not_applicable (the N x N counts would not be small)
MIN_PAIR_TOKENS = 5  # pairs with fewer joint tokens are not ranked
TOP_PAIRS = 10  # pairs listed per layer (and per pair of layers)
SHOWN_EXPERTS = 16  # the busiest experts shown in the figure and the result's matrices
_PAIR_BLOCK = 1 << 22  # pair indices formed at once (memory bound of the counting)


# -- pure statistics ---------------------------------------------------------------------------------------------
def selection_sets(expert_ids_TK: np.ndarray) -> np.ndarray:
    """ids_TK with repeated experts of a token replaced by -1 (each expert counts once per token)."""
    ids = np.sort(np.asarray(expert_ids_TK, dtype=np.int64), axis=1)
    dup = np.zeros(ids.shape, dtype=bool)
    dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
    return np.where(dup, -1, ids)


def pair_counts(ids_a_TK: np.ndarray, ids_b_TJ: np.ndarray, num_a: int, num_b: int) -> np.ndarray:
    """n_NM: n[i, j] = tokens that select i in a and j in b (ids from :func:`selection_sets`; -1 ignored).
    Within a layer pass the same ids twice: the diagonal is then n_i."""
    a, b = np.asarray(ids_a_TK, dtype=np.int64), np.asarray(ids_b_TJ, dtype=np.int64)
    out = np.zeros(num_a * num_b, dtype=np.int64)
    T, K, J = a.shape[0], a.shape[1], b.shape[1]
    step = max(1, _PAIR_BLOCK // max(K * J, 1))
    for start in range(0, T, step):
        aa, bb = a[start:start + step, :, None], b[start:start + step, None, :]
        valid = (aa >= 0) & (bb >= 0)
        keys = (aa * num_b + bb)[valid]
        out += np.bincount(keys, minlength=num_a * num_b)
    return out.reshape(num_a, num_b)


def conditional_coactivation(n_NM: np.ndarray, n_a_N: np.ndarray) -> np.ndarray:
    """P(j | i) = n[i, j] / n_i [N, M] (OLMoE section 5); NaN for experts i no token selected."""
    n_a = np.asarray(n_a_N, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_a[:, None] > 0, n_NM / np.maximum(n_a[:, None], 1), np.nan)


def lift(p_given_NM: np.ndarray, n_b_M: np.ndarray, tokens: int) -> np.ndarray:
    """P(j | i) / P(j), P(j) = n_j / T (1: independence); NaN where P(j) is 0."""
    p_b = np.asarray(n_b_M, dtype=np.float64) / max(tokens, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p_b[None, :] > 0, p_given_NM / p_b[None, :], np.nan)


def top_pairs(n_NM: np.ndarray, n_a_N: np.ndarray, n_b_M: np.ndarray, tokens: int, *, within: bool,
              k: int = TOP_PAIRS, min_tokens: int = MIN_PAIR_TOKENS) -> list[dict[str, Any]]:
    """The k pairs of largest lift with n_ij >= min_tokens (ties: larger n_ij, then ids); within a layer
    the diagonal (i = j) is excluded."""
    p = conditional_coactivation(n_NM, n_a_N)
    lf = lift(p, n_b_M, tokens)
    ok = n_NM >= min_tokens
    if within:
        np.fill_diagonal(ok, False)
    i, j = np.nonzero(ok)
    order = np.lexsort((j, i, -n_NM[i, j], -lf[i, j]))[:k]
    return [{"i": int(i[o]), "j": int(j[o]), "tokens": int(n_NM[i[o], j[o]]), "p_j_given_i": float(p[i[o], j[o]]),
             "p_j": float(n_b_M[j[o]] / tokens), "lift": float(lf[i[o], j[o]])} for o in order]


def busiest(n_N: np.ndarray, k: int = SHOWN_EXPERTS) -> np.ndarray:
    """Ids of the k busiest experts (ties by id), sorted by id."""
    order = np.lexsort((np.arange(n_N.size), -np.asarray(n_N)))[:k]
    return np.sort(order)


def _nan_to_none(m: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in m]


# -- the trace readout -------------------------------------------------------------------------------------------
def coactivation_readout(reader: TraceReader) -> dict[str, Any]:
    """Within-layer and consecutive-layer co-activation of a trace (module docstring); JSON-able. Null experts
    (trace v2) are ids N..N+M-1 here as in the load statistics: a null slot co-activates like any expert."""
    specs = {s.layer: s for s in reader.layers}
    ok = [l for l, s in specs.items() if s.num_outputs <= MAX_EXPERTS]
    skipped = {l: f"{s.num_outputs} experts > {MAX_EXPERTS}: the N x N co-activation counts are not formed"
               for l, s in specs.items() if s.num_outputs > MAX_EXPERTS}
    if not ok:
        return {"not_applicable": "no traced layer has at most "
                                  f"{MAX_EXPERTS} experts (" + "; ".join(f"layer {l}: {r}" for l, r in skipped.items())
                                  + ")"}
    layers = sorted(specs)
    across_pairs = [(a, b) for a, b in zip(layers, layers[1:]) if a in ok and b in ok]
    within = {l: np.zeros((specs[l].num_outputs, specs[l].num_outputs), np.int64) for l in ok}
    across = {(a, b): np.zeros((specs[a].num_outputs, specs[b].num_outputs), np.int64) for a, b in across_pairs}
    tokens = 0
    for chunk in reader.iter_chunks(ok):
        sets = {l: selection_sets(chunk.layers[l].expert_ids_TK) for l in ok}
        tokens += chunk.num_tokens
        for l in ok:
            within[l] += pair_counts(sets[l], sets[l], specs[l].num_outputs, specs[l].num_outputs)
        for a, b in across_pairs:
            across[(a, b)] += pair_counts(sets[a], sets[b], specs[a].num_outputs, specs[b].num_outputs)
    out_layers = []
    for l in ok:
        n = within[l]
        n_i = np.diag(n).copy()
        shown = busiest(n_i)
        p = conditional_coactivation(n, n_i)
        out_layers.append({
            "layer": l, "num_experts": specs[l].num_experts, "null_experts": specs[l].null_experts,
            "top_k": specs[l].top_k, "tokens": tokens,
            "top_pairs": top_pairs(n, n_i, n_i, tokens, within=True),
            "shown_experts": shown.tolist(),
            "p_j_given_i": _nan_to_none(p[np.ix_(shown, shown)]),
        })
    out_across = []
    for a, b in across_pairs:
        n = across[(a, b)]
        n_a, n_b = np.diag(within[a]).copy(), np.diag(within[b]).copy()
        shown_a, shown_b = busiest(n_a), busiest(n_b)
        p = conditional_coactivation(n, n_a)
        out_across.append({
            "layer_a": a, "layer_b": b, "tokens": tokens,
            "top_pairs": top_pairs(n, n_a, n_b, tokens, within=False),
            "shown_experts_a": shown_a.tolist(), "shown_experts_b": shown_b.tolist(),
            "p_j_given_i": _nan_to_none(p[np.ix_(shown_a, shown_b)]),
        })
    return {"definition": "P(j | i) = n_ij / n_i (OLMoE, Muennighoff et al. 2024, section 5); lift = P(j | i) / P(j)",
            "min_pair_tokens": MIN_PAIR_TOKENS, "layers": out_layers, "across": out_across,
            "skipped": {str(l): r for l, r in skipped.items()}}


# -- report ------------------------------------------------------------------------------------------------------
def plot_coactivation(result: dict[str, Any], path: str) -> str:
    """Heatmaps of P(j | i) among the busiest experts: one panel per layer, then one per consecutive pair.
    Written to a temporary name, then renamed. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = ([(f"layer {x['layer']}: P(j | i)", x["p_j_given_i"], x["shown_experts"], x["shown_experts"])
               for x in result["layers"]]
              + [(f"layer {x['layer_a']} -> {x['layer_b']}: P(j in {x['layer_b']} | i in {x['layer_a']})",
                  x["p_j_given_i"], x["shown_experts_a"], x["shown_experts_b"]) for x in result["across"]])
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.8 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for idx, (title, matrix, ids_i, ids_j) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, idx + 1)
        m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=np.float64)
        image = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("expert j", fontsize=8)
        ax.set_ylabel("expert i", fontsize=8)
        if len(ids_j) <= SHOWN_EXPERTS:
            ax.set_xticks(range(len(ids_j)), [str(x) for x in ids_j], fontsize=6)
            ax.set_yticks(range(len(ids_i)), [str(x) for x in ids_i], fontsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def _pairs_table(pairs: list[dict[str, Any]]) -> list[str]:
    lines = ["| i | j | tokens | P(j given i) | P(j) | lift |", "|---|---|---|---|---|---|"]
    lines += [f"| {p['i']} | {p['j']} | {p['tokens']} | {p['p_j_given_i']:.3f} | {p['p_j']:.3f} | {p['lift']:.2f} |"
              for p in pairs]
    return lines


def report_section(result: dict[str, Any], figures_dir: str) -> str:
    """Markdown of the co-activation section, with figures/coactivation.png."""
    lines = ["## Expert co-activation", ""]
    if "not_applicable" in result:
        return "\n".join(lines + [f"Not applicable: {result['not_applicable']}", ""])
    os.makedirs(figures_dir, exist_ok=True)
    plot_coactivation(result, os.path.join(figures_dir, "coactivation.png"))
    lines += [f"{result['definition']}. Pairs ranked by lift among pairs with at least {result['min_pair_tokens']} "
              f"joint tokens; the figure shows the {SHOWN_EXPERTS} busiest experts of each layer.", "",
              "![co-activation](figures/coactivation.png)", ""]
    for x in result["layers"]:
        nulls = f" + {x['null_experts']} null (ids from {x['num_experts']})" if x.get("null_experts") else ""
        lines += [f"### Layer {x['layer']} ({x['num_experts']} experts{nulls}, top-{x['top_k']}, {x['tokens']} tokens)",
                  ""]
        lines += (_pairs_table(x["top_pairs"]) if x["top_pairs"] else ["No pair reaches the token minimum."]) + [""]
    for x in result["across"]:
        lines += [f"### Layer {x['layer_a']} -> layer {x['layer_b']}", ""]
        lines += (_pairs_table(x["top_pairs"]) if x["top_pairs"] else ["No pair reaches the token minimum."]) + [""]
    for layer, reason in result["skipped"].items():
        lines += [f"Layer {layer}: not applicable ({reason}).", ""]
    return "\n".join(lines)
