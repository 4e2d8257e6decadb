"""Training dynamics of routing: router saturation, load and specialisation over checkpoints saved during training.

Router saturation (Muennighoff et al. 2024, "OLMoE: Open Mixture-of-Experts Language Models", arXiv 2409.02060,
section 5.1 "Router saturation"): for a checkpoint at iteration t and the final checkpoint F, run both on the same
tokens and measure, per layer, the share of each token's k experts selected by F that t selects too,

    saturation_l(t) = 1 / (T k) * sum_x |topk_t,l(x) ∩ topk_F,l(x)|,

1 when the routing of t is already the final one, k / N in expectation for routing independent of the final
one (k of N experts chosen at random). OLMoE plots it against the tokens trained on; here training tokens =
iteration x global batch x sequence length (a run without batch-size ramp-up). PEER layers compare the union of
their heads' selections (all K = heads x k columns, as a set; divided by its distinct size).

The same curves for load and specialisation come from each checkpoint's routing summary
(:func:`summary.summarize_trace`): the total-variation distance of the layer's load distribution from the final
one's, the layer's MaxVio, and the bias-corrected MI between the top-1 expert and the label.

Pure functions over arrays and traces (numpy only); no Megatron.

Legend: T tokens, K selections per token in a layer, N experts, P saved checkpoints (points of a curve).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from megatron_moe_ext.analysis.summary import Summary, TraceMismatchError
from megatron_moe_ext.analysis.trace_format import TraceReader


def topk_overlap(ids_TK: np.ndarray, final_ids_TK: np.ndarray) -> np.ndarray:
    """overlap_T: |set(ids[t]) ∩ set(final[t])| / |set(final[t])| per token, the order of the K columns ignored
    (OLMoE, arXiv 2409.02060 sec. 5.1; for a router's K distinct experts the denominator is K). Duplicates in a
    row (PEER heads that pick the same expert) count once, so a trace against itself gives 1. Empty slots
    (``EMPTY_SLOT`` = -1, the padding of routers with variable experts per token) are no selection: the sets
    are the real and null ids of each row, and a token the final checkpoint routes nowhere gets NaN. Both [T, K]."""
    a, b = np.asarray(ids_TK), np.asarray(final_ids_TK)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"topk_overlap: shapes {a.shape} and {b.shape}; fix: two [T, K] arrays of the same shape "
                         f"(the same tokens and top-k)")
    T, K = a.shape
    if K == 0:
        raise ValueError("topk_overlap: K = 0 selections per token; nothing to compare")
    b_s = np.sort(b, axis=1)
    # Distinct ids of each final row (a sorted row's first occurrences, empty slots left out), each looked up in
    # the other row: a [T, K, K] comparison, fine for the K of a router (<= a few hundred).
    first_TK = np.ones((T, K), dtype=bool)
    first_TK[:, 1:] = b_s[:, 1:] != b_s[:, :-1]
    first_TK &= b_s >= 0
    hit_TK = (b_s[:, :, None] == a[:, None, :]).any(axis=2) & first_TK
    size_T = first_TK.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(size_T > 0, hit_TK.sum(axis=1) / np.maximum(size_T, 1), np.nan)


def router_saturation(ids_TK: np.ndarray, final_ids_TK: np.ndarray) -> float:
    """Mean of :func:`topk_overlap` over the tokens the final checkpoint routes somewhere: the share of the final
    checkpoint's selections the checkpoint makes too (OLMoE, arXiv 2409.02060 sec. 5.1). NaN for no such token."""
    o_T = topk_overlap(ids_TK, final_ids_TK)
    o_T = o_T[~np.isnan(o_T)]
    return float(o_T.mean()) if o_T.size else float("nan")


def chance_saturation(top_k: int, num_experts: int) -> float:
    """Expected saturation of routing independent of the final one: k / N (each of the final k experts is among
    k uniformly random distinct experts with probability k / N)."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k}, num_experts={num_experts}: expected 1 <= top_k <= num_experts")
    return top_k / num_experts


def load_distance(counts_a_N: np.ndarray, counts_b_N: np.ndarray) -> float:
    """Total-variation distance 1/2 sum_e |p_a(e) - p_b(e)| between two load distributions (selection counts
    normalised to shares): 0 for the same shares, 1 for disjoint expert sets."""
    a, b = np.asarray(counts_a_N, np.float64), np.asarray(counts_b_N, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"load_distance: shapes {a.shape} and {b.shape}; fix: counts_N of the same layer")
    if a.sum() <= 0 or b.sum() <= 0:
        return float("nan")
    return float(0.5 * np.abs(a / a.sum() - b / b.sum()).sum())


def trace_saturation(trace_dir: str | os.PathLike[str],
                     final_dir: str | os.PathLike[str]) -> dict[int, float]:
    """layer -> :func:`router_saturation` of a checkpoint's trace against the final checkpoint's, streamed chunk
    by chunk. Both traces must hold the same tokens in the same order with the same chunking (capture on the
    same windows with the same sampling): else :class:`summary.TraceMismatchError`. Layers present in only one
    trace are left out."""
    ra, rf = TraceReader(trace_dir), TraceReader(final_dir)
    layers = sorted({s.layer for s in ra.layers} & {s.layer for s in rf.layers})
    for l in layers:
        if ra.layer_spec(l).top_k != rf.layer_spec(l).top_k:
            raise TraceMismatchError(f"layer {l}: top-k {ra.layer_spec(l).top_k} in {ra.path!r} vs "
                                     f"{rf.layer_spec(l).top_k} in {rf.path!r}; saturation compares the same k")
    if ra.num_tokens != rf.num_tokens:
        raise TraceMismatchError(f"{ra.path!r} holds {ra.num_tokens} tokens, {rf.path!r} {rf.num_tokens}; fix: "
                                 f"capture both on the same windows with the same sampling")
    sums = {l: 0.0 for l in layers}
    counted = {l: 0 for l in layers}  # tokens the final checkpoint routes somewhere in layer l
    for ca, cf in zip(ra.iter_chunks(layers), rf.iter_chunks(layers), strict=True):
        if ca.num_tokens != cf.num_tokens or not (np.array_equal(ca.token_ids_T, cf.token_ids_T)
                                                   and np.array_equal(ca.sequence_ids_T, cf.sequence_ids_T)):
            raise TraceMismatchError(f"{ra.path!r} and {rf.path!r} differ in chunk {ca.index} (tokens or "
                                     f"chunking); fix: capture both on the same windows with the same sampling")
        for l in layers:
            o_T = topk_overlap(ca.layers[l].expert_ids_TK, cf.layers[l].expert_ids_TK)
            routed_T = ~np.isnan(o_T)
            sums[l] += float(o_T[routed_T].sum())
            counted[l] += int(routed_T.sum())
    return {l: (sums[l] / counted[l] if counted[l] else float("nan")) for l in layers}


@dataclasses.dataclass(frozen=True)
class DynamicsPoint:
    """One saved checkpoint on the curves: per layer saturation against the final checkpoint, load distance
    from the final load, MaxVio and the corrected label MI (None where undefined)."""

    iteration: int
    tokens: int
    saturation: dict[int, float]
    load_distance: dict[int, float]
    max_violation: dict[int, float]
    label_mi: dict[int, float | None]


def dynamics_curves(summaries: Mapping[int, Summary], traces: Mapping[int, str], *, final_iteration: int,
                    tokens_per_iteration: int) -> list[DynamicsPoint]:
    """The curves over iterations (ascending; the final checkpoint included, saturation 1 by definition):
    ``summaries`` and ``traces`` map iteration -> the checkpoint's routing summary and trace directory."""
    if final_iteration not in summaries or set(summaries) != set(traces):
        raise ValueError(f"summaries {sorted(summaries)} and traces {sorted(traces)} must name the same iterations, "
                         f"the final one ({final_iteration}) included")
    if tokens_per_iteration < 1:
        raise ValueError(f"tokens_per_iteration={tokens_per_iteration}: expected global batch x sequence length >= 1")
    final = summaries[final_iteration]
    final_counts = {s.layer: s.load.counts_N for s in final.layers}
    points = []
    for it in sorted(summaries):
        s = summaries[it]
        sat = trace_saturation(traces[it], traces[final_iteration])
        points.append(DynamicsPoint(
            iteration=it, tokens=it * tokens_per_iteration, saturation=sat,
            load_distance={l.layer: load_distance(l.load.counts_N, final_counts[l.layer])
                           for l in s.layers if l.layer in final_counts
                           and final_counts[l.layer].shape == l.load.counts_N.shape},
            max_violation={l.layer: l.load.max_violation for l in s.layers},
            label_mi={l.layer: (l.specialisation["label"].corrected_nats if "label" in l.specialisation else None)
                      for l in s.layers}))
    return points


def dynamics_json(points: list[DynamicsPoint], *, final_iteration: int, tokens_per_iteration: int,
                  chance: Mapping[int, float]) -> dict[str, Any]:
    """The curves as JSON: per layer lists aligned with ``iterations`` / ``tokens``; ``chance`` = k / N per layer."""
    from megatron_moe_ext.analysis.summary import _jsonable

    layers = sorted({l for p in points for l in p.saturation})
    return _jsonable({
        "final_iteration": final_iteration, "tokens_per_iteration": tokens_per_iteration,
        "iterations": [p.iteration for p in points], "tokens": [p.tokens for p in points],
        "layers": {str(l): {"saturation": [p.saturation.get(l) for p in points],
                            "chance_saturation": chance.get(l),
                            "load_distance": [p.load_distance.get(l) for p in points],
                            "max_violation": [p.max_violation.get(l) for p in points],
                            "label_mi_corrected": [p.label_mi.get(l) for p in points]} for l in layers}})


__all__ = ["DynamicsPoint", "chance_saturation", "dynamics_curves", "dynamics_json", "load_distance",
           "router_saturation", "topk_overlap", "trace_saturation"]
