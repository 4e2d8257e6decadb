"""Trace summary: one streaming pass over a routing trace producing every per-model routing statistic, plus
linear CKA between the recorded hidden states of two traces (or of one trace's layers against each other).

The statistics themselves live in :mod:`statistics` (their docstrings say what each one means); this module
only streams a trace through their accumulators and packs the results into a :class:`Summary`, whose
:meth:`Summary.to_json` is bounded in size whatever N (a million-expert layer writes a <= 256-bin load histogram
and its top-32 experts, never counts_N).

Legend: T tokens in a chunk, K selections per token in a layer (top-k; PEER heads * k), N experts in a layer,
V distinct label values, B load-histogram bins, E experts kept for bounded output (top by load), L traced layers,
La / Lb layers with hidden states of traces a / b, D / F hidden sizes.

Memory: one chunk of the trace at a time, plus per layer counts_N (8 N bytes) and the sparse joint counts of
the MI accumulators (O(distinct pairs seen), at most O(T_total)); path diversity keeps the distinct paths. A
cheap first pass reads only the token columns (not the layer files) to fix the position-bucket width, the token
id range and the label set, which every chunk must share.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from megatron_moe_ext.analysis.statistics import (
    ExpertLoadAccumulator,
    HeadOverlapAccumulator,
    JointCountAccumulator,
    LinearCKAAccumulator,
    LoadStats,
    MutualInformation,
    PathDiversity,
    PathDiversityAccumulator,
    bucket_positions,
    effective_experts,
    experts_per_token_histogram,
    load_stats,
    routing_pairs,
)
from megatron_moe_ext.analysis.trace_format import TraceReader

MAX_HISTOGRAM_BINS = 256  # load histogram columns written to JSON and drawn in the heatmap
TOP_EXPERTS = 32  # experts listed by load, and rows of the expert x label matrix
MAX_MATRIX_LABELS = 64  # label columns of the expert x label matrix (most frequent labels)
DEFAULT_POSITION_BUCKETS = 16
DEFAULT_CKA_BYTES = 2**31  # fp64 moment matrices held at once by trace_cka; more pairs take more passes
INSTRUMENTS_FILE = "instruments.json"  # {name: result} of the rank-side instruments, written by capture
_SUMMARY_KEYS = frozenset({"trace_dir", "num_tokens", "has_labels", "mode", "position_buckets", "max_position",
                           "hidden_layers", "label_names", "layers", "dependence", "path_diversity", "instruments"})


# --------------------------------------------------------------------------------------------- result types


@dataclasses.dataclass(frozen=True)
class LabelMatrix:
    """Expert x label selection counts (every one of the K selections counts, as in
    :func:`statistics.expert_label_counts`), restricted to the top experts by load and the most frequent labels;
    ``counts_EV[e, v]`` = selections of expert ``experts[e]`` by tokens with label ``labels[v]``."""

    experts: list[int]
    labels: list[int]
    counts_EV: np.ndarray


@dataclasses.dataclass(frozen=True)
class EffectiveExperts:
    """Mean over tokens of :func:`statistics.effective_experts` (entropy: Hill-1 perplexity of the normalised
    gates; inverse_simpson: Hill-2), over the ``tokens`` whose gates sum to > 0. None fields with ``skipped``
    saying why when the gates are not non-negative weights (e.g. raw PEER scores)."""

    entropy: float | None
    inverse_simpson: float | None
    tokens: int
    skipped: str | None = None


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """All single-layer statistics of one traced layer. ``load`` holds counts_N in memory (for plots);
    JSON gets only ``histogram`` (counts summed over B contiguous expert-id bins, ``bin_edges_B1`` the first
    expert id of each bin plus N) and the top experts by load. ``specialisation`` maps "token", "position" and
    (with labels) "label" to the MI between the layer's top-1 expert and that variable."""

    layer: int
    num_experts: int
    top_k: int
    num_heads: int
    tokens: int
    load: LoadStats
    bin_edges_B1: np.ndarray
    histogram_B: np.ndarray
    top_experts_E: np.ndarray
    top_counts_E: np.ndarray
    specialisation: dict[str, MutualInformation]
    label_matrix: LabelMatrix | None
    head_overlap: float | None
    effective: EffectiveExperts | None
    # Variable experts per token (trace format 2): ``load``, histogram and top experts cover the N real experts;
    # experts_per_token_J[j] = tokens that visited exactly j real experts; null_fraction = null slots / used slots.
    null_experts: int = 0
    variable: bool = False
    experts_per_token_J: np.ndarray | None = None
    null_fraction: float | None = None

    @property
    def mean_active_experts(self) -> float | None:
        """Mean real experts per token (what ``flops --active-experts`` takes)."""
        h = self.experts_per_token_J
        return None if h is None or not h.sum() else float((np.arange(h.shape[0]) * h).sum() / h.sum())


@dataclasses.dataclass(frozen=True)
class LayerDependence:
    """Routing dependence (:func:`statistics.routing_dependence`) between two consecutive traced layers."""

    layer_a: int
    layer_b: int
    mi: MutualInformation


@dataclasses.dataclass(frozen=True)
class PathWindow:
    """Path diversity (:class:`statistics.PathDiversity`; ``of_max`` is the normalised value) over ``layers``."""

    layers: list[int]
    diversity: PathDiversity


@dataclasses.dataclass(frozen=True)
class Summary:
    """Routing summary of one trace. ``paths`` holds the window of all traced layers first, then every pair of
    consecutive traced layers (when there are more than two)."""

    trace_dir: str
    num_tokens: int
    has_labels: bool
    mode: str
    position_buckets: int
    max_position: int
    layers: list[LayerSummary]
    dependence: list[LayerDependence]
    paths: list[PathWindow]
    hidden_layers: list[int]
    # Names of the label values, when the trace's writer recorded them (metadata "label_names").
    label_names: list[str] = dataclasses.field(default_factory=list)
    # Results of the instruments (interventions, readouts) by name: :func:`instrument_results`.
    instruments: dict[str, Any] = dataclasses.field(default_factory=dict)

    def layer(self, layer: int) -> LayerSummary:
        for s in self.layers:
            if s.layer == layer:
                return s
        raise ValueError(f"layer {layer} is not in the summary; traced layers: {[s.layer for s in self.layers]}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict, bounded in size (no counts_N); non-finite floats become None."""
        return _jsonable({
            "trace_dir": self.trace_dir, "num_tokens": self.num_tokens, "has_labels": self.has_labels,
            "mode": self.mode, "position_buckets": self.position_buckets, "max_position": self.max_position,
            "hidden_layers": self.hidden_layers, "label_names": self.label_names,
            "layers": [_layer_json(s) for s in self.layers],
            "dependence": [{"layer_a": d.layer_a, "layer_b": d.layer_b, **mi_json(d.mi)} for d in self.dependence],
            "path_diversity": [path_json(p) for p in self.paths],
            "instruments": sorted(self.instruments), **self.instruments,
        })


@dataclasses.dataclass(frozen=True)
class CKAResult:
    """cka_LaLb: linear CKA (:class:`statistics.LinearCKAAccumulator`) between the hidden states of layer
    ``layers_a[i]`` of trace a and layer ``layers_b[j]`` of trace b over ``num_tokens`` shared tokens."""

    layers_a: list[int]
    layers_b: list[int]
    cka_LaLb: np.ndarray
    num_tokens: int
    debiased: bool

    def to_json(self) -> dict[str, Any]:
        return _jsonable({"layers_a": self.layers_a, "layers_b": self.layers_b, "matrix": self.cka_LaLb.tolist(),
                          "num_tokens": self.num_tokens, "debiased": self.debiased})


class TraceMismatchError(ValueError):
    """Two traces do not hold the same tokens in the same order, so their hidden states cannot be compared."""


# ------------------------------------------------------------------------------------------------- JSON helpers


def _jsonable(x: Any) -> Any:
    """Plain JSON types; NaN/inf -> None (strict JSON has no NaN), numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def mi_json(mi: MutualInformation) -> dict[str, Any]:
    """The MI fields as a JSON dict (nats, bias_nats, corrected_nats, entropies, samples, supports)."""
    return _jsonable(dataclasses.asdict(mi))


def path_json(p: PathWindow) -> dict[str, Any]:
    """Path diversity as JSON; ``max_paths`` is a decimal string (exact, may exceed any float)."""
    d = dataclasses.asdict(p.diversity)
    d["max_paths"] = str(p.diversity.max_paths)
    return _jsonable({"layers": p.layers, **d})


def _layer_json(s: LayerSummary) -> dict[str, Any]:
    ld = s.load
    eff = None if s.effective is None else dataclasses.asdict(s.effective)
    lm = None if s.label_matrix is None else {"experts": s.label_matrix.experts, "labels": s.label_matrix.labels,
                                              "counts": s.label_matrix.counts_EV}
    return {"layer": s.layer, "num_experts": s.num_experts, "top_k": s.top_k, "num_heads": s.num_heads,
            "tokens": s.tokens, "num_selections": ld.num_selections, "max_violation": ld.max_violation,
            "dead_count": ld.dead_count, "dead_fraction": ld.dead_fraction, "entropy_nats": ld.entropy_nats,
            "entropy_normalized": ld.entropy_normalized,
            "load_histogram": {"bin_edges": s.bin_edges_B1, "counts": s.histogram_B},
            "top_experts": {"experts": s.top_experts_E, "counts": s.top_counts_E},
            "specialisation": {k: mi_json(v) for k, v in s.specialisation.items()},
            "label_matrix": lm, "head_overlap": s.head_overlap, "effective_experts": eff,
            "null_experts": s.null_experts, "variable": s.variable, "null_fraction": s.null_fraction,
            "experts_per_token": None if s.experts_per_token_J is None else {
                "histogram": s.experts_per_token_J, "mean": s.mean_active_experts}}


# ---------------------------------------------------------------------------------------------- small helpers


def fmt(value: Any) -> str:
    """How report.md prints a summary.json value: ints as is, floats with 6 significant digits, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)



def bin_counts(counts_N: np.ndarray, max_bins: int = MAX_HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(bin_edges_B1, sums_B): counts_N summed over B = min(N, max_bins) contiguous expert-id bins; bin b covers
    experts [edges[b], edges[b+1]) (one expert per bin when N <= max_bins)."""
    N = int(counts_N.shape[0])
    if isinstance(max_bins, bool) or not isinstance(max_bins, int) or max_bins < 1:
        raise ValueError(f"max_bins={max_bins!r}: expected an int >= 1")
    B = min(N, max_bins)
    edges_B1 = (np.arange(B + 1, dtype=np.int64) * N) // B  # strictly increasing since B <= N
    return edges_B1, np.add.reduceat(counts_N, edges_B1[:-1])


def top_by_load(counts_N: np.ndarray, k: int = TOP_EXPERTS) -> np.ndarray:
    """experts_E: the k most loaded expert ids, ties broken by lower id (stable, so reproducible)."""
    return np.argsort(-counts_N, kind="stable")[:k]


def _progress(enabled: bool, what: str, done_tokens: int, tokens: int) -> None:
    if enabled:
        print(f"[{what}] {done_tokens}/{tokens} tokens", file=sys.stderr, flush=True)


@dataclasses.dataclass
class _TokenScan:
    min_token: int
    max_token: int
    max_position: int
    labels_V: np.ndarray | None  # sorted distinct labels
    label_counts_V: np.ndarray | None


def _scan_tokens(reader: TraceReader) -> _TokenScan:
    """First pass over the token files only (no layer files): ranges every chunk must be binned with."""
    lo, hi, max_pos = None, None, 0
    labels: dict[int, int] = {}
    for chunk in reader.iter_chunks(layers=[]):
        if chunk.num_tokens == 0:
            continue
        lo = int(chunk.token_ids_T.min()) if lo is None else min(lo, int(chunk.token_ids_T.min()))
        hi = int(chunk.token_ids_T.max()) if hi is None else max(hi, int(chunk.token_ids_T.max()))
        if chunk.positions_T.min() < 0:
            raise ValueError(f"{reader.path!r} chunk {chunk.index}: negative positions "
                             f"(min {chunk.positions_T.min()}); positions are 0-based offsets in a sequence")
        max_pos = max(max_pos, int(chunk.positions_T.max()))
        if chunk.labels_T is not None:
            values, counts = np.unique(chunk.labels_T, return_counts=True)
            for v, c in zip(values.tolist(), counts.tolist()):
                labels[v] = labels.get(v, 0) + c
    if lo is None:
        raise ValueError(f"{reader.path!r} holds no tokens: nothing to summarise; fix: trace a non-empty run")
    labels_V = counts_V = None
    if reader.has_labels:
        labels_V = np.array(sorted(labels), dtype=np.int64)
        counts_V = np.array([labels[v] for v in labels_V.tolist()], dtype=np.int64)
    return _TokenScan(lo, hi, max_pos, labels_V, counts_V)


class _LayerAccumulators:
    """Every single-layer accumulator of one traced layer."""

    def __init__(self, spec: Any, scan: _TokenScan, position_buckets: int) -> None:
        self.spec = spec
        # Ids of a layer with null experts or empty slots (-1) enter the MI accumulators shifted by one: MI does
        # not depend on the labelling, and -1 ("no expert") becomes a category of its own.
        self.shift = 1 if spec.variable or spec.null_experts else 0
        N = spec.num_experts + spec.null_experts + self.shift
        self.load = ExpertLoadAccumulator(spec.num_experts + spec.null_experts)
        self.per_token_J = np.zeros(spec.top_k + 1, dtype=np.int64)
        self.token_mi = JointCountAccumulator(N, scan.max_token - scan.min_token + 1)
        self.position_mi = JointCountAccumulator(N, position_buckets)
        self.label_mi = self.label_pairs = None
        if scan.labels_V is not None:
            V = int(scan.labels_V.shape[0])
            self.label_mi = JointCountAccumulator(N, V)
            # Sparse, so N * V never becomes a dense matrix; memory O(distinct (expert, label) pairs).
            self.label_pairs = JointCountAccumulator(N, V)
        self.heads = HeadOverlapAccumulator(spec.num_heads) if spec.num_heads > 1 else None
        self.eff_sums = [0.0, 0.0]  # entropy, inverse Simpson
        self.eff_tokens = 0
        self.eff_skipped: str | None = None
        self.tokens = 0


# --------------------------------------------------------------------------------------------------- summary


def summarize_trace(trace_dir: str | os.PathLike[str], *, position_buckets: int = DEFAULT_POSITION_BUCKETS,
                    mode: str = "top1", allow_incomplete: bool = False, progress: bool = False) -> Summary:
    """One streaming pass over ``trace_dir`` (plus a token-only pre-pass) computing, per traced layer, load
    (MaxVio, dead experts, entropy), specialisation MI of the top-1 expert vs token id, position bucket
    (:func:`statistics.bucket_positions`, linear over [0, max position]) and label, the bounded expert x label
    matrix, head overlap (num_heads > 1) and mean effective experts (num_heads > 1 or top_k > 1); between
    consecutive traced layers (by layer number) the routing dependence MI (``mode`` "top1" or "pairs", as
    :func:`statistics.routing_dependence`); and path diversity (top-1 paths) over all traced layers and every
    consecutive pair. ``progress`` prints one line per chunk to stderr."""
    if mode not in ("top1", "pairs"):
        raise ValueError(f"mode={mode!r}: expected 'top1' or 'pairs' (see statistics.routing_pairs)")
    if isinstance(position_buckets, bool) or not isinstance(position_buckets, int) or position_buckets < 1:
        raise ValueError(f"position_buckets={position_buckets!r}: expected an int >= 1")
    reader = TraceReader(trace_dir, allow_incomplete=allow_incomplete)
    scan = _scan_tokens(reader)
    specs = sorted(reader.layers, key=lambda s: s.layer)
    accs = {s.layer: _LayerAccumulators(s, scan, position_buckets) for s in specs}
    deps = [(a, b, JointCountAccumulator(*(_mi_size(x) for x in (a, b)))) for a, b in itertools.pairwise(specs)]
    windows = [[s.layer for s in specs]] + ([[a.layer, b.layer] for a, b in itertools.pairwise(specs)]
                                            if len(specs) > 2 else [])
    paths = [PathDiversityAccumulator([reader.layer_spec(l).num_outputs for l in w], "top1",
                                      [reader.layer_spec(l).variable for l in w]) for w in windows]
    done = 0
    for i, chunk in enumerate(reader.iter_chunks()):
        T = chunk.num_tokens
        if T == 0:
            continue
        tok_T = chunk.token_ids_T.astype(np.int64) - scan.min_token
        buckets_T = bucket_positions(chunk.positions_T, position_buckets, max_position=scan.max_position + 1)
        label_T = None if scan.labels_V is None else np.searchsorted(scan.labels_V, chunk.labels_T)
        for s in specs:
            _update_layer(accs[s.layer], chunk.layers[s.layer], tok_T, buckets_T, label_T, mode)
        for a, b, acc in deps:
            la, lb = chunk.layers[a.layer], chunk.layers[b.layer]
            x_S, y_S, w_S = routing_pairs(la.expert_ids_TK, lb.expert_ids_TK, mode, la.gates_TK, lb.gates_TK)
            acc.update(x_S + _mi_size(a) - a.num_outputs, y_S + _mi_size(b) - b.num_outputs, w_S)
        for w, acc in zip(windows, paths):
            acc.update([chunk.layers[l].expert_ids_TK for l in w], [chunk.layers[l].gates_TK for l in w])
        done += T
        _progress(progress, f"summary {reader.path}: chunk {i + 1}/{reader.num_chunks}", done, reader.num_tokens)
    return Summary(
        trace_dir=reader.path, num_tokens=done, has_labels=reader.has_labels, mode=mode,
        position_buckets=position_buckets, max_position=scan.max_position,
        layers=[_finish_layer(accs[s.layer], scan) for s in specs],
        dependence=[LayerDependence(a.layer, b.layer, acc.result()) for a, b, acc in deps],
        paths=[PathWindow(w, acc.result()) for w, acc in zip(windows, paths)],
        hidden_layers=[s.layer for s in specs if s.hidden_size],
        label_names=[str(x) for x in reader.manifest.get("metadata", {}).get("label_names", [])],
        instruments=instrument_results(reader))


def _mi_size(spec: Any) -> int:
    """Values an MI accumulator of this layer's choice takes: N + M, plus one for "no expert" (shifted ids)."""
    return spec.num_outputs + (1 if spec.variable or spec.null_experts else 0)


def _update_layer(acc: _LayerAccumulators, lc: Any, tok_T: np.ndarray, buckets_T: np.ndarray,
                  label_T: np.ndarray | None, mode: str) -> None:
    ids_TK, gates_TK = lc.expert_ids_TK, lc.gates_TK
    acc.load.update(ids_TK)
    acc.per_token_J += experts_per_token_histogram(ids_TK, acc.spec.num_experts)
    acc.tokens += ids_TK.shape[0]

    def shifted(x_S: np.ndarray, y_S: np.ndarray, w_S: np.ndarray | None) -> tuple:
        return x_S + acc.shift, y_S, w_S

    # routing_pairs is the one place that defines the top-1 / pairs samples, so summaries match specialisation().
    acc.token_mi.update(*shifted(*routing_pairs(ids_TK, tok_T, mode, gates_TK)))
    acc.position_mi.update(*shifted(*routing_pairs(ids_TK, buckets_T, mode, gates_TK)))
    if label_T is not None:
        acc.label_mi.update(*shifted(*routing_pairs(ids_TK, label_T, mode, gates_TK)))
        K = ids_TK.shape[1]
        used = ids_TK.ravel() >= 0
        acc.label_pairs.update(ids_TK.astype(np.int64).ravel()[used], np.repeat(label_T, K)[used])
    if acc.heads is not None:
        acc.heads.update(ids_TK)
    if (acc.spec.num_heads > 1 or acc.spec.top_k > 1) and acc.eff_skipped is None:
        g = gates_TK.astype(np.float64)
        if not np.all(np.isfinite(g)) or (g < 0).any():
            acc.eff_skipped = ("gates have negative or non-finite entries (raw scores, not weights): the "
                               "effective number of experts needs gates >= 0")
            return
        for j, kind in enumerate(("entropy", "inverse_simpson")):
            eff_T = effective_experts(g, kind)
            acc.eff_sums[j] += float(np.nansum(eff_T))  # NaN = a token whose gates sum to 0: left out
        acc.eff_tokens += int(np.isfinite(eff_T).sum())  # the same tokens are NaN for both kinds


def _finish_layer(acc: _LayerAccumulators, scan: _TokenScan) -> LayerSummary:
    s = acc.spec
    counts_N = acc.load.counts_N[:s.num_experts]  # real experts; null selections go to null_fraction
    load = load_stats(counts_N)
    used = int(acc.load.counts_N.sum())
    null = float(acc.load.counts_N[s.num_experts:].sum() / used) if s.null_experts and used else None
    edges, hist = bin_counts(counts_N)
    top_E = top_by_load(counts_N)
    spec = {"token": acc.token_mi.result(), "position": acc.position_mi.result()}
    matrix = None
    if acc.label_mi is not None:
        spec["label"] = acc.label_mi.result()
        matrix = _label_matrix(acc.label_pairs, top_E, scan)
    eff = None
    if s.num_heads > 1 or s.top_k > 1:
        n = acc.eff_tokens
        if acc.eff_skipped is not None:
            eff = EffectiveExperts(None, None, 0, acc.eff_skipped)
        else:
            eff = EffectiveExperts(acc.eff_sums[0] / n if n else None, acc.eff_sums[1] / n if n else None, n)
    return LayerSummary(s.layer, s.num_experts, s.top_k, s.num_heads, acc.tokens, load, edges, hist, top_E,
                        counts_N[top_E], spec, matrix, None if acc.heads is None else acc.heads.result(), eff,
                        null_experts=s.null_experts, variable=s.variable, experts_per_token_J=acc.per_token_J,
                        null_fraction=null)


def _label_matrix(pairs: JointCountAccumulator, experts_E: np.ndarray, scan: _TokenScan) -> LabelMatrix:
    V = pairs.size_y
    keep_V = np.sort(np.argsort(-scan.label_counts_V, kind="stable")[:MAX_MATRIX_LABELS])  # label indices
    x_S, y_S = pairs.codes_S // V, pairs.codes_S % V
    counts_EV = np.zeros((experts_E.shape[0], keep_V.shape[0]), dtype=np.int64)
    row_of = {int(e): r for r, e in enumerate(experts_E.tolist())}
    col_of = {int(v): c for c, v in enumerate(keep_V.tolist())}
    sel = np.isin(x_S, experts_E) & np.isin(y_S, keep_V)
    for x, y, c in zip(x_S[sel].tolist(), y_S[sel].tolist(), pairs.counts_S[sel].tolist()):
        counts_EV[row_of[x], col_of[y]] = round(c)  # integer counts held as fp64
    return LabelMatrix([int(e) for e in experts_E], scan.labels_V[keep_V].tolist(), counts_EV)


# ------------------------------------------------------------------------------------------------ instruments


def instrument_results(reader: TraceReader) -> dict[str, Any]:
    """The instruments' results of one trace, by name (``instrument_api``): the rank-side ones that capture wrote
    to ``INSTRUMENTS_FILE`` in the trace directory, then the trace readouts named in the trace's
    ``metadata["readouts"]``, computed now from the trace. Each result is a JSON dict (``{"not_applicable":
    reason}`` when the instrument does not apply); its ``summary.json`` key is its name, so names must not
    collide with the summary's own keys."""
    from megatron_moe_ext.analysis.instrument_api import TRACE_READOUTS, load_entry

    out: dict[str, Any] = {}
    path = os.path.join(reader.path, INSTRUMENTS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError(f"{path}: expected a JSON object {{name: result}}, got {type(saved).__name__}; the "
                             f"trace is corrupt: fix: capture it again")
        out.update(saved)
    for name in reader.manifest.get("metadata", {}).get("readouts", []):
        if name in TRACE_READOUTS and name not in out:
            out[name] = load_entry(name, TRACE_READOUTS)(reader)
    clash = sorted(set(out) & _SUMMARY_KEYS)
    if clash:
        raise ValueError(f"{reader.path}: instrument results named {clash} would overwrite the summary's own keys; "
                         f"fix: rename the instrument")
    return _jsonable(out)


# -------------------------------------------------------------------------------------------------------- CKA


def _hidden_layers(reader: TraceReader, layers: Sequence[int] | None) -> list[int]:
    have = [s.layer for s in sorted(reader.layers, key=lambda s: s.layer) if s.hidden_size]
    if not have:
        raise ValueError(f"{reader.path!r} recorded no hidden states (every LayerSpec.hidden_size is None); fix: "
                         f"re-trace with hidden_size set on the layers to compare")
    if layers is None:
        return have
    missing = [l for l in layers if l not in have]
    if missing:
        raise ValueError(f"layers {missing} of {reader.path!r} have no hidden states; layers with them: {have}")
    return list(layers)


def _aligned(reader_a: TraceReader, layers_a: list[int], reader_b: TraceReader,
             layers_b: list[int]) -> Iterator[tuple[dict[int, np.ndarray], dict[int, np.ndarray]]]:
    """Yields (hidden_a by layer, hidden_b by layer) row blocks of the same tokens, whatever the two traces' chunk
    boundaries: each block is the overlap of the current chunk of a and of b. Raises TraceMismatchError at the
    first row whose token_ids or sequence_ids differ, or when one trace runs out first."""
    it_a = reader_a.iter_chunks(layers_a, hidden=True)
    it_b = reader_b.iter_chunks(layers_b, hidden=True)
    ca = cb = None
    oa = ob = row = 0
    while True:
        while ca is None or oa == ca.num_tokens:
            ca, oa = next(it_a, None), 0
            if ca is None:
                break
        while cb is None or ob == cb.num_tokens:
            cb, ob = next(it_b, None), 0
            if cb is None:
                break
        if ca is None or cb is None:
            if ca is not None or cb is not None:
                raise TraceMismatchError(f"{reader_a.path!r} and {reader_b.path!r} hold different numbers of "
                                         f"tokens (one ends at row {row}); CKA compares the same tokens; fix: "
                                         f"trace both models on the same data with the same sample_p and seed")
            return
        n = min(ca.num_tokens - oa, cb.num_tokens - ob)
        for col in ("token_ids_T", "sequence_ids_T"):
            va, vb = getattr(ca, col)[oa:oa + n], getattr(cb, col)[ob:ob + n]
            bad = np.flatnonzero(va != vb)
            if bad.size:
                r = int(bad[0])
                raise TraceMismatchError(
                    f"{reader_a.path!r} and {reader_b.path!r} differ at token row {row + r}: {col[:-2]} "
                    f"{int(va[r])} vs {int(vb[r])}; CKA needs the same tokens in the same order; fix: trace both "
                    f"models on the same data with the same sample_p and seed")
        yield ({l: ca.layers[l].hidden_TD[oa:oa + n] for l in layers_a},
               {l: cb.layers[l].hidden_TD[ob:ob + n] for l in layers_b})
        oa, ob, row = oa + n, ob + n, row + n


def _passes(pairs: list[tuple[int, int]], bytes_of: Any, max_bytes: int) -> list[list[tuple[int, int]]]:
    """Greedy groups of pairs whose accumulators fit max_bytes together (a pair alone may exceed it)."""
    groups: list[list[tuple[int, int]]] = []
    used = max_bytes + 1
    for p in pairs:
        b = bytes_of(p)
        if used + b > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(p)
        used += b
    return groups


def trace_cka(trace_a: str | os.PathLike[str], trace_b: str | os.PathLike[str], *,
              layers_a: Sequence[int] | None = None, layers_b: Sequence[int] | None = None, debiased: bool = False,
              max_bytes: int = DEFAULT_CKA_BYTES, allow_incomplete: bool = False,
              progress: bool = False) -> CKAResult:
    """Linear CKA between every hidden-state layer of trace a and of trace b (default: all layers that recorded
    them), streamed chunk by chunk. The traces must hold the same tokens in the same order (checked row by row
    on token_ids and sequence_ids; chunking may differ): else TraceMismatchError (a ValueError). Each layer pair
    holds (D^2 + F^2 + D F) fp64 moments; pairs beyond ``max_bytes`` are computed in further passes."""
    ra = TraceReader(trace_a, allow_incomplete=allow_incomplete)
    rb = TraceReader(trace_b, allow_incomplete=allow_incomplete)
    la, lb = _hidden_layers(ra, layers_a), _hidden_layers(rb, layers_b)
    if ra.num_tokens != rb.num_tokens:
        raise TraceMismatchError(f"{ra.path!r} holds {ra.num_tokens} tokens and {rb.path!r} {rb.num_tokens}; CKA "
                                 f"compares the same tokens; fix: trace both models on the same data with the same "
                                 f"sample_p and seed")
    da = {l: ra.layer_spec(l).hidden_size for l in la}
    db = {l: rb.layer_spec(l).hidden_size for l in lb}
    pairs = [(i, j) for i in range(len(la)) for j in range(len(lb))]
    out_LaLb = np.zeros((len(la), len(lb)))
    groups = _passes(pairs, lambda p: 8 * (da[la[p[0]]] + db[lb[p[1]]]) ** 2, max_bytes)
    for g, group in enumerate(groups):
        need_a = sorted({la[i] for i, _ in group})
        need_b = sorted({lb[j] for _, j in group})
        accs = {p: LinearCKAAccumulator(debiased) for p in group}
        done = 0
        for block_a, block_b in _aligned(ra, need_a, rb, need_b):
            for (i, j), acc in accs.items():
                acc.update(block_a[la[i]], block_b[lb[j]])
            done += next(iter(block_a.values())).shape[0]
            _progress(progress, f"cka {ra.path} vs {rb.path}: pass {g + 1}/{len(groups)}", done, ra.num_tokens)
        for (i, j), acc in accs.items():
            out_LaLb[i, j] = acc.result()
    return CKAResult(la, lb, out_LaLb, ra.num_tokens, bool(debiased))


def self_cka(trace_dir: str | os.PathLike[str], *, layers: Sequence[int] | None = None, debiased: bool = False,
             max_bytes: int = DEFAULT_CKA_BYTES, allow_incomplete: bool = False,
             progress: bool = False) -> CKAResult:
    """Linear CKA between every pair of one trace's hidden-state layers (self-similarity; symmetric, diagonal 1
    by definition), one streaming pass per ``max_bytes`` group of the L (L - 1) / 2 pairs."""
    reader = TraceReader(trace_dir, allow_incomplete=allow_incomplete)
    ls = _hidden_layers(reader, layers)
    d = {l: reader.layer_spec(l).hidden_size for l in ls}
    out_LL = np.eye(len(ls))
    pairs = [(i, j) for i in range(len(ls)) for j in range(i + 1, len(ls))]
    groups = _passes(pairs, lambda p: 8 * (d[ls[p[0]]] + d[ls[p[1]]]) ** 2, max_bytes)
    for g, group in enumerate(groups):
        need = sorted({ls[i] for p in group for i in p})
        accs = {p: LinearCKAAccumulator(debiased) for p in group}
        done = 0
        for chunk in reader.iter_chunks(need, hidden=True):
            for (i, j), acc in accs.items():
                acc.update(chunk.layers[ls[i]].hidden_TD, chunk.layers[ls[j]].hidden_TD)
            done += chunk.num_tokens
            _progress(progress, f"self-cka {reader.path}: pass {g + 1}/{len(groups)}, chunk {chunk.index + 1}/"
                                f"{reader.num_chunks}", done, reader.num_tokens)
        for (i, j), acc in accs.items():
            out_LL[i, j] = out_LL[j, i] = acc.result()
    return CKAResult(ls, ls, out_LL, reader.num_tokens, bool(debiased))


def cka_compatible(trace_a: str | os.PathLike[str], trace_b: str | os.PathLike[str]) -> str | None:
    """None when both traces recorded hidden states and hold the same number of tokens (the cheap checks;
    :func:`trace_cka` still checks every token), else the reason they cannot be compared."""
    ra, rb = TraceReader(trace_a, allow_incomplete=True), TraceReader(trace_b, allow_incomplete=True)
    for r in (ra, rb):
        if not any(s.hidden_size for s in r.layers):
            return f"{r.path!r} recorded no hidden states"
    if ra.num_tokens != rb.num_tokens:
        return f"token counts differ ({ra.num_tokens} vs {rb.num_tokens})"
    return None


__all__ = [
    "INSTRUMENTS_FILE", "CKAResult", "EffectiveExperts", "LabelMatrix", "LayerDependence", "LayerSummary",
    "PathWindow", "Summary", "TraceMismatchError", "bin_counts", "cka_compatible", "fmt", "instrument_results",
    "mi_json", "path_json", "self_cka", "summarize_trace", "top_by_load", "trace_cka",
]
