"""Null (zero-computation) expert settings (MoE++, Jin et al., ICLR 2025; AdaMoE, Zeng et al. 2024).

Pure Python (no torch). ``--moe-null-experts M`` adds M router outputs that no expert computes: a
token whose slot goes to one spends no expert compute there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Routers that can take null experts, and why the others cannot.
NULL_EXPERT_ROUTERS = ("topk", "product_key", "expert_choice")
_NULL_REFUSALS = {
    "relu": "a ReLU gate of zero already skips an expert, so the ReLU router's compute is variable without "
            "null experts; fix: drop --moe-null-experts (tune --moe-relu-target-sparsity instead)",
}


def null_expert_count(get: Callable[[str], Any]) -> int:
    """M, checked against the router (0: none)."""
    m = get("moe_null_experts")
    if m is None or m == 0:
        return 0
    if m < 0:
        raise ValueError(f"--moe-null-experts {m} must be >= 0")
    router = get("moe_router_type")
    if router in _NULL_REFUSALS:
        raise ValueError(f"--moe-null-experts {m} with --moe-router-type {router}: {_NULL_REFUSALS[router]}")
    if get("num_moe_experts") is None:
        raise ValueError(f"--moe-null-experts {m} needs MoE layers; fix: set --num-experts or --moe-granularity "
                         "(PEER layers take no null experts)")
    return int(m)
