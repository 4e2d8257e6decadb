"""Once-per-step updates of selection biases (auxiliary-loss-free balancing), hooked into Megatron.

Megatron updates its own ``expert_bias`` inside ``finalize_model_grads`` and only for
``--moe-router-enable-expert-bias``. Our product-key router keeps separable row/column biases
instead, so we need the same once-per-global-batch point. Megatron's training loop keeps a
``config.finalize_model_grads_func`` that a model builder installed ("Preserve a builder-installed
finalize hook", megatron/training/training.py), so this is a seam, not a patch:
``MoEExtConfig`` installs ``finalize_model_grads_with_balancing`` when a bias-balancing option is on.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.utils import get_attr_wrapped_model


def update_balancing_biases(model: list[torch.nn.Module]) -> None:
    """All-reduce every bias-balancing module's local counts in one call, then update its biases."""
    modules = [
        module
        for chunk in model
        for module in get_attr_wrapped_model(chunk, "modules")()
        if hasattr(module, "balancing_counts") and module.training and module.balancing_counts()
    ]
    if not modules:
        return
    counts = [c for m in modules for c in m.balancing_counts()]
    flat = torch.cat([c.reshape(-1).float() for c in counts])
    group = modules[0].tp_dp_cp_group
    if torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(flat, group=group)
    reduced = iter(torch.split(flat, [c.numel() for c in counts]))
    for module in modules:
        local = module.balancing_counts()
        module.apply_bias_update(*(next(reduced).view_as(c) for c in local))


def finalize_model_grads_with_balancing(
    model: list[torch.nn.Module],
    num_tokens: torch.Tensor | None = None,
    pg_collection=None,
    force_all_reduce: bool | None = False,
) -> None:
    """Megatron's ``finalize_model_grads`` followed by our bias updates (same signature)."""
    finalize_model_grads(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    update_balancing_biases(model)
