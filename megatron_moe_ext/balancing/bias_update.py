"""Once-per-step balancing work, hooked into Megatron: bias updates (auxiliary-loss-free balancing),
step metrics and the reset of per-step buffers.

Megatron updates its own ``expert_bias`` inside ``finalize_model_grads`` and only for
``--moe-router-enable-expert-bias``. Our product-key router keeps separable row/column biases
instead, so we need the same once-per-global-batch point. Megatron's training loop keeps a
``config.finalize_model_grads_func`` that a model builder installed ("Preserve a builder-installed
finalize hook", megatron/training/training.py), so this is a seam, not a patch:
``MoEExtConfig`` installs ``finalize_model_grads_with_balancing`` when a bias-balancing option,
the global_expert balance loss or the balance metrics are on.

The same point ends a step for the balance losses and metrics (``balancing/attach.py``): the
global-batch counts accumulated over the step's micro-batches are reset here (Megatron resets its
own ``global_tokens_per_expert`` in ``reset_model_temporary_tensors`` only for its global_aux_loss),
and every layer's step load is all-reduced in one call and recorded as metrics. The finalize hook
runs once per training step, after the last micro-batch's backward and before the optimizer step
and Megatron's ``training_log`` (which reports the MoE metrics tracker); evaluation never calls it
and never counts (counting happens only in training forwards with gradients).

The same point adapts the ReLU router's L1 coefficient (``update_relu_coefficients``; ReMoE's
controller, ``relu_l1.py``): the step's zero-gate counts of every ReLU layer, indexed by layer
number, are summed over all ranks in one all-reduce (every rank calls it, pipeline stages without
a ReLU layer with zeros), so every rank computes the same coefficient from the same numbers.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.utils import get_attr_wrapped_model, get_model_config

from megatron_moe_ext.balancing.relu_l1 import adapted_l1_coeff
from megatron_moe_ext.settings import ext_settings


def selection_bias_step(counts: torch.Tensor, rule: str = "sign") -> torch.Tensor:
    """The update direction of auxiliary-loss-free selection biases (times the rate), per entry of the
    last dim, from the step's all-reduced selection counts (any leading dims, e.g. heads).

    'sign': sign(mean - count), Megatron's expert-bias rule (Wang et al. 2024, arXiv 2408.15664);
    'relative': clamp((mean - count) / mean, -1, 1), proportional to the relative deviation, so the
    steps shrink as the load nears the mean instead of flipping by the full rate around it, and
    saturate at the sign rule's step (a bin with no selections, or twice the mean, moves by the
    full rate; counts of zero stay defined at a million experts)."""
    mean = counts.mean(dim=-1, keepdim=True)
    if rule == "sign":
        return torch.sign(mean - counts)
    if rule == "relative":
        return ((mean - counts) / mean.clamp(min=1e-6)).clamp(-1.0, 1.0)
    raise ValueError(f"bias update rule {rule!r} is unknown; fix: 'sign' or 'relative'")


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


def finish_balancing_step(model: list[torch.nn.Module]) -> None:
    """Record every balancing router's and PEER layer's step metrics (one all-reduce of all their
    step loads per counting group) and reset their per-step buffers."""
    modules = [
        module
        for chunk in model
        for module in get_attr_wrapped_model(chunk, "modules")()
        if hasattr(module, "reset_balancing_step")
    ]
    counting = [(module, counts) for module in modules if (counts := module.balance_step_counts()) is not None]
    # One all-reduce per group: routers count over TP x DP x CP; PEER layers over the ranks with
    # distinct tokens (``balance_count_group``: without sequence parallelism TP ranks hold copies).
    by_group: dict[int, tuple[object, list]] = {}
    for module, counts in counting:
        group = getattr(module, "balance_count_group", None) or module.tp_dp_cp_group
        by_group.setdefault(id(group), (group, []))[1].append((module, counts))
    for group, members in by_group.values():
        flat = torch.cat([counts.reshape(-1) for _, counts in members])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(flat, group=group)
        reduced = torch.split(flat, [counts.numel() for _, counts in members])
        for (module, _), counts in zip(members, reduced):
            module.record_balance_step(counts)
    for module in modules:
        module.reset_balancing_step()


def update_relu_coefficients(model: list[torch.nn.Module]) -> torch.Tensor | None:
    """ReMoE's once-per-step controller for every ReLU router of ``model``: the step's [zero gates, gates]
    per layer summed over all ranks (one all-reduce of [layers, 2] on every rank), the model's sparsity
    S = zeros / gates, then lambda <- lambda * alpha^sign(target - S) in every ReLU router, which also
    records its layer's metrics. Returns the reduced [layers, 2] counts (None when the run has no ReLU
    router; nothing changes in a step without training forwards)."""
    config = get_model_config(model[0])
    relu = ext_settings(config).router.relu
    if relu is None:
        return None
    routers = [
        module
        for chunk in model
        for module in get_attr_wrapped_model(chunk, "modules")()
        if hasattr(module, "apply_relu_step")
    ]
    num_layers = config.num_layers + (config.mtp_num_layers or 0)
    device = routers[0].relu_step_counts.device if routers else next(model[0].parameters()).device
    counts_L2 = torch.zeros(num_layers, 2, dtype=torch.float64, device=device)
    index = {}
    for router in routers:
        row = router.layer_number - 1 + (config.num_layers if router.is_mtp_layer else 0)
        index[id(router)] = row
        counts_L2[row] += router.relu_step_statistics().to(device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(counts_L2)
    zeros, total = counts_L2.sum(0)
    for router in routers:
        coeff = router.relu_l1_coeff
        new_coeff = coeff if total <= 0 else adapted_l1_coeff(
            coeff, (zeros / total).float(), target=relu.target_sparsity, rate=relu.update_rate
        )
        router.apply_relu_step(counts_L2[index[id(router)]], new_coeff)
    return counts_L2


def finalize_model_grads_with_balancing(
    model: list[torch.nn.Module],
    num_tokens: torch.Tensor | None = None,
    pg_collection=None,
    force_all_reduce: bool | None = False,
) -> None:
    """Megatron's ``finalize_model_grads`` followed by our bias updates, the ReLU routers' coefficient
    update and the step end (same signature)."""
    finalize_model_grads(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    update_balancing_biases(model)
    update_relu_coefficients(model)
    finish_balancing_step(model)
