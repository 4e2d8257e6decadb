"""ReLU router settings (``ReluRouterSettings``; ReMoE, Wang et al., ICLR 2025, arXiv 2412.14711).

Pure Python (no torch). Gates are ReLU(router logits); an L1 penalty on the gates, whose coefficient
is multiplied by ``update_rate`` when the gates are denser than ``target_sparsity`` and divided by it
when sparser, steers the mean number of active experts per token.

Megatron routing options the ReLU router cannot honour are refused here (``RELU_REFUSALS``), before
any rank starts. Honoured: the z-loss (on the logits), input jitter, the router dtype, padding masks,
capacity dropping (on the ReLU routing map), ``--moe-router-pre-softmax`` (no softmax to take first:
no effect; Megatron requires it with top-k 1), and Megatron's aux_loss (its scores for aux losses,
softmax or sigmoid over all experts, with the ReLU routing map as the load; seq_aux_loss and
global_aux_loss are refused: Megatron infers their token counts as selections / top-k; ReMoE's own
Megatron fork ignores aux losses, its L1 penalty being load-weighted
already: ``--moe-router-load-balancing-type none`` trains as the paper did). ``--moe-balance-metrics``
works (loads of a variable number of experts per token); ``--moe-balance-losses`` is refused (each
normalises by a fixed top-k; the L1 penalty is ReMoE's balance term).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Routing methods that replace top-k selection: ReLU gates are a selection of their own.
_RELU_ROUTING_TYPES = {
    "sinkhorn": "Sinkhorn routing replaces the gates by its own top-1 assignment",
    "quantile_balancing": "quantile balancing selects top-k through a per-expert dual bias",
    "seq_aux_loss": "Megatron computes it from a top-k map (tokens = selections / top-k)",
    "global_aux_loss": "Megatron computes it from a top-k map (tokens = selections / top-k)",
}


def _relu_refusals(get: Callable[[str], Any]) -> list[tuple[bool, str, str]]:
    """(is set, flag, why and fix) of every option the ReLU router cannot honour."""
    return [
        (get("moe_token_dispatcher_type") == "flex", "--moe-token-dispatcher-type flex",
         "the flex (DeepEP) dispatcher takes each token's top-k of the probs, a fixed number of experts; fix: "
         "--moe-token-dispatcher-type allgather (or alltoall)"),
        (bool(get("moe_router_enable_expert_bias")), "--moe-router-enable-expert-bias",
         "the auxiliary-loss-free expert bias shifts a top-k selection, which ReLU routing does not make; fix: drop "
         "it (the load-weighted L1 penalty balances the experts)"),
        (bool(get("moe_router_num_groups") or get("moe_router_group_topk")),
         "--moe-router-num-groups/--moe-router-group-topk",
         "group-limited routing restricts a top-k selection; fix: drop them"),
        (bool(get("moe_router_fusion")), "--moe-router-fusion", "TE's fused kernel computes top-k gates; fix: drop it"),
        (bool(get("moe_router_force_load_balancing")), "--moe-router-force-load-balancing",
         "random logits would make the sparsity target meaningless; fix: drop it"),
        (bool(get("moe_enable_routing_replay")), "--moe-enable-routing-replay",
         "replay records top-k indices; fix: drop it"),
        (get("moe_router_topk_scaling_factor") is not None, "--moe-router-topk-scaling-factor",
         "the gates are ReLU(logits), whose scale the router learns; fix: drop it"),
        (bool(get("moe_router_noisy_gating")), "--moe-router-noisy-gating",
         "noise on the logits would switch gates on and off at random; fix: drop it (or --moe-input-jitter-eps)"),
        (bool(get("moe_balance_losses")), "--moe-balance-losses",
         "each of them normalises by a fixed top-k while ReLU routing has a variable number of experts per token, "
         "and ReMoE's load-weighted L1 penalty is its balance term; fix: drop it (--moe-balance-metrics works), "
         "or Megatron's --moe-router-load-balancing-type aux_loss"),
    ]


@dataclass(frozen=True)
class ReluRouterSettings:
    """Target fraction of zero gates, the initial L1 coefficient and its multiplicative step."""

    target_sparsity: float
    l1_coeff: float
    update_rate: float

    def target_active(self, num_experts: int) -> float:
        """Mean active experts per token at the target: (1 - sparsity) x experts."""
        return (1.0 - self.target_sparsity) * num_experts


def relu_router_settings(get: Callable[[str], Any]) -> ReluRouterSettings | None:
    """The ReLU-router settings (None for another router), checked; reads by MoEExtConfig field name."""
    if get("moe_router_type") != "relu":
        return None
    experts, topk = get("num_moe_experts"), get("moe_router_topk")
    if experts is None:
        raise ValueError("--moe-router-type relu needs MoE experts; fix: set --num-experts or --moe-granularity")
    balancing = get("moe_router_load_balancing_type")
    for name in balancing if isinstance(balancing, list) else [balancing]:
        if name in _RELU_ROUTING_TYPES:
            raise ValueError(
                f"--moe-router-type relu with --moe-router-load-balancing-type {name}: {_RELU_ROUTING_TYPES[name]}; "
                "fix: aux_loss or none"
            )
    for is_set, flag, why in _relu_refusals(get):
        if is_set:
            raise ValueError(f"--moe-router-type relu with {flag}: {why}")
    target = get("moe_relu_target_sparsity")
    if target is None:
        target = 1.0 - topk / experts
    if not 0.0 < target < 1.0:
        raise ValueError(
            f"--moe-relu-target-sparsity {target}: the target fraction of zero gates must be in (0, 1); fix: e.g. "
            f"{1.0 - topk / experts if 0 < topk < experts else 0.75} (1 - top-k / experts, the compute of top-k routing)"
        )
    coeff, rate = get("moe_relu_l1_coeff"), get("moe_relu_l1_update_rate")
    if not coeff > 0:
        raise ValueError(f"--moe-relu-l1-coeff {coeff} must be > 0 (it is adapted multiplicatively); fix: e.g. 1e-8")
    if not rate > 1:
        raise ValueError(f"--moe-relu-l1-update-rate {rate} must be > 1 (multiplicative step); fix: e.g. 1.2")
    return ReluRouterSettings(target_sparsity=float(target), l1_coeff=float(coeff), update_rate=float(rate))
