"""Balancing for PEER layers (``layers/peer.py``): the sub-key marginal loss and the step metrics.

PEER is an MLP-slot module, not Megatron's MoELayer, so it has no router to mix ``BalancingMixin``
into; ``PEERBalancing`` is a small child module of the layer that reuses the same pieces:

- loss: ``--moe-balance-losses subkey`` (same flag, coefficient and policy as the product-key
  router) balances each head's n row and n column sub-keys (2n counts per head, never n^2).
  PEER heads share one pool of N = n^2 experts, and each head's ids ARE its local grid ids
  (row * n + col), which is exactly what the loss counts. ``--moe-peer-subkey-loss-marginals``
  picks its soft marginals: 'candidates' (default) is ``attach.reduced_subkey_candidate_loss``
  (``subkey_candidate_loss``: each token's softmax over the k' sub-keys per side its retrieval
  kept, whose gradient joins the retrieval's sparse backward, O(T H k')); 'full' is
  ``attach.reduced_subkey_loss``, the router's ``subkey_marginal_loss`` over all n sub-keys,
  which needs dense half scores and a dense backward (+11% of the layer's step at N = 1M,
  benchmarks/RESULTS.md), optionally on every s-th token (``--moe-peer-subkey-loss-stride``).
  Both use the same all-reduced counts and are attached to the gates through Megatron's
  ``MoEAuxLossAutoScaler`` and recorded in Megatron's MoE metrics tracker as
  ``subkey_balance_loss``, like ``TopKRouter.attach_and_log_load_balancing_loss`` does.
- metrics: ``--moe-balance-metrics`` counts selections per global expert id (index_add over the
  T*K ids, O(T K)) plus the per-head row/column counts (2Hn) in one int64 buffer per layer; the
  finalize hook (``bias_update.finish_balancing_step``) all-reduces it once per step and
  ``record_balance_step`` logs max_violation, load_entropy, experts_used_fraction (``UsageWindow``,
  one int64 per expert: 8 MiB at N = 1M) and pk_rows_used / pk_cols_used.

Groups. Retrieval is replicated over the table shards and runs on the rank's own tokens. Tokens
differ across TP ranks only with sequence parallelism, so the loss counts are summed over TP x CP
with SP and over CP without it (TP ranks then hold copies: summing them would count tokens twice),
and the loss divided by that group's size as the router does (its gradient is summed over those
ranks); the step load is summed over the same group x DP (DDP averages the loss gradients over DP).

Loss scale without MoE layers. Megatron's schedule (``forward_step``, 0.19) sets
``MoEAuxLossAutoScaler``'s scale (loss scale x CP / num_microbatches, or the loss scale with
per-token loss) only ``if config.num_moe_experts is not None``. In a PEER-only model it is never
set, so the aux gradient would be neither divided by the micro-batch count nor multiplied by the
fp16 loss scale. ``set_aux_loss_scale_without_moe`` then sets it from the layer's forward with
Megatron's own formula (``schedules._get_moe_loss_scale``); with MoE layers Megatron's value stands.

Legend: T local tokens, H heads, n sub-keys per side, k top-k per head, K = H*k, N = n^2 experts,
k' = k1 = k2 candidate sub-keys kept per token, head and side.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_moe_ext.balancing.attach import (
    _token_count,
    reduced_subkey_candidate_loss,
    reduced_subkey_loss,
)
from megatron_moe_ext.balancing.losses import count_subkeys
from megatron_moe_ext.balancing.metrics import UsageWindow
from megatron_moe_ext.balancing.step_metrics import step_load_metrics, usage_fraction
from megatron_moe_ext.kernels.product_keys import Candidates, product_key_half_scores
from megatron_moe_ext.settings.balancing import LOAD_METRICS, LOSS_LOG_NAMES, PRODUCT_KEY_METRICS, BalanceSettings
from megatron_moe_ext.settings.peer import PEERSettings

Tensor = torch.Tensor


def set_aux_loss_scale_without_moe(config, cp_size: int, device: torch.device) -> None:
    """Set ``MoEAuxLossAutoScaler``'s scale as Megatron's schedule would, when it does not (no MoE layers).

    scale = loss_scale (per-token loss) or loss_scale * cp / num_microbatches (schedules.forward_step,
    Megatron 0.19); num_microbatches is 1 outside Megatron's training loop (calculator unset).
    """
    if config.num_moe_experts is not None:
        return  # Megatron's schedule sets it after every micro-batch's loss
    from megatron.core.pipeline_parallel.schedules import _get_moe_loss_scale

    try:
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        micro = get_num_microbatches()
    except (AttributeError, AssertionError, TypeError):  # calculator not initialised (tests, benchmarks)
        micro = 1
    scale = _get_moe_loss_scale(config, device)
    if not config.calculate_per_token_loss:
        scale = scale * cp_size / micro
    MoEAuxLossAutoScaler.set_loss_scale(scale.reshape(()) if scale.numel() == 1 else scale)


class PEERBalancing(torch.nn.Module):
    """The balance loss and step metrics of one PEER layer (child module: found by the finalize hook).

    ``config``: Megatron's fields (layers, MTP, per-token loss, loss scale); ``balance`` and ``peer``:
    the run's settings (``ext_settings(config)``). ``loss_group``: ranks holding other tokens of the
    same sequences (TP x CP with SP, else CP); ``count_group``: all ranks with distinct tokens (that x
    DP). Holds no parameters and no checkpointed state (the usage history starts empty after a resume,
    like the routers').
    """

    def __init__(self, config, *, balance: BalanceSettings, peer: PEERSettings, heads: int, grid: int, topk: int,
                 num_experts: int, loss_group, count_group, cp_size: int = 1, is_mtp_layer: bool = False) -> None:
        super().__init__()
        self.config = config
        # Only the subkey loss applies to PEER (the others balance Megatron's routers).
        self.subkey_coeff = dict(balance.losses).get("subkey", 0.0)
        self.marginals = peer.subkey_loss_marginals
        self.score_stride = peer.subkey_loss_stride
        self.metrics = balance.metrics
        self.usage_window = balance.usage_window
        self.heads, self.grid, self.topk, self.num_experts = heads, grid, topk, num_experts
        self.loss_group, self.balance_count_group = loss_group, count_group
        self.cp_size, self.is_mtp_layer = cp_size, is_mtp_layer
        self.layer_number: int | None = None
        # Step load: [N per-expert counts | H*n row counts | H*n column counts], int64, allocated on first use.
        self._step_counts: Tensor | None = None
        self._usage: UsageWindow | None = None
        self._step = 0
        self._micro_batches = 0

    @property
    def enabled(self) -> bool:
        return self.subkey_coeff > 0 or self.metrics

    def active(self) -> bool:
        """Training forward with gradients (not eval, not activation recompute), as Megatron's aux losses."""
        return self.enabled and self.training and torch.is_grad_enabled()

    # -- per micro-batch -----------------------------------------------------------------------
    def forward(self, q_THD: Tensor, subkeys: tuple[Tensor, Tensor], candidates: Candidates, ids_THk: Tensor,
                valid_T: Tensor | None, gates_TK: Tensor) -> Tensor:
        """Counts this micro-batch (metrics) and attaches the subkey loss to ``gates_TK`` (returned).

        q_THD: the normalised queries retrieval used; subkeys: (row_keys, col_keys) [H, n, D/2] as used;
        candidates: retrieval's (a_THk1, row_THk1, b_THk2, col_THk2) (``product_key_topk_with_candidates``);
        ids_THk: selected expert ids = row * n + col (the pool is shared: global id = local grid id).
        """
        if self.metrics:
            self._count(ids_THk, valid_T)
        if self.subkey_coeff <= 0:
            return gates_TK
        if self.marginals == "candidates":
            loss = reduced_subkey_candidate_loss(candidates, ids_THk, (self.grid, self.grid), valid_T,
                                                 self.subkey_coeff, self.loss_group)
        else:
            s = self.score_stride
            # Dense half scores [T/s, H, n] (one more bmm per side than the sparse top-k, and a dense backward).
            a_THn, b_THn = product_key_half_scores(q_THD[::s] if s > 1 else q_THD, subkeys)
            loss = reduced_subkey_loss(a_THn, b_THn, ids_THk, valid_T, self.subkey_coeff, self.loss_group,
                                       score_stride=s)
        return self._attach(gates_TK, loss / _size(self.loss_group), valid_T, ids_THk.shape[0])

    def _attach(self, gates_TK: Tensor, loss: Tensor, valid_T: Tensor | None, T: int) -> Tensor:
        """``TopKRouter.attach_and_log_load_balancing_loss`` for a module that is not a router."""
        set_aux_loss_scale_without_moe(self.config, self.cp_size, gates_TK.device)
        cfg = self.config
        num_layers = cfg.num_layers + (cfg.mtp_num_layers or 0)
        layer = self.layer_number + cfg.num_layers if (self.is_mtp_layer and self.layer_number) else self.layer_number
        get_moe_metrics_tracker().record(
            LOSS_LOG_NAMES["subkey"], loss.detach() / self.subkey_coeff, layer, num_layers,
            reduce_group=self.loss_group, needs_dp_avg=True,
        )
        if cfg.calculate_per_token_loss:
            # Megatron's per-token path: cancels the global token count finalize_model_grads divides by.
            n_local = _token_count(valid_T, T, gates_TK.device)
            return MoEAuxLossAutoScaler.apply(gates_TK, loss * n_local * _size(self.loss_group))
        return MoEAuxLossAutoScaler.apply(gates_TK, loss)

    @torch.no_grad()
    def _count(self, ids_THk: Tensor, valid_T: Tensor | None) -> None:
        N, Hn = self.num_experts, self.heads * self.grid
        if self._step_counts is None or self._step_counts.device != ids_THk.device:
            self._step_counts = torch.zeros(N + 2 * Hn, dtype=torch.long, device=ids_THk.device)
        self._micro_batches += 1
        if valid_T is None and ids_THk.device.type == "cpu":
            # CPU: bincount is ~1.6x faster than index_add_ at N = 1M (on GPU it would sync on max(ids)).
            self._step_counts[:N] += torch.bincount(ids_THk.reshape(-1), minlength=N)
        else:
            w_THk = torch.ones_like(ids_THk) if valid_T is None else valid_T.view(-1, 1, 1).expand_as(ids_THk).long()
            self._step_counts[:N].index_add_(0, ids_THk.reshape(-1), w_THk.reshape(-1))
        rows_Hn, cols_Hn = count_subkeys(ids_THk, self.grid, self.grid, valid_T)
        self._step_counts[N:N + Hn] += rows_Hn.reshape(-1)
        self._step_counts[N + Hn:] += cols_Hn.reshape(-1)

    # -- once per step (bias_update.finish_balancing_step) --------------------------------------
    def balance_step_counts(self) -> Tensor | None:
        if self.metrics and self.training and self._micro_batches > 0:
            return self._step_counts
        return None

    def record_balance_step(self, packed: Tensor) -> None:
        """Metrics from the step's counts summed over ``balance_count_group`` (identical on its ranks)."""
        N, H, n = self.num_experts, self.heads, self.grid
        counts_N = packed[:N]
        self._step += 1
        if self._usage is None:
            self._usage = UsageWindow(N, self.usage_window, device=counts_N.device)
        self._usage.update(counts_N, self._step)
        values = step_load_metrics(counts_N)
        values["experts_used_fraction"] = usage_fraction(self._usage, self._step)
        values["pk_rows_used"] = (packed[N:N + H * n] > 0).float().mean()
        values["pk_cols_used"] = (packed[N + H * n:] > 0).float().mean()
        cfg = self.config
        num_layers = cfg.num_layers + (cfg.mtp_num_layers or 0)
        tracker = get_moe_metrics_tracker()
        for name in list(LOAD_METRICS) + list(PRODUCT_KEY_METRICS):
            # x micro-batches: Megatron's report averages a metric over micro-batches (see attach.py).
            tracker.record(name, values[name] * self._micro_batches, self.layer_number, num_layers, needs_dp_avg=False)

    def reset_balancing_step(self) -> None:
        if self._step_counts is not None:
            self._step_counts.zero_()
        self._micro_batches = 0


def _size(group) -> int:
    return group.size() if group is not None else 1

