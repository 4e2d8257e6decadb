"""``ExpertChoiceRouter``: each expert chooses its top-c tokens (Zhou et al. 2022, "Mixture-of-Experts with
Expert Choice Routing", arXiv 2202.09368, Sec. 3.1), in Megatron's router contract.

Math. Megatron's gating gives logits x W^T (+ the router bias with ``add_bias_linear``) over the E = N + M
router outputs (N real experts, M null experts: ``layers/null_experts.py``); the scores are the softmax over
the E outputs of each token, in fp32 (fp64 with ``--moe-router-dtype fp64``): S = softmax(X W^T), the
paper's Eq. 1. In training, expert e takes the c tokens of the token group with the largest S[:, e]
(I, G = TopK(S^T, c)), c = ``ExpertChoiceSettings.capacity(group tokens)`` = ceil(n k / N f); its gate
for a chosen token is that score (no renormalisation). A token may get 0..E experts; a token no real
expert chose keeps only the residual (its MoE output is 0), as Megatron's capacity dropping does.

Token group: this data-parallel rank's micro-batch, all S x B tokens. Under sequence parallelism the router
sees a sequence shard, so the [T_loc, E] scores are all-gathered over the tensor-parallel group (detached:
the selection has no gradient) and each rank keeps its own rows of the choice; the gates are the local
scores, so gradients reach the logits, the router weight and the input through the local rows only (the
router weight is marked ``sequence_parallel``: Megatron sums its partial gradients over TP). The choice
is thus the same at any TP/SP/EP layout. Padding tokens (``padding_mask`` True) are never chosen; c is
computed from the group's size (padding included), so with fewer valid tokens than c an expert takes all
valid tokens.

Causal rule (evaluation and generation, ``not self.training``): selection over a batch sees later
tokens, so ``--moe-ec-eval-rule`` replaces it by a per-token rule: 'threshold', token t uses expert e iff
S[t, e] >= thr_e, gate S[t, e]; 'token_choice', the top-k of S[t, :], gate S[t, e]. ``batch_choice(model)``
switches every expert-choice router of a model back to the batch choice (the evaluation log's gap).

Threshold estimator (``ec_thresholds`` [E], a persistent fp32 buffer saved in checkpoints): for each
training micro-batch, q_e = the c-th largest score of column e over the group's valid tokens (the
min(c, valid)-th with fewer valid tokens), averaged over the data-parallel ranks (one all-reduce of E + 1
floats over the TP x DP group per layer and micro-batch, so every rank holds the same buffer); then a
bias-corrected exponential moving average, thr <- (b m thr + (1 - b) q) / (b m + 1 - b), m <- b m + 1 - b,
with b = ``EC_THRESHOLD_DECAY`` and the correction mass m in ``ec_threshold_mass`` [1] (persistent; m = 0:
no update yet, thresholds 0). With a stationary score distribution the rule passes about c of every n
tokens to each expert, the training compute.

Logged in training through Megatron's MoE metrics tracker: ``active_experts`` (mean real experts per valid
token), ``ec_unrouted_fraction`` (valid tokens no real expert chose) and, with null experts,
``null_fraction`` (null selections / all selections); computed on the whole group, averaged over the
TP x DP ranks like Megatron's z-loss.

Refused by the settings (``settings/expert_choice.py``): Megatron's token-choice options (expert bias,
group-limited routing, router fusion, force-balancing, routing replay, sinkhorn, capacity factor, permute
fusion, flex dispatcher, top-k scaling), aux losses and ours (balanced by construction), context parallelism.
The z-loss (``--moe-z-loss-coeff``) and input jitter are Megatron's, over the E logits.

Legend: S sequence (local shard under SP), B micro-batch, T = S*B local tokens, G group tokens (T x TP
under SP), N real experts, M null experts, E = N + M, c capacity, h hidden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.layers.null_experts import null_expert_config, null_routing_stats, split_null_columns
from megatron_moe_ext.settings import ext_settings
from megatron_moe_ext.settings.expert_choice import EC_THRESHOLD_DECAY


def expert_choice_map(scores_GE: torch.Tensor, capacity: int, valid_G: torch.Tensor | None = None) -> torch.Tensor:
    """Batch choice, bool [G, E]: column e marks the ``capacity`` valid rows with the largest scores[:, e]."""
    if valid_G is not None:
        scores_GE = scores_GE.masked_fill(~valid_G.unsqueeze(-1), float("-inf"))
    idx_cE = torch.topk(scores_GE, capacity, dim=0).indices
    map_GE = torch.zeros(scores_GE.shape, dtype=torch.bool, device=scores_GE.device).scatter_(0, idx_cE, True)
    return map_GE if valid_G is None else map_GE & valid_G.unsqueeze(-1)


def capacity_scores(scores_GE: torch.Tensor, capacity: int, valid_G: torch.Tensor | None = None) -> torch.Tensor:
    """q_E: each column's ``capacity``-th largest score over the valid rows (the min(capacity, valid)-th
    with fewer valid rows; 0 without any), the quantity the threshold rule tracks."""
    if valid_G is not None:
        scores_GE = scores_GE.masked_fill(~valid_G.unsqueeze(-1), float("-inf"))
        n_valid = valid_G.sum()
    else:
        n_valid = torch.tensor(scores_GE.shape[0], device=scores_GE.device)
    top_cE = torch.topk(scores_GE, capacity, dim=0).values
    row = (n_valid.clamp(min=1, max=capacity) - 1).view(1, 1).expand(1, scores_GE.shape[1])
    q_E = top_cE.gather(0, row).squeeze(0)
    return torch.where(n_valid > 0, q_E, torch.zeros_like(q_E))


def causal_map(scores_TE: torch.Tensor, rule: str, *, thresholds_E: torch.Tensor, topk: int) -> torch.Tensor:
    """The causal rules, bool [T, E], each token on its own: 'threshold' (scores >= thresholds) or
    'token_choice' (each row's top-k)."""
    if rule == "threshold":
        return scores_TE >= thresholds_E.to(scores_TE.dtype)
    if rule == "token_choice":
        idx_TK = torch.topk(scores_TE, topk, dim=-1).indices
        return torch.zeros(scores_TE.shape, dtype=torch.bool, device=scores_TE.device).scatter_(1, idx_TK, True)
    raise ValueError(f"unknown expert-choice eval rule {rule!r}; fix: threshold or token_choice")


def ema_threshold_update(
    thresholds_E: torch.Tensor, mass_1: torch.Tensor, q_E: torch.Tensor, weight: torch.Tensor, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One bias-corrected EMA step of the thresholds toward q (unchanged where ``weight`` is 0):
    thr' = (b m thr + (1 - b) q) / m', m' = b m + (1 - b)."""
    update = weight > 0
    mass_new = torch.where(update, decay * mass_1 + (1.0 - decay), mass_1)
    blended = (decay * mass_1 * thresholds_E + (1.0 - decay) * q_E) / mass_new.clamp(min=1e-30)
    return torch.where(update, blended, thresholds_E), mass_new


class ExpertChoiceRouter(TopKRouter):
    """Megatron router (``MoESubmodules.router``) where each expert chooses its tokens (module docstring).

    Reads ``ext_settings(config).router``: ``expert_choice`` (capacity factor, eval rule) and
    ``null_experts``. Returns Megatron's contract: probs [T, N] (the gates, in the logits' dtype) and a
    bool routing map [T, N]; rows hold any number of experts.
    """

    def __init__(
        self, config: TransformerConfig, pg_collection: ProcessGroupCollection | None = None, is_mtp_layer: bool = False,
        **router_kwargs,  # what newer Megatron adds (dev: layer_number=) goes on to TopKRouter
    ) -> None:
        settings = ext_settings(config).router
        if settings.expert_choice is None:
            raise ValueError(
                f"ExpertChoiceRouter with moe_router_type={settings.router_type!r}; fix: --moe-router-type "
                "expert_choice (the config then checks the expert-choice options)"
            )
        self.ec = settings.expert_choice
        self.num_real_experts = config.num_moe_experts
        self.num_null_experts = settings.null_experts
        # The router alone sees N + M outputs (weight [E, h], bias [E], z-loss over E); experts keep N.
        super().__init__(config=null_expert_config(config), pg_collection=pg_collection, is_mtp_layer=is_mtp_layer,
                         **router_kwargs)
        E = self.num_real_experts + self.num_null_experts
        self.register_buffer("ec_thresholds", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("ec_threshold_mass", torch.zeros(1, dtype=torch.float32))
        self.force_batch_choice = False  # batch_choice(model): evaluate with the training rule
        self.last_null_selection: tuple[torch.Tensor, torch.Tensor] | None = None

    def _maintain_float32_expert_bias(self) -> None:
        """TopKRouter calls this before saving, loading and in forward: the thresholds stay fp32 under
        Float16Module (which casts buffers), as Megatron keeps its expert bias."""
        super()._maintain_float32_expert_bias()
        for name in ("ec_thresholds", "ec_threshold_mass"):
            buf = getattr(self, name, None)  # not there yet during Router.__init__
            if buf is not None and buf.dtype != torch.float32:
                buf.data = buf.data.float()

    def _score_dtype(self) -> torch.dtype:
        return torch.float64 if self.config.moe_router_dtype == "fp64" else torch.float32

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None, *_unused, **_unused_kw):
        # _unused: what newer Megatron's MoELayer passes after padding_mask (dev: input_ids, packed_seq_params).
        self._maintain_float32_expert_bias()
        input = self.apply_input_jitter(input)
        logits = self.gating(input)
        E = logits.shape[-1]
        logits_TE = logits.reshape(-1, E)
        pad_T = padding_mask.reshape(-1).bool() if padding_mask is not None else None
        valid_T = ~pad_T if pad_T is not None else None
        logits_TE = self.apply_z_loss(logits_TE, padding_mask=pad_T)
        scores_TE = torch.softmax(logits_TE, dim=-1, dtype=self._score_dtype())
        map_TE = self.select(scores_TE.detach(), valid_T)
        probs_TE = (scores_TE * map_TE).to(logits_TE.dtype)
        probs_TN, map_TN, null_map_TM, null_probs_TM = split_null_columns(probs_TE, map_TE, self.num_real_experts)
        self.last_null_selection = (null_map_TM, null_probs_TM) if self.num_null_experts else None
        return probs_TN, map_TN

    def select(self, scores_TE: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
        """The routing map [T, E] (bool) of this rank's tokens: the batch choice in training (or under
        ``batch_choice``), else the causal rule."""
        if self.training or self.force_batch_choice:
            return self._batch_choice(scores_TE, valid_T)
        map_TE = causal_map(scores_TE, self.ec.eval_rule, thresholds_E=self.ec_thresholds, topk=self.topk)
        return map_TE if valid_T is None else map_TE & valid_T.unsqueeze(-1)

    def _group(
        self, scores_TE: torch.Tensor, valid_T: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(scores_GE, valid_G, offset of this rank's rows): the whole micro-batch under sequence parallelism."""
        tp = self.tp_group
        if not (self.config.sequence_parallel and tp is not None and tp.size() > 1):
            return scores_TE, valid_T, 0
        scores_GE = gather_from_sequence_parallel_region(scores_TE, group=tp)
        valid_G = None
        if valid_T is not None:
            valid_G = gather_from_sequence_parallel_region(valid_T.to(scores_TE.dtype).unsqueeze(-1), group=tp)
            valid_G = valid_G.squeeze(-1) > 0.5
        return scores_GE, valid_G, tp.rank() * scores_TE.shape[0]

    def _batch_choice(self, scores_TE: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
        learn = self.training and torch.is_grad_enabled()  # not in eval, nor in a no-grad first pass of recompute
        with torch.no_grad():
            scores_GE, valid_G, offset = self._group(scores_TE, valid_T)
            capacity = self.ec.capacity(scores_GE.shape[0])
            map_GE = expert_choice_map(scores_GE, capacity, valid_G)
            if learn:
                self._update_thresholds(capacity_scores(scores_GE, capacity, valid_G), valid_G)
                self._record_metrics(map_GE, valid_G)
            return map_GE[offset : offset + scores_TE.shape[0]]

    def _update_thresholds(self, q_E: torch.Tensor, valid_G: torch.Tensor | None) -> None:
        """q averaged over the data-parallel ranks (TP ranks hold the same group), then one EMA step."""
        has = torch.ones(1, device=q_E.device) if valid_G is None else (valid_G.any()).float().view(1)
        stats = torch.cat([q_E.float() * has, has])
        group = self.tp_dp_cp_group
        if group is not None and group.size() > 1:
            torch.distributed.all_reduce(stats, group=group)
        weight = stats[-1]
        mean_E = stats[:-1] / weight.clamp(min=1.0)
        thresholds, mass = ema_threshold_update(self.ec_thresholds, self.ec_threshold_mass, mean_E, weight,
                                                EC_THRESHOLD_DECAY)
        self.ec_thresholds.copy_(thresholds)
        self.ec_threshold_mass.copy_(mass)

    def _record_metrics(self, map_GE: torch.Tensor, valid_G: torch.Tensor | None) -> None:
        """active_experts, ec_unrouted_fraction (and null_fraction) of the group, in Megatron's tracker."""
        N = self.num_real_experts
        map_GN = map_GE[:, :N]
        null_fraction, active = null_routing_stats(map_GN, map_GE[:, N:], valid_G)
        unrouted_G = ~map_GN.any(dim=-1)
        if valid_G is not None:
            unrouted = (unrouted_G & valid_G).sum().float() / valid_G.sum().float().clamp(min=1.0)
        else:
            unrouted = unrouted_G.float().mean()
        values = {"active_experts": active, "ec_unrouted_fraction": unrouted}
        if self.num_null_experts:
            values["null_fraction"] = null_fraction
        cfg = self.config
        num_layers = cfg.num_layers + (cfg.mtp_num_layers or 0)
        layer_number = self.layer_number + cfg.num_layers if self.is_mtp_layer else self.layer_number
        tracker = get_moe_metrics_tracker()
        for name, value in values.items():
            tracker.record(name, value, layer_number, num_layers, avg_group=self.tp_dp_cp_group, needs_dp_avg=False)


def expert_choice_routers(model: torch.nn.Module | Iterable[torch.nn.Module]) -> list[ExpertChoiceRouter]:
    """Every ExpertChoiceRouter of ``model`` (a module, or Megatron's list of model chunks)."""
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, ExpertChoiceRouter)]


@contextlib.contextmanager
def batch_choice(model: torch.nn.Module | Iterable[torch.nn.Module]) -> Iterator[int]:
    """Within the block, every expert-choice router of ``model`` selects by the batch choice even in eval
    mode (thresholds untouched: they are updated in training only); yields how many routers it switched."""
    routers = expert_choice_routers(model)
    saved = [router.force_batch_choice for router in routers]
    for router in routers:
        router.force_batch_choice = True
    try:
        yield len(routers)
    finally:
        for router, flag in zip(routers, saved):
            router.force_batch_choice = flag
