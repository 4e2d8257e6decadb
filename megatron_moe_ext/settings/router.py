"""Router choice and the product-key router's settings (``RouterSettings``), built once for the config and the flags.

Pure Python (no torch), so the flag path can refuse bad settings before any process group or
model exists. Every refusal is a ValueError naming the values and the fix.

Product-key layout (see ``layers/product_key_router.py``): the N experts are split into ``heads``
disjoint pools of N/heads experts, each an n1 x n2 grid (square by default); each head picks
topk/heads experts of its own pool, so every token gets exactly topk distinct experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_moe_ext.settings.expert_choice import ExpertChoiceSettings, expert_choice_settings
from megatron_moe_ext.settings.null_experts import null_expert_count
from megatron_moe_ext.settings.relu_router import ReluRouterSettings, relu_router_settings

ROUTER_TYPES = ("topk", "product_key", "expert_choice", "relu")
# Update rules of the product-key selection biases (MoEExtConfig.moe_pk_bias_update_rule).
BIAS_UPDATE_RULES = ("sign", "relative")

# Megatron routing options the product-key router cannot honour, with the reason.
_PK_UNSUPPORTED_BALANCING = {
    "sinkhorn": "Sinkhorn iterates over the dense [tokens, experts] logits, which product keys never build",
    "quantile_balancing": "quantile balancing keeps a per-expert dual bias over dense logits",
}
PK_SCORE_FUNCTIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class ProductKeyLayout:
    """Where experts sit: ``heads`` pools of ``rows x cols`` experts, ``k`` picks per head."""

    heads: int
    rows: int
    cols: int
    k: int
    subkey_topk: int

    @property
    def pool_size(self) -> int:
        return self.rows * self.cols


def _square_hint(n: int) -> str:
    r = math.isqrt(n)
    return f"{r * r} or {(r + 1) ** 2}"


def product_key_layout(
    num_experts: int | None,
    topk: int,
    *,
    heads: int,
    key_dim: int,
    subkey_topk: int | None = None,
    grid_rows: int | None = None,
) -> ProductKeyLayout:
    """Checks the product-key geometry; returns the layout (``subkey_topk`` None: the top-k per head;
    ``grid_rows`` None: a square grid)."""
    if num_experts is None:
        raise ValueError("--moe-router-type product_key needs MoE experts; fix: set --num-experts (n*n) or --moe-granularity")
    if heads < 1:
        raise ValueError(f"--moe-pk-heads {heads} must be >= 1")
    if key_dim < 2 or key_dim % 2:
        raise ValueError(
            f"--moe-pk-key-dim {key_dim}: the query splits into two halves of key_dim/2, so it must be even "
            f"and >= 2; fix: use {max(2, key_dim + (key_dim % 2))}"
        )
    if num_experts % heads:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by --moe-pk-heads {heads} (each head owns a pool "
            f"of num_experts/heads experts); fix: use heads dividing {num_experts}, or heads=1"
        )
    if topk % heads:
        raise ValueError(
            f"moe_router_topk={topk} is not divisible by --moe-pk-heads {heads} (each head fills "
            f"topk/heads slots); fix: heads dividing {topk}, e.g. 1"
        )
    pool = num_experts // heads
    if grid_rows is not None:
        if grid_rows < 1 or pool % grid_rows:
            raise ValueError(
                f"--moe-pk-grid-rows {grid_rows} does not divide the {pool} experts per head "
                f"(num_experts={num_experts} / heads={heads}); fix: a divisor of {pool}, or leave it unset for a square grid"
            )
        rows, cols = grid_rows, pool // grid_rows
    else:
        rows = math.isqrt(pool)
        if rows * rows != pool:
            raise ValueError(
                f"{pool} experts per head (num_experts={num_experts}, heads={heads}) is not a perfect square, so "
                f"no n x n product-key grid exists; fix: {_square_hint(pool)} experts per head, or "
                "--moe-pk-grid-rows for a rectangular grid"
            )
        cols = rows
    k = topk // heads
    if k > min(rows, cols):
        raise ValueError(
            f"top-k per head {k} (moe_router_topk={topk} / heads={heads}) exceeds the {min(rows, cols)} sub-keys "
            f"of a side of the {rows} x {cols} grid: product keys would then search the whole pool; fix: "
            f"more experts (>= {k} x {k} per head), more heads, or a smaller top-k"
        )
    kp = k if subkey_topk is None else subkey_topk
    if kp < k:
        raise ValueError(
            f"--moe-pk-subkey-topk {kp} < top-k per head {k}: the search is exact only if each side keeps "
            f">= k sub-keys; fix: --moe-pk-subkey-topk >= {k}, or leave it unset (= k)"
        )
    if kp > max(rows, cols):
        raise ValueError(
            f"--moe-pk-subkey-topk {kp} exceeds the sub-keys per side ({rows} x {cols} grid); fix: <= {max(rows, cols)}"
        )
    return ProductKeyLayout(heads=heads, rows=rows, cols=cols, k=k, subkey_topk=kp)


def check_router_choice(
    router_type: str,
    *,
    score_function: str = "softmax",
    load_balancing_type: str | list[str] | None = None,
    expert_bias: bool = False,
    num_groups: int | None = None,
    group_topk: int | None = None,
    router_fusion: bool = False,
    force_load_balancing: bool = False,
    routing_replay: bool = False,
) -> None:
    """Refuses Megatron routing options that the chosen router cannot honour."""
    if router_type not in ROUTER_TYPES:
        raise ValueError(f"--moe-router-type {router_type!r} is unknown; choose from {', '.join(ROUTER_TYPES)}")
    if router_type != "product_key":
        return
    types = load_balancing_type if isinstance(load_balancing_type, list) else [load_balancing_type]
    for t in types:
        if t in _PK_UNSUPPORTED_BALANCING:
            raise ValueError(
                f"--moe-router-type product_key with --moe-router-load-balancing-type {t}: "
                f"{_PK_UNSUPPORTED_BALANCING[t]}; fix: aux_loss, seq_aux_loss, global_aux_loss or none"
            )
    if score_function not in PK_SCORE_FUNCTIONS:
        raise ValueError(
            f"--moe-router-type product_key with --moe-router-score-function {score_function}; fix: one of "
            f"{', '.join(PK_SCORE_FUNCTIONS)}"
        )
    refusals = [
        (expert_bias, "--moe-router-enable-expert-bias", (
            "a dense per-expert bias breaks the separable product-key scores; fix: drop it and use "
            "--moe-pk-bias-balancing (separable row/column biases)")),
        (num_groups or group_topk, "--moe-router-num-groups/--moe-router-group-topk",
         "group-limited routing needs dense scores; fix: drop them (heads give disjoint expert pools)"),
        (router_fusion, "--moe-router-fusion", "TE's fused top-k works on dense logits; fix: drop it"),
        (force_load_balancing, "--moe-router-force-load-balancing",
         "it replaces dense logits by random ones; fix: drop it"),
        (routing_replay, "--moe-enable-routing-replay", "replay records dense top-k; fix: drop it"),
    ]
    for bad, flag, why in refusals:
        if bad:
            raise ValueError(f"--moe-router-type product_key with {flag}: {why}")


@dataclass(frozen=True, kw_only=True)
class RouterSettings:
    """The router of the MoE layers (``MoEExtConfig.moe_router_*`` and ``moe_pk_*``); ``pk_layout`` is
    the product-key geometry (None for the dense router)."""

    router_type: str
    noisy_gating: bool
    pk_layout: ProductKeyLayout | None
    pk_key_dim: int
    pk_query_norm: str
    pk_bias_balancing: bool
    pk_expert_bias_balancing: bool
    pk_bias_update_rule: str
    expert_choice: ExpertChoiceSettings | None = None
    relu: ReluRouterSettings | None = None
    null_experts: int = 0

    @property
    def variable_experts(self) -> bool:
        """Tokens may get any number of experts (expert choice, ReLU gates, null experts): the dispatch
        cannot size its buffers as tokens x top-k (integration row ``variable-experts-alltoall``)."""
        return self.expert_choice is not None or self.relu is not None or self.null_experts > 0

    @property
    def selection_biases(self) -> bool:
        """A product-key selection bias is updated once per step (the finalize hook)."""
        return self.pk_bias_balancing or self.pk_expert_bias_balancing


def router_settings(get: Callable[[str], Any]) -> RouterSettings:
    """The router settings, checked, reading by ``MoEExtConfig`` field name through ``get(name)`` (the
    config object, or Megatron's parsed args through a name map), so the config and the flag path
    apply exactly the same rules."""
    router_type = get("moe_router_type")
    check_router_choice(
        router_type,
        score_function=get("moe_router_score_function"),
        load_balancing_type=get("moe_router_load_balancing_type"),
        expert_bias=bool(get("moe_router_enable_expert_bias")),
        num_groups=get("moe_router_num_groups"),
        group_topk=get("moe_router_group_topk"),
        router_fusion=bool(get("moe_router_fusion")),
        force_load_balancing=bool(get("moe_router_force_load_balancing")),
        routing_replay=bool(get("moe_enable_routing_replay")),
    )
    bias, expert_bias = bool(get("moe_pk_bias_balancing")), bool(get("moe_pk_expert_bias_balancing"))
    if bias and router_type != "product_key":
        raise ValueError(
            f"--moe-pk-bias-balancing with --moe-router-type {router_type}: the separable biases belong to the "
            "product-key router; fix: --moe-router-type product_key, or Megatron's --moe-router-enable-expert-bias "
            "for the dense router"
        )
    if expert_bias and router_type != "product_key":
        raise ValueError(
            f"--moe-pk-expert-bias-balancing with --moe-router-type {router_type}: this per-expert bias acts on the "
            "product-key candidate grid; fix: --moe-router-type product_key, or Megatron's "
            "--moe-router-enable-expert-bias for the dense router"
        )
    layout = None
    if router_type == "product_key":
        experts = get("num_moe_experts")
        layout = product_key_layout(  # null experts (--moe-null-experts) are cells of the grid too
            None if experts is None else experts + null_expert_count(get),
            get("moe_router_topk"),
            heads=get("moe_pk_heads"),
            key_dim=get("moe_pk_key_dim"),
            subkey_topk=get("moe_pk_subkey_topk"),
            grid_rows=get("moe_pk_grid_rows"),
        )
        if expert_bias:
            check_expert_bias_candidates(layout)
    rule = get("moe_pk_bias_update_rule")
    if rule not in BIAS_UPDATE_RULES:
        raise ValueError(f"--moe-pk-bias-update-rule {rule!r} is unknown; fix: one of {', '.join(BIAS_UPDATE_RULES)}")
    if rule != "sign" and not (bias or expert_bias):  # another rule than Megatron's would change nothing
        raise ValueError(
            f"--moe-pk-bias-update-rule {rule} with no selection bias to update; fix: add --moe-pk-bias-balancing "
            "and/or --moe-pk-expert-bias-balancing, or drop the rule"
        )
    return RouterSettings(
        router_type=router_type, noisy_gating=bool(get("moe_router_noisy_gating")), pk_layout=layout,
        pk_key_dim=get("moe_pk_key_dim"), pk_query_norm=get("moe_pk_query_norm"), pk_bias_balancing=bias,
        pk_expert_bias_balancing=expert_bias, pk_bias_update_rule=rule,
        expert_choice=expert_choice_settings(get), relu=relu_router_settings(get), null_experts=null_expert_count(get),
    )


def check_expert_bias_candidates(layout: ProductKeyLayout) -> None:
    """The per-expert selection bias re-ranks each token's candidate pairs, so a head needs more
    candidate pairs (k'1 x k'2) than slots (k); otherwise every candidate is chosen and the bias is
    a silent no-op. Since k' >= k <= each side, that fails only for k = k' = 1."""
    k1, k2 = min(layout.subkey_topk, layout.rows), min(layout.subkey_topk, layout.cols)
    if k1 * k2 <= layout.k:
        raise ValueError(
            f"--moe-pk-expert-bias-balancing with top-k per head {layout.k}, --moe-pk-subkey-topk {layout.subkey_topk} "
            f"on a {layout.rows} x {layout.cols} grid: each token has {k1} x {k2} = {k1 * k2} candidate pairs for "
            f"{layout.k} slots, so a per-expert bias cannot change the selection; fix: --moe-pk-subkey-topk 2 "
            "(or more: more candidate pairs than slots), or --moe-pk-bias-balancing alone"
        )
