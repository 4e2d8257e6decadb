"""Expert-choice router settings (``ExpertChoiceSettings``; Zhou et al. 2022, arXiv 2202.09368).

Pure Python (no torch). Each expert takes its top-c tokens of the token group, c =
ceil(group tokens x top-k / experts x capacity factor); the group is a data-parallel rank's
micro-batch (the whole sequence under sequence parallelism), so the choice does not depend on the
tensor/sequence/expert-parallel layout. At evaluation a causal rule replaces the batch choice
(``EC_EVAL_RULES``): 'threshold' was measured closer to the batch choice than 'token_choice' on the
demo model (see ``DEFAULT_EC_EVAL_RULE``).

Refused (each with the reason and the fix): Megatron routing options that assume token choice or a
static number of routed tokens, Megatron's auxiliary balance losses and ours (expert choice is
balanced by construction: every expert takes exactly c tokens of every group), and context
parallelism (the group would span CP ranks; not implemented).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EC_EVAL_RULES = ("threshold", "token_choice")
# Chosen by measurement (2026-12-07, 2-core CPU): the demo model (`megatron-moe-ext train --moe-router-type
# expert_choice --moe-aux-loss-coeff 0 --moe-token-dispatcher-type allgather --train-iters 200 --eval-interval 100
# --eval-iters 8`, seeds 1234 and 4321), its iteration-200 checkpoint evaluated with --skip-train under each rule on
# the same validation batches. Validation loss, batch choice / threshold / token_choice: seed 1234 2.6345 / 2.6319 /
# 2.6427; seed 4321 2.6111 / 2.6129 / 2.6316 (test split: 2.2500 / 2.2492 / 2.2498 and 2.3238 / 2.3223 / 2.3266).
# The threshold rule stays within 0.003 of the batch choice and beats token choice in all four comparisons.
DEFAULT_EC_EVAL_RULE = "threshold"
# Decay of the running estimate of each expert's threshold (an exponential moving average of the c-th best
# score over training micro-batches, bias-corrected; layers/expert_choice_router.py): a horizon of ~100 updates.
EC_THRESHOLD_DECAY = 0.99
# Dispatchers that take a variable number of routed tokens: allgather counts them (tokens_per_expert.sum()),
# alltoall through the integration row variable-experts-alltoall; flex (DeepEP) rebuilds a fixed top-k per token.
EC_DISPATCHERS = ("alltoall", "allgather")

# Megatron's auxiliary load-balancing losses (--moe-router-load-balancing-type) and why expert choice refuses them.
_AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")
_BALANCED = ("expert choice is balanced by construction (every expert takes exactly c tokens of each group), so a "
             "load-balancing loss has nothing to balance and would only flatten the router's scores")


@dataclass(frozen=True)
class ExpertChoiceSettings:
    """``capacity_factor`` f and ``eval_rule``; ``capacity(tokens)`` is c for a token group."""

    capacity_factor: float
    eval_rule: str
    topk: int
    num_experts: int

    def capacity(self, tokens: int) -> int:
        """c = ceil(tokens x k / E x f), at most ``tokens``: the tokens each expert takes from a group."""
        return min(tokens, max(1, math.ceil(tokens * self.topk / self.num_experts * self.capacity_factor)))


def _aux_coefficients(types: Any, coeffs: Any) -> list[tuple[str, float]]:
    """(type, coefficient) pairs of Megatron's --moe-router-load-balancing-type / --moe-aux-loss-coeff."""
    types = types if isinstance(types, list) else [types]
    if not isinstance(coeffs, list):
        coeffs = [coeffs] * len(types)
    return [(t, float(c or 0.0)) for t, c in zip(types, coeffs)]


def check_expert_choice_options(get: Callable[[str], Any]) -> None:
    """Refuses what the expert-choice router cannot honour (reads Megatron's fields and ours by name)."""
    prefix = "--moe-router-type expert_choice with"
    for balancing, coeff in _aux_coefficients(get("moe_router_load_balancing_type"), get("moe_aux_loss_coeff")):
        if balancing in ("sinkhorn", "quantile_balancing"):
            raise ValueError(
                f"{prefix} --moe-router-load-balancing-type {balancing}: it chooses experts per token, expert choice "
                "chooses tokens per expert; fix: --moe-router-load-balancing-type none"
            )
        if balancing in _AUX_LOSS_TYPES and coeff > 0:
            raise ValueError(
                f"{prefix} --moe-router-load-balancing-type {balancing} --moe-aux-loss-coeff {coeff:g}: {_BALANCED}; "
                "fix: --moe-aux-loss-coeff 0 (or --moe-router-load-balancing-type none); --moe-z-loss-coeff is allowed"
            )
    if get("moe_balance_losses") or get("moe_balance_metrics"):
        raise ValueError(
            f"{prefix} --moe-balance-losses/--moe-balance-metrics: {_BALANCED}, and each expert's load is c; fix: drop "
            "them (the router logs active_experts and ec_unrouted_fraction instead)"
        )
    score_function = get("moe_router_score_function")
    if score_function != "softmax":
        raise ValueError(
            f"{prefix} --moe-router-score-function {score_function}: its scores are the softmax over all experts "
            "(Zhou et al. 2022, Eq. 1); fix: --moe-router-score-function softmax"
        )
    scaling = get("moe_router_topk_scaling_factor")
    dispatcher = get("moe_token_dispatcher_type")
    refusals = [
        (get("moe_router_enable_expert_bias"), "--moe-router-enable-expert-bias",
         "a selection bias re-ranks experts per token; expert choice ranks tokens per expert and is balanced "
         "already; fix: drop it"),
        (get("moe_router_num_groups") or get("moe_router_group_topk"), "--moe-router-num-groups/--moe-router-group-topk",
         "group-limited routing limits the experts of a token; fix: drop them"),
        (get("moe_router_fusion"), "--moe-router-fusion", "TE's fused kernel is a per-token top-k; fix: drop it"),
        (get("moe_router_force_load_balancing"), "--moe-router-force-load-balancing",
         "it replaces the logits by random ones for token choice; fix: drop it"),
        (get("moe_router_force_biased") is not None, f"--moe-router-force-biased {get('moe_router_force_biased')}",
         "it biases token-choice logits for benchmarks; fix: drop it"),
        (get("moe_enable_routing_replay"), "--moe-enable-routing-replay",
         "replay records per-token top-k indices; fix: drop it"),
        (get("moe_expert_capacity_factor") is not None,
         f"--moe-expert-capacity-factor {get('moe_expert_capacity_factor')}",
         "expert choice has its own capacity (each expert takes exactly c tokens); fix: drop it and set "
         "--moe-ec-capacity-factor"),
        (get("moe_permute_fusion"), "--moe-permute-fusion",
         "TE's fused permute needs a static number of routed tokens (tokens x top-k), which expert choice does "
         "not have per rank; fix: drop it"),
        (dispatcher not in EC_DISPATCHERS, f"--moe-token-dispatcher-type {dispatcher}",
         "expert choice routes a variable number of tokens per rank, and the flex (DeepEP) dispatcher rebuilds a "
         "fixed top-k per token; fix: --moe-token-dispatcher-type alltoall or allgather"),
        (scaling is not None, f"--moe-router-topk-scaling-factor {scaling}",
         "expert-choice gates are the token's softmax scores, not renormalised; fix: drop it"),
        (get("moe_router_noisy_gating"), "--moe-router-noisy-gating",
         "noisy top-k gating explores per token; fix: drop it"),
        ((get("context_parallel_size") or 1) > 1, f"--context-parallel-size {get('context_parallel_size')}",
         "the token group (a micro-batch) would span context-parallel ranks, which this router does not gather; "
         "fix: --context-parallel-size 1 (sequence parallelism is supported)"),
    ]
    for bad, flag, why in refusals:
        if bad:
            raise ValueError(f"{prefix} {flag}: {why}")


def expert_choice_settings(get: Callable[[str], Any]) -> ExpertChoiceSettings | None:
    """The expert-choice settings (None for another router), checked; reads by MoEExtConfig field name."""
    if get("moe_router_type") != "expert_choice":
        return None
    factor, rule = get("moe_ec_capacity_factor"), get("moe_ec_eval_rule")
    if factor is None or not factor > 0 or not math.isfinite(factor):
        raise ValueError(
            f"--moe-ec-capacity-factor {factor}: each expert takes ceil(tokens x top-k / experts x factor) tokens, "
            "so the factor must be finite and > 0; fix: e.g. 1.0 (the mean compute of top-k token choice)"
        )
    if rule not in EC_EVAL_RULES:
        raise ValueError(f"--moe-ec-eval-rule {rule!r} is unknown; fix: one of {', '.join(EC_EVAL_RULES)}")
    experts = get("num_moe_experts")
    if experts is None:
        raise ValueError("--moe-router-type expert_choice needs MoE experts; fix: set --num-experts or --moe-granularity")
    check_expert_choice_options(get)
    return ExpertChoiceSettings(capacity_factor=float(factor), eval_rule=rule, topk=get("moe_router_topk"),
                                num_experts=experts)
