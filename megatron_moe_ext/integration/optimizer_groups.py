"""Optimizer parameter groups for PEER expert tables: their own learning rate and weight decay.

Memory-layer work trains value tables at their own rate (Berges et al. 2024 use a fixed 1e-3), so
--moe-peer-table-lr-mult scales the tables' max and min learning rate and
--moe-peer-table-wd-mult their weight decay, through Megatron's own mechanism: a
``ParamKey(attr="peer_table")`` -> ``ParamGroupOverride`` entry in the ``config_overrides`` that
``get_megatron_optimizer`` turns into parameter groups (PEERLayer tags u and v with
``peer_table``). The LR schedule keeps its shape: Megatron's scheduler follows each group's
max_lr/min_lr.

megatron.training builds those overrides in ``get_megatron_optimizer_config(args)`` with no hook
for extra entries, so the integration table's row ``peer-optimizer-groups`` wraps that function
(``wrap_get_megatron_optimizer_config``: it adds our entry and changes nothing else). Callers building their own optimizer use
``peer_table_overrides`` directly.
"""

from __future__ import annotations

from typing import Any

from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer_config import ParamKey

PEER_TABLE_ATTR = "peer_table"


def peer_table_overrides(optimizer_config: OptimizerConfig, lr_mult: float, wd_mult: float) -> dict:
    """``{ParamKey(attr='peer_table'): override}`` for Megatron's config_overrides (empty when both
    multipliers are 1; the settings, ``settings/peer.py``, refuse negative ones)."""
    override: dict[str, Any] = {}
    if lr_mult != 1.0:
        override["max_lr"] = optimizer_config.lr * lr_mult
        override["min_lr"] = (optimizer_config.min_lr or 0.0) * lr_mult
    if wd_mult != 1.0:
        override["wd_mult"] = wd_mult
    return {ParamKey(attr=PEER_TABLE_ATTR): override} if override else {}


def wrap_get_megatron_optimizer_config(original):
    """Row ``peer-optimizer-groups``: Megatron's optimizer config plus the PEER table groups from its args."""

    def get_megatron_optimizer_config(args):
        from megatron_moe_ext.args import settings_from_args

        config, overrides = original(args)
        peer = settings_from_args(args).peer
        if peer.enabled:
            extra = peer_table_overrides(config, peer.table_lr_mult, peer.table_wd_mult)
            if extra:
                overrides = {**(overrides or {}), **extra}
        return config, overrides

    return get_megatron_optimizer_config
