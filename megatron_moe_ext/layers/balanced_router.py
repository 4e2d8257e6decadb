"""Megatron's dense TopKRouter (and our noisy variant) with this package's balance losses and step metrics.

Everything Megatron's router does is kept (gating, score functions, expert bias, capacity, its own
aux losses and z-loss); ``routing`` additionally counts the step's load and attaches the losses of
``--moe-balance-losses`` to Megatron's scores for aux losses (``compute_routing_scores_for_aux_loss``:
the full softmax, or sigmoid/sqrtsoftplus normalised, over all experts, with its own top-k map
taken without expert bias or capacity dropping, as Megatron's aux losses use). The step metrics
count the routing map actually dispatched. Wiring and gradient scales: ``balancing/attach.py``.

Legend: S sequence, B micro-batch, T = S*B tokens, N experts.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection, compute_routing_scores_for_aux_loss
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.balancing.attach import BalancingMixin
from megatron_moe_ext.layers.noisy_gating import NoisyTopKRouter


class BalancedTopKRouter(BalancingMixin, TopKRouter):
    """TopKRouter plus ``--moe-balance-losses`` and ``--moe-balance-metrics``."""

    def __init__(
        self, config: TransformerConfig, pg_collection: ProcessGroupCollection | None = None, is_mtp_layer: bool = False,
        **router_kwargs,  # what newer Megatron adds (dev: layer_number=) goes on to TopKRouter
    ) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, **router_kwargs)
        self._init_balancing(pg_collection)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None, **routing_kwargs):
        # routing_kwargs: what newer Megatron passes (dev: input_ids=, packed_seq_params=), for TopKRouter
        probs_TN, routing_map_TN = super().routing(logits, padding_mask=padding_mask, **routing_kwargs)
        if not self._balancing_active():
            return probs_TN, routing_map_TN
        seq_length, bsz = logits.shape[:2]
        logits_TN = logits.reshape(-1, self.config.num_moe_experts)
        pad_T = padding_mask.reshape(-1).bool() if padding_mask is not None else None
        valid_T = ~pad_T if pad_T is not None else None
        self._count_step_load(routing_map_TN, valid_T)
        if self.balance_losses:
            map_for_aux_TN, scores_TN = compute_routing_scores_for_aux_loss(
                logits_TN, self.topk, self.score_function, fused=self.config.moe_router_fusion, padding_mask=pad_T
            )
            probs_TN = self._attach_balance_losses(
                probs_TN, scores_TN=scores_TN, routing_map_TN=map_for_aux_TN.bool(), valid_T=valid_T,
                seq_length=seq_length, bsz=bsz,
            )
        return probs_TN, routing_map_TN


class BalancedNoisyTopKRouter(BalancedTopKRouter, NoisyTopKRouter):
    """NoisyTopKRouter plus the balance losses and metrics (losses on the noisy train-time logits,
    as Megatron's own aux losses there)."""
