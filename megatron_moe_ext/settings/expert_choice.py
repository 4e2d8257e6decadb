"""Expert-choice router settings (``ExpertChoiceSettings``; Zhou et al. 2022, arXiv 2202.09368).

Pure Python (no torch). Each expert takes its top-c tokens of the token group, c =
ceil(group tokens x top-k / experts x capacity factor); the group is a data-parallel rank's
micro-batch (the whole sequence under sequence parallelism), so the choice does not depend on the
parallel layout. At evaluation a causal rule replaces the batch choice (``EC_EVAL_RULES``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EC_EVAL_RULES = ("threshold", "token_choice")
DEFAULT_EC_EVAL_RULE = "threshold"


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


def expert_choice_settings(get: Callable[[str], Any]) -> ExpertChoiceSettings | None:
    """The expert-choice settings (None for another router), checked; reads by MoEExtConfig field name."""
    factor, rule = get("moe_ec_capacity_factor"), get("moe_ec_eval_rule")
    if get("moe_router_type") != "expert_choice":
        return None
    if factor is None or not factor > 0:
        raise ValueError(
            f"--moe-ec-capacity-factor {factor}: each expert takes ceil(tokens x top-k / experts x factor) tokens, "
            "so the factor must be > 0; fix: e.g. 1.0 (the mean compute of top-k token choice)"
        )
    if rule not in EC_EVAL_RULES:
        raise ValueError(f"--moe-ec-eval-rule {rule!r} is unknown; fix: one of {', '.join(EC_EVAL_RULES)}")
    experts = get("num_moe_experts")
    if experts is None:
        raise ValueError("--moe-router-type expert_choice needs MoE experts; fix: set --num-experts or --moe-granularity")
    return ExpertChoiceSettings(capacity_factor=float(factor), eval_rule=rule, topk=get("moe_router_topk"),
                                num_experts=experts)
