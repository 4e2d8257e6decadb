"""The options of ``analyze --interventions``: parsed from the command line, checked against the checkpoint's
model before any rank starts, handed to the ranks as ``RankEnv.options`` (a JSON dict).

Pure Python (no torch, no Megatron): the launcher builds :class:`InterventionOptions` with
:func:`build_intervention_options` from the flag values and the model's facts (:class:`ModelFacts`, read from the
checkpoint's saved arguments), and every bad value is a ValueError naming the values and the fix.

What each option selects (one rerun of the model per variant and batch):

* ``ablate_experts`` ((layer, expert), ...): each expert alone, its gate set to 0 for every token;
  ``ablate_top_m`` (M, ...): the M busiest experts of every router layer (busiest by the load of a clean
  calibration pass over all analysed tokens, ties to the lower id); ``ablate_layers`` (layer, ...): every
  routed expert of the layer (its shared experts stay). ``renormalize``: the gates left to a token are rescaled
  to the token's clean gate sum (otherwise the ablated share is simply dropped).
* ``topk_values`` (k, ...): the routers of every top-k layer evaluated at k (reduced or increased).
* ``frozen_paths`` (P, ...; 0 = all observed paths): routing restricted to the P most frequent top-1 paths.
* ``copy_routing`` ((src, dst), ...): layer dst uses the routing layer src chose for the same token.
* ``hurt_tokens``: how many of the most-hurt tokens each variant lists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

ALL_PATHS = 0  # frozen_paths value meaning "every observed path"


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know of the model: routed layers (1-based) by kind ('moe' or 'peer'), experts per
    router layer, the router's top-k and whether it is a product-key router."""

    layers: dict[int, str]
    num_experts: int | None
    topk: int | None
    router_type: str
    peer_num_experts: int | None = None

    @property
    def router_layers(self) -> list[int]:
        return [n for n, kind in self.layers.items() if kind == "moe"]


@dataclasses.dataclass(frozen=True)
class InterventionOptions:
    ablate_experts: tuple[tuple[int, int], ...] = ()
    ablate_top_m: tuple[int, ...] = ()
    ablate_layers: tuple[int, ...] = ()
    renormalize: bool = False
    topk_values: tuple[int, ...] = ()
    frozen_paths: tuple[int, ...] = ()
    copy_routing: tuple[tuple[int, int], ...] = ()
    hurt_tokens: int = 10

    def as_dict(self) -> dict[str, Any]:
        """The JSON form handed to the ranks (``RankEnv.options``)."""
        return {f.name: _listed(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> InterventionOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _tupled(v) for k, v in options.items() if k in known})


def _listed(v: Any) -> Any:
    return [_listed(x) for x in v] if isinstance(v, tuple) else v


def _tupled(v: Any) -> Any:
    return tuple(_tupled(x) for x in v) if isinstance(v, list) else v


def parse_ints(text: str | None, flag: str, *, allow_all: bool = False) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); with ``allow_all``, 'all' -> ALL_PATHS. ValueError naming the flag otherwise."""
    if text is None or text == "":
        return ()
    out = []
    for part in text.split(","):
        part = part.strip()
        if allow_all and part == "all":
            out.append(ALL_PATHS)
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {part!r} is not an integer; fix: a comma list such as "
                             f"{flag} 1,2{',all' if allow_all else ''}") from None
    return tuple(out)


def parse_pairs(text: str | None, flag: str) -> tuple[tuple[int, int], ...]:
    """'1:0,2:3' -> ((1, 0), (2, 3)); ValueError naming the flag otherwise."""
    if text is None or text == "":
        return ()
    out = []
    for part in text.split(","):
        a, sep, b = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            out.append((int(a), int(b)))
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {part!r} is not A:B with two integers; fix: e.g. {flag} 1:0,2:3") \
                from None
    return tuple(out)


def default_copy_pairs(facts: ModelFacts) -> tuple[tuple[int, int], ...]:
    """Each router layer copies the routing of the router layer before it (same expert count by construction)."""
    layers = facts.router_layers
    return tuple(zip(layers[:-1], layers[1:]))


def build_intervention_options(*, names: Sequence[str], facts: ModelFacts, ablate_experts: str | None = None,
                               ablate_top_m: str | None = None, ablate_layers: str | None = None,
                               renormalize: bool = False, topk_values: str | None = None,
                               frozen_paths: str | None = None, copy_routing: str | None = None,
                               hurt_tokens: int = 10) -> InterventionOptions:
    """The checked options of the interventions ``names`` (defaults filled in where an asked-for intervention
    has no option of its own); ValueError naming the values and the fix."""
    router_layers = facts.router_layers
    peer_layers = [n for n, kind in facts.layers.items() if kind == "peer"]
    routable = ", ".join(map(str, router_layers)) or "none"

    def check_layer(layer: int, flag: str) -> None:
        if layer in peer_layers:
            raise ValueError(f"{flag}: layer {layer} is a PEER layer; its selections are not exposed for changing "
                             f"(only for recording); fix: name a router layer ({routable})")
        if layer not in router_layers:
            raise ValueError(f"{flag}: the model has no router in layer {layer}; fix: one of its router layers "
                             f"({routable})")

    experts = parse_pairs(ablate_experts, "--ablate-experts")
    for layer, expert in experts:
        check_layer(layer, "--ablate-experts")
        if not 0 <= expert < (facts.num_experts or 0):
            raise ValueError(f"--ablate-experts {layer}:{expert}: layer {layer} has experts 0..{facts.num_experts - 1}"
                             f"; fix: an expert id in that range")
    top_m = parse_ints(ablate_top_m, "--ablate-top-m")
    for m in top_m:
        if not 1 <= m < (facts.num_experts or 0):
            raise ValueError(f"--ablate-top-m {m}: must be in 1..{(facts.num_experts or 1) - 1} (the model has "
                             f"{facts.num_experts} experts per layer; ablating all is --ablate-layers); fix: a "
                             f"smaller M")
    layers = parse_ints(ablate_layers, "--ablate-layers")
    for layer in layers:
        check_layer(layer, "--ablate-layers")
    ks = parse_ints(topk_values, "--topk-values")
    for k in ks:
        if not 1 <= k <= (facts.num_experts or 0):
            raise ValueError(f"--topk-values {k}: must be in 1..{facts.num_experts} (experts per layer); fix: "
                             f"drop it")
    paths = parse_ints(frozen_paths, "--frozen-paths", allow_all=True)
    if any(p < 0 for p in paths):
        raise ValueError(f"--frozen-paths {frozen_paths}: counts must be >= 1 (or 'all'); fix: e.g. 1,4,16,all")
    copies = parse_pairs(copy_routing, "--copy-routing")
    for src, dst in copies:
        check_layer(src, "--copy-routing")
        check_layer(dst, "--copy-routing")
        if src == dst:
            raise ValueError(f"--copy-routing {src}:{dst}: a layer copied onto itself changes nothing; fix: two "
                             f"different router layers")
    if hurt_tokens < 0:
        raise ValueError(f"--hurt-tokens {hurt_tokens} must be >= 0")
    given = {"expert_ablation": bool(experts or top_m or layers), "topk_change": bool(ks),
             "frozen_paths": bool(paths), "layer_copy": bool(copies)}
    flags = {"expert_ablation": "--ablate-experts/--ablate-top-m/--ablate-layers", "topk_change": "--topk-values",
             "frozen_paths": "--frozen-paths", "layer_copy": "--copy-routing"}
    for name, has in given.items():
        if has and name not in names:
            raise ValueError(f"{flags[name]} given without the {name} intervention; fix: add {name} to "
                             f"--interventions (or drop the option)")
    if "expert_ablation" in names and not given["expert_ablation"]:
        layers = tuple(router_layers)  # default: each router layer's routed part, and the busiest expert
        top_m = (1,) if (facts.num_experts or 0) > 1 else ()
    if "topk_change" in names and not ks and facts.topk is not None and facts.num_experts:
        ks = tuple(sorted({max(1, facts.topk // 2), min(facts.num_experts, 2 * facts.topk)} - {facts.topk}))
    if "frozen_paths" in names and not paths:
        paths = (1, 4, 16, ALL_PATHS)
    if "layer_copy" in names and not copies:
        copies = default_copy_pairs(facts)
    return InterventionOptions(ablate_experts=experts, ablate_top_m=top_m, ablate_layers=layers,
                               renormalize=renormalize, topk_values=ks, frozen_paths=paths, copy_routing=copies,
                               hurt_tokens=hurt_tokens)
