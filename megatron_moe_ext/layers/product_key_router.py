"""``ProductKeyRouter``: exact top-k over N = heads * n1 * n2 experts at O(sqrt N) cost per token,
for Megatron's MoELayer (Lample et al. 2019, PKM; He 2024, PEER arXiv 2407.04153).

Math. A token's query q = norm(W_q x), one D-vector per head, is split in halves [q1; q2]. Expert
(i, j) of head h's pool has the full key [c_h,i; c'_h,j], so its logit is s = a_h,i + b_h,j with
a = q1 . C_h, b = q2 . C'_h: a dense router whose [N x hidden] gate has rank <= heads*D. Top-k
over s is exact via the product-key core (``kernels/product_keys.py``); everything else Megatron
computes from dense logits is separable over the grid and computed in O(n1 + n2):
log-partition logZ = logsumexp_h(lse_i a_h,i + lse_j b_h,j) (for pre-softmax gates and the
z-loss), and the full softmax p_h,ij = exp(a_h,i + b_h,j - logZ).

Heads own disjoint pools: head h routes among experts [h*N/heads, (h+1)*N/heads) and fills
topk/heads of the token's top-k slots, so every row of the routing map has exactly topk distinct
experts (a union of overlapping heads could not guarantee that). The gates are Megatron's,
computed over the token's topk selected logits jointly: softmax over them (or, with
``moe_router_pre_softmax``, the full softmax over all N), or sigmoid normalised over them; then
``moe_router_topk_scaling_factor``. With one head the router equals a TopKRouter whose gate weight
is the full key matrix times W_q (tested that way).

Megatron contract: ``forward(hidden [S, B, h], padding_mask [S, B] True = padding)`` returns dense
probs [S*B, N] and a bool routing map [S*B, N], so every dispatcher, capacity dropping, EP and
TP+SP work unchanged. Megatron's aux losses (aux_loss, seq_aux_loss, global_aux_loss) are applied
by TopKRouter's own code to the full softmax, which is materialised as [T, N] only when one of
them is on (the routing outputs are [T, N] anyway); the z-loss uses logZ. Retrieval runs in fp32
(fp64 with ``--moe-router-dtype fp64``). Parameters are replicated and marked
``sequence_parallel`` like Megatron's router weight.

Biases (``add_bias_linear``, Megatron's default). Megatron's TopKRouter adds ``router.bias`` [N]
to its dense logits; a per-expert logit offset is not separable over the grid (the exact top-k
needs s = a_i + b_j), so that bias is dropped with the dense gate. The bias of the router's linear
map goes to the query projection instead: q = norm(W_q x + b_q), ``query_bias`` [H*D], replicated
and ``sequence_parallel`` like ``query_weight``, same dtype, in the checkpoint as ``router.query_bias``.
With one head and no query norm this is exactly a TopKRouter with weight K W_q and bias K b_q.
Init: zero, the convention of Megatron's linear layers (``ColumnParallelLinear`` zeroes its bias),
not Megatron's Router (``init_method`` on its bias): a random b_q moves every token's query the
same way, a shared preference for the same experts at step 0, whereas zero starts from the
bias-free router. Under the batch-norm query norm b_q is cancelled by the batch mean (its
gradient is zero, it stays at zero); it is kept so the parameter set depends on add_bias_linear
alone. Without add_bias_linear there is no ``query_bias`` (checkpoints of such runs load as before).

Auxiliary-loss-free balancing for product keys (``moe_pk_bias_balancing``; Wang et al. 2024,
arXiv 2408.15664, made separable): per-head row biases [H, n1] and column biases [H, n2] are added
to a and b for the selection only (the search stays exact for the biased scores), the gates use
the unbiased logits a_i + b_j. Row and column selection counts are accumulated during training
and, after each step (``finalize_model_grads_with_balancing``), all-reduced over the
tensor+data+context group and turned into bias += rate * sign(mean - count): 2n counts per head
instead of n^2 expert counts, which stay meaningful at a million experts.

Row and column biases balance the rows and the columns, not the experts: a token's affinity for
a (row, column) pair that the separable scores a_i + b_j do not explain (measured on the tiny
model: rows and columns within 2% of their mean while one expert carries 2x its share) is beyond
them. ``moe_pk_expert_bias_balancing`` adds a per-expert bias [H, n1*n2] where the k'1 x k'2
candidate pairs are combined (``_combine_candidates``): the selection is the top-k of
(a_i + r_i) + (b_j + c_j) + e_ij over the candidate grid (exact over all N only when k' covers
the grid), the gates stay unbiased, and e follows Megatron's expert-bias rule from the N
all-reduced per-expert counts, in the same all-reduce as the row and column counts.

Null experts (``--moe-null-experts M``, ``layers/null_experts.py``): the grid holds N + M cells (the
layout is sized N + M by ``settings/router.py``) and the last M ids are null; the router runs on
``null_expert_config(config)`` (num_moe_experts = N + M), so selection, gates, z-loss, Megatron's aux
losses and our balancing see all N + M cells; the dispatcher gets the N real columns, the null ones
go to ``last_null_selection`` and the ``null_fraction`` / ``active_experts`` metrics.

Legend: S sequence, B micro-batch, T = S*B tokens, h hidden, H heads, D key dim (D2 = D/2),
n1 x n2 grid per head, N experts (N + M grid cells with null experts), K top-k of the token (k = K/H per head).
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    ProcessGroupCollection,
    apply_router_token_dropping,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.balancing.attach import BalancingMixin
from megatron_moe_ext.balancing.bias_update import selection_bias_step
from megatron_moe_ext.balancing.losses import count_subkeys
from megatron_moe_ext.kernels.product_key_core import (
    biased_topk_from_half_scores,
    pooled_expert_ids,
    product_key_half_scores,
    product_key_log_partition,
    router_gates,
)
from megatron_moe_ext.layers.noisy_gating import add_gating_noise
from megatron_moe_ext.layers.null_experts import null_expert_config, record_null_metrics, split_null_columns
from megatron_moe_ext.layers.query_norm import QueryNorm
from megatron_moe_ext.settings import ext_settings


def product_key_full_scores(a_THn1: torch.Tensor, b_THn2: torch.Tensor, score_function: str) -> torch.Tensor:
    """The router's normalised scores over all N experts, [T, N] (Megatron's scores for aux
    losses: full softmax, or sigmoid normalised to sum 1)."""
    T = a_THn1.shape[0]
    logits_THnn = a_THn1.unsqueeze(-1) + b_THn2.unsqueeze(-2)
    if score_function == "softmax":
        logz_T = product_key_log_partition(a_THn1, b_THn2)
        return torch.exp(logits_THnn - logz_T.view(T, 1, 1, 1)).reshape(T, -1)
    scores_TN = torch.sigmoid(logits_THnn).reshape(T, -1)
    return scores_TN / (scores_TN.sum(dim=-1, keepdim=True) + 1e-20)


class ProductKeyRouter(BalancingMixin, TopKRouter):
    """Megatron router (``MoESubmodules.router``) selecting experts by product keys.

    Settings come from the config's ``RouterSettings`` (``ext_settings(config).router``: the
    product-key layout, key dim, query norm, selection biases, noisy gating) and Megatron's own
    routing fields (topk, score function, pre-softmax, scaling factor, aux-loss
    types and coefficients, z-loss, capacity factor, input jitter). ``--moe-balance-losses`` and
    ``--moe-balance-metrics`` come through ``BalancingMixin`` (``balancing/attach.py``): the subkey
    loss from the half scores and the selected ids in O(T H (n1 + n2)); the expert, sequence,
    device and communication losses from the full scores [T, N] (``product_key_full_scores``,
    O(T N), built only when one of them is on); the step load counted from the ids in O(T K).
    """

    def __init__(
        self, config: TransformerConfig, pg_collection: ProcessGroupCollection | None = None, is_mtp_layer: bool = False,
        **router_kwargs,  # what newer Megatron adds (dev: layer_number=) goes on to TopKRouter
    ) -> None:
        # Checked with the config (settings/router.py): the layout and Megatron's routing options.
        settings = ext_settings(config).router
        if settings.pk_layout is None:
            raise ValueError(
                f"ProductKeyRouter with moe_router_type={settings.router_type!r}; fix: --moe-router-type product_key "
                "(the config then checks the product-key layout)"
            )
        self.layout = settings.pk_layout
        self.num_real_experts = config.num_moe_experts
        self.num_null_experts = settings.null_experts
        self.last_null_selection: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(
            config=null_expert_config(config), pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, **router_kwargs
        )
        # TopKRouter's constructor made a dense [N, h] gate and, with add_bias_linear, a logit bias [N]
        # (torch.empty: reserved, never touched, since reset_parameters is ours); product keys replace
        # the gate, and the query bias below replaces the logit bias (module docstring: not separable).
        del self.weight
        self.weight = None
        if self.bias is not None:
            del self.bias
            self.bias = None

        H, D = self.layout.heads, settings.pk_key_dim
        self.key_dim = D
        sp = config.sequence_parallel
        self.query_weight = torch.nn.Parameter(torch.empty(H * D, config.hidden_size, dtype=torch.float32))
        # q = W_q x + b_q with Megatron's add_bias_linear; zero-initialised (module docstring).
        self.query_bias = (
            torch.nn.Parameter(torch.zeros(H * D, dtype=torch.float32)) if config.add_bias_linear else None
        )
        self.row_keys = torch.nn.Parameter(torch.empty(H, self.layout.rows, D // 2, dtype=torch.float32))
        self.col_keys = torch.nn.Parameter(torch.empty(H, self.layout.cols, D // 2, dtype=torch.float32))
        self.query_norm = QueryNorm(
            settings.pk_query_norm, H, D,
            stats_group=self.tp_dp_cp_group, sequence_parallel=sp,
        )
        self.bias_balancing = settings.pk_bias_balancing
        self.expert_bias_balancing = settings.pk_expert_bias_balancing
        self.bias_update_rule = settings.pk_bias_update_rule
        # fp32 buffers like Megatron's expert_bias (kept fp32 in forward under Float16Module).
        if self.bias_balancing:
            self.register_buffer("row_bias", torch.zeros(H, self.layout.rows))
            self.register_buffer("col_bias", torch.zeros(H, self.layout.cols))
            self.register_buffer("local_row_counts", torch.zeros(H, self.layout.rows), persistent=False)
            self.register_buffer("local_col_counts", torch.zeros(H, self.layout.cols), persistent=False)
        if self.expert_bias_balancing:
            self.register_buffer("pk_expert_bias", torch.zeros(H, self.layout.pool_size))
            self.register_buffer("local_expert_counts", torch.zeros(H, self.layout.pool_size), persistent=False)
        self.noisy = settings.noisy_gating
        if self.noisy:
            self.noise_row_weight = torch.nn.Parameter(torch.zeros(H * self.layout.rows, config.hidden_size))
            self.noise_col_weight = torch.nn.Parameter(torch.zeros(H * self.layout.cols, config.hidden_size))
        self.reset_parameters()
        self._init_balancing(pg_collection)

    def reset_parameters(self) -> None:
        if not hasattr(self, "row_keys"):
            return  # called by Router.__init__ before our parameters exist
        if self.config.perform_initialization:
            self.config.init_method(self.query_weight)
            if self.query_bias is not None:
                self.query_bias.data.zero_()  # Megatron's linear-layer convention, not its Router's
            # Unit-variance half scores for unit-RMS queries: std 1/sqrt(D/2) per sub-key entry.
            std = 1.0 / math.sqrt(self.key_dim // 2)
            torch.nn.init.normal_(self.row_keys, std=std)
            torch.nn.init.normal_(self.col_keys, std=std)
        for param in self.parameters():
            param.data = param.data.to(dtype=self.config.params_dtype)
            # Replicated over TP but fed SP-sharded tokens: partial gradients, all-reduced over TP.
            param.sequence_parallel = self.config.sequence_parallel

    def _retrieval_dtype(self) -> torch.dtype:
        return torch.float64 if self.config.moe_router_dtype == "fp64" else torch.float32

    def half_scores(
        self, input_Th: torch.Tensor, valid_T: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """a_THn1, b_THn2: the two halves' scores of every token against every sub-key (noisy at
        train time when noisy gating is on)."""
        dtype = self._retrieval_dtype()
        H, D = self.layout.heads, self.key_dim
        x_Th = input_Th.to(dtype)
        bias = self.query_bias.to(dtype) if self.query_bias is not None else None
        q_THD = torch.nn.functional.linear(x_Th, self.query_weight.to(dtype), bias).view(-1, H, D)
        q_THD = self.query_norm(q_THD, valid_T).to(dtype)
        a_THn1, b_THn2 = product_key_half_scores(q_THD, (self.row_keys.to(dtype), self.col_keys.to(dtype)))
        if self.noisy and self.training:
            T = x_Th.shape[0]
            noise_a = torch.nn.functional.linear(x_Th, self.noise_row_weight.to(dtype)).view(T, H, -1)
            noise_b = torch.nn.functional.linear(x_Th, self.noise_col_weight.to(dtype)).view(T, H, -1)
            a_THn1, b_THn2 = add_gating_noise(a_THn1, noise_a), add_gating_noise(b_THn2, noise_b)
        return a_THn1, b_THn2

    def select(
        self, a_THn1: torch.Tensor, b_THn2: torch.Tensor, valid_T: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's exact top-k in its own pool: logits_TK and global expert ids_TK (with bias
        balancing: selected on the biased half scores, logits unbiased, selections counted)."""
        balancing = self.bias_balancing or self.expert_bias_balancing
        if balancing:
            self._keep_bias_fp32()
        scores_THk, local_THk = biased_topk_from_half_scores(
            a_THn1, b_THn2, self.layout.k, subkey_topk=self.layout.subkey_topk,
            row_bias_Hn1=self.row_bias if self.bias_balancing else None,
            col_bias_Hn2=self.col_bias if self.bias_balancing else None,
            expert_bias_HN=self.pk_expert_bias if self.expert_bias_balancing else None,
        )
        if balancing and self.training and torch.is_grad_enabled():  # not in eval, nor in recompute
            self._count_selections(local_THk, valid_T)
        return scores_THk.reshape(scores_THk.shape[0], -1), pooled_expert_ids(local_THk, self.layout.pool_size)

    def _bias_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(selection bias, its local count buffer) of every active bias, in update order."""
        pairs = []
        if self.bias_balancing:
            pairs += [(self.row_bias, self.local_row_counts), (self.col_bias, self.local_col_counts)]
        if self.expert_bias_balancing:
            pairs.append((self.pk_expert_bias, self.local_expert_counts))
        return pairs

    def _keep_bias_fp32(self) -> None:
        for bias, counts in self._bias_buffers():
            for buf in (bias, counts):
                if buf.dtype != torch.float32:
                    buf.data = buf.data.float()

    def _maintain_float32_expert_bias(self) -> None:
        """TopKRouter calls this before saving and loading its state (and in its forward): our
        selection biases too are saved and loaded in fp32, so a bf16 model (Float16Module casts
        buffers) does not round them on resume."""
        super()._maintain_float32_expert_bias()
        if hasattr(self, "expert_bias_balancing"):  # not during Router.__init__
            self._keep_bias_fp32()

    @torch.no_grad()
    def _count_selections(self, local_THk: torch.Tensor, valid_T: torch.Tensor | None) -> None:
        if self.bias_balancing:
            rows_Hn1, cols_Hn2 = count_subkeys(local_THk, self.layout.rows, self.layout.cols, valid_T)
            self.local_row_counts += rows_Hn1
            self.local_col_counts += cols_Hn2
        if self.expert_bias_balancing:
            T, H, k = local_THk.shape
            pool = self.layout.pool_size
            weight_THk = (torch.ones(T, H, k, device=local_THk.device) if valid_T is None
                          else valid_T.view(T, 1, 1).expand(T, H, k).float())
            heads_1H1 = torch.arange(H, device=local_THk.device).view(1, H, 1)
            self.local_expert_counts.view(-1).index_add_(
                0, (local_THk + heads_1H1 * pool).reshape(-1), weight_THk.reshape(-1)
            )

    def balancing_counts(self) -> list[torch.Tensor]:
        """The local selection counts a step's bias update reduces (rows and columns with
        ``moe_pk_bias_balancing``, then experts with ``moe_pk_expert_bias_balancing``)."""
        return [counts for _, counts in self._bias_buffers()]

    @torch.no_grad()
    def apply_bias_update(self, *reduced_counts: torch.Tensor) -> None:
        """bias += rate * step(counts) per head for every active bias (rows and columns: per sub-key;
        experts: per expert of the head's pool), from the all-reduced counts in ``balancing_counts``
        order; step is ``moe_pk_bias_update_rule`` (``selection_bias_step``; default Megatron's
        sign(mean - count)). Resets the local counts."""
        pairs = self._bias_buffers()
        if len(reduced_counts) != len(pairs):
            raise ValueError(f"apply_bias_update got {len(reduced_counts)} count tensors, this router keeps "
                             f"{len(pairs)} biases; fix: pass the all-reduced balancing_counts(), in order")
        rate = self.config.moe_router_bias_update_rate
        for (bias, local), counts in zip(pairs, reduced_counts):
            bias.add_(selection_bias_step(counts, self.bias_update_rule) * rate)
            local.zero_()

    def gates(self, logits_TK: torch.Tensor, logz_T: torch.Tensor | None) -> torch.Tensor:
        """Megatron's gate functions, over the selected logits of each token."""
        cfg = self.config
        return router_gates(
            logits_TK, score_function=cfg.moe_router_score_function, pre_softmax=cfg.moe_router_pre_softmax,
            topk=self.topk, scaling_factor=cfg.moe_router_topk_scaling_factor, logz_T=logz_T,
        )

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None, *_unused, **_unused_kw):
        # _unused: what newer Megatron's MoELayer passes after padding_mask, positionally (dev: input_ids,
        # packed_seq_params); product-key routing reads neither.
        seq_length, bsz = input.shape[:2]
        input = self.apply_input_jitter(input)
        input_Th = input.reshape(-1, input.shape[-1])
        pad_T = padding_mask.reshape(-1).bool() if padding_mask is not None else None
        valid_T = ~pad_T if pad_T is not None else None

        a_THn1, b_THn2 = self.half_scores(input_Th, valid_T)
        logits_TK, ids_TK = self.select(a_THn1, b_THn2, valid_T)
        need_logz = (self.config.moe_router_score_function == "softmax" and self.config.moe_router_pre_softmax) or (
            self._z_loss_on()
        )
        logz_T = product_key_log_partition(a_THn1, b_THn2) if need_logz else None
        probs_TK = self.gates(logits_TK, logz_T)

        out_dtype = input.dtype if self.config.moe_router_dtype is None else self._retrieval_dtype()
        T, N = input_Th.shape[0], self.config.num_moe_experts
        # In-place scatter into fresh zeros: one [T, N] allocation each (the contract's dense outputs
        # are the only O(T N) work left); the zeros need no gradient, so backward is a gather.
        probs_TN = torch.zeros(T, N, dtype=out_dtype, device=input.device).scatter_(1, ids_TK, probs_TK.to(out_dtype))
        routing_map_TN = torch.zeros(T, N, dtype=torch.bool, device=input.device).scatter_(1, ids_TK, True)
        map_for_aux_TN = routing_map_TN

        if self._z_loss_on():
            probs_TN = self._attach_z_loss(probs_TN, logz_T, pad_T)

        if self.config.moe_expert_capacity_factor is not None:
            probs_TN, routing_map_TN = apply_router_token_dropping(
                probs_TN,
                routing_map_TN,
                router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )

        train = self.training and torch.is_grad_enabled()
        megatron_aux = train and self.is_aux_loss_enabled()
        ours = self._balancing_active()
        need_full = megatron_aux or (ours and any(kind != "subkey" for kind, _ in self.balance_losses))
        score_function = self.config.moe_router_score_function
        scores_TN = product_key_full_scores(a_THn1, b_THn2, score_function) if need_full else None
        if ours:
            # The step's load: from the ids (O(T K)) unless capacity dropping changed the map.
            dropped = self.config.moe_expert_capacity_factor is not None
            self._count_step_load(routing_map_TN, valid_T, ids_TK=None if dropped else ids_TK)
            if self.balance_losses:
                local_THk = (ids_TK % self.layout.pool_size).view(T, self.layout.heads, self.layout.k)
                probs_TN = self._attach_balance_losses(
                    probs_TN, scores_TN=scores_TN, routing_map_TN=map_for_aux_TN, valid_T=valid_T,
                    seq_length=seq_length, bsz=bsz, subkeys=(a_THn1, b_THn2, local_THk),
                )
        if megatron_aux:
            aux_map_TN = map_for_aux_TN
            if pad_T is not None:
                keep_T1 = valid_T.unsqueeze(-1)
                scores_TN = scores_TN * keep_T1
                aux_map_TN = aux_map_TN & keep_T1
            padded = pad_T is not None
            probs_TN = self._apply_aux_loss(probs_TN, scores_TN, aux_map_TN, with_padding_mask=padded)
            probs_TN = self._apply_seq_aux_loss(
                probs_TN, scores_TN, aux_map_TN, seq_length, bsz, with_padding_mask=padded
            )
            probs_TN = self._apply_global_aux_loss(probs_TN, scores_TN, aux_map_TN, with_padding_mask=padded)
        if self.num_null_experts:
            probs_TN, routing_map_TN, null_map_TM, null_probs_TM = split_null_columns(
                probs_TN, routing_map_TN, self.num_real_experts
            )
            self.last_null_selection = (null_map_TM, null_probs_TM)
            if train:
                record_null_metrics(self, routing_map_TN, null_map_TM, valid_T)
        return probs_TN, routing_map_TN

    def _z_loss_on(self) -> bool:
        return self.config.moe_z_loss_coeff is not None and self.training and torch.is_grad_enabled()

    def _attach_z_loss(self, probs_TN: torch.Tensor, logz_T: torch.Tensor, pad_T: torch.Tensor | None) -> torch.Tensor:
        """Megatron's z-loss (ST-MoE), mean over valid tokens of logZ^2, from the separable logZ;
        scaled, attached and logged exactly as ``TopKRouter.apply_z_loss`` does."""
        coeff = self.config.moe_z_loss_coeff / self.tp_cp_group.size()
        sq_T = logz_T.float().square()
        if pad_T is not None:
            valid_T = (~pad_T).to(sq_T.dtype)
            z_loss = (sq_T * valid_T).sum() / valid_T.sum().clamp(min=1.0) * coeff
            num_local_tokens = valid_T.sum()
        else:
            z_loss = sq_T.mean() * coeff
            num_local_tokens = sq_T.shape[0]
        if self.calculate_per_token_loss:
            probs_TN = MoEAuxLossAutoScaler.apply(probs_TN, z_loss * num_local_tokens * self.tp_cp_group.size())
        else:
            probs_TN = MoEAuxLossAutoScaler.apply(probs_TN, z_loss)
        if self.is_mtp_layer and self.config.mtp_use_repeated_layer and self.config.mtp_num_layers is not None:
            z_loss = z_loss / self.config.mtp_num_layers
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        layer_number = self.layer_number + self.config.num_layers if self.is_mtp_layer else self.layer_number
        get_moe_metrics_tracker().record(
            "z_loss", z_loss / coeff, layer_number, num_layers, avg_group=self.tp_dp_cp_group
        )
        return probs_TN
