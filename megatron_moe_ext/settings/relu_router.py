"""ReLU router settings (``ReluRouterSettings``; ReMoE, Wang et al., ICLR 2025, arXiv 2412.14711).

Pure Python (no torch). Gates are ReLU(router logits); an L1 penalty on the gates, whose coefficient
is multiplied by ``update_rate`` when the gates are denser than ``target_sparsity`` and divided by it
when sparser, steers the mean number of active experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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
