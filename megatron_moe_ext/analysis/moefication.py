"""MoEfication (``analyze --readouts moefication``): how much of a dense FFN's output a few neuron clusters carry,
next to how much of an MoE layer's all-experts output its router's top-k carries.

Dense FFNs (Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts",
arXiv 2110.01786, sections 3.1-3.2): the F intermediate neurons of each dense FFN (the input of ``linear_fc2``,
after the activation or GLU) are split into E equal clusters by co-activation: neuron f's feature is its
absolute activation |a_cf| over the calibration tokens c, scaled to unit length, and the features are grouped by
balanced k-means (:func:`balanced_kmeans`: scikit-learn's k-means for the start, then assignments under equal
cluster sizes solved exactly as a linear assignment problem by scipy, Malinen & Fränti 2014, "Balanced K-Means
for Clustering"). The paper's co-activation graph partition also asks for equal sizes; k-means on the
co-activation profiles is the paper's "parameter/co-activation clustering" variant. The FFN output of token t is
the sum of the clusters' parts, y_t = sum_e y_te with y_te = W2[:, cluster e] a_t[cluster e] (fc2 bias left
out). Per token the selection keeps the k clusters with the largest ||y_te|| (an oracle router: an upper bound
for any learned MoEfication router), and

    share_t = 1 - ||y_t - sum_{e kept} y_te||^2 / ||y_t||^2

is the part of the output (squared norm) they carry (1 = all of it). Control: k clusters drawn uniformly per
token (seeded by seed, layer, window, position). The loss when only the kept clusters' neurons are active in
every dense FFN at once (the others' fc2 inputs zeroed by a forward pre-hook on ``linear_fc2``) is measured by
a rerun, for the oracle and the random selection, against the clean loss on the same tokens.

Calibration part: the windows whose index is a multiple of ``CALIBRATION_EVERY`` (4): their tokens (at most
``moefication_calibration_tokens``, the first in (window, position) order) feed the clustering; every
measurement uses the other windows only.

MoE layers, the same measurement for the model's own router: the layer's output with its router's top-k (the
clean pass) against the layer's output with every expert selected (a rerun with each top-k router's ``topk`` and
the layer's ``moe_router_topk`` set to N: the gates are the router's own at k = N, e.g. the full softmax),
share_t as above with y_t the all-experts output, and the loss of the all-experts model against the clean loss.
Not applicable to product-key routers and PEER layers (their k is part of the retrieval layout).

Uncertainty: each mean comes with a 95% bootstrap interval over windows (:func:`bootstrap_mean_ci`, 1000
resamples, seeded).

Parity: per-token values are keyed by (window, position), gathered to rank 0 and reduced in that order;
clustering runs on the same gathered calibration tokens on every rank; under TP the activations and fc2
weights are gathered over the TP group first. Results do not depend on the layout.

Legend: T token rows (Megatron's s-major [S, B] order; S_loc under SP), B windows on this rank, S sequence, F
FFN neurons (F_loc this TP rank's), H hidden, E clusters, K kept clusters, C calibration tokens, W windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from megatron_moe_ext.analysis.instrument_api import Batch, RankEnv, router_rows

CALIBRATION_EVERY = 4  # window w calibrates when w % 4 == 0
BOOTSTRAP_RESAMPLES = 1000

# name -> (type, default, help): ``analyze`` flags ``--moefication-clusters`` etc.
OPTIONS: dict[str, tuple[type, Any, str]] = {
    "moefication_clusters": (int, 8, "E: clusters each dense FFN's neurons are split into (equal sizes)"),
    "moefication_topk": (int, 2, "k: clusters kept per token"),
    "moefication_calibration_tokens": (int, 4096, "at most this many calibration tokens feed the clustering"),
}


def check_options(options: dict[str, Any]) -> None:
    """ValueError naming the value and the fix unless the options are positive ints with k <= E."""
    values = {}
    for name, (_, default, _) in OPTIONS.items():
        value = options.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value!r}: expected an integer >= 1; fix: pass e.g. "
                             f"--{name.replace('_', '-')} {default}")
        values[name] = value
    if values["moefication_topk"] > values["moefication_clusters"]:
        raise ValueError(f"--moefication-topk {values['moefication_topk']} > --moefication-clusters "
                         f"{values['moefication_clusters']}: k clusters are kept out of E; fix: k <= E")


# -- pure statistics ---------------------------------------------------------------------------------------------
def coactivation_features(a_CF: np.ndarray) -> np.ndarray:
    """x_FC: each neuron's absolute activation over the calibration tokens, scaled to unit length (a neuron
    never active gets the zero vector): neurons that fire on the same tokens get close features."""
    x = np.abs(np.asarray(a_CF, dtype=np.float64)).T
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def balanced_kmeans(x_FD: np.ndarray, num_clusters: int, *, seed: int = 0, max_iter: int = 50) -> np.ndarray:
    """labels_F in [0, E): k-means under equal cluster sizes (sizes differ by at most one when E does not divide
    F). Start: scikit-learn's KMeans centres; then alternately assign points to centres with the size constraint
    (each centre repeated size times, the squared-distance assignment solved exactly by
    ``scipy.optimize.linear_sum_assignment``) and move each centre to its points' mean, until the assignment
    stops changing (Malinen & Fränti 2014). Deterministic for a seed."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    x = np.asarray(x_FD, dtype=np.float64)
    F = x.shape[0]
    if not 1 <= num_clusters <= F:
        raise ValueError(f"balanced_kmeans: {num_clusters} clusters for {F} points; fix: 1 <= clusters <= points")
    sizes_E = np.full(num_clusters, F // num_clusters)
    sizes_E[: F % num_clusters] += 1
    slot_E = np.repeat(np.arange(num_clusters), sizes_E)  # slot -> cluster
    centres = KMeans(n_clusters=num_clusters, n_init=4, random_state=seed).fit(x).cluster_centers_
    labels = None
    for _ in range(max_iter):
        d_FE = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
        rows, cols = linear_sum_assignment(d_FE[:, slot_E])
        new = np.empty(F, dtype=np.int64)
        new[rows] = slot_E[cols]
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack([x[labels == e].mean(0) for e in range(num_clusters)])
    return labels


def cluster_parts(a_TF: torch.Tensor, w2_HF: torch.Tensor, labels_F: np.ndarray, num_clusters: int) -> torch.Tensor:
    """y_ETH: each cluster's part of the FFN output, W2[:, cluster e] a_t[cluster e] (float64)."""
    a, w = a_TF.double(), w2_HF.double()
    lab = torch.as_tensor(labels_F, device=a.device)
    return torch.stack([a[:, lab == e] @ w[:, lab == e].T for e in range(num_clusters)])


def output_share(y_TH: torch.Tensor, kept_TH: torch.Tensor) -> torch.Tensor:
    """share_T = 1 - ||y - kept||^2 / ||y||^2 (NaN where y = 0): the part of the output the kept parts carry."""
    err = (y_TH.double() - kept_TH.double()).pow(2).sum(-1)
    tot = y_TH.double().pow(2).sum(-1)
    return torch.where(tot > 0, 1 - err / tot.clamp_min(1e-300), torch.full_like(tot, float("nan")))


def top_clusters(parts_ETH: torch.Tensor, k: int) -> torch.Tensor:
    """keep_TE (bool): the k clusters with the largest part norms per token (ties to the lower cluster id)."""
    norms_TE = parts_ETH.norm(dim=-1).T.cpu().numpy()
    ids_TE = np.broadcast_to(np.arange(norms_TE.shape[1]), norms_TE.shape)
    order_TE = np.lexsort((ids_TE, -norms_TE), axis=-1)
    keep = np.zeros(norms_TE.shape, dtype=bool)
    np.put_along_axis(keep, order_TE[:, :k], True, axis=1)
    return torch.from_numpy(keep)


def random_clusters(keys_T: np.ndarray, layer: int, seed: int, num_clusters: int, k: int) -> np.ndarray:
    """keep_TE (bool): k clusters per token drawn uniformly from a hash of (seed, layer, key, cluster) with key =
    window * S + position (SplitMix64, Steele et al. 2014), so the draw does not depend on the layout."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        z = (np.asarray(keys_T, dtype=np.uint64)[:, None] * np.uint64(1_000_003)
             + np.arange(num_clusters, dtype=np.uint64)[None, :]
             + np.uint64((seed * 1_000_033 + layer) & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15))
        z = (z + np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    order = np.argsort(z, axis=1, kind="stable")[:, :k]
    keep = np.zeros(z.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    return keep


def bootstrap_mean_ci(values_W: np.ndarray, *, seed: int = 0,
                      resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float]:
    """(mean, 2.5%, 97.5%) of per-window values: the percentile bootstrap over windows (Efron & Tibshirani 1993,
    ch. 13); NaN values are left out; all NaN for no values."""
    v = np.asarray(values_W, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (resamples, v.size))].mean(1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# -- the rank-side instrument ------------------------------------------------------------------------------------
def _dense_mlps(model: torch.nn.Module) -> dict[int, Any]:
    """layer number -> the ``MLP`` of every transformer layer whose FFN is dense (not an MoE or PEER layer)."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    out = {}
    for m in model.modules():
        if isinstance(m, TransformerLayer) and isinstance(m.mlp, MLP):
            out[int(m.layer_number)] = m.mlp
    return dict(sorted(out.items()))


def _gather_tp(x: torch.Tensor, env: RankEnv, dim: int) -> torch.Tensor:
    if env.tensor_parallel_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(env.tensor_parallel_size)]
    torch.distributed.all_gather(parts, x.contiguous(), group=env.tensor_parallel_group)
    return torch.cat(parts, dim=dim)


class MoEfication:
    """``moefication``: see the module docstring. ``MoEfication(name, env)`` is the INSTRUMENTS factory."""

    def __init__(self, name: str, env: RankEnv) -> None:
        check_options(env.options)
        self.name, self.env = name, env
        self.E = int(env.options.get("moefication_clusters", OPTIONS["moefication_clusters"][1]))
        self.k = int(env.options.get("moefication_topk", OPTIONS["moefication_topk"][1]))
        self.max_calibration = int(env.options.get("moefication_calibration_tokens",
                                                   OPTIONS["moefication_calibration_tokens"][1]))
        self._handles: list[Any] = []
        # layer (MoE layers: -layer) -> its tensor in the first forward on the current tokens: the clean pass
        # (capture runs it first on every batch; reruns, ours or other instruments', see the same tokens object)
        self._clean: dict[int, torch.Tensor] = {}
        self._tokens: Any = None
        self._rerun_out: dict[int, torch.Tensor] = {}
        self._masks: dict[int, torch.Tensor] | None = None
        self._capture_moe = False
        self._calib: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.labels: dict[int, np.ndarray] = {}
        self.records: list[tuple[str, int, np.ndarray, np.ndarray]] = []  # (what, layer, keys, values)
        self.not_applicable_moe: str | None = None
        self.needs_calibration = False

    # -- attach ------------------------------------------------------------------------------------------------
    def attach(self, model: Any, env: RankEnv) -> None:
        from megatron_moe_ext.analysis.interventions import router_sites

        self.dense = _dense_mlps(model)
        self.needs_calibration = bool(self.dense)
        self._handles.append(model.register_forward_pre_hook(self._new_tokens, with_kwargs=True))
        self.w2 = {}
        for layer, mlp in self.dense.items():
            w = mlp.linear_fc2.weight.detach()
            self.w2[layer] = _gather_tp(w, env, dim=1)  # [H, F]
            if self.w2[layer].shape[1] < self.E:
                raise ValueError(f"layer {layer}: {self.w2[layer].shape[1]} FFN neurons < --moefication-clusters "
                                 f"{self.E}; fix: fewer clusters")
            self._handles.append(mlp.linear_fc2.register_forward_pre_hook(self._fc2_hook(layer)))
        sites, peers = router_sites(model)
        self.sites = [s for s in sites if s.kind == "topk"]
        other = sorted({s.kind for s in sites if s.kind != "topk"})
        if other:
            self.not_applicable_moe = (f"the model has {', '.join(other)} routers: their k is part of the "
                                       f"retrieval layout (or they share moe_router_topk with the top-k routers), "
                                       f"so 'every expert selected' is not a setting of theirs")
            self.sites = []
        elif peers and not sites:
            self.not_applicable_moe = "PEER layers only: product-key retrieval has no all-experts setting"
        elif not sites:
            self.not_applicable_moe = "no MoE layers"
        for s in self.sites:
            moe = self._moe_layer_of(model, s.module)
            self._handles.append(moe.register_forward_hook(self._moe_hook(s.layer)))
        self.peer_layers = peers

    @staticmethod
    def _moe_layer_of(model: Any, router: Any) -> Any:
        for m in model.modules():
            if getattr(m, "router", None) is router:
                return m
        raise ValueError("router without its MoE layer")

    def _new_tokens(self, module: Any, args: tuple, kwargs: dict) -> None:
        tokens = args[0] if args else kwargs.get("input_ids")
        if tokens is not self._tokens:  # a new batch: its first forward is the clean one
            self._tokens = tokens
            self._clean.clear()

    def _fc2_hook(self, layer: int) -> Callable[..., Any]:
        def hook(module: Any, args: tuple) -> tuple | None:
            x = args[0]
            if self._masks is not None:
                return (x * self._masks[layer].to(x.dtype), *args[1:])
            if layer not in self._clean:
                self._clean[layer] = x.detach()
            return None

        return hook

    def _moe_hook(self, layer: int) -> Callable[..., Any]:
        key = -layer  # MoE outputs share the dict with dense inputs: negative keys

        def hook(module: Any, args: tuple, output: Any) -> None:
            y = output[0] if isinstance(output, tuple) else output
            if self._capture_moe:
                self._rerun_out[layer] = y.detach()
            elif key not in self._clean:
                self._clean[key] = y.detach()

        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- calibration -------------------------------------------------------------------------------------------
    def _rows(self, batch: Batch, S: int) -> tuple[np.ndarray, np.ndarray]:
        """(window_T, position_T) of the [S, B] rows of a dense FFN (full sequence on every TP rank)."""
        B = len(batch.window_ids_B)
        return (np.tile(np.asarray(batch.window_ids_B, np.int64), S), np.repeat(np.arange(S, dtype=np.int64), B))

    def calibrate(self, batch: Batch, clean_loss_BS: Any) -> None:
        for layer in self.dense:
            a = _gather_tp(self._clean[layer], self.env, dim=-1)  # [S, B, F]
            S, B, F = a.shape
            window_T, pos_T = self._rows(batch, S)
            real_T = np.tile(np.asarray(batch.real_B, bool), S)
            sel = real_T & (window_T % CALIBRATION_EVERY == 0)
            if self.env.tensor_parallel_rank == 0 and sel.any():
                keys = window_T[sel] * S + pos_T[sel]
                self._calib.setdefault(layer, []).append((keys, a.reshape(S * B, F)[torch.from_numpy(sel)]
                                                          .double().cpu().numpy()))

    def _fit_clusters(self) -> None:
        gathered = [None] * self.env.world_size
        mine = {l: (np.concatenate([k for k, _ in v]), np.concatenate([a for _, a in v]))
                for l, v in self._calib.items()}
        torch.distributed.all_gather_object(gathered, mine)
        for layer in self.dense:
            parts = [g[layer] for g in gathered if layer in g]
            if not parts:
                raise ValueError(f"no calibration tokens for layer {layer}: the analysis has no window whose index "
                                 f"is a multiple of {CALIBRATION_EVERY}; fix: analyse more tokens (--max-tokens)")
            keys = np.concatenate([p[0] for p in parts])
            acts = np.concatenate([p[1] for p in parts])
            keys, first = np.unique(keys, return_index=True)  # sorted, TP copies dropped
            acts = acts[first][: self.max_calibration]
            self.calibration_tokens = int(acts.shape[0])
            self.labels[layer] = balanced_kmeans(coactivation_features(acts), self.E, seed=self.env.seed)
        self._calib.clear()

    # -- measurement -------------------------------------------------------------------------------------------
    def _record(self, what: str, layer: int, keys: np.ndarray, values: np.ndarray) -> None:
        self.records.append((what, layer, keys, values))

    def on_batch(self, batch: Batch, clean_loss_BS: Any, rerun: Callable[[], Any]) -> None:
        if batch.tokens_BS is not self._tokens:
            raise RuntimeError("moefication: on_batch without the clean forward of its batch")
        if self.dense and not self.labels:
            self._fit_clusters()
        S = self.env.seq_length
        measure_B = np.asarray(batch.real_B, bool) & (np.asarray(batch.window_ids_B) % CALIBRATION_EVERY != 0)
        record = self.env.tensor_parallel_rank == 0
        loss_keys = (np.asarray(batch.window_ids_B, np.int64)[:, None] * S + np.arange(S)[None, :])  # [B, S]
        loss_sel = measure_B[:, None] & np.asarray(batch.loss_mask_BS, bool)
        if record:
            self._record("loss_clean", 0, loss_keys[loss_sel], clean_loss_BS.double().cpu().numpy()[loss_sel])
        if self.dense:
            oracle, rand = {}, {}
            tp_r = self.env.tensor_parallel_rank
            for layer in self.dense:
                a_loc = self._clean[layer]
                a = _gather_tp(a_loc, self.env, dim=-1)
                Sx, B, F = a.shape
                F_loc = a_loc.shape[-1]
                window_T, pos_T = self._rows(batch, Sx)
                keys_T = window_T * S + pos_T
                parts = cluster_parts(a.reshape(Sx * B, F), self.w2[layer], self.labels[layer], self.E)
                y = parts.sum(0)
                keep_o = top_clusters(parts, self.k)
                keep_r = torch.from_numpy(random_clusters(keys_T, layer, self.env.seed, self.E, self.k))
                share_o = output_share(y, (parts * keep_o.T.unsqueeze(-1)).sum(0))
                share_r = output_share(y, (parts * keep_r.T.unsqueeze(-1)).sum(0))
                sel = np.tile(measure_B, Sx)
                if record:
                    self._record("share_topk", layer, keys_T[sel], share_o.cpu().numpy()[sel])
                    self._record("share_random", layer, keys_T[sel], share_r.cpu().numpy()[sel])
                lab = torch.as_tensor(self.labels[layer][tp_r * F_loc:(tp_r + 1) * F_loc])
                oracle[layer] = keep_o[:, lab].reshape(Sx, B, F_loc)
                rand[layer] = keep_r[:, lab].reshape(Sx, B, F_loc)
            for what, masks in (("loss_topk_clusters", oracle), ("loss_random_clusters", rand)):
                self._masks = masks
                try:
                    loss = rerun()
                finally:
                    self._masks = None
                if record:
                    self._record(what, 0, loss_keys[loss_sel], loss.double().cpu().numpy()[loss_sel])
        if self.sites:
            saved = [(s.module.topk, [c.moe_router_topk for c in s.configs]) for s in self.sites]
            self._capture_moe = True
            try:
                for s in self.sites:
                    n = s.module.config.num_moe_experts
                    s.module.topk = n
                    for c in s.configs:
                        c.moe_router_topk = n
                loss = rerun()
            finally:
                self._capture_moe = False
                for s, (topk, ks) in zip(self.sites, saved):
                    s.module.topk = topk
                    for c, kk in zip(s.configs, ks):
                        c.moe_router_topk = kk
            if record:
                self._record("loss_all_experts", 0, loss_keys[loss_sel], loss.double().cpu().numpy()[loss_sel])
            for s in self.sites:
                y_k, y_all = self._clean[-s.layer], self._rerun_out[s.layer]
                rows = y_k.shape[0] * y_k.shape[1]
                window_T, pos_T = router_rows(batch, self.env, rows)
                share = output_share(y_all.reshape(rows, -1), y_k.reshape(rows, -1)).cpu().numpy()
                real = np.isin(window_T, np.asarray(batch.window_ids_B)[measure_B])
                self._record("share_routed", s.layer, (window_T * S + pos_T)[real], share[real])
        self._rerun_out.clear()

    # -- result ------------------------------------------------------------------------------------------------
    def result(self) -> dict[str, Any] | None:
        if self.dense and not self.labels:  # no batch at all
            self._fit_clusters()
        gathered = [None] * self.env.world_size
        torch.distributed.all_gather_object(gathered, self.records)
        if self.env.rank != 0:
            return None
        by: dict[tuple[str, int], dict[int, float]] = {}
        for recs in gathered:
            for what, layer, keys, values in recs:
                d = by.setdefault((what, layer), {})
                d.update(zip(keys.tolist(), values.tolist()))  # duplicates (TP/SP copies) are equal
        S = self.env.seq_length

        def per_window(what: str, layer: int) -> tuple[np.ndarray, int]:
            d = by.get((what, layer), {})
            keys = np.array(sorted(d), dtype=np.int64)
            vals = np.array([d[k] for k in keys.tolist()], dtype=np.float64)
            if keys.size == 0:
                return np.zeros(0), 0
            win = keys // S
            uniq, inv = np.unique(win, return_inverse=True)
            sums = np.zeros(uniq.size)
            cnt = np.zeros(uniq.size)
            ok = np.isfinite(vals)
            np.add.at(sums, inv[ok], vals[ok])
            np.add.at(cnt, inv[ok], 1)
            with np.errstate(invalid="ignore"):
                return sums / cnt, int(ok.sum())

        def stat(what: str, layer: int = 0) -> dict[str, Any]:
            w, n = per_window(what, layer)
            mean, lo, hi = bootstrap_mean_ci(w, seed=self.env.seed)
            return {"mean": mean, "ci95": [lo, hi], "tokens": n, "windows": int(w.size)}

        def delta(a: str, b: str) -> dict[str, Any]:
            wa, _ = per_window(a, 0)
            wb, n = per_window(b, 0)
            mean, lo, hi = bootstrap_mean_ci(wa - wb if wa.size == wb.size else np.zeros(0), seed=self.env.seed)
            return {"mean": mean, "ci95": [lo, hi], "tokens": n, "windows": int(wb.size)}

        out: dict[str, Any] = {
            "calibration": (f"windows whose index is a multiple of {CALIBRATION_EVERY} (their first "
                            f"{self.max_calibration} tokens at most); measurements on the other windows"),
            "selection": ("per token, the k clusters with the largest output-part norm (oracle); control: k "
                          "clusters drawn uniformly per token"),
            "clusters": self.E, "topk": self.k, "clean_loss": stat("loss_clean")}
        if self.dense:
            out["dense"] = {
                "calibration_tokens": self.calibration_tokens,
                "layers": {str(l): {"share_topk": stat("share_topk", l), "share_random": stat("share_random", l),
                                    "cluster_sizes": np.bincount(self.labels[l], minlength=self.E).tolist()}
                           for l in self.dense},
                "loss_topk_clusters": stat("loss_topk_clusters"),
                "loss_random_clusters": stat("loss_random_clusters"),
                "loss_increase_topk": delta("loss_topk_clusters", "loss_clean"),
                "loss_increase_random": delta("loss_random_clusters", "loss_clean")}
        else:
            out["dense"] = {"not_applicable": "no dense FFN layers (every FFN is an MoE or PEER layer)"}
        if self.sites:
            out["moe"] = {"layers": {str(s.layer): {"share_routed": stat("share_routed", s.layer),
                                                    "top_k": s.module.topk,
                                                    "num_experts": s.module.config.num_moe_experts}
                                     for s in self.sites},
                          "loss_all_experts": stat("loss_all_experts"),
                          "loss_change_routed_vs_all": delta("loss_clean", "loss_all_experts")}
        else:
            out["moe"] = {"not_applicable": self.not_applicable_moe or "no top-k MoE layers"}
        if self.peer_layers:
            out["peer_layers"] = {"not_applicable": "PEER layers: product-key retrieval has no all-experts setting",
                                  "layers": self.peer_layers}
        return out


def _fmt_stat(s: dict[str, Any]) -> str:
    from megatron_moe_ext.analysis.summary import fmt

    lo, hi = s["ci95"]
    return f"{fmt(s['mean'])} [{fmt(lo)}, {fmt(hi)}]"


def report_section(result: dict[str, Any], figures_dir: str) -> str:
    """The Markdown of the ``moefication`` section (no figures)."""
    md = [("MoEfication (Zhang et al. 2022, arXiv 2110.01786): dense FFN neurons split into "
           f"{result['clusters']} equal clusters by co-activation; per token the {result['topk']} clusters with "
           "the largest output parts kept. Share = 1 - ||y - kept||² / ||y||² (1 = the kept part is the whole "
           "output). Means over windows with 95% bootstrap intervals."),
          "", f"Calibration: {result['calibration']}. Selection: {result['selection']}.", ""]
    md += [f"Clean loss (measured windows): {_fmt_stat(result['clean_loss'])}", ""]
    dense = result["dense"]
    if "not_applicable" in dense:
        md += [f"Dense FFNs: not applicable ({dense['not_applicable']}).", ""]
    else:
        md += ["| dense layer | share, top-k clusters | share, random k clusters | cluster sizes |",
               "|---|---|---|---|"]
        for l, d in dense["layers"].items():
            md.append(f"| {l} | {_fmt_stat(d['share_topk'])} | {_fmt_stat(d['share_random'])} | "
                      f"{', '.join(map(str, d['cluster_sizes']))} |")
        md += ["", f"Loss with only the top-k clusters in every dense FFN: {_fmt_stat(dense['loss_topk_clusters'])} "
                   f"(increase {_fmt_stat(dense['loss_increase_topk'])}); random k clusters: "
                   f"{_fmt_stat(dense['loss_random_clusters'])} (increase {_fmt_stat(dense['loss_increase_random'])}).",
               ""]
    moe = result["moe"]
    if "not_applicable" in moe:
        md += [f"MoE routers: not applicable ({moe['not_applicable']}).", ""]
    else:
        md += ["| MoE layer | experts | top-k | share of the all-experts output the routed top-k carry |",
               "|---|---|---|---|"]
        for l, d in moe["layers"].items():
            md.append(f"| {l} | {d['num_experts']} | {d['top_k']} | {_fmt_stat(d['share_routed'])} |")
        md += ["", f"Loss with every expert selected: {_fmt_stat(moe['loss_all_experts'])}; routed minus all-experts: "
                   f"{_fmt_stat(moe['loss_change_routed_vs_all'])}.", ""]
    if "peer_layers" in result:
        md += [f"PEER layers {result['peer_layers']['layers']}: {result['peer_layers']['not_applicable']}.", ""]
    return "\n".join(md)


__all__ = ["MoEfication", "OPTIONS", "balanced_kmeans", "bootstrap_mean_ci", "check_options", "cluster_parts",
           "coactivation_features", "output_share", "random_clusters", "report_section", "top_clusters"]
