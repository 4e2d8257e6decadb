"""Null (zero-computation) experts: ``NullExpertTopKRouter`` and the helpers every router with null
experts shares (MoE++, Jin et al., ICLR 2025, arXiv 2410.07348; AdaMoE, Zeng et al. 2024, arXiv 2406.13233).

A router with M null experts has N + M outputs: its gate weight is [N + M, h] (and its bias, expert
bias, noise weight, product-key grid, expert-choice columns are sized N + M); ids N..N+M-1 are null.
Selection and gates run over all N + M exactly as the underlying router computes them (top-k:
Megatron's ``topk_routing_with_score_function`` over the N + M logits, i.e. the softmax over the k
selected logits, or with ``moe_router_pre_softmax`` the softmax over all N + M; sigmoid likewise);
then the dispatcher gets only the N real columns (``split_null_columns``): a null slot contributes
zero to the token's output and spends no expert compute, and a token whose k slots are all null
keeps only the residual (its MoE output is exactly 0). The real gates are not renormalised.

How a router gets N + M outputs: ``null_expert_config(config)`` is a shallow copy of the layer's
config whose ``num_moe_experts`` is N + M, given to the router alone (the experts and the dispatcher
keep the layer's config with N), so every piece of Megatron's router (score functions, z-loss, its
aux losses, expert bias and its update, capacity dropping, routing replay) and our balancing run
over N + M columns unchanged. ``router.num_real_experts`` is N, ``router.num_null_experts`` M.

Balancing (stated once, for every router with null experts): the null experts count as ordinary
experts in every balance loss and load metric (AdaMoE's load balance over all N + M; MoE++'s
heterogeneous balance with its factor tau = 1), so balance means a fraction M / (N + M) of the
slots goes to null experts; EP metrics cover the real experts only (null experts live on no rank).

Each forward stores ``router.last_null_selection = (null_map_TM bool, null_probs_TM float)``
(detached) for the routing recorder, and training forwards record ``null_fraction`` (null slots /
all selected slots, valid tokens) and ``active_experts`` (mean real experts per valid token) in
Megatron's MoE metrics tracker.

Legend: S sequence, B micro-batch, T = S*B tokens, N real experts, M null experts, E = N + M, h hidden.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.layers.balanced_router import BalancedTopKRouter
from megatron_moe_ext.layers.noisy_gating import add_gating_noise
from megatron_moe_ext.settings import ext_settings


def null_expert_config(config: TransformerConfig) -> TransformerConfig:
    """The router's config: ``config`` itself without null experts, else a shallow copy with
    ``num_moe_experts`` = N + M (no re-validation: every other field, the settings included, is shared)."""
    m = ext_settings(config).router.null_experts
    if not m:
        return config
    router_config = copy.copy(config)
    router_config.num_moe_experts = config.num_moe_experts + m
    return router_config


def split_null_columns(
    probs_TE: torch.Tensor, map_TE: torch.Tensor, num_real: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probs_TN, map_TN, null_map_TM, null_probs_TM): the N real columns for the dispatcher
    (contiguous; gradients flow into probs_TE) and the M null columns, detached."""
    probs_TN = probs_TE[:, :num_real].contiguous()
    map_TN = map_TE[:, :num_real].contiguous()
    return probs_TN, map_TN, map_TE[:, num_real:].detach().clone(), probs_TE[:, num_real:].detach().float()


def null_routing_stats(
    map_TN: torch.Tensor, null_map_TM: torch.Tensor, valid_T: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(null_fraction, active_experts) of valid tokens, 0-dim fp32: null selections / all selections,
    and the mean number of real experts per token (0 and 0 without selections or tokens)."""
    if valid_T is not None:
        map_TN = map_TN & valid_T.unsqueeze(-1)
        null_map_TM = null_map_TM & valid_T.unsqueeze(-1)
        tokens = valid_T.sum().float()
    else:
        tokens = torch.tensor(float(map_TN.shape[0]), device=map_TN.device)
    real, null = map_TN.sum().float(), null_map_TM.sum().float()
    fraction = null / (real + null).clamp(min=1.0)
    return fraction, real / tokens.clamp(min=1.0)


def record_null_metrics(router, map_TN: torch.Tensor, null_map_TM: torch.Tensor, valid_T: torch.Tensor | None) -> None:
    """Records ``null_fraction`` and ``active_experts`` of one training micro-batch in Megatron's tracker
    (averaged over the tensor, data and context parallel ranks, like Megatron's z-loss)."""
    fraction, active = null_routing_stats(map_TN, null_map_TM, valid_T)
    cfg = router.config
    num_layers = cfg.num_layers + (cfg.mtp_num_layers or 0)
    layer_number = router.layer_number + cfg.num_layers if router.is_mtp_layer else router.layer_number
    tracker = get_moe_metrics_tracker()
    for name, value in (("null_fraction", fraction), ("active_experts", active)):
        tracker.record(name, value, layer_number, num_layers, avg_group=router.tp_dp_cp_group, needs_dp_avg=False)


class NullExpertTopKRouter(BalancedTopKRouter):
    """Megatron's TopKRouter over N + M experts, the last M null (module docstring), with noisy gating
    (``--moe-router-noisy-gating``: N(0,1) x softplus(x W_noise) on the N + M train-time logits, W_noise
    [N + M, h] zero-initialised as in ``NoisyTopKRouter``) and ``--moe-balance-losses`` /
    ``--moe-balance-metrics`` over the N + M columns. Returns probs and routing map [T, N]."""

    def __init__(
        self, config: TransformerConfig, pg_collection: ProcessGroupCollection | None = None, is_mtp_layer: bool = False,
        **router_kwargs,  # what newer Megatron adds (dev: layer_number=) goes on to TopKRouter
    ) -> None:
        settings = ext_settings(config).router
        if not settings.null_experts or settings.router_type != "topk":
            raise ValueError(
                f"NullExpertTopKRouter with moe_router_type={settings.router_type!r} and moe_null_experts="
                f"{settings.null_experts}; fix: --moe-router-type topk --moe-null-experts M (M >= 1)"
            )
        self.num_real_experts = config.num_moe_experts
        self.num_null_experts = settings.null_experts
        router_config = null_expert_config(config)
        super().__init__(config=router_config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, **router_kwargs)
        self.noisy = settings.noisy_gating
        if self.noisy:
            self.noise_weight = torch.nn.Parameter(
                torch.zeros(router_config.num_moe_experts, config.hidden_size, dtype=config.params_dtype)
            )
            self.noise_weight.sequence_parallel = config.sequence_parallel
        self.last_null_selection: tuple[torch.Tensor, torch.Tensor] | None = None

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        logits = super().gating(input)
        if not (self.noisy and self.training):
            return logits
        noise_logits = torch.nn.functional.linear(input.to(logits.dtype), self.noise_weight.to(logits.dtype))
        return add_gating_noise(logits, noise_logits)

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None, *args, **kwargs):
        probs_TE, map_TE = super().forward(input, padding_mask, *args, **kwargs)
        probs_TN, map_TN, null_map_TM, null_probs_TM = split_null_columns(probs_TE, map_TE, self.num_real_experts)
        self.last_null_selection = (null_map_TM, null_probs_TM)
        if self.training and torch.is_grad_enabled():
            valid_T = None if padding_mask is None else ~padding_mask.reshape(-1).bool()
            record_null_metrics(self, map_TN, null_map_TM, valid_T)
        return probs_TN, map_TN
