"""Interventions of ``analyze --interventions``: the model rerun with its routing changed, each variant's
per-token next-token loss against the clean loss on the same tokens (capture's clean pass).

Every change goes through a forward hook on Megatron's router modules (``TopKRouter`` and its subclasses:
ours with product keys or balancing) that returns a changed ``(probs_TN, routing_map_TN)``; routing is never
recomputed here. What each intervention does:

* ``expert_ablation``: the ablated experts' gates are set to 0 for every token. The routing map is kept: the
  expert still receives its tokens (Megatron's dropless dispatch sizes its buffers for k selections per token),
  but its output and its fc2 bias are both scaled by the gate, so it contributes exactly nothing. With
  ``renormalize`` a token's remaining gates are rescaled to its clean gate sum; without, the ablated share is
  dropped. "Top-M busiest": the M experts of each router layer with the most selections in a clean calibration
  pass over all analysed tokens (counts summed over every rank: layout-independent), ties to the lower id.
  Not applicable with ``moe_apply_probs_on_input`` (the gate scales the input, so a 0 gate still leaves the
  expert's fc1 bias through).
* ``topk_change``: each top-k router evaluated at k' (its ``topk`` and the layer's ``moe_router_topk``, which
  sizes the dispatch, set for the rerun only): the selection at k' is the router's own. Not applicable to
  product-key routers (their k per head is part of the retrieval layout) or to a model that has one (the layers
  share ``moe_router_topk``).
* ``random_routing``: the routing rows (probs and map together) of each window permuted over its positions by
  a permutation seeded by (seed, window, layer): every expert keeps its load in every window and every token its
  k selections and gate values, only the token-expert pairing is random. Under sequence parallelism the rows of
  a window are gathered over the TP group first, so the permutation does not depend on the layout.
* ``frozen_paths``: a token's path is its tuple of top-1 experts over the router layers. A calibration pass
  counts the paths of all analysed tokens (summed over ranks); the P most frequent (ties by path) are allowed.
  In the rerun each token descends the trie of allowed paths layer by layer: among the next experts of allowed
  paths that share its prefix so far, it takes the one its router gives the highest gate; when none of them is
  among its router's selections, the next expert of the most frequent allowed path. The chosen expert replaces
  the token's top-1 (gates swapped when it was already selected, otherwise it takes the top-1's gate and place):
  k and the gate values stay. With P = all observed paths every token keeps its own path: the clean loss.
* ``layer_copy``: layer DST returns the routing layer SRC returned for the same token in the clean pass (the
  same expert count and k): does a layer's own routing matter, or only that tokens are routed?

Routers with variable experts per token (expert choice, ReLU; null experts under any router): expert ablation,
random routing and layer copy apply as written (a gate, a row, a layer's rows; with random routing "its k" is the
token's own number of selections). ``topk_change`` does not (expert choice's k is a capacity, ReLU has none) and
neither does ``frozen_paths`` (a token may have no expert, so no top-1 path).

PEER layers expose their selections to one observer (the routing recorder) and return only their output: no
intervention changes them; they are listed as not applicable in each result.

Parity: the changes are per token (or per window, seeded by window and layer), losses are gathered to rank 0 and
summed in window order, so results do not depend on TP/EP.

Legend: T router rows on this rank (Megatron's s-major [S_loc, B]), N experts, K top-k, B windows on this rank,
S sequence length, L router layers, P allowed paths, W analysed windows, V variants.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from megatron_moe_ext.analysis.instrument_api import Batch, RankEnv
from megatron_moe_ext.analysis.interventions_options import ALL_PATHS, InterventionOptions

PEER_REASON = ("a PEER layer exposes its selections only to the routing recorder and returns only its output, so "
               "they cannot be changed through a hook")


@dataclasses.dataclass
class RouterSite:
    """One router of the model: its layer number, module, kind ('topk', 'product_key' or another router type)
    and the configs its MoE layer reads ``moe_router_topk`` from."""

    layer: int
    module: torch.nn.Module
    kind: str
    configs: list[Any]


def router_sites(model: torch.nn.Module) -> tuple[list[RouterSite], list[int]]:
    """(router sites by layer, PEER layer numbers) of ``model``."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_ext.layers.peer import PEERLayer
    from megatron_moe_ext.settings.access import ext_settings

    sites, peers = [], []
    for module in model.modules():
        if isinstance(module, MoELayer) and isinstance(module.router, TopKRouter):
            router = module.router
            kind = ext_settings(router.config).router.router_type  # settings.router.ROUTER_TYPES
            if kind == "topk" and router.routing_type == "sinkhorn":
                kind = "sinkhorn"
            configs = {id(c): c for c in (router.config, module.config,
                                          getattr(module.token_dispatcher, "config", router.config))}
            sites.append(RouterSite(int(router.layer_number), router, kind, list(configs.values())))
        elif isinstance(module, PEERLayer):
            peers.append(int(module.layer_number))
    return sorted(sites, key=lambda s: s.layer), sorted(peers)


def real_experts(router: torch.nn.Module) -> int:
    """The experts a router's (probs, map) columns address: N, also with null experts (whose router config
    counts N + M outputs; layers/null_experts.py)."""
    return int(getattr(router, "num_real_experts", router.config.num_moe_experts))


def all_reduce_ints(values: list[int], op: Any = None) -> list[int]:
    """Integers reduced (default: summed) over every rank; on the device the backend needs (NCCL: the GPU)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM if op is None else op)
    return [int(x) for x in t.tolist()]


def _top1(probs_TN: torch.Tensor, map_TN: torch.Tensor) -> torch.Tensor:
    """The selected expert with the largest gate (ties to the lower id)."""
    return torch.where(map_TN.bool(), probs_TN.float(), torch.full_like(probs_TN, -1.0, dtype=torch.float32)).argmax(-1)


class _LossRecords:
    """Per-window clean and intervened losses of this rank's real windows (TP rank 0 only: the other TP ranks
    hold the same losses), gathered to rank 0 and reduced in window order."""

    def __init__(self, env: RankEnv, num_variants: int) -> None:
        self.keep = env.tensor_parallel_rank == 0
        self.windows: list[int] = []
        self.tokens: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.mask: list[np.ndarray] = []
        self.clean: list[np.ndarray] = []
        self.variants: list[list[np.ndarray]] = [[] for _ in range(num_variants)]

    def add_batch(self, batch: Batch, clean_BS: torch.Tensor) -> None:
        if not self.keep:
            return
        clean = clean_BS.detach().double().cpu().numpy()
        tokens = batch.tokens_BS.detach().cpu().numpy()
        for b in np.flatnonzero(batch.real_B):
            self.windows.append(int(batch.window_ids_B[b]))
            self.tokens.append(tokens[b])
            self.labels.append(np.asarray(batch.labels_BS[b]))
            self.mask.append(np.asarray(batch.loss_mask_BS[b]))
            self.clean.append(clean[b])

    def add_variant(self, v: int, batch: Batch, loss_BS: torch.Tensor) -> None:
        if not self.keep:
            return
        loss = loss_BS.detach().double().cpu().numpy()
        self.variants[v].extend(loss[b] for b in np.flatnonzero(batch.real_B))

    def gather(self) -> dict[str, np.ndarray] | None:
        """On rank 0: arrays [W, S] (and [V, W, S]) over all windows in window order; None elsewhere."""
        mine = (self.windows, self.tokens, self.labels, self.mask, self.clean, self.variants)
        world = torch.distributed.get_world_size()
        everything: list[Any] = [None] * world
        torch.distributed.all_gather_object(everything, mine)
        if torch.distributed.get_rank() != 0:
            return None
        windows = [w for part in everything for w in part[0]]
        order = np.argsort(np.array(windows, dtype=np.int64), kind="stable")

        def cat(i: int) -> np.ndarray:
            return np.stack([x for part in everything for x in part[i]])[order]

        return {"windows": np.array(windows, dtype=np.int64)[order], "tokens": cat(1), "labels": cat(2),
                "mask": cat(3), "clean": cat(4),
                "variants": np.stack([np.stack([x for part in everything for x in part[5][v]])[order]
                                      for v in range(len(self.variants))]) if self.variants else None}


def loss_effects(clean_WS: np.ndarray, loss_WS: np.ndarray, mask_WS: np.ndarray, labels_WS: np.ndarray,
                 label_names: tuple[str, ...]) -> dict[str, Any]:
    """Mean next-token loss of a variant against the clean loss on the same tokens, overall and per label:
    ``delta`` = mean(loss - clean) over the tokens that have a next token; ``delta_se`` its standard error with
    windows as the units (tokens of one window are not independent): std of the per-window mean deltas over
    sqrt(windows) (0 for one window)."""
    diff_WS = np.where(mask_WS, loss_WS - clean_WS, 0.0)
    counts_W = mask_WS.sum(axis=1)
    n = int(counts_W.sum())
    per_window = diff_WS.sum(axis=1)[counts_W > 0] / counts_W[counts_W > 0]
    se = float(per_window.std(ddof=1) / np.sqrt(per_window.size)) if per_window.size > 1 else 0.0
    out: dict[str, Any] = {"tokens": n, "loss": float(np.where(mask_WS, loss_WS, 0.0).sum() / max(n, 1)),
                           "clean": float(np.where(mask_WS, clean_WS, 0.0).sum() / max(n, 1)),
                           "delta": float(diff_WS.sum() / max(n, 1)), "delta_se": se, "per_label": {}}
    for value in np.unique(labels_WS[mask_WS]):
        sel = mask_WS & (labels_WS == value)
        m = int(sel.sum())
        name = label_names[value] if 0 <= value < len(label_names) else str(int(value))
        out["per_label"][name] = {"tokens": m, "loss": float(loss_WS[sel].sum() / m),
                                  "clean": float(clean_WS[sel].sum() / m),
                                  "delta": float((loss_WS[sel] - clean_WS[sel]).sum() / m)}
    return out


def hurt_tokens(records: dict[str, np.ndarray], loss_WS: np.ndarray, label_names: tuple[str, ...],
                count: int) -> list[dict[str, Any]]:
    """The ``count`` tokens whose loss rose most (ties: earlier window, then position)."""
    if count == 0:
        return []
    mask = records["mask"]
    diff = np.where(mask, loss_WS - records["clean"], -np.inf)
    flat = np.argsort(-diff.reshape(-1), kind="stable")[:count]
    out = []
    S = diff.shape[1]
    for f in flat:
        w, s = divmod(int(f), S)
        if not np.isfinite(diff[w, s]):
            break
        label = int(records["labels"][w, s])
        out.append({"window": int(records["windows"][w]), "position": s, "token": int(records["tokens"][w, s]),
                    "next_token": int(records["tokens"][w, s + 1]),
                    "label": label_names[label] if 0 <= label < len(label_names) else str(label),
                    "clean": float(records["clean"][w, s]), "loss": float(loss_WS[w, s]),
                    "delta": float(diff[w, s])})
    return out


class _Intervention:
    """Shared machinery: router hooks armed with one variant at a time, loss records, the result layout."""

    description = ""
    # Router types (settings.router.ROUTER_TYPES) whose (probs, map) the intervention's change is defined on.
    applies_to: tuple[str, ...] = ("topk", "product_key", "expert_choice", "relu")

    def __init__(self, name: str, env: RankEnv) -> None:
        self.name = name
        self.env = env
        self.options = InterventionOptions.from_dict(env.options)
        self.sites: list[RouterSite] = []
        self.peers: list[int] = []
        self.skipped: dict[str, str] = {}
        self.variants: list[dict[str, Any]] = []
        self.armed: dict[str, Any] | None = None
        self.batch: Batch | None = None
        self.handles: list[Any] = []
        self.records: _LossRecords | None = None
        self.not_applicable: str | None = None
        # Nothing to calibrate unless make_variants says so (expert ablation of the busiest, frozen paths); an
        # intervention that does not apply is never calibrated.
        self.calibrated = True

    # -- lifecycle -----------------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module, env: RankEnv) -> None:
        sites, self.peers = router_sites(model)
        for site in sites:
            if site.kind not in self.applies_to:
                self.skipped[str(site.layer)] = self.kind_reason(site)
        self.sites = [s for s in sites if s.kind in self.applies_to]
        for peer in self.peers:
            self.skipped[str(peer)] = PEER_REASON
        self.not_applicable = self.check(model)
        if self.not_applicable is None:
            self.variants = self.make_variants()
            if not self.variants:
                self.not_applicable = "no variant applies to this model's router layers"
        for site in self.sites if self.not_applicable is None else ():
            self.handles.append(site.module.register_forward_hook(self._hook(site)))
        self.records = _LossRecords(env, len(self.variants))
        self.needs_calibration = self.not_applicable is None and not self.calibrated

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @property
    def distinct_rows(self) -> bool:
        """Whether this rank's router rows are its own (not a copy held by another TP rank)."""
        return self.env.sequence_parallel or self.env.tensor_parallel_size == 1 or self.env.tensor_parallel_rank == 0

    def real_rows(self, rows: int) -> torch.Tensor:
        """[T] bool: router rows of real windows (not the padding copies of a short last batch)."""
        real_B = np.asarray(self.batch.real_B, dtype=bool)
        return torch.from_numpy(np.tile(real_B, rows // real_B.size))

    def kind_reason(self, site: RouterSite) -> str:
        return f"router type {site.kind!r}: {self.name} is defined for top-k routers"

    def check(self, model: torch.nn.Module) -> str | None:
        """The reason the intervention does not apply to this model at all, or None."""
        if not self.sites:
            return "no router layer it applies to (" + "; ".join(f"layer {k}: {v}" for k, v in
                                                                 sorted(self.skipped.items())) + ")"
        return None

    def make_variants(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _hook(self, site: RouterSite) -> Callable:
        def hook(module: torch.nn.Module, inputs: tuple, output: tuple) -> Any:
            return self.on_router(site, output[0], output[1])
        return hook

    def on_router(self, site: RouterSite, probs_TN: torch.Tensor, map_TN: torch.Tensor) -> Any:
        """A changed (probs, map) when a variant is armed for this layer, else None (output unchanged)."""
        return None

    def arm(self, variant: dict[str, Any]) -> None:
        self.armed = variant

    def disarm(self) -> None:
        self.armed = None

    def on_batch(self, batch: Batch, clean_loss_BS: torch.Tensor, rerun: Callable[[], torch.Tensor]) -> None:
        self.batch = batch
        self.prepare()
        if self.not_applicable is not None:
            return
        self.records.add_batch(batch, clean_loss_BS)
        for v, variant in enumerate(self.variants):
            self.arm(variant)
            try:
                loss_BS = rerun()
            finally:
                self.disarm()
            self.records.add_variant(v, batch, loss_BS)

    def prepare(self) -> None:
        """Called at each batch before the reruns (collectives allowed: every rank calls it)."""

    def variant_extra(self, variant: dict[str, Any]) -> dict[str, Any]:
        return {}

    def result(self) -> dict[str, Any] | None:
        if self.not_applicable is not None:
            return {"not_applicable": self.not_applicable} if torch.distributed.get_rank() == 0 else None
        records = self.records.gather()
        extras = [self.variant_extra(v) for v in self.variants]  # collective where the extras reduce
        if records is None:
            return None
        from megatron_moe_ext.analysis.token_text import token_decoder

        names = self.env.label_names
        decode = token_decoder(self.env.model_args)
        out: dict[str, Any] = {"description": self.description, "labels": list(names),
                               "clean": loss_effects(records["clean"], records["clean"], records["mask"],
                                                     records["labels"], names),
                               "layers": [s.layer for s in self.sites],
                               "not_applicable_layers": dict(sorted(self.skipped.items())), "variants": []}
        for v, variant in enumerate(self.variants):
            loss_WS = records["variants"][v]
            entry = {"name": variant["name"], **{k: val for k, val in variant.items() if k not in ("name", "_")},
                     **loss_effects(records["clean"], loss_WS, records["mask"], records["labels"], names),
                     "hurt_tokens": hurt_tokens(records, loss_WS, names, self.options.hurt_tokens), **extras[v]}
            for t in entry["hurt_tokens"]:  # their text, where the tokenizer gives one (None otherwise)
                t["text"] = decode(t["token"]) if decode is not None else None
                t["next_text"] = decode(t["next_token"]) if decode is not None else None
            out["variants"].append(entry)
        return out


# ---------------------------------------------------------------------------------------------- ablation
def ablated_gates(probs_TN: torch.Tensor, experts: list[int], *, renormalize: bool) -> torch.Tensor:
    """Gates with ``experts`` set to 0 for every token; with ``renormalize`` each token's remaining gates are
    scaled to its original gate sum (a token left with no gate keeps zeros)."""
    keep_N = torch.ones(probs_TN.shape[1], dtype=probs_TN.dtype, device=probs_TN.device)
    keep_N[torch.as_tensor(experts, device=probs_TN.device)] = 0
    new_TN = probs_TN * keep_N
    if renormalize:
        before_T1 = probs_TN.sum(dim=-1, keepdim=True)
        after_T1 = new_TN.sum(dim=-1, keepdim=True)
        new_TN = torch.where(after_T1 > 0, new_TN * (before_T1 / after_T1.clamp_min(1e-30)), new_TN)
    return new_TN


class ExpertAblation(_Intervention):
    description = ("gates of the ablated experts set to 0 for every token (routing map kept, so the expert "
                   "contributes exactly nothing)")

    def check(self, model: torch.nn.Module) -> str | None:
        if self.sites and self.sites[0].module.config.moe_apply_probs_on_input:
            return ("moe_apply_probs_on_input: the gate scales the expert's input, so a 0 gate still passes its "
                    "fc1 bias through; ablation by gate is not exact")
        return super().check(model)

    def make_variants(self) -> list[dict[str, Any]]:
        o = self.options
        layers = {s.layer: s for s in self.sites}
        out: list[dict[str, Any]] = []
        for layer, expert in o.ablate_experts:
            if layer in layers:
                out.append({"name": f"layer {layer} expert {expert}", "layer": layer, "experts": [expert],
                            "_": {layer: [expert]}})
        for m in o.ablate_top_m:  # the experts are chosen after the calibration pass (prepare)
            out.append({"name": f"top-{m} busiest experts of every router layer", "top_m": m, "_": {}})
        for layer in o.ablate_layers:
            if layer in layers:
                n = real_experts(layers[layer].module)
                out.append({"name": f"layer {layer}: all routed experts", "layer": layer, "_": {layer: list(range(n))}})
        self.needs_load = bool(o.ablate_top_m)
        self.pending: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}
        self.loads: dict[int, list[int]] = {}
        self.calibrated = not self.needs_load
        self.renormalize = o.renormalize
        self.description += "; remaining gates " + (
            "rescaled to the token's clean gate sum" if o.renormalize else "left as they were (ablated share dropped)")
        return out

    def calibrate(self, batch: Batch, clean_loss_BS: torch.Tensor) -> None:
        """Adds this calibration forward's selections (counted by the hook) to each layer's load."""
        self.batch = batch
        if self.distinct_rows:
            for layer, (rows, pairs_P2, n) in self.pending.items():
                keep_P = self.real_rows(rows)[pairs_P2[:, 0]]
                c = torch.bincount(pairs_P2[keep_P, 1], minlength=n)
                self.counts[layer] = self.counts.get(layer, 0) + c
        self.pending = {}

    def on_router(self, site: RouterSite, probs_TN: torch.Tensor, map_TN: torch.Tensor) -> Any:
        if self.armed is None:
            if not self.calibrated:  # a calibration forward (or the first clean one, dropped by prepare)
                # (rows, (row, expert) of every selection, N): O(T k), not the dense [T, N] map
                self.pending[site.layer] = (map_TN.shape[0], map_TN.nonzero().to("cpu"), map_TN.shape[1])
            return None
        experts = self.armed["_"].get(site.layer)
        if not experts:
            return None
        return ablated_gates(probs_TN, experts, renormalize=self.renormalize), map_TN

    def prepare(self) -> None:
        self.pending = {}
        if self.calibrated or self.not_applicable is not None:
            return
        # The global load of the calibration pass: integer counts summed over every rank (each token is routed
        # on exactly one rank: its data-parallel share, its SP slice).
        for site in self.sites:
            c = self.counts.get(site.layer)
            c = torch.zeros(real_experts(site.module), dtype=torch.int64) if c is None else c
            self.loads[site.layer] = all_reduce_ints(c.tolist())
        for v in self.variants:
            if "top_m" in v:
                v["_"] = {layer: sorted(range(len(load)), key=lambda e, load=load: (-load[e], e))[:v["top_m"]]
                          for layer, load in self.loads.items()}
                v["experts_by_layer"] = {str(layer): experts for layer, experts in v["_"].items()}
        self.calibrated = True

    def variant_extra(self, variant: dict[str, Any]) -> dict[str, Any]:
        if "top_m" in variant:
            return {"calibration_load": {str(k): v for k, v in self.loads.items()}}
        return {}


# ---------------------------------------------------------------------------------------------- top-k change
class TopkChange(_Intervention):
    description = ("every top-k router evaluated at k' (its topk and the layer's moe_router_topk set for the "
                   "rerun): the router's own top-k' selection and gates")
    applies_to = ("topk",)

    def kind_reason(self, site: RouterSite) -> str:
        if site.kind == "product_key":
            return "product-key router: its k per head is part of the retrieval layout (sub-key top-k)"
        return super().kind_reason(site)

    def check(self, model: torch.nn.Module) -> str | None:
        if any(v != PEER_REASON for v in self.skipped.values()) and self.sites:
            return ("the model mixes top-k routers with other routers that read the same moe_router_topk; changing "
                    "k for the top-k ones would resize the others' dispatch (" +
                    "; ".join(f"layer {k}: {v}" for k, v in sorted(self.skipped.items())) + ")")
        return super().check(model)

    def make_variants(self) -> list[dict[str, Any]]:
        n = self.sites[0].module.config.num_moe_experts
        k = self.sites[0].module.topk
        return [{"name": f"top-{kk} (trained top-{k})", "k": kk, "_": kk}
                for kk in self.options.topk_values if 1 <= kk <= n and kk != k]

    def arm(self, variant: dict[str, Any]) -> None:
        super().arm(variant)
        self.saved = [(s.module.topk, [c.moe_router_topk for c in s.configs]) for s in self.sites]
        for s in self.sites:
            s.module.topk = variant["k"]
            for c in s.configs:
                c.moe_router_topk = variant["k"]

    def disarm(self) -> None:
        for s, (topk, ks) in zip(self.sites, self.saved):
            s.module.topk = topk
            for c, k in zip(s.configs, ks):
                c.moe_router_topk = k
        super().disarm()


# ---------------------------------------------------------------------------------------------- random routing
def window_permutation(seed: int, window: int, layer: int, length: int) -> np.ndarray:
    """The permutation of a window's positions for one layer, from (seed, window, layer) only."""
    return np.random.default_rng([seed, window, layer, 0x5EED]).permutation(length)


def permute_window_rows(x_SBN: torch.Tensor, window_ids_B: np.ndarray, *, seed: int, layer: int) -> torch.Tensor:
    """Routing rows [S, B, N] of B whole windows, each window's rows permuted over its S positions by
    :func:`window_permutation`: new[s, b] = x[perm_b[s], b]."""
    S, B = x_SBN.shape[:2]
    perm_SB = torch.stack([torch.from_numpy(window_permutation(seed, int(w), layer, S)) for w in window_ids_B],
                          dim=1).to(x_SBN.device)
    return x_SBN[perm_SB, torch.arange(B, device=x_SBN.device).expand(S, B)]


class RandomRouting(_Intervention):
    description = ("each window's routing rows (gates and selections together) permuted over its positions, "
                   "seeded by (seed, window, layer): every expert keeps its load in every window, every token its "
                   "k and gate values; only which token goes where is random")

    def make_variants(self) -> list[dict[str, Any]]:
        out = [{"name": f"layer {s.layer} random", "layers": [s.layer], "_": {s.layer}} for s in self.sites]
        if len(self.sites) > 1:
            out.append({"name": "all router layers random", "layers": [s.layer for s in self.sites],
                        "_": {s.layer for s in self.sites}})
        self.load_checks = [{"same_load": True, "moved": 0, "rows": 0} for _ in out]
        return out

    def _full_rows(self, x_TN: torch.Tensor) -> torch.Tensor:
        """This rank's windows' rows over all positions: [S, B, N] (gathered over TP under SP)."""
        B = len(self.batch.window_ids_B)
        tp = self.env.tensor_parallel_size
        if self.env.sequence_parallel and tp > 1:
            parts = [torch.empty_like(x_TN) for _ in range(tp)]
            torch.distributed.all_gather(parts, x_TN.contiguous(), group=self.env.tensor_parallel_group)
            x_TN = torch.cat(parts, dim=0)  # TP slices are consecutive positions (s-major rows)
        return x_TN.reshape(-1, B, x_TN.shape[-1])

    def on_router(self, site: RouterSite, probs_TN: torch.Tensor, map_TN: torch.Tensor) -> Any:
        if self.armed is None or site.layer not in self.armed["_"]:
            return None
        T_loc = probs_TN.shape[0]
        probs_SBN = self._full_rows(probs_TN)
        map_SBN = self._full_rows(map_TN.to(torch.uint8))
        S, B = probs_SBN.shape[:2]
        new_probs = permute_window_rows(probs_SBN, self.batch.window_ids_B, seed=self.env.seed, layer=site.layer)
        new_map = permute_window_rows(map_SBN, self.batch.window_ids_B, seed=self.env.seed, layer=site.layer)
        check = self.load_checks[self.variants.index(self.armed)]
        real = torch.from_numpy(np.asarray(self.batch.real_B)).to(probs_TN.device)
        if not torch.equal(new_map.sum(dim=0)[real], map_SBN.sum(dim=0)[real]):
            check["same_load"] = False
        if self.env.tensor_parallel_rank == 0:
            check["moved"] += int((new_map != map_SBN).any(dim=-1)[:, real].sum())
            check["rows"] += int(S * int(real.sum()))
        first = self.env.tensor_parallel_rank * (T_loc // B) if S * B != T_loc else 0
        rows = slice(first, first + T_loc // B)
        return (new_probs[rows].reshape(T_loc, -1).contiguous(),
                new_map[rows].reshape(T_loc, -1).to(map_TN.dtype).contiguous())

    def variant_extra(self, variant: dict[str, Any]) -> dict[str, Any]:
        c = self.load_checks[self.variants.index(variant)]
        (same,) = all_reduce_ints([int(c["same_load"])], op=torch.distributed.ReduceOp.MIN)
        moved, rows = all_reduce_ints([c["moved"], c["rows"]])
        return {"load_preserved": bool(same), "tokens_rerouted_fraction": moved / max(rows, 1)}


# ---------------------------------------------------------------------------------------------- frozen paths
class FrozenPaths(_Intervention):
    description = ("routing restricted to the P most frequent top-1 paths (a path: the top-1 expert of each "
                   "router layer; frequencies from a clean calibration pass); each token descends the trie of "
                   "allowed paths layer by layer, taking the allowed next expert its router gates highest (or, "
                   "when none is selected, that of the most frequent allowed path) as its top-1")

    applies_to = ("topk", "product_key")

    def kind_reason(self, site: RouterSite) -> str:
        return (f"router type {site.kind!r}: a token may get no expert or several without an order, so its top-1 "
                "path is not defined")

    def check(self, model: torch.nn.Module) -> str | None:
        from megatron_moe_ext.settings.access import ext_settings

        nulls = [s.layer for s in self.sites if ext_settings(s.module.config).router.null_experts > 0]
        if nulls:
            return (f"null experts in router layers {nulls}: a token routed only to null experts has no top-1 "
                    "expert, so its path is not defined")
        return super().check(model)

    def make_variants(self) -> list[dict[str, Any]]:
        self.order = {s.layer: i for i, s in enumerate(self.sites)}
        self.local_top1: list[torch.Tensor] = []
        self.path_counts: dict[tuple[int, ...], int] = {}
        self.paths: np.ndarray | None = None
        self.calibrated = False
        return [{"name": "all observed paths" if p == ALL_PATHS else f"{p} most frequent paths", "paths": p,
                 "_": p} for p in self.options.frozen_paths]

    def calibrate(self, batch: Batch, clean_loss_BS: torch.Tensor) -> None:
        """Counts this calibration forward's top-1 paths (the hooks kept each layer's top-1, in layer order)."""
        self.batch = batch
        if len(self.local_top1) == len(self.sites) and self.distinct_rows:
            rows_TL = torch.stack(self.local_top1, dim=1).cpu().numpy()
            uniq, counts = np.unique(rows_TL[self.real_rows(rows_TL.shape[0]).numpy()], axis=0, return_counts=True)
            for path, c in zip(map(tuple, uniq.tolist()), counts.tolist()):
                self.path_counts[path] = self.path_counts.get(path, 0) + c
        self.local_top1 = []

    def prepare(self) -> None:
        self.local_top1 = []
        if self.calibrated:
            return
        everything: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everything, self.path_counts)
        total: dict[tuple[int, ...], int] = {}
        for part in everything:
            for path, c in part.items():
                total[path] = total.get(path, 0) + c
        ranked = sorted(total.items(), key=lambda pc: (-pc[1], pc[0]))
        self.ranked_paths = np.array([p for p, _ in ranked], dtype=np.int64).reshape(len(ranked), len(self.sites))
        self.ranked_counts = np.array([c for _, c in ranked], dtype=np.int64)
        for v in self.variants:
            p = len(ranked) if v["paths"] == ALL_PATHS else min(v["paths"], len(ranked))
            covered = int(self.ranked_counts[:p].sum())
            v["paths_used"] = p
            v["observed_paths"] = len(ranked)
            v["calibration_tokens_on_allowed_paths"] = covered / max(int(self.ranked_counts.sum()), 1)
        self.changed = [[0, 0] for _ in self.variants]
        self.calibrated = True

    def on_router(self, site: RouterSite, probs_TN: torch.Tensor, map_TN: torch.Tensor) -> Any:
        i = self.order[site.layer]
        if self.armed is None:
            if not self.calibrated:
                self.local_top1.append(_top1(probs_TN, map_TN))
            return None
        P = self.armed["paths_used"]
        paths_PL = torch.from_numpy(self.ranked_paths[:P]).to(probs_TN.device)
        if i == 0:
            self.alive_TP = torch.ones(probs_TN.shape[0], P, dtype=torch.bool, device=probs_TN.device)
            self.moved_T = torch.zeros(probs_TN.shape[0], dtype=torch.bool, device=probs_TN.device)
        alive_TP = self.alive_TP
        gates_TP = torch.where(map_TN.bool(), probs_TN.float(), torch.zeros_like(probs_TN, dtype=torch.float32))
        gates_TP = gates_TP[:, paths_PL[:, i]]
        key_TP = torch.where(alive_TP, gates_TP, torch.full_like(gates_TP, -1.0))
        best_T1 = key_TP.max(dim=1, keepdim=True).values
        pick_T = (alive_TP & (key_TP == best_T1)).to(torch.int8).argmax(dim=1)  # first = most frequent
        chosen_T = paths_PL[pick_T, i]
        self.alive_TP = alive_TP & (paths_PL[:, i].unsqueeze(0) == chosen_T.unsqueeze(1))
        top1_T = _top1(probs_TN, map_TN)
        moved_T = chosen_T != top1_T
        self.moved_T |= moved_T
        if i == len(self.sites) - 1 and self.distinct_rows:
            real_T = self.real_rows(probs_TN.shape[0])
            c = self.changed[self.variants.index(self.armed)]
            c[0] += int(self.moved_T.cpu()[real_T].sum())
            c[1] += int(real_T.sum())
        if not bool(moved_T.any()):
            return None
        rows = torch.arange(probs_TN.shape[0], device=probs_TN.device)
        probs, routing = probs_TN.clone(), map_TN.clone()
        g_top1 = probs_TN[rows, top1_T]
        g_chosen = probs_TN[rows, chosen_T]
        was_selected = map_TN[rows, chosen_T].bool()
        m = moved_T
        probs[rows[m], chosen_T[m]] = g_top1[m]
        probs[rows[m], top1_T[m]] = torch.where(was_selected[m], g_chosen[m], torch.zeros_like(g_chosen[m]))
        routing[rows[m], chosen_T[m]] = True
        routing[rows[m], top1_T[m]] = was_selected[m].to(routing.dtype)
        return probs, routing

    def variant_extra(self, variant: dict[str, Any]) -> dict[str, Any]:
        moved, rows = all_reduce_ints(self.changed[self.variants.index(variant)])
        return {"tokens_rerouted_fraction": moved / max(rows, 1)}


# ---------------------------------------------------------------------------------------------- layer copy
class LayerCopy(_Intervention):
    description = ("layer DST routes every token as layer SRC did in the clean pass (same experts, same gates): "
                   "does a layer's own routing matter, or only that tokens are routed?")

    def check(self, model: torch.nn.Module) -> str | None:
        if len(self.sites) == 1:
            return (f"the model has one router layer ({self.sites[0].layer}): no other layer's routing to copy" +
                    "".join(f"; layer {k}: {v}" for k, v in sorted(self.skipped.items())))
        return super().check(model)

    def make_variants(self) -> list[dict[str, Any]]:
        by_layer = {s.layer: s for s in self.sites}
        out = []
        for src, dst in self.options.copy_routing:
            if src not in by_layer or dst not in by_layer:
                continue
            a, b = by_layer[src].module, by_layer[dst].module
            if (real_experts(a), a.config.num_moe_experts, a.topk) != (real_experts(b), b.config.num_moe_experts,
                                                                         b.topk):
                self.skipped[f"{src}:{dst}"] = "different expert counts or top-k"
                continue
            out.append({"name": f"layer {dst} routed as layer {src}", "src": src, "dst": dst, "_": (src, dst)})
        self.sources = {v["src"] for v in out}
        self.clean: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        return out

    def on_router(self, site: RouterSite, probs_TN: torch.Tensor, map_TN: torch.Tensor) -> Any:
        if self.armed is None:
            if site.layer in self.sources:
                self.clean[site.layer] = (probs_TN.detach().clone(), map_TN.detach().clone())
            return None
        if site.layer != self.armed["dst"]:
            return None
        probs, routing = self.clean[self.armed["src"]]
        return probs.to(probs_TN.dtype), routing.to(map_TN.dtype)


# ---------------------------------------------------------------------------------------------- registry
_CLASSES: dict[str, type[_Intervention]] = {
    "expert_ablation": ExpertAblation,
    "topk_change": TopkChange,
    "random_routing": RandomRouting,
    "frozen_paths": FrozenPaths,
    "layer_copy": LayerCopy,
}


def make_intervention(name: str, env: RankEnv) -> _Intervention:
    """The instrument of intervention ``name`` (``instrument_api.INTERVENTIONS``)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown intervention {name!r}; fix: one of {', '.join(_CLASSES)}")
    return _CLASSES[name](name, env)


# ---------------------------------------------------------------------------------------------- report
def _fmt(x: float) -> str:
    return f"{x:+.4f}" if isinstance(x, float) else str(x)


def report_section(result: dict[str, Any], figures_dir: str) -> str:
    """Markdown of one intervention's result: per variant the loss against the clean loss on the same tokens,
    per label, and the tokens hurt most; a figure of loss against P for frozen paths."""
    if "not_applicable" in result:
        return f"Not applicable: {result['not_applicable']}.\n"
    lines = [result["description"].rstrip(".?") + ("?" if result["description"].endswith("?") else "."), "",
             f"Clean next-token loss on these tokens: {result['clean']['loss']:.4f} nats "
             f"({result['clean']['tokens']} tokens).", ""]
    labels = result["labels"]
    head = "| variant | loss | Δ loss | ± (windows) | " + " | ".join(f"Δ {n}" for n in labels) + " |"
    lines += [head, "|" + "---|" * (4 + len(labels))]
    for v in result["variants"]:
        per = [_fmt(v["per_label"][n]["delta"]) if n in v["per_label"] else "" for n in labels]
        lines.append(f"| {v['name']} | {v['loss']:.4f} | {_fmt(v['delta'])} | {v['delta_se']:.4f} | "
                     + " | ".join(per) + " |")
    extras = [(v["name"], {k: v[k] for k in ("load_preserved", "tokens_rerouted_fraction", "paths_used",
                                             "calibration_tokens_on_allowed_paths") if k in v})
              for v in result["variants"]]
    if any(e for _, e in extras):
        lines += [""] + [f"- {name}: " + ", ".join(f"{k} {val:.4g}" if isinstance(val, float) else f"{k} {val}"
                                                   for k, val in e.items()) for name, e in extras if e]
    if result.get("not_applicable_layers"):
        lines += [""] + [f"- layer {k}: not applicable ({v})" for k, v in result["not_applicable_layers"].items()]
    worst = max(result["variants"], key=lambda v: v["delta"], default=None)
    if worst is not None and worst["hurt_tokens"]:
        lines += ["", f"Tokens hurt most by \"{worst['name']}\":", "",
                  "| window | position | token → next | label | clean | loss | Δ |", "|---|---|---|---|---|---|---|"]
        for t in worst["hurt_tokens"]:
            pair = f"{_shown(t, 'token', 'text')} → {_shown(t, 'next_token', 'next_text')}"
            lines.append(f"| {t['window']} | {t['position']} | {pair} | {t['label']} | "
                         f"{t['clean']:.3f} | {t['loss']:.3f} | {_fmt(t['delta'])} |")
    figure = _frozen_paths_figure(result, figures_dir)
    if figure:
        lines += ["", f"![loss against the number of allowed paths](figures/{figure})"]
    return "\n".join(lines) + "\n"


def _shown(t: dict[str, Any], id_key: str, text_key: str) -> str:
    """A token in a Markdown table: its text quoted (escaped) when it has one, else its id."""
    text = t.get(text_key)
    if text is None:
        return str(t[id_key])
    return "`" + repr(text)[1:-1].replace("|", "\\|").replace("`", "'") + "`"


def _frozen_paths_figure(result: dict[str, Any], figures_dir: str) -> str | None:
    points = sorted((v["paths_used"], v["loss"]) for v in result["variants"] if "paths_used" in v)
    if len(points) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot([p for p, _ in points], [loss for _, loss in points], "o-", label="frozen to P paths")
    ax.axhline(result["clean"]["loss"], color="gray", ls="--", label="clean")
    ax.set_xscale("log")
    ax.set_xlabel("allowed top-1 paths P")
    ax.set_ylabel("next-token loss (nats)")
    ax.legend()
    fig.tight_layout()
    os.makedirs(figures_dir, exist_ok=True)
    name = "frozen_paths_loss.png"
    tmp = os.path.join(figures_dir, f".{name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, os.path.join(figures_dir, name))
    return name
