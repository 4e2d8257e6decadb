"""Which balance losses and metrics a run uses (``BalanceSettings``), built once for the flags and the config.

Pure Python, no process groups and no model: ``balance_settings`` runs from ``args.apply_ext_args``
(before any process group exists) and from ``MoEExtConfig.__post_init__`` (through
``settings.build_settings``); every refusal (``check_balance_settings``) is a ValueError naming the
values and the fix. ``balance_coefficients`` turns the user's settings into the coefficient each loss
is attached with; ``tracked_names`` lists what the routers record in Megatron's MoE metrics tracker,
derived from the settings alone so that every rank (pipeline stages without MoE layers included)
appends the same names to Megatron's ``track_names``.

The losses (``losses.py``) and where each is attached (``attach.py``):

| name          | loss function (losses.py)          | counts all-reduced over            | logged as                  |
|---------------|------------------------------------|------------------------------------|----------------------------|
| expert        | global_batch_balance_loss, dp=1    | TP x CP (shards of the same tokens)| expert_balance_loss        |
| global_expert | global_batch_balance_loss, dp=DP   | TP x DP x CP, summed over the step | global_expert_balance_loss |
| sequence      | sequence_balance_loss              | TP x CP                            | seq_balance_loss           |
| device        | device_balance_loss                | TP x CP                            | device_balance_loss        |
| communication | communication_balance_loss         | none (what this rank sends)        | comm_balance_loss          |
| subkey        | subkey_marginal_loss (product keys)| TP x CP                            | subkey_balance_loss        |

PEER layers (``--moe-peer-num-experts``) take part in ``subkey`` and the metrics only: the same
flags turn them on (``subkey`` then needs product keys in the router *or* PEER layers, and a
PEER-only model, num_moe_experts None, may use ``subkey`` and the metrics); the other losses need
Megatron MoE layers. PEER's sub-key counts are all-reduced over the ranks holding distinct tokens of
the same sequence (TP x CP with sequence parallelism, CP otherwise: its retrieval is replicated on
TP ranks), its step load over those and DP (``balancing/peer.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

BALANCE_LOSSES = ("expert", "global_expert", "sequence", "device", "communication", "subkey")

# Name in Megatron's MoE metrics tracker (ends in "loss": Megatron prints it next to its own losses).
LOSS_LOG_NAMES = {
    "expert": "expert_balance_loss",
    "global_expert": "global_expert_balance_loss",
    "sequence": "seq_balance_loss",
    "device": "device_balance_loss",
    "communication": "comm_balance_loss",
    "subkey": "subkey_balance_loss",
}

# Coefficient of each loss when --moe-balance-coeffs is not given, at G = 1: the Switch
# Transformer's and Megatron's recommended aux-loss weight (arXiv 2101.03961, section 2.2).
DEFAULT_BALANCE_COEFF = 1e-2
# Multiplier of a G = 1 coefficient at granularity G for each policy (derivation in
# balancing/losses.py, coefficient_for_granularity).
GRANULARITY_POLICIES = {
    "constant": lambda g: 1.0,
    "constant_gradient": lambda g: math.sqrt(g),
    "constant_gradient_per_expert": lambda g: float(g),
}
# Policy applied to those default coefficients (see balance_coefficients).
DEFAULT_COEFF_POLICY = "constant_gradient"
COEFF_POLICIES = tuple(GRANULARITY_POLICIES)

# Step metrics (metrics.py semantics, computed in step_metrics.py), in the order they are logged.
LOAD_METRICS = ("max_violation", "load_entropy", "experts_used_fraction")
EP_METRICS = ("max_violation_ep_rank_max", "device_max_violation")
PRODUCT_KEY_METRICS = ("pk_rows_used", "pk_cols_used")

_EP_LOSSES = ("device", "communication")


def check_balance_settings(
    *,
    losses: Sequence[str] | None,
    coeffs: Sequence[float] | None,
    policy: str | None,
    metrics: bool,
    usage_window: int,
    router_type: str,
    num_experts: int | None,
    ep_size: int,
    peer_num_experts: int | None = None,
) -> None:
    """Refuses balance settings that would be ignored, contradict each other or cannot apply.

    ``peer_num_experts``: --moe-peer-num-experts (None = no PEER layer); PEER layers balance with
    ``subkey`` and record the metrics, so with them a model needs no Megatron MoE layer for those.
    """
    peer = peer_num_experts is not None
    if coeffs is not None and losses is None:
        raise ValueError(
            f"--moe-balance-coeffs {' '.join(map(str, coeffs))} without --moe-balance-losses: nothing would use "
            "them; fix: add --moe-balance-losses with one loss per coefficient (e.g. --moe-balance-losses expert)"
        )
    if policy is not None and losses is None:
        raise ValueError(
            f"--moe-balance-coeff-policy {policy} without --moe-balance-losses: no loss to scale; fix: add "
            "--moe-balance-losses, or drop --moe-balance-coeff-policy"
        )
    if policy is not None and policy not in COEFF_POLICIES:
        raise ValueError(f"--moe-balance-coeff-policy {policy!r} is unknown; choose from {', '.join(COEFF_POLICIES)}")
    if isinstance(usage_window, bool) or not isinstance(usage_window, int) or usage_window < 1:
        raise ValueError(f"--moe-balance-usage-window {usage_window!r} must be an int >= 1 (steps); fix: e.g. 100")
    if (losses is not None or metrics) and num_experts is None and not peer:
        what = "--moe-balance-losses" if losses is not None else "--moe-balance-metrics"
        raise ValueError(f"{what} needs MoE layers; fix: set --num-experts (or --moe-granularity), or "
                         "--moe-peer-num-experts for PEER layers (subkey loss and metrics)")
    if losses is None:
        return
    losses = list(losses)
    if not losses:
        raise ValueError("--moe-balance-losses is empty; fix: name at least one of " + ", ".join(BALANCE_LOSSES))
    for name in losses:
        if name not in BALANCE_LOSSES:
            raise ValueError(f"--moe-balance-losses {name!r} is unknown; choose from {', '.join(BALANCE_LOSSES)}")
    duplicates = sorted({n for n in losses if losses.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"--moe-balance-losses {' '.join(losses)} names {', '.join(duplicates)} more than once; fix: list each "
            "loss once (its weight goes in --moe-balance-coeffs)"
        )
    if coeffs is not None:
        coeffs = list(coeffs)
        if len(coeffs) != len(losses):
            raise ValueError(
                f"--moe-balance-coeffs has {len(coeffs)} values ({' '.join(map(str, coeffs))}) for "
                f"{len(losses)} losses ({' '.join(losses)}); fix: one coefficient per loss, in the same order"
            )
        for name, c in zip(losses, coeffs):
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
                raise ValueError(
                    f"--moe-balance-coeffs: {c!r} for the {name} loss must be a finite number >= 0; fix: a weight "
                    f"such as {DEFAULT_BALANCE_COEFF} (0 turns that loss off)"
                )
    if "subkey" in losses and router_type != "product_key" and not peer:
        raise ValueError(
            f"--moe-balance-losses subkey with --moe-router-type {router_type} and no PEER layer: the sub-key "
            "marginal loss balances the rows and columns of product-key grids, which this router does not have; "
            "fix: --moe-router-type product_key, or --moe-peer-num-experts (PEER layers), or the expert / "
            "global_expert loss for the dense router"
        )
    if num_experts is None:  # PEER-only model: only its own losses can apply
        others = [n for n in losses if n != "subkey"]
        if others:
            raise ValueError(
                f"--moe-balance-losses {' '.join(others)} without --num-experts: these balance Megatron MoE layers "
                "and this model has only PEER layers (which use the subkey loss); fix: --moe-balance-losses subkey, "
                "or add MoE layers with --num-experts"
            )
    for name in _EP_LOSSES:
        if name not in losses:
            continue
        if ep_size < 2:
            raise ValueError(
                f"--moe-balance-losses {name} with --expert-model-parallel-size {ep_size}: a {name}-level loss "
                "balances EP ranks, and with one rank it is the constant coefficient with no gradient; fix: "
                "--expert-model-parallel-size >= 2, or the expert / global_expert loss"
            )
        if num_experts % ep_size:
            raise ValueError(
                f"--moe-balance-losses {name}: --num-experts {num_experts} is not divisible by "
                f"--expert-model-parallel-size {ep_size} (Megatron places num_experts/EP experts per rank); fix: a "
                f"multiple of {ep_size} experts"
            )


def balance_coefficients(
    losses: Sequence[str] | None,
    coeffs: Sequence[float] | None,
    policy: str | None,
    granularity: int | None,
) -> list[tuple[str, float]]:
    """(loss, coefficient attached) for every requested loss, in order (0 = off).

    - No ``coeffs``: each loss gets ``DEFAULT_BALANCE_COEFF`` (a G = 1 weight) scaled by ``policy``,
      by default ``constant_gradient``: coeff * sqrt(G), which keeps the router weight's balance
      gradient norm the same at every granularity (at a fixed coefficient it falls as 1/sqrt(G);
      derivation and measurement in ``coefficient_for_granularity``).
    - ``coeffs`` given: used exactly as given, unless a ``policy`` is given too, which then reads
      them as G = 1 weights and scales them (explicit beats derived).
    """
    if not losses:
        return []
    g = granularity or 1
    if coeffs is None:
        base, policy = [DEFAULT_BALANCE_COEFF] * len(losses), policy or DEFAULT_COEFF_POLICY
    else:
        base, policy = list(coeffs), policy or "constant"
    return [(name, float(GRANULARITY_POLICIES[policy](g)) * float(c)) for name, c in zip(losses, base)]


def tracked_names(
    coefficients: Sequence[tuple[str, float]], *, metrics: bool, product_key: bool, ep_size: int
) -> list[str]:
    """Names the routers record in Megatron's MoE metrics tracker for these settings."""
    names = [LOSS_LOG_NAMES[name] for name, coeff in coefficients if coeff > 0]
    if metrics:
        names += list(LOAD_METRICS)
        if ep_size > 1:
            names += list(EP_METRICS)
        if product_key:
            names += list(PRODUCT_KEY_METRICS)
    return names


@dataclasses.dataclass(frozen=True, kw_only=True)
class BalanceSettings:
    """The balance losses and metrics of a run, resolved: ``coefficients`` are the (loss, coefficient)
    pairs attached, in order (0 = off), ``tracked_names`` what Megatron's MoE metrics tracker reports."""

    coefficients: tuple[tuple[str, float], ...]
    metrics: bool
    usage_window: int
    tracked_names: tuple[str, ...]

    @property
    def losses(self) -> tuple[tuple[str, float], ...]:
        """The losses that are on (coefficient > 0), with their coefficients."""
        return tuple((name, c) for name, c in self.coefficients if c > 0)

    @property
    def requested(self) -> bool:
        """Balance losses or metrics were asked for (a router that balances is needed)."""
        return bool(self.coefficients) or self.metrics

    @property
    def needs_step_hook(self) -> bool:
        """Work once per step: the global_expert loss's counts reset, or the metrics."""
        return "global_expert" in dict(self.coefficients) or self.metrics


def balance_settings(get: Callable[[str], Any]) -> BalanceSettings:
    """The balance settings, checked, reading by ``MoEExtConfig``/TransformerConfig field name through
    ``get(name)`` (the config, or Megatron's args through a name map)."""
    losses, coeffs, policy = get("moe_balance_losses"), get("moe_balance_coeffs"), get("moe_balance_coeff_policy")
    metrics, window = bool(get("moe_balance_metrics")), get("moe_balance_usage_window")
    router_type, peer_num_experts = get("moe_router_type"), get("moe_peer_num_experts")
    ep_size = get("expert_model_parallel_size") or 1
    check_balance_settings(
        losses=losses, coeffs=coeffs, policy=policy, metrics=metrics, usage_window=window, router_type=router_type,
        num_experts=get("num_moe_experts"), ep_size=ep_size, peer_num_experts=peer_num_experts,
    )
    coefficients = tuple(balance_coefficients(losses, coeffs, policy, get("moe_granularity")))
    names = tracked_names(
        coefficients, metrics=metrics, ep_size=ep_size,
        # PEER layers record the row/column usage too (their sub-key grids).
        product_key=router_type == "product_key" or peer_num_experts is not None,
    )
    return BalanceSettings(coefficients=coefficients, metrics=metrics, usage_window=window, tracked_names=tuple(names))
