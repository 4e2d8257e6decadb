"""``ReluRouter``: ReLU routing with an adaptive, load-weighted L1 penalty (ReMoE, Wang et al., ICLR 2025,
arXiv 2412.14711), in Megatron's router contract.

Gating is TopKRouter's (logits = x W^T, plus the router bias when Megatron has one, in the router
dtype; input jitter; the z-loss on the logits). The gates are ReLU(logits) in fp32: probs = gates,
routing map = gates > 0, so a token gets any number of experts, 0..N (a token with none keeps the
residual: the dispatcher combines nothing for it). Training adds ReMoE's L1 penalty
(``balancing/relu_l1.py``: lambda * N / (k T^2) * sum_e count_e * sum_t R_te, counts over TP x CP)
through Megatron's ``MoEAuxLossAutoScaler`` (``attach_and_log_load_balancing_loss``, logged as
``relu_l1_loss`` = the penalty / lambda), and counts the zero gates of the step.

Once per step (``balancing/bias_update.py: update_relu_coefficients``, from the finalize hook that
``MoEExtConfig`` installs for this router) the step's zero-gate counts of every ReLU layer are summed
over all ranks in one all-reduce, and every ReLU router multiplies its coefficient by alpha^sign(target
- sparsity) (the paper's controller, one coefficient for the whole model as in the paper: every layer
holds the same value, computed on every rank from the same reduced counts, so all ranks agree
bit for bit). The coefficient is the persistent fp32 buffer ``relu_l1_coeff`` [1] (saved in
checkpoints: a resumed run continues with it). Logged through Megatron's MoE metrics tracker:
``relu_l1_coeff`` (used in the step), ``relu_sparsity`` and ``active_experts`` (= (1 - sparsity) x N,
mean real experts per token) per layer.

Evaluation (not ``self.training``) routes by ReLU(logits) alone: no penalty, no counting.
Megatron options that make no sense for ReLU gates are refused by ``settings/relu_router.py``.

Legend: S sequence, B micro-batch, T = S*B tokens, N experts, h hidden.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import (
    ProcessGroupCollection,
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
    switch_load_balancing_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.balancing.attach import BalancingMixin
from megatron_moe_ext.balancing.relu_l1 import gate_sparsity_counts, relu_l1_penalty
from megatron_moe_ext.settings import ext_settings


def relu_gates(logits_TN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates_TN = ReLU(logits) in fp32, routing map_TN = gates > 0): the ReLU router's routing."""
    gates_TN = torch.relu(logits_TN.float())
    return gates_TN, gates_TN > 0


class ReluRouter(BalancingMixin, TopKRouter):
    """Megatron router (``MoESubmodules.router``) with ReLU gates and ReMoE's adaptive L1 penalty.

    Returns dense probs [T, N] (the gates, zero off the map) and a bool routing map [T, N] with any
    number of experts per token. ``--moe-balance-metrics`` works through ``BalancingMixin``.
    """

    def __init__(
        self, config: TransformerConfig, pg_collection: ProcessGroupCollection | None = None, is_mtp_layer: bool = False,
        **router_kwargs,  # what newer Megatron adds (dev: layer_number=) goes on to TopKRouter
    ) -> None:
        settings = ext_settings(config).router.relu
        if settings is None:
            raise ValueError(
                f"ReluRouter with moe_router_type={ext_settings(config).router.router_type!r}; fix: --moe-router-type "
                "relu (the config then checks the ReLU settings)"
            )
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, **router_kwargs)
        self.relu_settings = settings
        self.target_active = settings.target_active(config.num_moe_experts)
        # One coefficient for the model (ReMoE), held by every ReLU router; fp32, in checkpoints.
        self.register_buffer("relu_l1_coeff", torch.full((1,), settings.l1_coeff, dtype=torch.float32))
        # [zero gates, gates] of the valid tokens of this step's training forwards (fp64).
        self.register_buffer("relu_step_counts", torch.zeros(2, dtype=torch.float64), persistent=False)
        self.relu_micro_batches = 0
        self._init_balancing(pg_collection)

    def _maintain_float32_expert_bias(self) -> None:
        """TopKRouter calls this before saving, loading and each forward: the coefficient stays fp32
        (a bf16 model's Float16Module casts buffers) and on the parameters' device."""
        super()._maintain_float32_expert_bias()
        coeff = getattr(self, "relu_l1_coeff", None)  # not during Router.__init__
        if coeff is not None and coeff.dtype != torch.float32:
            coeff.data = coeff.data.float()
        counts = getattr(self, "relu_step_counts", None)
        if counts is not None and counts.dtype != torch.float64:
            counts.data = counts.data.double()

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None, **_unused_kw):
        # _unused_kw: what newer Megatron passes (dev: input_ids=, packed_seq_params=); ReLU routing reads neither.
        seq_length, bsz = logits.shape[:2]
        N = self.config.num_moe_experts
        logits_TN = logits.reshape(-1, N)
        pad_T = padding_mask.reshape(-1).bool() if padding_mask is not None else None
        valid_T = ~pad_T if pad_T is not None else None
        logits_TN = self.apply_z_loss(logits_TN, padding_mask=pad_T)
        gates_TN, routing_map_TN = relu_gates(logits_TN)
        probs_TN = gates_TN
        if self.config.moe_expert_capacity_factor is not None:
            probs_TN, routing_map_TN = apply_router_token_dropping(
                probs_TN, routing_map_TN, router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )
        if self.training and torch.is_grad_enabled():  # not in eval, nor in a no-grad first pass of recompute
            map_TN = gates_TN > 0  # the penalty and the controller see the gates, before capacity dropping
            with torch.no_grad():
                self.relu_step_counts.data = self.relu_step_counts.data.to(gates_TN.device)
                self.relu_step_counts += gate_sparsity_counts(map_TN, valid_T)
                self.relu_micro_batches += 1
            probs_TN = self._attach_l1(probs_TN, gates_TN, map_TN, valid_T)
            if self.is_aux_loss_enabled():
                probs_TN = self._attach_megatron_aux_losses(
                    probs_TN, logits_TN, map_TN, pad_T, seq_length=seq_length, bsz=bsz
                )
            if self._balancing_active():
                self._count_step_load(routing_map_TN, valid_T)
        return probs_TN.to(logits.dtype), routing_map_TN

    def _attach_l1(
        self, probs_TN: torch.Tensor, gates_TN: torch.Tensor, map_TN: torch.Tensor, valid_T: torch.Tensor | None
    ) -> torch.Tensor:
        """ReMoE's penalty (counts and tokens summed over TP x CP), attached and logged like Megatron's aux loss."""
        counts_N, tokens = self._reduced_counts(map_TN, valid_T, self.tp_cp_group)
        local = map_TN.shape[0] if valid_T is None else valid_T.sum()
        coeff = self.relu_l1_coeff.to(gates_TN.device)
        penalty = relu_l1_penalty(
            gates_TN, counts_N, tokens, target_active=self.target_active, coeff=coeff[0], valid_T=valid_T
        )
        return self.attach_and_log_load_balancing_loss(
            probs_TN, coeff[0], penalty, "relu_l1_loss", self.tp_cp_group, valid_token_count=local
        )

    def _attach_megatron_aux_losses(
        self, probs_TN: torch.Tensor, logits_TN: torch.Tensor, map_TN: torch.Tensor, pad_T: torch.Tensor | None,
        *, seq_length: int, bsz: int,
    ) -> torch.Tensor:
        """Megatron's aux_loss (``switch_load_balancing_loss_func``) with its scores for aux losses (the
        score function over all N experts), the ReLU routing map as the load and the valid tokens counted
        directly (Megatron's helper infers them as selections / top-k, which holds only for top-k maps),
        normalised by top-k as Megatron does; attached and logged as Megatron's ``load_balancing_loss``."""
        coeff = self.get_aux_loss_coeff("aux_loss")
        if coeff == 0:
            return probs_TN
        _, scores_TN = compute_routing_scores_for_aux_loss(
            logits_TN, self.topk, self.score_function, fused=False, padding_mask=pad_T
        )
        valid_T = None if pad_T is None else ~pad_T
        counts_N, tokens = self._reduced_counts(map_TN, valid_T, self.tp_cp_group)
        aux_loss = switch_load_balancing_loss_func(
            probs=scores_TN, tokens_per_expert=counts_N, total_num_tokens=tokens, topk=self.topk,
            num_experts=self.config.num_moe_experts, moe_aux_loss_coeff=coeff,
        )
        local = map_TN.shape[0] if valid_T is None else valid_T.sum()
        return self.attach_and_log_load_balancing_loss(
            probs_TN, coeff, aux_loss, "load_balancing_loss", self.tp_cp_group, valid_token_count=local
        )

    # ------------------------------------------------------------------------------------------
    # Once per step (balancing/bias_update.py: update_relu_coefficients)
    # ------------------------------------------------------------------------------------------

    def relu_step_statistics(self) -> torch.Tensor:
        """This step's local [zero gates, gates] (zeros when the layer did not train this step)."""
        return self.relu_step_counts

    @torch.no_grad()
    def apply_relu_step(self, layer_counts: torch.Tensor, new_coeff: torch.Tensor) -> None:
        """Records the step's metrics from this layer's all-reduced [zero gates, gates] and the coefficient
        used, then sets the coefficient for the next step and resets the counts."""
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        micro = self.relu_micro_batches
        if micro > 0 and layer_counts[1] > 0:
            cfg = self.config
            num_layers = cfg.num_layers + (cfg.mtp_num_layers or 0)
            layer_number = self.layer_number + cfg.num_layers if self.is_mtp_layer else self.layer_number
            sparsity = (layer_counts[0] / layer_counts[1]).float()
            values = {
                "relu_l1_coeff": self.relu_l1_coeff[0].float(),
                "relu_l1_coeff_log10": torch.log10(self.relu_l1_coeff[0].float()),
                "relu_sparsity": sparsity,
                "active_experts": (1.0 - sparsity) * cfg.num_moe_experts,
            }
            tracker = get_moe_metrics_tracker()
            for name, value in values.items():
                # Megatron's report scales by 1 / micro-batches; identical on every rank: no reduction.
                tracker.record(name, value * micro, layer_number, num_layers, needs_dp_avg=False)
        self.relu_l1_coeff.copy_(new_coeff.to(self.relu_l1_coeff))
        self.relu_step_counts.zero_()
        self.relu_micro_batches = 0
