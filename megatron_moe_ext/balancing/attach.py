"""Attaching the balance losses to Megatron's routers, and recording the step metrics.

The wiring between the pure functions (``losses.py``, ``step_metrics.py``) and Megatron:
``BalancingMixin`` is mixed into our TopKRouter subclasses (``layers/balanced_router.py``) and the
product-key router. Per micro-batch (training forward with gradients only, like Megatron's aux
losses) it counts selections, all-reduces them over the group each loss needs (table in
``settings/balancing.py``), and attaches each loss to the routing probabilities through
``TopKRouter.attach_and_log_load_balancing_loss``, i.e. Megatron's ``MoEAuxLossAutoScaler``, so
the loss is scaled exactly like Megatron's own (``1/num_microbatches`` and the loss scale, or
per-token-loss scaling) and logged under its name. Once per step, ``finalize_model_grads_with_balancing``
(``bias_update.py``) all-reduces the step's counts of every layer in one call, the layers record their
metrics and reset their per-step buffers.

Gradient scale. Megatron sums a router's gradients over the TP x CP ranks (sequence-parallel partial
gradients; CP through the schedule's cp factor) and averages them over DP. Losses whose P is the
mean over local tokens (sequence, device, communication, subkey) are divided by |TP x CP|, as
Megatron does for its z-loss, so the sum over those ranks is their mean (exact when the shards hold
equally many valid tokens). The expert losses use ``global_batch_balance_loss``, exact shares:
``expert`` with dp_size 1 over the TP x CP tokens (Megatron's ``aux_loss``), ``global_expert`` with the
real DP size over the TP x DP x CP tokens, so DDP's average over DP gives the whole batch's gradient
(Megatron 0.19's ``global_aux_loss`` is 1/DP too small; tests/distributed/test_balancing_megatron.py).

With null experts (``layers/null_experts.py``) the router's config has N + M experts, so every loss
and the step load see the N + M columns (null experts balanced as experts, AdaMoE / MoE++ with tau = 1);
the EP metrics cover the real experts only.

Legend: S sequence, B micro-batch, T = S*B tokens, N experts, K top-k, H product-key heads,
n1 x n2 grid per head, k top-k per head.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

from megatron_moe_ext.balancing.losses import (
    communication_balance_loss,
    count_subkeys,
    device_balance_loss,
    expert_counts,
    global_batch_balance_loss,
    sequence_balance_loss,
    sequence_counts,
    subkey_candidate_loss,
    subkey_marginal_loss,
)
from megatron_moe_ext.balancing.metrics import UsageWindow
from megatron_moe_ext.balancing.step_metrics import step_load_metrics, usage_fraction
from megatron_moe_ext.settings import ext_settings
from megatron_moe_ext.settings.balancing import EP_METRICS, LOAD_METRICS, LOSS_LOG_NAMES, PRODUCT_KEY_METRICS

Tensor = torch.Tensor


def _all_reduce(t: Tensor, group) -> Tensor:
    if group is not None and dist.is_initialized() and group.size() > 1:
        dist.all_reduce(t, group=group)
    return t


def _token_count(valid_T: Tensor | None, T: int, device: torch.device) -> Tensor:
    if valid_T is None:
        return torch.tensor(T, dtype=torch.long, device=device)
    return valid_T.sum().long()


def reduced_subkey_counts(
    local_THk: Tensor, n1: int, n2: int, valid_T: Tensor | None, group
) -> tuple[Tensor, Tensor, Tensor]:
    """(row_counts_Hn1, col_counts_Hn2, valid tokens) of this micro-batch, summed over ``group`` (the
    ranks holding other tokens of the same sequences) in one all-reduce: the f of both sub-key losses."""
    H = local_THk.shape[1]
    with torch.no_grad():
        rows_Hn1, cols_Hn2 = count_subkeys(local_THk, n1, n2, valid_T)
        tokens = _token_count(valid_T, local_THk.shape[0], rows_Hn1.device)
        packed = torch.cat([rows_Hn1.reshape(-1), cols_Hn2.reshape(-1), tokens.view(1)])
        packed = _all_reduce(packed, group)
    return packed[: H * n1].view(H, n1), packed[H * n1 : -1].view(H, n2), packed[-1]


def reduced_subkey_loss(
    a_THn1: Tensor,
    b_THn2: Tensor,
    local_THk: Tensor,
    valid_T: Tensor | None,
    coeff: float,
    group,
    *,
    score_stride: int = 1,
) -> Tensor:
    """``subkey_marginal_loss`` of this micro-batch with the row/column counts and the token count
    summed over ``group`` (``reduced_subkey_counts``).

    Shared by the product-key router and PEER layers (one implementation). ``score_stride`` s > 1
    estimates the soft marginals P from every s-th local token only (a_THn1 / b_THn2 are then the
    scores of tokens 0, s, 2s, ...: [ceil(T/s), H, n]); the counts f always cover all T tokens.
    """
    rows_Hn1, cols_Hn2, tokens = reduced_subkey_counts(local_THk, a_THn1.shape[-1], b_THn2.shape[-1], valid_T, group)
    valid_scored = None if valid_T is None else valid_T[::score_stride]
    return subkey_marginal_loss(a_THn1, b_THn2, rows_Hn1, cols_Hn2, tokens, local_THk.shape[-1], coeff,
                                valid_T=valid_scored)


def reduced_subkey_candidate_loss(
    candidates: tuple[Tensor, Tensor, Tensor, Tensor],
    local_THk: Tensor,
    grid: tuple[int, int],
    valid_T: Tensor | None,
    coeff: float,
    group,
) -> Tensor:
    """``subkey_candidate_loss`` of this micro-batch, counts reduced as in ``reduced_subkey_loss``.

    candidates: (a_THk1, row_THk1, b_THk2, col_THk2) from ``product_key_topk_with_candidates`` for
    the same local tokens; grid: (n1, n2) of one head.
    """
    rows_Hn1, cols_Hn2, tokens = reduced_subkey_counts(local_THk, *grid, valid_T, group)
    a_THk1, row_THk1, b_THk2, col_THk2 = candidates
    return subkey_candidate_loss(a_THk1, row_THk1, b_THk2, col_THk2, rows_Hn1, cols_Hn2, tokens,
                                 local_THk.shape[-1], coeff, valid_T=valid_T)


class BalancingMixin:
    """Balance losses and step metrics for a ``TopKRouter`` subclass (Megatron's router API:
    ``config``, ``topk``, process groups, ``attach_and_log_load_balancing_loss``, ``layer_number``).

    The subclass calls ``_init_balancing`` at the end of ``__init__``, then per forward
    ``_count_step_load`` and ``_attach_balance_losses``. Settings: the config's ``BalanceSettings``
    (``ext_settings(config).balance``); a plain TransformerConfig has none on.
    """

    def _init_balancing(self, pg_collection) -> None:
        cfg = self.config
        ext = ext_settings(cfg)
        self.balance_losses: list[tuple[str, float]] = list(ext.balance.losses)
        self.balance_metrics = ext.balance.metrics
        self.balance_usage_window = ext.balance.usage_window
        ep_group = getattr(pg_collection, "ep", None)
        # Megatron's placement (BaseMoELayer): EP rank r holds experts [r*N/D, (r+1)*N/D).
        self.balance_ep_size = ep_group.size() if ep_group is not None else 1
        self.balance_dp_size = self.tp_dp_cp_group.size() // self.tp_cp_group.size()
        kinds = {name for name, _ in self.balance_losses}
        for name in ("device", "communication"):
            if name in kinds and self.balance_ep_size < 2:
                raise ValueError(
                    f"the {name} balance loss needs an EP group of >= 2 ranks, this router's has "
                    f"{self.balance_ep_size}; fix: --expert-model-parallel-size >= 2, or the expert loss"
                )
        if "subkey" in kinds and self._balance_grid() is None and ext.peer.enabled:
            # --moe-balance-losses subkey is for the PEER layers of this model, not this dense router.
            self.balance_losses = [(n, c) for n, c in self.balance_losses if n != "subkey"]
            kinds.discard("subkey")
        if "subkey" in kinds and self._balance_grid() is None:
            raise ValueError(f"the subkey balance loss needs product keys, not {type(self).__name__}; fix: "
                             "--moe-router-type product_key")
        N = cfg.num_moe_experts
        if "global_expert" in kinds:
            if cfg.finalize_model_grads_func is None:
                raise ValueError(
                    "the global_expert balance loss accumulates counts over a step's micro-batches and needs "
                    "finalize_model_grads_with_balancing to reset them after each step; fix: build the model "
                    "from MoEExtConfig (which installs it), or set config.finalize_model_grads_func to it"
                )
            # Counts of the step's micro-batches so far, summed over TP x DP x CP; last entry: tokens.
            self.register_buffer("global_balance_counts", torch.zeros(N + 1, dtype=torch.long), persistent=False)
        if self.balance_metrics:
            self.register_buffer("step_load_counts", torch.zeros(N, dtype=torch.long), persistent=False)
        self._usage_window: UsageWindow | None = None
        self._balance_step = 0
        self._balance_micro_batches = 0

    # ------------------------------------------------------------------------------------------
    # Per micro-batch
    # ------------------------------------------------------------------------------------------

    def _balance_grid(self) -> tuple[int, int, int] | None:
        layout = getattr(self, "layout", None)
        return None if layout is None else (layout.heads, layout.rows, layout.cols)

    def _balancing_active(self) -> bool:
        return bool(self.balance_losses or self.balance_metrics) and self.training and torch.is_grad_enabled()

    @torch.no_grad()
    def _count_step_load(self, routing_map_TN: Tensor, valid_T: Tensor | None, ids_TK: Tensor | None = None) -> None:
        """Adds this micro-batch's selections to the step's load (from the ids when given: O(T K))."""
        if not self.balance_metrics:
            return
        if self.step_load_counts.device != routing_map_TN.device:
            self.step_load_counts.data = self.step_load_counts.data.to(routing_map_TN.device)
        self._balance_micro_batches += 1
        if ids_TK is not None:
            w_TK = torch.ones_like(ids_TK) if valid_T is None else valid_T.unsqueeze(-1).expand_as(ids_TK).long()
            self.step_load_counts.index_add_(0, ids_TK.reshape(-1), w_TK.reshape(-1))
        else:
            self.step_load_counts += expert_counts(routing_map_TN, valid_T=valid_T)

    @torch.no_grad()
    def _reduced_counts(self, routing_map_TN: Tensor, valid_T: Tensor | None, group) -> tuple[Tensor, Tensor]:
        """(counts_N, valid tokens) of this micro-batch, summed over ``group`` in one all-reduce."""
        counts_N = expert_counts(routing_map_TN, valid_T=valid_T)
        tokens = _token_count(valid_T, routing_map_TN.shape[0], counts_N.device)
        packed = _all_reduce(torch.cat([counts_N, tokens.view(1)]), group)
        return packed[:-1], packed[-1]

    def _attach_balance_losses(
        self,
        probs_TN: Tensor,
        *,
        scores_TN: Tensor | None,
        routing_map_TN: Tensor,
        valid_T: Tensor | None,
        seq_length: int,
        bsz: int,
        subkeys: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Attaches every configured loss to ``probs_TN`` (returned) and logs it.

        scores_TN: normalised scores over all N experts (Megatron's scores for aux losses; may be
        None if only the subkey loss is on); routing_map_TN: bool [T, N], the selection the losses
        balance; valid_T: False for padding; subkeys: (a_THn1, b_THn2, local ids_THk) for product keys.
        """
        if not self.balance_losses:
            return probs_TN
        tp_cp = self.tp_cp_group.size()
        n_local = _token_count(valid_T, routing_map_TN.shape[0], routing_map_TN.device)
        micro = None
        for kind, coeff in self.balance_losses:
            if kind != "subkey":
                assert scores_TN is not None, f"the {kind} loss needs the full scores [T, N]"
            if kind in ("expert", "device"):
                if micro is None:
                    micro = self._reduced_counts(routing_map_TN, valid_T, self.tp_cp_group)
                counts_N, tokens = micro
                if kind == "expert":
                    loss = global_batch_balance_loss(
                        scores_TN, counts_N, tokens, self.topk, coeff, group_tokens=tokens, dp_size=1, valid_T=valid_T
                    )
                else:
                    loss = device_balance_loss(
                        scores_TN, counts_N, tokens, self.topk, self.balance_ep_size, coeff, valid_T=valid_T
                    ) / tp_cp
            elif kind == "global_expert":
                counts_N, tokens = self._reduced_counts(routing_map_TN, valid_T, self.tp_dp_cp_group)
                buf = self.global_balance_counts
                if buf.device != counts_N.device:
                    buf.data = buf.data.to(counts_N.device)
                buf[:-1] += counts_N
                buf[-1] += tokens
                loss = global_batch_balance_loss(
                    scores_TN, buf[:-1].clone(), buf[-1].clone(), self.topk, coeff,
                    group_tokens=tokens, dp_size=self.balance_dp_size, valid_T=valid_T,
                )
            elif kind == "sequence":
                loss = self._sequence_loss(scores_TN, routing_map_TN, valid_T, seq_length, bsz, coeff) / tp_cp
            elif kind == "communication":
                loss = communication_balance_loss(
                    scores_TN, routing_map_TN, self.balance_ep_size, coeff, valid_T=valid_T
                ) / tp_cp
            elif kind == "subkey":
                assert subkeys is not None, "the subkey loss needs the product-key half scores and ids"
                loss = self._subkey_loss(*subkeys, valid_T, coeff) / tp_cp
            else:
                raise AssertionError(f"unhandled balance loss {kind!r}")
            probs_TN = self.attach_and_log_load_balancing_loss(
                probs_TN, coeff, loss, LOSS_LOG_NAMES[kind], self.tp_cp_group, valid_token_count=n_local
            )
        return probs_TN

    def _sequence_loss(
        self, scores_TN: Tensor, routing_map_TN: Tensor, valid_T: Tensor | None, S: int, B: int, coeff: float
    ) -> Tensor:
        N = routing_map_TN.shape[1]
        valid_SB = None if valid_T is None else valid_T.view(S, B)
        with torch.no_grad():
            counts_BN = sequence_counts(routing_map_TN.view(S, B, N), valid_SB=valid_SB)
            tokens_B = valid_SB.sum(0).long() if valid_SB is not None else torch.full(
                (B,), S, dtype=torch.long, device=counts_BN.device)
            packed = _all_reduce(torch.cat([counts_BN.reshape(-1), tokens_B]), self.tp_cp_group)
        return sequence_balance_loss(
            scores_TN.view(S, B, N), packed[:-B].view(B, N), self.topk, coeff, valid_SB=valid_SB, tokens_B=packed[-B:]
        )

    def _subkey_loss(
        self, a_THn1: Tensor, b_THn2: Tensor, local_THk: Tensor, valid_T: Tensor | None, coeff: float
    ) -> Tensor:
        return reduced_subkey_loss(a_THn1, b_THn2, local_THk, valid_T, coeff, self.tp_cp_group)

    # ------------------------------------------------------------------------------------------
    # Once per step (called by bias_update.finish_balancing_step)
    # ------------------------------------------------------------------------------------------

    def balance_step_counts(self) -> Tensor | None:
        """This step's local selections per expert, for the step-end all-reduce; None if not tracked."""
        if self.balance_metrics and self.training and self._balance_micro_batches > 0:
            return self.step_load_counts
        return None

    def record_balance_step(self, counts_N: Tensor) -> None:
        """Records the step's metrics from its counts all-reduced over TP x DP x CP.

        Megatron's report averages a metric over micro-batches (x 1/num_microbatches); a step
        metric is recorded once, so it is recorded times the step's micro-batch count.
        """
        self._balance_step += 1
        if self._usage_window is None:
            self._usage_window = UsageWindow(counts_N.numel(), self.balance_usage_window, device=counts_N.device)
        self._usage_window.update(counts_N, self._balance_step)
        values = step_load_metrics(counts_N, ep_size=self.balance_ep_size, grid=self._balance_grid(),
                                   num_real=getattr(self, "num_real_experts", None))
        values["experts_used_fraction"] = usage_fraction(self._usage_window, self._balance_step)
        cfg = self.config
        num_layers = cfg.num_layers + (cfg.mtp_num_layers or 0)
        layer_number = self.layer_number + cfg.num_layers if self.is_mtp_layer else self.layer_number
        names = list(LOAD_METRICS) + (list(EP_METRICS) if self.balance_ep_size > 1 else [])
        names += list(PRODUCT_KEY_METRICS) if self._balance_grid() is not None else []
        tracker = get_moe_metrics_tracker()
        for name in names:
            # Identical on every rank of the group (all-reduced counts): no further reduction.
            tracker.record(name, values[name] * self._balance_micro_batches, layer_number, num_layers,
                           needs_dp_avg=False)

    def reset_balancing_step(self) -> None:
        """Zeroes the per-step buffers (global-batch counts, step load)."""
        if getattr(self, "global_balance_counts", None) is not None:
            self.global_balance_counts.zero_()
        if self.balance_metrics:
            self.step_load_counts.zero_()
        self._balance_micro_batches = 0
