"""Null (zero-computation) expert settings (MoE++, Jin et al., ICLR 2025; AdaMoE, Zeng et al. 2024).

Pure Python (no torch). ``--moe-null-experts M`` adds M router outputs that no expert computes: a
token whose slot goes to one spends no expert compute there.

The router then has N + M outputs (ids N..N+M-1 are null) and everything it computes over them
(Megatron's score functions, aux losses, z-loss, expert bias, capacity; our balance losses and load
metrics) sees N + M columns; only the N real columns go to the dispatcher. Balancing counts the null
experts as ordinary experts (AdaMoE, Zeng et al. 2024, arXiv 2406.13233: the usual load balance over
all N + M; MoE++, arXiv 2410.07348: its heterogeneous load balance, whose factor tau for the
zero-computation experts is 1 here), so at balance a fraction M / (N + M) of the slots is null.
Refused: the flex dispatcher (it re-takes a top-k of the real probs), Megatron's group-limited
routing (its groups are device groups of real experts) and the device/communication balance losses
(null experts live on no EP rank).
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
    if get("moe_router_num_groups") or get("moe_router_group_topk"):
        raise ValueError(
            f"--moe-null-experts {m} with --moe-router-num-groups/--moe-router-group-topk: the groups are device "
            "groups of real experts and null experts live on no device; fix: drop the group-limited routing"
        )
    if get("moe_token_dispatcher_type") == "flex":
        raise ValueError(
            f"--moe-null-experts {m} with --moe-token-dispatcher-type flex: the flex (DeepEP) dispatcher takes each "
            "token's top-k of the real probs and would dispatch the null slots to real experts; fix: "
            "--moe-token-dispatcher-type allgather (or alltoall)"
        )
    losses = get("moe_balance_losses") or []
    on_devices = [name for name in losses if name in ("device", "communication")]
    if on_devices:
        raise ValueError(
            f"--moe-null-experts {m} with --moe-balance-losses {' '.join(on_devices)}: these balance the EP ranks' "
            "loads and null experts live on no EP rank; fix: expert, global_expert or sequence"
        )
    return int(m)
