"""Optimizer parameter groups for PEER expert tables: their own learning rate and weight decay.

Memory-layer work trains value tables at their own rate (Berges et al. 2024 use a fixed 1e-3), so
--moe-peer-table-lr-mult scales the tables' max and min learning rate and
--moe-peer-table-wd-mult their weight decay, through Megatron's own mechanism: a
``ParamKey(attr="peer_table")`` -> ``ParamGroupOverride`` entry in the ``config_overrides`` that
``get_megatron_optimizer`` turns into parameter groups (PEERLayer tags u and v with
``peer_table``). The LR schedule keeps its shape: Megatron's scheduler follows each group's
max_lr/min_lr.

megatron.training builds those overrides in ``get_megatron_optimizer_config(args)`` with no hook
for extra entries, so ``install_peer_optimizer_groups`` wraps that function (the only patch here;
the wrapper adds our entry and changes nothing else). Callers building their own optimizer use
``peer_table_overrides`` directly.
"""

from __future__ import annotations

from typing import Any

from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer_config import ParamKey

PEER_TABLE_ATTR = "peer_table"


def peer_table_overrides(optimizer_config: OptimizerConfig, lr_mult: float = 1.0, wd_mult: float = 1.0) -> dict:
    """``{ParamKey(attr='peer_table'): override}`` for Megatron's config_overrides (empty when both
    multipliers are 1)."""
    for name, value in (("moe_peer_table_lr_mult", lr_mult), ("moe_peer_table_wd_mult", wd_mult)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0; fix: e.g. 1.0 (unchanged) or 0 (frozen / no decay)")
    override: dict[str, Any] = {}
    if lr_mult != 1.0:
        override["max_lr"] = optimizer_config.lr * lr_mult
        override["min_lr"] = (optimizer_config.min_lr or 0.0) * lr_mult
    if wd_mult != 1.0:
        override["wd_mult"] = wd_mult
    return {ParamKey(attr=PEER_TABLE_ATTR): override} if override else {}


def install_peer_optimizer_groups() -> None:
    """Make megatron.training's optimizer setup add the PEER table groups from its args
    (idempotent)."""
    from megatron.training import training

    original = training.get_megatron_optimizer_config
    if getattr(original, "_megatron_moe_ext", False):
        return

    def get_megatron_optimizer_config(args):
        config, overrides = original(args)
        extra = peer_table_overrides(
            config,
            getattr(args, "moe_peer_table_lr_mult", 1.0),
            getattr(args, "moe_peer_table_wd_mult", 1.0),
        )
        if extra and getattr(args, "moe_peer_num_experts", None):
            overrides = {**(overrides or {}), **extra}
        return config, overrides

    get_megatron_optimizer_config._megatron_moe_ext = True  # type: ignore[attr-defined]
    training.get_megatron_optimizer_config = get_megatron_optimizer_config
