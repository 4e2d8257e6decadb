"""Linear probes (``analyze --readouts probes``): how linearly decodable the user labels and the token classes are
from each layer's input hidden states and from its router's logits, on held-out windows, next to a
shuffled-label control and the majority baseline.

Features, per transformer layer l (the same code for MoE, PEER and dense models):
* ``hidden``: the layer's MLP input [T, H] (the normed residual the router sees; a dense FFN's input).
* ``router``: a top-k router's dense logits [T, N] (``router.gating``: Megatron's gating linear, not the
  routing); a product-key router's two half-score vectors, concatenated [T, heads * (n1 + n2)]
  (``router.half_scores``: the scores of the query against every sub-key, the product-key analogue of the
  logits); ``not_applicable`` for PEER layers (their retrieval exposes no score method) and dense layers.

Targets: ``labels`` (the user label of each token, ``Batch.labels_BS``) and ``token_class`` (the class of the
token at that position, ``token_text.TOKEN_CLASSES``; ``not_applicable`` without tokenizer text).

Tokens: a fixed, layout-independent sample: token (window w, position p) gets u = SplitMix64(seed, w*S + p)
in [0, 1) and the ``probe_max_tokens`` tokens of smallest u are kept (every rank keeps its own smallest, rank
0 merges: the union holds the global smallest). Split: window w is held out when SplitMix64(seed', w) <
``probe_test_fraction`` (by window, so no window is in both halves; seed' = seed + 1).

Probe: multinomial logistic regression (scikit-learn ``LogisticRegression``, L2, ``C = probe_c``) on
standardised features, fitted on the training windows, accuracy on the held-out ones. Baselines: the
majority class of the training half (its held-out accuracy), and a control task (Hewitt & Liang 2019,
"Designing and Interpreting Probes with Control Tasks", section 2): the targets permuted over the sampled
tokens (seeded), fitted and scored the same way; what a probe reads off the representation rather than
memorises is the selectivity, accuracy minus control accuracy. (Hewitt & Liang's control assigns random
labels per word type; a token-level permutation is the stricter version: its held-out accuracy is chance.)

Legend: T tokens, H hidden, N experts, X sampled tokens, F features, C classes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from megatron_moe_ext.analysis.instrument_api import Batch, RankEnv, router_rows

# name -> (type, default, help): H4 turns these into ``analyze`` flags (``--probe-max-tokens`` etc.).
OPTIONS: dict[str, tuple[type, Any, str]] = {
    "probe_max_tokens": (int, 8192, "tokens sampled per layer for the probes (fixed by a hash of window and "
                                    "position, so the same at any layout)"),
    "probe_test_fraction": (float, 0.25, "share of the windows held out for the probes' test accuracy"),
    "probe_c": (float, 1.0, "inverse L2 regularisation strength C of the logistic-regression probes"),
}


def check_options(options: Mapping[str, Any]) -> None:
    """ValueError naming the value and the fix for a bad probe option."""
    n = options.get("probe_max_tokens", OPTIONS["probe_max_tokens"][1])
    if isinstance(n, bool) or not isinstance(n, int) or n < 4:
        raise ValueError(f"--probe-max-tokens {n!r}: expected an integer >= 4; fix: e.g. --probe-max-tokens 8192")
    f = options.get("probe_test_fraction", OPTIONS["probe_test_fraction"][1])
    if not isinstance(f, (int, float)) or not 0.0 < f < 1.0:
        raise ValueError(f"--probe-test-fraction {f!r}: expected a number in (0, 1); fix: e.g. "
                         f"--probe-test-fraction 0.25")
    c = options.get("probe_c", OPTIONS["probe_c"][1])
    if not isinstance(c, (int, float)) or not c > 0:
        raise ValueError(f"--probe-c {c!r}: expected a number > 0; fix: e.g. --probe-c 1.0")


def check_probe_labels(label_counts: Mapping[str, int] | Sequence[int]) -> None:
    """ValueError unless at least two labels have tokens: a probe of one label has nothing to tell apart.
    ``label_counts``: tokens per label (a mapping name -> count, or counts in label order)."""
    items = list(label_counts.items()) if isinstance(label_counts, Mapping) else list(enumerate(label_counts))
    present = [str(name) for name, count in items if count > 0]
    if len(present) < 2:
        raise ValueError(f"probes need tokens of at least 2 labels, the data has {len(present)} "
                         f"({', '.join(present) or 'none'}); fix: pass two or more --data files (one label each) "
                         f"or a --labels-file with two or more distinct labels")


# -- pure functions ----------------------------------------------------------------------------------------------
def uniform_hash(seed: int, keys: np.ndarray) -> np.ndarray:
    """u in [0, 1) per int key: the SplitMix64 finaliser (Steele, Lea & Flood 2014) of key XOR a mixed seed,
    top 53 bits. Depends only on (seed, key), never on how the keys are batched or which rank holds them."""
    def mix(z: np.ndarray) -> np.ndarray:
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    seed_mix = mix(np.array([seed & (2**64 - 1)], dtype=np.uint64))[0]
    return (mix(np.asarray(keys).astype(np.uint64) ^ seed_mix) >> np.uint64(11)).astype(np.float64) / float(2**53)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Held-out accuracies of one probe (fractions of the test tokens)."""

    accuracy: float
    control_accuracy: float
    majority_accuracy: float
    train_accuracy: float
    train_tokens: int
    test_tokens: int
    classes: int

    @property
    def selectivity(self) -> float:
        return self.accuracy - self.control_accuracy


def fit_probe(features_XF: np.ndarray, targets_X: np.ndarray, train_X: np.ndarray, *, c: float = 1.0,
              seed: int = 0) -> ProbeResult:
    """A logistic-regression probe (standardised features, L2 with inverse strength ``c``) fitted on the rows
    with ``train_X`` True, scored on the others; the control (targets permuted over all rows with ``seed``,
    Hewitt & Liang 2019) and the majority class of the training rows scored on the same held-out rows.
    ValueError when either half is empty or the training rows hold fewer than 2 classes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features_XF, dtype=np.float64)
    y = np.asarray(targets_X)
    train = np.asarray(train_X, dtype=bool)
    test = ~train
    if not train.any() or not test.any():
        raise ValueError(f"probe split: {int(train.sum())} training and {int(test.sum())} test tokens; both must be "
                         f"non-empty (fix: more windows, or another --probe-test-fraction)")
    classes = np.unique(y[train])
    if classes.size < 2:
        raise ValueError(f"probe: the training tokens hold {classes.size} class; a probe needs at least 2")

    def fit_score(t: np.ndarray) -> tuple[float, float]:
        if np.unique(t[train]).size < 2:
            return float("nan"), float("nan")
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        model.fit(x[train], t[train])
        return float(model.score(x[test], t[test])), float(model.score(x[train], t[train]))

    accuracy, train_accuracy = fit_score(y)
    control, _ = fit_score(np.random.default_rng(seed).permutation(y))
    values, counts = np.unique(y[train], return_counts=True)
    majority = values[np.argmax(counts)]
    return ProbeResult(accuracy=accuracy, control_accuracy=control,
                       majority_accuracy=float((y[test] == majority).mean()), train_accuracy=train_accuracy,
                       train_tokens=int(train.sum()), test_tokens=int(test.sum()), classes=int(np.unique(y).size))


def smallest_u(u_X: np.ndarray, keys_X: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k rows of smallest (u, key), sorted by key (the layout-independent order)."""
    order = np.lexsort((keys_X, u_X))[:k]
    return order[np.argsort(keys_X[order], kind="stable")]


# -- the rank-side instrument ------------------------------------------------------------------------------------
def _router_logits(router: Any, x: torch.Tensor) -> torch.Tensor:
    """A top-k router's dense logits [T, N] (Megatron's gating linear) of its input x [S, B, H]."""
    logits = router.gating(x)
    return logits.reshape(-1, logits.shape[-1])


def _half_scores(router: Any, x: torch.Tensor) -> torch.Tensor:
    """A product-key router's half scores, both halves and heads concatenated [T, heads * (n1 + n2)]."""
    a, b = router.half_scores(x.reshape(-1, x.shape[-1]), None)
    return torch.cat([a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)], dim=1)


@dataclasses.dataclass
class _Sample:
    """One layer's kept tokens on this rank."""

    u: np.ndarray
    key: np.ndarray
    window: np.ndarray
    label: np.ndarray
    token: np.ndarray
    hidden: np.ndarray
    router: np.ndarray | None


class Probes:
    """``probes``: see the module docstring. ``Probes(name, env)`` is the INSTRUMENTS factory."""

    def __init__(self, name: str, env: RankEnv) -> None:
        check_options(env.options)
        self.name = name
        self.env = env
        self.max_tokens = int(env.options.get("probe_max_tokens", OPTIONS["probe_max_tokens"][1]))
        self.test_fraction = float(env.options.get("probe_test_fraction", OPTIONS["probe_test_fraction"][1]))
        self.c = float(env.options.get("probe_c", OPTIONS["probe_c"][1]))
        self._armed = False
        self._handles: list[Any] = []
        self._captured: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.kinds: dict[int, str] = {}
        self.router_features: dict[int, str | None] = {}
        self.samples: dict[int, _Sample | None] = {}

    def attach(self, model: Any, env: RankEnv) -> None:
        from megatron.core.transformer.moe.moe_layer import MoELayer

        from megatron_moe_ext.layers.peer import PEERLayer
        from megatron_moe_ext.layers.product_key_router import ProductKeyRouter

        for layer in model.decoder.layers:
            mlp = getattr(layer, "mlp", None)
            if mlp is None:
                continue
            number = int(layer.layer_number)
            features: Callable[[torch.Tensor], torch.Tensor] | None = None
            if isinstance(mlp, MoELayer):
                pk = isinstance(mlp.router, ProductKeyRouter)
                kind, self.router_features[number] = "moe", "product-key half scores" if pk else "router logits"
                features = functools.partial(_half_scores if pk else _router_logits, mlp.router)
            elif isinstance(mlp, PEERLayer):
                kind, self.router_features[number] = "peer", None
            else:
                kind, self.router_features[number] = "dense", None
            self.kinds[number] = kind
            self.samples[number] = None
            self._handles.append(mlp.register_forward_pre_hook(self._hook(number, features)))
        self.kinds = dict(sorted(self.kinds.items()))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, number: int, features: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable:
        def hook(module: Any, inputs: tuple) -> None:
            if not self._armed:
                return
            x = inputs[0].detach()
            f = features(x).detach().float() if features is not None else None
            self._captured[number] = (x.reshape(-1, x.shape[-1]).float().clone(), f)
        return hook

    def on_batch(self, batch: Batch, clean_loss_BS: Any, rerun: Callable[[], Any]) -> None:
        self._armed = True
        try:
            rerun()
        finally:
            self._armed = False
        S = self.env.seq_length
        tokens_BS = batch.tokens_BS.detach().cpu().numpy()
        labels_BS = np.asarray(batch.labels_BS)
        for number in self.kinds:
            hidden_TH, router_TF = self._captured.pop(number)
            T = hidden_TH.shape[0]
            window_T, position_T = router_rows(batch, self.env, T)
            B = len(batch.window_ids_B)
            b_T = np.tile(np.arange(B), T // B)
            real_T = np.asarray(batch.real_B, dtype=bool)[b_T]
            key_T = window_T * S + position_T
            u_T = uniform_hash(self.env.seed, key_T)
            new = _Sample(u_T[real_T], key_T[real_T], window_T[real_T], labels_BS[b_T, position_T][real_T],
                          tokens_BS[b_T, position_T][real_T], hidden_TH.cpu().numpy()[real_T],
                          router_TF.cpu().numpy()[real_T] if router_TF is not None else None)
            self.samples[number] = self._merge([s for s in (self.samples[number], new) if s is not None])

    def _merge(self, parts: list[_Sample]) -> _Sample:
        """The max_tokens rows of smallest u among ``parts``, in key order."""
        cat = {f.name: (None if getattr(parts[0], f.name) is None
                        else np.concatenate([getattr(p, f.name) for p in parts]))
               for f in dataclasses.fields(_Sample)}
        keep = smallest_u(cat["u"], cat["key"], self.max_tokens)
        return _Sample(**{k: (None if v is None else v[keep]) for k, v in cat.items()})

    def result(self) -> dict[str, Any] | None:
        self.detach()
        mine = {n: (dataclasses.asdict(s) if s is not None else None) for n, s in self.samples.items()}
        if self.env.world_size > 1:
            gathered = [None] * self.env.world_size if self.env.rank == 0 else None
            torch.distributed.gather_object(mine, gathered, dst=0)
        else:
            gathered = [mine]
        if self.env.rank != 0:
            return None
        if self.env.tensor_parallel_size > 1 and not self.env.sequence_parallel:
            gathered = gathered[:: self.env.tensor_parallel_size]  # TP replicas hold the same tokens
        from megatron_moe_ext.analysis.token_text import TOKEN_CLASSES, class_table, token_decoder

        decode = token_decoder(self.env.model_args)
        label_names = list(self.env.label_names)
        layers = []
        for number, kind in self.kinds.items():
            parts = [_Sample(**g[number]) for g in gathered if g[number] is not None]
            entry: dict[str, Any] = {"layer": number, "kind": kind, "router_features": self.router_features[number]}
            if not parts:
                entry["not_applicable"] = "no tokens reached this layer"
                layers.append(entry)
                continue
            sample = self._merge(parts)
            test = uniform_hash(self.env.seed + 1, sample.window) < self.test_fraction
            entry["sampled_tokens"] = int(sample.key.size)
            entry["test_windows"] = int(np.unique(sample.window[test]).size)
            targets: dict[str, np.ndarray | str] = {"labels": sample.label}
            if decode is not None:
                vocab = int(sample.token.max()) + 1
                targets["token_class"] = class_table(vocab, decode)[sample.token]
            else:
                targets["token_class"] = "the checkpoint's tokenizer gives no token text (token_text module)"
            feats: dict[str, np.ndarray | str] = {"hidden": sample.hidden}
            feats["router"] = (sample.router if sample.router is not None else
                               "PEER retrieval exposes no router scores" if kind == "peer" else
                               "a dense layer has no router")
            probes: dict[str, Any] = {}
            for fname, x in feats.items():
                for tname, y in targets.items():
                    name = f"{fname}/{tname}"
                    if isinstance(x, str) or isinstance(y, str):
                        probes[name] = {"not_applicable": x if isinstance(x, str) else y}
                        continue
                    try:
                        r = fit_probe(x, y, ~test, c=self.c, seed=self.env.seed)
                    except ValueError as e:
                        probes[name] = {"not_applicable": str(e)}
                        continue
                    values = {**dataclasses.asdict(r), "selectivity": r.selectivity}
                    # NaN (a control whose permuted training half holds one class) is not JSON: null.
                    probes[name] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                                    for k, v in values.items()}
            entry["probes"] = probes
            layers.append(entry)
        return {"label_names": label_names, "token_classes": list(TOKEN_CLASSES), "c": self.c,
                "test_fraction": self.test_fraction, "max_tokens": self.max_tokens,
                "control": "targets permuted over the sampled tokens (Hewitt & Liang 2019 control task, "
                           "token-level)", "layers": layers}


def report_section(result: dict[str, Any], figures_dir: str) -> str:
    """Markdown of the probes section: one row per layer, feature set and target."""
    lines = ["## Linear probes", ""]
    if "not_applicable" in result:
        return "\n".join(lines + [f"Not applicable: {result['not_applicable']}", ""])
    lines += [f"Logistic-regression probes (C = {result['c']:g}) on up to {result['max_tokens']} tokens per layer; "
              f"{result['test_fraction']:.0%} of the windows held out. Control: {result['control']}. "
              f"Selectivity = accuracy - control.", "",
              "| layer | kind | features | target | test acc | control | majority | selectivity "
              "| tokens (train/test) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for layer in result["layers"]:
        if "not_applicable" in layer:
            lines.append(f"| {layer['layer']} | {layer['kind']} | - | - | n/a: {layer['not_applicable']} |||||")
            continue
        for name, p in layer["probes"].items():
            fname, tname = name.split("/")
            if fname == "router" and layer["router_features"]:
                fname = layer["router_features"]
            if "not_applicable" in p:
                lines.append(f"| {layer['layer']} | {layer['kind']} | {fname} | {tname} | n/a |  |  |  | "
                             f"{p['not_applicable']} |")
                continue
            def f(v: float | None, spec: str = ".3f") -> str:
                return "n/a" if v is None else format(v, spec)

            lines.append(f"| {layer['layer']} | {layer['kind']} | {fname} | {tname} | {f(p['accuracy'])} | "
                         f"{f(p['control_accuracy'])} | {f(p['majority_accuracy'])} | {f(p['selectivity'], '+.3f')} | "
                         f"{p['train_tokens']}/{p['test_tokens']} |")
    lines.append("")
    return "\n".join(lines)
