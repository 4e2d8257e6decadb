"""``MoEExtSettings``: every feature's settings of one run, built and checked by ``build_settings``.

The flag path (``args.apply_ext_args``, in the launcher before any rank starts) and the config
(``MoEExtConfig.__post_init__``) both call ``build_settings`` with a getter by MoEExtConfig /
TransformerConfig field name, so every value is derived and every combination checked by the same
code, once. Pure Python: no torch, no Megatron.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from megatron_moe_ext.settings.balancing import BalanceSettings, balance_settings
from megatron_moe_ext.settings.experts import ExpertSettings, expert_settings
from megatron_moe_ext.settings.granularity import GranularitySettings, granularity_settings
from megatron_moe_ext.settings.peer import PEERSettings, peer_settings
from megatron_moe_ext.settings.router import RouterSettings, router_settings

Getter = Callable[[str], Any]

# What the variable-compute routers record in Megatron's MoE metrics tracker (issue #22's contract).
# relu_l1_coeff_log10: Megatron's console prints non-loss metrics with 2 decimals, where 1e-8 reads 0.00.
RELU_METRICS = ("relu_l1_loss", "relu_l1_coeff", "relu_l1_coeff_log10", "relu_sparsity", "active_experts")
NULL_EXPERT_METRICS = ("null_fraction", "active_experts")
EXPERT_CHOICE_METRICS = ("active_experts", "ec_unrouted_fraction")


def routing_metric_names(router: RouterSettings) -> tuple[str, ...]:
    """The routing metrics the router of these settings records (appended to the tracked names, so every
    rank, pipeline stages without MoE layers included, reports the same names)."""
    names: list[str] = []
    if router.relu is not None:
        names += RELU_METRICS
    if router.expert_choice is not None:
        names += EXPERT_CHOICE_METRICS
    if router.null_experts:
        names += NULL_EXPERT_METRICS
    return tuple(dict.fromkeys(names))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEExtSettings:
    """The validated settings of every feature; ``derived`` holds the TransformerConfig values they
    determine (the granularity's sizes and the top-k), as (field name, value) pairs."""

    granularity: GranularitySettings
    experts: ExpertSettings
    router: RouterSettings
    balance: BalanceSettings
    peer: PEERSettings
    derived: tuple[tuple[str, Any], ...] = dataclasses.field(compare=False)  # what the caller writes back

    @property
    def needs_step_hook(self) -> bool:
        """Once-per-step work (selection-bias updates, global-batch counts, step metrics): the config
        installs ``finalize_model_grads_with_balancing``."""
        return self.router.selection_biases or self.balance.needs_step_hook or self.router.relu is not None


def build_settings(get: Getter, *, default_topk: int) -> MoEExtSettings:
    """All settings from ``get(name)``, in a fixed order: granularity first (its derived sizes are what
    the other features see), then experts, router, balancing, PEER.

    ``get("moe_router_topk")`` reads None when the top-k was not set (see ``granularity_settings``);
    it is then derived from the granularity, or ``default_topk`` (Megatron's default).
    """
    granularity = granularity_settings(get)
    derived = granularity.derived()
    if derived.get("moe_router_topk", get("moe_router_topk")) is None:
        derived["moe_router_topk"] = default_topk

    def resolved(name: str) -> Any:
        return derived[name] if name in derived else get(name)

    router = router_settings(resolved)
    balance = balance_settings(resolved)
    # Megatron's report prints only the tracked names: the routing metrics join the balance ones.
    extra = tuple(name for name in routing_metric_names(router) if name not in balance.tracked_names)
    balance = dataclasses.replace(balance, tracked_names=balance.tracked_names + extra)
    return MoEExtSettings(
        granularity=granularity,
        experts=expert_settings(resolved),
        router=router,
        balance=balance,
        peer=peer_settings(resolved),
        derived=tuple(derived.items()),
    )
