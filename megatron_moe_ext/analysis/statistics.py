"""Routing statistics: pure functions over routing traces, with streaming accumulators where a trace may not fit
in memory. Inputs are numpy arrays or CPU torch tensors (as :mod:`trace_format` stores them); outputs are
Python floats, numpy arrays or small frozen dataclasses. All arithmetic is fp64.

Legend: T tokens, K selections per token in a layer (top-k; for PEER heads * k), J selections in a second layer,
N experts in a layer, H product-key heads, k selections per head, P path-key width, S samples (token or
selection pairs), V distinct values of a variable (token ids, position buckets, labels), La / Lb layers of
models a / b, D / E hidden sizes.

Conventions shared by several statistics:

* **Top-1 expert** of a token: the selection with the largest gate when gates are given, else column 0 (Megatron
  and the product-key router emit top-k sorted by score, so column 0 is the top-1).
* **Plug-in mutual information** of two discrete variables from S samples (counts c_xy, c_x, c_y, S):
  I = sum_xy (c_xy/S) log(c_xy S / (c_x c_y)), in nats. Under independence 2 S I is asymptotically chi-square
  with (Kx-1)(Ky-1) degrees of freedom (Kx, Ky observed support sizes), so the plug-in estimate is biased up by
  about (Kx-1)(Ky-1)/(2S) (Miller 1955; Paninski 2003, Neural Computation 15(6)). Every MI result carries that
  bias and the corrected value; treat MI values within a few times the bias of 0 as "no dependence". The bias is
  large when Kx Ky is comparable to S (e.g. MI with token identity at a million experts): read such numbers
  relative to a shuffled-label baseline, not in absolute terms.
* **Variable experts per token** (expert choice, ReLU routing, null experts; trace format version 2): a row may
  hold fewer than K selections, padded with id -1 (``EMPTY``) and gate 0; null experts are ids N..N+M-1, so
  statistics over all router outputs take ``num_experts`` = N + M. Loads count only used slots (-1 is never
  counted; null experts are counted where the caller includes them). The top-1 of a token with no expert is -1,
  a value of its own ("no expert") in MI and paths. ``"pairs"`` MI uses each token's used slots only, weight
  1/(K_t J_t) with K_t, J_t its own counts, and one sample (-1) of weight 1 for a token without any. A ``"set"``
  path is the token's set of experts (of any size), so its maximum count is prod_l sum_{j<=K_l} C(N_l, j) for
  variable layers.
* **Selection modes** for MI between a routing choice and another variable: ``"top1"`` uses one sample per token
  (its top-1 expert); ``"pairs"`` uses every selection (every pair of selections for two layers), each weighted
  1/(number of samples of that token) so that each token still weighs 1 and S = T for the bias.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

_MODES = ("top1", "pairs")
EMPTY = -1  # an unused slot of a variable layer (trace_format.EMPTY_SLOT)
_DENSE_LIMIT = 2**28  # elements of a dense count matrix (2 GiB of fp64); larger needs the sparse accumulator


# ----------------------------------------------------------------------------------------------------- inputs


def _as_numpy(x: Any) -> np.ndarray:
    # CPU torch tensors come straight from trace capture; numpy cannot read CUDA memory, so .cpu() first.
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _ids(x: Any, name: str, num_experts: int | None = None, rows: int | None = None) -> np.ndarray:
    """[T, K] int64 selections ([T] is read as K = 1), range-checked against num_experts when given."""
    a = _as_numpy(x)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer) or a.shape[1] == 0:
        raise ValueError(f"{name} of shape {a.shape} and dtype {a.dtype}: expected integer expert ids [T, K] "
                         f"(or [T] for top-1); fix: pass the router's selected expert indices")
    if rows is not None and a.shape[0] != rows:
        raise ValueError(f"{name} has {a.shape[0]} tokens, expected {rows} (the other inputs' token count); fix: "
                         f"pass rows for the same tokens")
    a = a.astype(np.int64, copy=False)
    if num_experts is not None:
        _positive_int(num_experts, "num_experts")
        if a.size and (a.min() < EMPTY or a.max() >= num_experts):
            raise ValueError(f"{name} spans [{a.min()}, {a.max()}], outside [0, num_experts={num_experts}) (-1: an "
                             f"empty slot); fix: global expert ids, or the layer's true num_experts (N + M with "
                             f"null experts)")
    return a


def _values(x: Any, name: str, rows: int) -> np.ndarray:
    a = _as_numpy(x)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} of shape {a.shape} and dtype {a.dtype}: expected integer values [T]")
    if a.shape[0] != rows:
        raise ValueError(f"{name} has {a.shape[0]} entries for {rows} tokens; fix: one value per token (e.g. a "
                         f"label file aligned with the traced tokens)")
    return a.astype(np.int64, copy=False)


def _gates(x: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    a = _as_numpy(x)
    if a.shape != shape or not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} of shape {a.shape} and dtype {a.dtype}: expected floating gates of shape {shape}"
                         f" matching the expert ids")
    return a.astype(np.float64)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an int >= 1")
    return int(value)


def _mode(mode: str) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r}: expected one of {_MODES}")
    return mode


def top1(expert_ids_TK: Any, gates_TK: Any = None) -> np.ndarray:
    """top1_T: each token's top-1 expert (largest gate if gates are given, else column 0; see the module doc)."""
    ids_TK = _ids(expert_ids_TK, "expert_ids_TK")
    if gates_TK is None:
        return ids_TK[:, 0]
    g_TK = _gates(gates_TK, "gates_TK", ids_TK.shape)
    return ids_TK[np.arange(ids_TK.shape[0]), g_TK.argmax(1)]


# ------------------------------------------------------------------------------------------------------- load


def expert_counts(expert_ids_TK: Any, num_experts: int) -> np.ndarray:
    """counts_N (int64): how many of the T*K selections went to each expert (empty slots, -1, not counted)."""
    ids_TK = _ids(expert_ids_TK, "expert_ids_TK", num_experts)
    ids = ids_TK.ravel()
    return np.bincount(ids[ids != EMPTY], minlength=num_experts).astype(np.int64)


def experts_per_token(expert_ids_TK: Any, num_real: int) -> np.ndarray:
    """count_T (int64): real experts each token visited, ids in [0, num_real) (null experts, ids >= num_real, and
    empty slots are not counted): the compute a token spent, in experts."""
    ids_TK = _ids(expert_ids_TK, "expert_ids_TK")
    _positive_int(num_real, "num_real")
    return ((ids_TK >= 0) & (ids_TK < num_real)).sum(axis=1).astype(np.int64)


def experts_per_token_histogram(expert_ids_TK: Any, num_real: int) -> np.ndarray:
    """hist_J (int64), J = K + 1: hist[j] = tokens that visited exactly j real experts (:func:`experts_per_token`)."""
    ids_TK = _ids(expert_ids_TK, "expert_ids_TK")
    return np.bincount(experts_per_token(ids_TK, num_real), minlength=ids_TK.shape[1] + 1).astype(np.int64)


def null_fraction(expert_ids_TK: Any, num_real: int) -> float:
    """Null selections / all selections (empty slots excluded), the share of slots that spent no compute
    (MoE++, Jin et al. 2025; the metric the routers log as ``null_fraction``). NaN without selections."""
    ids_TK = _ids(expert_ids_TK, "expert_ids_TK")
    _positive_int(num_real, "num_real")
    used = int((ids_TK != EMPTY).sum())
    return float("nan") if used == 0 else float((ids_TK >= num_real).sum() / used)


def _counts(counts_N: Any) -> np.ndarray:
    c = _as_numpy(counts_N)
    if c.ndim != 1 or c.size == 0 or not (np.issubdtype(c.dtype, np.integer) or np.issubdtype(c.dtype, np.floating)):
        raise ValueError(f"counts_N of shape {c.shape} and dtype {c.dtype}: expected non-empty numeric [N] loads; "
                         f"fix: expert_counts(expert_ids_TK, num_experts)")
    c = c.astype(np.float64)
    if not np.all(np.isfinite(c)) or (c < 0).any():
        raise ValueError("counts_N has negative or non-finite entries; loads are counts >= 0")
    return c


def max_violation(counts_N: Any) -> float:
    """MaxVio = max_i c_i / mean_i c_i - 1 (Wang et al. 2024, "Auxiliary-loss-free load balancing",
    arXiv 2408.15664): 0 at perfect balance, N - 1 when one expert takes all. NaN when there is no load."""
    c_N = _counts(counts_N)
    mean = c_N.mean()
    return float("nan") if mean == 0 else float(c_N.max() / mean - 1.0)


def dead_experts(counts_N: Any) -> tuple[int, float]:
    """(count, fraction) of experts never selected (c_i = 0)."""
    c_N = _counts(counts_N)
    dead = int((c_N == 0).sum())
    return dead, dead / c_N.shape[0]


def load_entropy(counts_N: Any, normalized: bool = False) -> float:
    """H = -sum_i p_i log p_i with p = c / sum c (0 log 0 = 0), in nats; ``normalized`` divides by log N
    (1 = uniform, 0 = one expert takes all; 1.0 for N = 1). NaN when there is no load."""
    c_N = _counts(counts_N)
    total = c_N.sum()
    if total == 0:
        return float("nan")
    p = c_N[c_N > 0] / total
    h = float(-(p * np.log(p)).sum())
    if not normalized:
        return h
    return 1.0 if c_N.shape[0] == 1 else h / math.log(c_N.shape[0])


@dataclasses.dataclass(frozen=True)
class LoadStats:
    """Load distribution of one layer: counts_N and the scalars derived from it (see the functions above)."""

    counts_N: np.ndarray
    num_selections: int
    max_violation: float
    dead_count: int
    dead_fraction: float
    entropy_nats: float
    entropy_normalized: float


def load_stats(counts_N: Any) -> LoadStats:
    """All load statistics of one layer from its counts_N."""
    c_N = _counts(counts_N)
    dead, frac = dead_experts(c_N)
    return LoadStats(c_N, int(c_N.sum()), max_violation(c_N), dead, frac, load_entropy(c_N),
                     load_entropy(c_N, normalized=True))


class ExpertLoadAccumulator:
    """Streaming :func:`load_stats`: O(N) memory (8 MB at N = 1M), one bincount per chunk."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = _positive_int(num_experts, "num_experts")
        self.counts_N = np.zeros(self.num_experts, dtype=np.int64)

    def update(self, expert_ids_TK: Any) -> None:
        self.counts_N += expert_counts(expert_ids_TK, self.num_experts)

    def result(self) -> LoadStats:
        return load_stats(self.counts_N)


# ----------------------------------------------------------------------------------------- mutual information


@dataclasses.dataclass(frozen=True)
class MutualInformation:
    """Plug-in MI (nats) with the entropies of both sides, the sample count S (total weight), the observed
    support sizes, the independence bias (Kx-1)(Ky-1)/(2S) and ``corrected_nats`` = nats - bias (may be < 0)."""

    nats: float
    entropy_x: float
    entropy_y: float
    num_samples: float
    support_x: int
    support_y: int
    bias_nats: float
    corrected_nats: float


def plugin_mi_bias(support_x: int, support_y: int, num_samples: float) -> float:
    """Expected plug-in MI of independent variables, (Kx-1)(Ky-1)/(2S), to first order in 1/S (module doc)."""
    if num_samples <= 0:
        return float("nan")
    return (support_x - 1) * (support_y - 1) / (2.0 * num_samples)


def _entropy_of_counts(c: np.ndarray, total: float) -> float:
    p = c[c > 0] / total
    return float(-(p * np.log(p)).sum())


class JointCountAccumulator:
    """Sparse joint counts of two non-negative integer variables x in [0, size_x), y in [0, size_y), streamed.

    Memory is O(distinct (x, y) pairs seen), never size_x * size_y, so MI between a million experts and a 50k
    vocabulary stays feasible. ``result()`` is the plug-in MI of everything seen (module doc).
    """

    def __init__(self, size_x: int, size_y: int) -> None:
        self.size_x = _positive_int(size_x, "size_x")
        self.size_y = _positive_int(size_y, "size_y")
        if self.size_x * self.size_y >= 2**63:
            raise ValueError(f"size_x * size_y = {self.size_x * self.size_y} does not fit an int64 pair code; "
                             f"fix: compress the values (np.unique(..., return_inverse=True)) first")
        self.codes_S = np.zeros(0, dtype=np.int64)
        self.counts_S = np.zeros(0, dtype=np.float64)

    def update(self, x_S: Any, y_S: Any, weights_S: Any = None) -> None:
        x = _as_numpy(x_S)
        y = _as_numpy(y_S)
        if x.ndim != 1 or y.shape != x.shape or not np.issubdtype(x.dtype, np.integer) \
                or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"x_S {x.shape} {x.dtype} and y_S {y.shape} {y.dtype}: expected two integer [S] arrays "
                             f"of equal length")
        if x.size and (x.min() < 0 or x.max() >= self.size_x or y.min() < 0 or y.max() >= self.size_y):
            raise ValueError(f"values x in [{x.min()}, {x.max()}], y in [{y.min()}, {y.max()}] outside "
                             f"[0, {self.size_x}) x [0, {self.size_y}); fix: larger sizes or compressed values")
        w = None
        if weights_S is not None:
            w = _as_numpy(weights_S).astype(np.float64)
            if w.shape != x.shape or not np.all(np.isfinite(w)) or (w < 0).any():
                raise ValueError(f"weights_S of shape {w.shape}: expected finite non-negative [S] weights")
        codes = x.astype(np.int64) * self.size_y + y.astype(np.int64)
        # Merge with what was seen: unique over the union, then add both sides' counts by inverse index.
        all_codes = np.concatenate([self.codes_S, codes])
        all_w = np.concatenate([self.counts_S, np.ones(codes.shape[0]) if w is None else w])
        self.codes_S, inv = np.unique(all_codes, return_inverse=True)
        self.counts_S = np.bincount(inv.ravel(), weights=all_w, minlength=self.codes_S.shape[0])

    def count_matrix(self) -> np.ndarray:
        """counts_XY (fp64, dense); only for size_x * size_y up to 2^28 entries."""
        if self.size_x * self.size_y > _DENSE_LIMIT:
            raise ValueError(f"a dense {self.size_x} x {self.size_y} count matrix exceeds {_DENSE_LIMIT} entries; "
                             f"fix: read the sparse codes_S (x * size_y + y) and counts_S instead")
        m = np.zeros(self.size_x * self.size_y)
        m[self.codes_S] = self.counts_S
        return m.reshape(self.size_x, self.size_y)

    def result(self) -> MutualInformation:
        keep = self.counts_S > 0
        c = self.counts_S[keep]
        codes = self.codes_S[keep]
        total = float(c.sum())
        if total == 0:
            nan = float("nan")
            return MutualInformation(nan, nan, nan, 0.0, 0, 0, nan, nan)
        x_ids, x_inv = np.unique(codes // self.size_y, return_inverse=True)
        y_ids, y_inv = np.unique(codes % self.size_y, return_inverse=True)
        cx = np.bincount(x_inv, weights=c)
        cy = np.bincount(y_inv, weights=c)
        # sum p_xy log(p_xy / (p_x p_y)) directly, not H(X)+H(Y)-H(X,Y): no cancellation when MI << H.
        mi = float((c / total * (np.log(c) + math.log(total) - np.log(cx[x_inv]) - np.log(cy[y_inv]))).sum())
        mi = max(mi, 0.0)  # >= 0 exactly; only rounding can go below
        bias = plugin_mi_bias(len(x_ids), len(y_ids), total)
        return MutualInformation(mi, _entropy_of_counts(cx, total), _entropy_of_counts(cy, total), total,
                                 len(x_ids), len(y_ids), bias, mi - bias)


def mutual_information(x_S: Any, y_S: Any, weights_S: Any = None) -> MutualInformation:
    """Plug-in MI between two integer variables given as paired samples (any integer values, compressed first)."""
    x = _as_numpy(x_S)
    y = _as_numpy(y_S)
    if x.ndim != 1 or y.shape != x.shape:
        raise ValueError(f"x_S {x.shape} and y_S {y.shape}: expected two [S] arrays of equal length")
    if x.size == 0:
        raise ValueError("x_S and y_S are empty: MI needs at least one sample")
    # np.unique is monotone, so the compressed pair codes keep the accumulator's order (same sums, same bits).
    ux, xi = np.unique(x, return_inverse=True)
    uy, yi = np.unique(y, return_inverse=True)
    acc = JointCountAccumulator(len(ux), len(uy))
    acc.update(xi.ravel(), yi.ravel(), weights_S)
    return acc.result()


def routing_pairs(x_TK: Any, y: Any, mode: str = "top1", gates_x_TK: Any = None,
                  gates_y_TJ: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(x_S, y_S, weights_S or None): samples for MI between a routing choice x_TK and y, which is either a second
    routing choice y_TJ or a per-token value y_T ([T], e.g. labels). ``"top1"``: one sample per token (gates pick
    the top-1, module doc). ``"pairs"``: every (selection, selection) or (selection, value) pair, weight 1/(K J).
    Feed the result to :func:`mutual_information` or :meth:`JointCountAccumulator.update` to stream. ``"pairs"``
    makes T*K*J samples (a sort of that many int64 codes), so stream large traces chunk by chunk."""
    mode = _mode(mode)
    x_ids = _ids(x_TK, "x_TK")
    T = x_ids.shape[0]
    y_arr = _as_numpy(y)
    y_is_value = y_arr.ndim == 1
    y_ids = _values(y_arr, "y_T", T)[:, None] if y_is_value else _ids(y_arr, "y_TJ", rows=T)
    if mode == "top1":
        xs = top1(x_ids, gates_x_TK)
        ys = y_ids[:, 0] if y_is_value else top1(y_ids, gates_y_TJ)
        return xs, ys, None
    K, J = x_ids.shape[1], y_ids.shape[1]
    xs = np.repeat(x_ids, J, axis=1).ravel()  # [T, K*J]: x_k repeated for each y_j
    ys = np.tile(y_ids, (1, K)).ravel()
    if not ((x_ids == EMPTY).any() or (not y_is_value and (y_ids == EMPTY).any())):
        return xs, ys, np.full(xs.shape[0], 1.0 / (K * J))
    # Variable rows (module doc): used slots only, weight 1/(K_t J_t); a token without any keeps one -1 sample.
    x_used = _used_slots(x_ids)
    y_used = np.ones_like(y_ids, dtype=bool) if y_is_value else _used_slots(y_ids)
    keep = (np.repeat(x_used, J, axis=1) & np.tile(y_used, (1, K))).ravel()
    w_T = 1.0 / (x_used.sum(1) * y_used.sum(1))
    return xs[keep], ys[keep], np.repeat(w_T, K * J)[keep]


def _used_slots(ids_TK: np.ndarray) -> np.ndarray:
    """used_TK (bool): the non-empty slots, and column 0 of a row without any (its -1 stands for "no expert")."""
    used_TK = ids_TK != EMPTY
    used_TK[:, 0] |= ~used_TK.any(axis=1)
    return used_TK


def routing_dependence(expert_ids_a_TK: Any, expert_ids_b_TJ: Any, gates_a_TK: Any = None, gates_b_TJ: Any = None,
                       mode: str = "top1") -> MutualInformation:
    """Layer-to-layer routing dependence: plug-in MI (nats) between layer l's and layer l+1's choice for the
    same tokens. ``"top1"`` compares top-1 experts; ``"pairs"`` treats each of the K x J selection pairs of a
    token as a sample of weight 1/(KJ). Identical routing gives MI = H(top-1 load); independent routing gives
    MI ~ bias (module doc)."""
    a = _ids(expert_ids_a_TK, "expert_ids_a_TK")
    b = _ids(expert_ids_b_TJ, "expert_ids_b_TJ", rows=a.shape[0])
    return mutual_information(*routing_pairs(a, b, mode, gates_a_TK, gates_b_TJ))


def specialisation(expert_ids_TK: Any, values_T: Any, gates_TK: Any = None, mode: str = "top1") -> MutualInformation:
    """Specialisation: plug-in MI (nats) between expert choice and a per-token variable: (a) token identity
    (values = token ids), (b) position (values = :func:`bucket_positions`), (c) a user label (domain, language).
    A router that sends each label to its own expert gives MI = H(label) exactly; a random router gives MI ~ bias.
    Normalise by ``entropy_y`` for "fraction of the label's information carried by routing"."""
    ids_TK = _ids(expert_ids_TK, "expert_ids_TK")
    values = _values(values_T, "values_T", ids_TK.shape[0])
    return mutual_information(*routing_pairs(ids_TK, values, mode, gates_TK))


def bucket_positions(positions_T: Any, num_buckets: int, max_position: int | None = None,
                     scheme: str = "linear") -> np.ndarray:
    """buckets_T (int64) for position MI. ``"linear"``: floor(pos * B / max_position), equal-width buckets over
    [0, max_position) (default max_position = max(pos) + 1); ``"log2"``: floor(log2(pos + 1)), so 0 | 1-2 | 3-6 |
    ..., finer where positions matter most. Both clipped to B - 1."""
    num_buckets = _positive_int(num_buckets, "num_buckets")
    pos = _as_numpy(positions_T)
    if pos.ndim != 1 or not np.issubdtype(pos.dtype, np.integer) or (pos.size and pos.min() < 0):
        raise ValueError(f"positions_T of shape {pos.shape} and dtype {pos.dtype}: expected non-negative integer [T]")
    pos = pos.astype(np.int64)
    if scheme == "linear":
        top = int(pos.max()) + 1 if max_position is None and pos.size else max_position or 1
        top = _positive_int(top, "max_position")
        b = pos * num_buckets // top
    elif scheme == "log2":
        b = np.floor(np.log2(pos + 1.0)).astype(np.int64)
    else:
        raise ValueError(f"scheme={scheme!r}: expected 'linear' or 'log2'")
    return np.minimum(b, num_buckets - 1)


def expert_label_counts(expert_ids_TK: Any, labels_T: Any, num_experts: int, num_labels: int) -> np.ndarray:
    """counts_NV (int64): how often expert n was selected (any of the K selections) by tokens of label v; the
    expert x label specialisation matrix. Dense, so N * V is capped at 2^28; beyond that stream a
    :class:`JointCountAccumulator` (sparse)."""
    ids_TK = _ids(expert_ids_TK, "expert_ids_TK", num_experts)
    num_labels = _positive_int(num_labels, "num_labels")
    labels = _values(labels_T, "labels_T", ids_TK.shape[0])
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(f"labels span [{labels.min()}, {labels.max()}], outside [0, num_labels={num_labels}); "
                         f"fix: map labels to 0..num_labels-1")
    if num_experts * num_labels > _DENSE_LIMIT:
        raise ValueError(f"num_experts * num_labels = {num_experts * num_labels} > {_DENSE_LIMIT} entries; fix: a "
                         f"JointCountAccumulator(num_experts, num_labels) keeps only the pairs seen")
    codes = (ids_TK * num_labels + labels[:, None]).ravel()
    codes = codes[ids_TK.ravel() != EMPTY]
    return np.bincount(codes, minlength=num_experts * num_labels).reshape(num_experts, num_labels)


# --------------------------------------------------------------------------------------------- path diversity


@dataclasses.dataclass(frozen=True)
class PathDiversity:
    """Distinct expert paths over a window of L consecutive layers.

    ``per_token`` = distinct / T (1 when every token took its own path); ``of_max`` = distinct / min(T,
    max_paths), the fraction of the achievable distinct paths that were realised (1 = as diverse as possible
    for T tokens). ``max_paths`` (exact Python int, may be astronomically large) is prod_l N_l (top-1 paths) or
    prod_l C(N_l, K_l) (set paths; prod_l sum_{j<=K_l} C(N_l, j) for variable layers, N_l + 1 top-1 choices
    with "no expert")."""

    distinct: int
    num_tokens: int
    per_token: float
    of_max: float
    max_paths: int
    window: int
    mode: str


def path_keys(expert_ids_by_layer: Sequence[Any], gates_by_layer: Sequence[Any] | None = None,
              mode: str = "top1") -> np.ndarray:
    """keys_TP (int64): each token's path through the given layers. ``"top1"``: the tuple of top-1 experts,
    P = L. ``"set"``: per layer the sorted K selections (the set of experts, order ignored), concatenated,
    P = sum_l K_l. Two tokens share a path iff their rows are equal."""
    if mode not in ("top1", "set"):
        raise ValueError(f"mode={mode!r}: expected 'top1' or 'set'")
    if len(expert_ids_by_layer) == 0:
        raise ValueError("expert_ids_by_layer is empty: a path needs at least one layer")
    if gates_by_layer is not None and len(gates_by_layer) != len(expert_ids_by_layer):
        raise ValueError(f"{len(gates_by_layer)} gate arrays for {len(expert_ids_by_layer)} layers; fix: one per "
                         f"layer, or None")
    first = _ids(expert_ids_by_layer[0], "expert_ids_by_layer[0]")
    parts = []
    for l, ids in enumerate(expert_ids_by_layer):
        ids_TK = _ids(ids, f"expert_ids_by_layer[{l}]", rows=first.shape[0])
        if mode == "top1":
            parts.append(top1(ids_TK, None if gates_by_layer is None else gates_by_layer[l])[:, None])
        else:
            parts.append(np.sort(ids_TK, axis=1))
    return np.concatenate(parts, axis=1)


def _max_paths(num_experts_by_layer: Sequence[int], top_k_by_layer: Sequence[int] | None, mode: str,
               variable_by_layer: Sequence[bool] | None = None) -> int:
    total = 1
    for l, n in enumerate(num_experts_by_layer):
        n = _positive_int(n, f"num_experts_by_layer[{l}]")
        variable = bool(variable_by_layer and variable_by_layer[l])
        if mode == "top1":
            total *= n + 1 if variable else n
        elif variable:
            total *= sum(math.comb(n, j) for j in range(top_k_by_layer[l] + 1))
        else:
            total *= math.comb(n, top_k_by_layer[l])
    return total


class PathDiversityAccumulator:
    """Streaming :func:`path_diversity` for one window of layers. Memory O(distinct paths * P) (the distinct
    rows themselves: exact, no hashing), independent of N."""

    def __init__(self, num_experts_by_layer: Sequence[int], mode: str = "top1",
                 variable_by_layer: Sequence[bool] | None = None) -> None:
        self.num_experts_by_layer = list(num_experts_by_layer)
        self.variable_by_layer = None if variable_by_layer is None else list(variable_by_layer)
        if not self.num_experts_by_layer:
            raise ValueError("num_experts_by_layer is empty: a path needs at least one layer")
        self.mode = mode
        self.num_tokens = 0
        self.top_k_by_layer: list[int] | None = None
        self._distinct: np.ndarray | None = None

    def update(self, expert_ids_by_layer: Sequence[Any], gates_by_layer: Sequence[Any] | None = None) -> None:
        if len(expert_ids_by_layer) != len(self.num_experts_by_layer):
            raise ValueError(f"{len(expert_ids_by_layer)} layers given, the window has "
                             f"{len(self.num_experts_by_layer)}; fix: pass the same layers every update")
        for l, (ids, n) in enumerate(zip(expert_ids_by_layer, self.num_experts_by_layer)):
            _ids(ids, f"expert_ids_by_layer[{l}]", n)
        keys_TP = path_keys(expert_ids_by_layer, gates_by_layer, self.mode)
        ks = [_ids(ids, "ids").shape[1] for ids in expert_ids_by_layer]
        if self.top_k_by_layer is None:
            self.top_k_by_layer = ks
        elif ks != self.top_k_by_layer:
            raise ValueError(f"top-k per layer changed from {self.top_k_by_layer} to {ks} between updates")
        both = keys_TP if self._distinct is None else np.concatenate([self._distinct, keys_TP])
        self._distinct = np.unique(both, axis=0)
        self.num_tokens += keys_TP.shape[0]

    def result(self) -> PathDiversity:
        if self.num_tokens == 0 or self._distinct is None:
            raise ValueError("no tokens seen: path diversity needs at least one token")
        d = int(self._distinct.shape[0])
        max_paths = _max_paths(self.num_experts_by_layer, self.top_k_by_layer, self.mode, self.variable_by_layer)
        return PathDiversity(d, self.num_tokens, d / self.num_tokens, d / min(self.num_tokens, max_paths),
                             max_paths, len(self.num_experts_by_layer), self.mode)


def path_diversity(expert_ids_by_layer: Sequence[Any], num_experts_by_layer: Sequence[int],
                   gates_by_layer: Sequence[Any] | None = None, mode: str = "top1",
                   variable_by_layer: Sequence[bool] | None = None) -> PathDiversity:
    """Distinct expert paths across the given consecutive layers (a window of L = len(...) layers); see
    :class:`PathDiversity` for the normalisations and :func:`path_keys` for what a path is. E.g. identical top-1
    routing in every layer, with all N experts used, gives distinct = N whatever L."""
    acc = PathDiversityAccumulator(num_experts_by_layer, mode, variable_by_layer)
    acc.update(expert_ids_by_layer, gates_by_layer)
    return acc.result()


def path_diversity_curve(expert_ids_by_layer: Sequence[Any], num_experts_by_layer: Sequence[int], window: int,
                         gates_by_layer: Sequence[Any] | None = None, mode: str = "top1") -> list[PathDiversity]:
    """:func:`path_diversity` of every window of ``window`` consecutive layers: entry s covers layers
    [s, s + window)."""
    window = _positive_int(window, "window")
    L = len(expert_ids_by_layer)
    if window > L or len(num_experts_by_layer) != L:
        raise ValueError(f"window={window} with {L} layers of ids and {len(num_experts_by_layer)} expert counts; "
                         f"fix: 1 <= window <= layers and one num_experts per layer")
    return [path_diversity(expert_ids_by_layer[s:s + window], num_experts_by_layer[s:s + window],
                           None if gates_by_layer is None else gates_by_layer[s:s + window], mode)
            for s in range(L - window + 1)]


# --------------------------------------------------------------------------------------- product-key heads


def _head_jaccard_sums(expert_ids_TK: Any, num_heads: int) -> tuple[float, int]:
    """(sum over tokens and head pairs of Jaccard overlap, number of (token, pair) terms)."""
    num_heads = _positive_int(num_heads, "num_heads")
    ids_TK = _ids(expert_ids_TK, "expert_ids_TK")
    T, K = ids_TK.shape
    if num_heads < 2 or K % num_heads:
        raise ValueError(f"num_heads={num_heads} with K={K} selections per token: expected >= 2 heads dividing K "
                         f"(PEER stores heads * k columns, head-major); fix: the layer's num_heads")
    k = K // num_heads
    ids_THk = ids_TK.reshape(T, num_heads, k)
    # A repeated id inside one head counts once: the heads' selections are sets.
    earlier_THkk = np.tril(np.ones((k, k), dtype=bool), -1)  # [j, i]: i < j
    dup_THk = ((ids_THk[..., :, None] == ids_THk[..., None, :]) & earlier_THkk).any(-1)
    size_TH = k - dup_THk.sum(-1)
    total, terms = 0.0, 0
    for h in range(num_heads):
        for g in range(h + 1, num_heads):
            in_other_Tk = (ids_THk[:, h, :, None] == ids_THk[:, g, None, :]).any(-1) & ~dup_THk[:, h]
            inter_T = in_other_Tk.sum(-1)
            union_T = size_TH[:, h] + size_TH[:, g] - inter_T
            total += float((inter_T / union_T).sum())
            terms += T
    return total, terms


def head_overlap(expert_ids_TK: Any, num_heads: int) -> float:
    """Mean Jaccard overlap |S_h n S_g| / |S_h u S_g| between the expert sets S_h of every pair of heads h < g,
    averaged over pairs and tokens. Product-key heads share one expert pool (PEER, He 2024, arXiv 2407.04153);
    overlap 1 = heads redundant, 0 = disjoint (each head adds k new experts). Random heads of k experts out of N
    overlap about k / (2N - k)."""
    total, terms = _head_jaccard_sums(expert_ids_TK, num_heads)
    if terms == 0:
        raise ValueError("expert_ids_TK has no tokens: head overlap needs at least one")
    return total / terms


class HeadOverlapAccumulator:
    """Streaming :func:`head_overlap`: a running sum and count."""

    def __init__(self, num_heads: int) -> None:
        self.num_heads = _positive_int(num_heads, "num_heads")
        self._total, self._terms = 0.0, 0

    def update(self, expert_ids_TK: Any) -> None:
        total, terms = _head_jaccard_sums(expert_ids_TK, self.num_heads)
        self._total += total
        self._terms += terms

    def result(self) -> float:
        if self._terms == 0:
            raise ValueError("no tokens seen: head overlap needs at least one token")
        return self._total / self._terms


# -------------------------------------------------------------------------------------- effective experts


def effective_experts(gates_TK: Any, kind: str = "entropy") -> np.ndarray:
    """eff_T (fp64): effective number of experts per token from the gates of its K selections, normalised to
    p = g / sum g. ``"entropy"``: exp(-sum p log p) (Hill number of order 1, the perplexity); ``"inverse_simpson"``:
    1 / sum p^2 (Hill number of order 2, weighs the largest gates more). Both are K for uniform gates and 1 for
    one-hot gates. Gates must be >= 0 (softmax or sigmoid outputs; apply softmax to raw PEER scores first).
    NaN for a token whose gates sum to 0. Report the mean over tokens, or the histogram."""
    g = _as_numpy(gates_TK)
    if g.ndim != 2 or g.shape[1] == 0 or not np.issubdtype(g.dtype, np.floating):
        raise ValueError(f"gates_TK of shape {g.shape} and dtype {g.dtype}: expected floating [T, K] gates")
    g = g.astype(np.float64)
    if not np.all(np.isfinite(g)) or (g < 0).any():
        raise ValueError("gates_TK has negative or non-finite entries: the effective number needs weights >= 0; "
                         "fix: softmax the raw scores over each token's selections first")
    total_T = g.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = g / total_T
        if kind == "entropy":
            plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
            eff = np.exp(-plogp.sum(1))
        elif kind == "inverse_simpson":
            eff = 1.0 / (p * p).sum(1)
        else:
            raise ValueError(f"kind={kind!r}: expected 'entropy' or 'inverse_simpson'")
    return np.where(total_T[:, 0] > 0, eff, np.nan)


# --------------------------------------------------------------------------------------------------- CKA


class _CrossMoments:
    """Sufficient statistics of two row-paired matrices A [T, D], B [T, E] for linear HSIC: A^T B, column sums,
    sum_i a_i |b_i|^2, sum_i b_i |a_i|^2, sum_i |a_i|^2 |b_i|^2 and T (fp64)."""

    def __init__(self, d: int, e: int) -> None:
        self.ab_DE = np.zeros((d, e))
        self.sa_D = np.zeros(d)
        self.sb_E = np.zeros(e)
        self.a_nb_D = np.zeros(d)
        self.b_na_E = np.zeros(e)
        self.na_nb = 0.0
        self.sq_a = 0.0  # sum_i |a_i|^2
        self.sq_b = 0.0
        self.n = 0

    def update(self, a_TD: np.ndarray, b_TE: np.ndarray) -> None:
        na_T = (a_TD * a_TD).sum(1)
        nb_T = (b_TE * b_TE).sum(1)
        self.ab_DE += a_TD.T @ b_TE
        self.sa_D += a_TD.sum(0)
        self.sb_E += b_TE.sum(0)
        self.a_nb_D += a_TD.T @ nb_T
        self.b_na_E += b_TE.T @ na_T
        self.na_nb += float(na_T @ nb_T)
        self.sq_a += float(na_T.sum())
        self.sq_b += float(nb_T.sum())
        self.n += a_TD.shape[0]

    def hsic(self, debiased: bool) -> float:
        n = self.n
        if not debiased:
            # ||A_c^T B_c||_F^2 with A_c, B_c column-centred; the 1/(n-1)^2 factor cancels in CKA.
            c_DE = self.ab_DE - np.outer(self.sa_D, self.sb_E) / n
            return float((c_DE * c_DE).sum())
        # Unbiased HSIC (Song et al. 2012, JMLR 13, eq. 5) for K = AA^T, L = BB^T with zeroed diagonals, each
        # term rewritten in feature space so nothing is O(T^2):
        #   tr(K~L~) = ||A^T B||^2 - sum_i |a_i|^2 |b_i|^2,   1^T K~ 1 = |s_a|^2 - sum_i |a_i|^2,
        #   1^T K~ L~ 1 = s_a^T (A^T B) s_b - s_a . sum_i a_i |b_i|^2 - s_b . sum_i b_i |a_i|^2 + sum |a_i|^2|b_i|^2.
        tr_kl = float((self.ab_DE * self.ab_DE).sum()) - self.na_nb
        one_k_one = float(self.sa_D @ self.sa_D) - self.sq_a
        one_l_one = float(self.sb_E @ self.sb_E) - self.sq_b
        one_kl_one = (float(self.sa_D @ self.ab_DE @ self.sb_E) - float(self.sa_D @ self.a_nb_D)
                      - float(self.sb_E @ self.b_na_E) + self.na_nb)
        return (tr_kl + one_k_one * one_l_one / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * one_kl_one) / (n * (n - 3))


def _matrix(x: Any, name: str) -> np.ndarray:
    a = _as_numpy(x)
    if a.ndim != 2 or a.shape[1] == 0 or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} of shape {a.shape} and dtype {a.dtype}: expected a numeric [tokens, hidden] matrix")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite entries")
    return a


class LinearCKAAccumulator:
    """Streaming linear CKA between two representations of the same tokens, x_TD and y_TE, fed in row chunks.

    CKA(X, Y) = HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y)) with the linear kernel (Kornblith et al. 2019,
    "Similarity of neural network representations revisited", ICML). ``debiased=False``: the biased estimator
    HSIC = ||X_c^T Y_c||_F^2 / (T-1)^2 on column-centred X_c, Y_c (Kornblith's default; > 0 even for independent
    X, Y, by about sqrt(D E) / T). ``debiased=True``: the unbiased HSIC U-statistic (Song et al. 2012), as in
    Nguyen et al. 2021 ("Do wide and deep networks learn the same things?"): ~0 for independent representations,
    may be slightly negative, needs T >= 4. Both are invariant to orthogonal transforms and isotropic scaling of
    either side, and to shifting it by a constant vector.

    Memory: D^2 + E^2 + D E fp64 (384 MB at D = E = 4096), independent of T. Rows are shifted by the first
    chunk's column mean before accumulating (HSIC is shift-invariant) so that large means do not eat fp64 digits.
    """

    def __init__(self, debiased: bool = False) -> None:
        self.debiased = bool(debiased)
        self._xx: _CrossMoments | None = None
        self._yy: _CrossMoments | None = None
        self._xy: _CrossMoments | None = None
        self._shift: tuple[np.ndarray, np.ndarray] | None = None

    def update(self, x_TD: Any, y_TE: Any) -> None:
        x = _matrix(x_TD, "x_TD")
        y = _matrix(y_TE, "y_TE")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x_TD has {x.shape[0]} rows and y_TE {y.shape[0]}: CKA compares the same tokens; fix: "
                             f"pass hidden states of the same tokens in the same order")
        if self._shift is None:
            self._shift = (x.mean(0) if x.shape[0] else np.zeros(x.shape[1]),
                           y.mean(0) if y.shape[0] else np.zeros(y.shape[1]))
            d, e = x.shape[1], y.shape[1]
            self._xx, self._yy, self._xy = _CrossMoments(d, d), _CrossMoments(e, e), _CrossMoments(d, e)
        elif x.shape[1] != self._shift[0].shape[0] or y.shape[1] != self._shift[1].shape[0]:
            raise ValueError(f"hidden sizes changed between updates: x {x.shape[1]} (was {self._shift[0].shape[0]}), "
                             f"y {y.shape[1]} (was {self._shift[1].shape[0]})")
        x = x - self._shift[0]
        y = y - self._shift[1]
        self._xx.update(x, x)
        self._yy.update(y, y)
        self._xy.update(x, y)

    def result(self) -> float:
        n = 0 if self._xy is None else self._xy.n
        need = 4 if self.debiased else 2
        if n < need:
            raise ValueError(f"{n} tokens seen: {'debiased' if self.debiased else 'biased'} CKA needs at least "
                             f"{need}")
        hxy = self._xy.hsic(self.debiased)
        hxx = self._xx.hsic(self.debiased)
        hyy = self._yy.hsic(self.debiased)
        if not self.debiased and (hxx <= 0 or hyy <= 0):
            raise ValueError("x_TD or y_TE is constant across tokens (zero variance): CKA is undefined; fix: check "
                             "that the hidden states were captured")
        if hxx <= 0 or hyy <= 0:
            return float("nan")  # debiased self-HSIC can be <= 0 for tiny or near-constant samples
        return float(hxy / math.sqrt(hxx * hyy))


def linear_cka(x_TD: Any, y_TE: Any, debiased: bool = False) -> float:
    """Linear CKA between two [tokens x hidden] representations of the same tokens (see
    :class:`LinearCKAAccumulator` for the definition, estimators and invariances). CKA(X, X) = 1."""
    acc = LinearCKAAccumulator(debiased)
    acc.update(x_TD, y_TE)
    return acc.result()


def cka_matrix(hidden_a: Sequence[Any], hidden_b: Sequence[Any], debiased: bool = False) -> np.ndarray:
    """cka_LaLb: linear CKA between every layer of model a (hidden_a[i] = x_TD) and every layer of model b
    (hidden_b[j] = y_TE), on the same tokens; compares e.g. fine-grained vs coarse vs dense layer by layer."""
    if len(hidden_a) == 0 or len(hidden_b) == 0:
        raise ValueError(f"hidden_a has {len(hidden_a)} layers and hidden_b {len(hidden_b)}: need at least one each")
    out = np.zeros((len(hidden_a), len(hidden_b)))
    for i, x in enumerate(hidden_a):
        for j, y in enumerate(hidden_b):
            out[i, j] = linear_cka(x, y, debiased)
    return out
