"""Load balancing: pure losses (``losses``) and cheap per-step metrics (``metrics``), torch only.

No process groups and no Megatron here: callers pass counts already all-reduced over the group their
variant needs, and attach the returned loss to backward themselves.
"""

from megatron_moe_ext.balancing.losses import (
    GRANULARITY_POLICIES,
    coefficient_for_granularity,
    communication_balance_loss,
    device_balance_loss,
    device_token_counts,
    expected_devices_per_token,
    expert_balance_loss,
    expert_counts,
    global_batch_balance_loss,
    sequence_balance_loss,
    sequence_counts,
    subkey_candidate_loss,
    subkey_counts,
    subkey_marginal_loss,
)
from megatron_moe_ext.balancing.metrics import (
    SubkeyUsage,
    UsageWindow,
    device_max_violation,
    load_entropy,
    max_violation,
    max_violation_per_rank,
    subkey_usage,
)

__all__ = [
    "GRANULARITY_POLICIES",
    "SubkeyUsage",
    "UsageWindow",
    "coefficient_for_granularity",
    "communication_balance_loss",
    "device_balance_loss",
    "device_max_violation",
    "device_token_counts",
    "expected_devices_per_token",
    "expert_balance_loss",
    "expert_counts",
    "global_batch_balance_loss",
    "load_entropy",
    "max_violation",
    "max_violation_per_rank",
    "sequence_balance_loss",
    "sequence_counts",
    "subkey_candidate_loss",
    "subkey_counts",
    "subkey_marginal_loss",
    "subkey_usage",
]
