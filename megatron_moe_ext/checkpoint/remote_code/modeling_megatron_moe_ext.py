"""``MegatronMoEExtForCausalLM``: a megatron-moe-ext GPT model in Hugging Face transformers (remote code).

Shipped inside every folder ``megatron-moe-ext export-hf`` writes for models no native architecture reproduces
exactly (our product-key router, PEER layers, ...), and loaded with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. It reproduces Megatron-Core's eval-mode
forward (local spec, no dropout, batch-norm queries on running statistics, no noise) and supports ``generate()``
with a KV cache (``DynamicCache``): MoE, product-key and PEER routing are per token, so caching attention keys and
values is exact.

Parameters have exactly Megatron's canonical checkpoint names and layouts (``checkpoint/torch_dist.py``), so the
safetensors file is the Megatron state with no transform: ``embedding.word_embeddings.weight``,
``decoder.layers.<i>.self_attention.linear_qkv.{weight,layer_norm_weight}`` (the input norm is stored with the QKV
projection, rows interleaved per query group [q_1..q_hpg, k, v]), ``decoder.layers.<i>.mlp.linear_fc1.layer_norm_weight``
(the pre-MLP norm, also on MoE and PEER layers), stacked experts ``mlp.experts.experts.linear_fc{1,2}.weight`` [E, out, in]
with fc1 rows [gate; up], PEER tables ``mlp.u``/``mlp.v`` [N, h], ``decoder.final_layernorm.weight``, ``output_layer.weight``.
Megatron's defaults are reproduced too: ``.bias`` next to each linear's weight (``add_bias_linear``; stacked expert
biases [E, out]), LayerNorm biases (``layer_norm_bias``), ``embedding.position_embeddings.weight`` (learned absolute
positions) and the tanh GELU of its fused bias-GELU kernel in the MLPs (``mlp_gelu_approximate``).

The product-key retrieval, the router gates, the PEER expert reference and the query norms are the very files our
Megatron layers run (``product_key_core.py``, ``peer_reference.py``, ``query_norm.py``, copied next to this one);
Megatron's own TopKRouter and attention are re-implemented here from megatron-core 0.19's code.

Legend: B batch, S new tokens, L cached + new tokens, T = B*S, h hidden, nh query heads, ng query groups,
hd head dim, E experts, K top-k, F expert hidden, H retrieval heads, D key dim; N real experts, M null experts
(E' = N + M router outputs).

Routers with variable experts per token (issue #22), in their inference form: expert choice with its causal rule
(``moe_ec_eval_rule``: 'threshold' on the trained ``ec_thresholds``, or 'token_choice'), ReLU gates, and null
experts (a router of N + M outputs whose ids >= N add nothing). A router returns (probs_TK, ids_TK); a slot whose
id is -1 or a null id is skipped by the experts, so each token gets any number of experts.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_megatron_moe_ext import MegatronMoEExtConfig
from .peer_reference import peer_experts_reference, peer_gates, uniform_offsets
from .product_key_core import (
    biased_topk_from_half_scores,
    pooled_expert_ids,
    product_key_half_scores,
    product_key_log_partition,
    router_gates,
    topk_from_half_scores,
)
from .query_norm import QueryNorm

Tensor = torch.Tensor
# transformers 5.25 renamed the outputs' ``past_key_values`` to ``cache`` (the old name still works, with a warning).
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _router_dtype(name: str | None, input_dtype: torch.dtype) -> torch.dtype:
    return {"fp32": torch.float32, "fp64": torch.float64}.get(name, input_dtype)


# -- norms and linears named as Megatron stores them ---------------------------------------------------------------


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last dim, torch's functional kernels (what Megatron's local norms call)."""

    def __init__(self, config: MegatronMoEExtConfig, size: int) -> None:
        super().__init__()
        self.kind, self.size, self.eps = config.normalization, size, config.norm_eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if self.kind == "LayerNorm" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "RMSNorm":
            return F.rms_norm(x, (self.size,), self.weight, self.eps)
        return F.layer_norm(x, (self.size,), self.weight, self.bias, self.eps)


class NormLinear(nn.Module):
    """A norm fused with the linear it feeds (``layer_norm_weight`` next to ``weight``, as in Megatron's
    checkpoints); ``out_features=None`` holds the norm only (the pre-MLP norm of MoE and PEER layers)."""

    def __init__(self, config: MegatronMoEExtConfig, in_features: int, out_features: int | None,
                 bias: bool = False) -> None:
        super().__init__()
        self.kind, self.size, self.eps = config.normalization, in_features, config.norm_eps
        self.layer_norm_weight = nn.Parameter(torch.ones(in_features))
        self.layer_norm_bias = nn.Parameter(torch.zeros(in_features)) if self.kind == "LayerNorm" else None
        self.weight = nn.Parameter(torch.empty(out_features, in_features)) if out_features else None
        self.bias = nn.Parameter(torch.zeros(out_features)) if out_features and bias else None

    def norm(self, x: Tensor) -> Tensor:
        if self.kind == "RMSNorm":
            return F.rms_norm(x, (self.size,), self.layer_norm_weight, self.eps)
        return F.layer_norm(x, (self.size,), self.layer_norm_weight, self.layer_norm_bias, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.norm(x), self.weight, self.bias)


def _activation(config: MegatronMoEExtConfig, h: Tensor, gelu_approximate: str = "none") -> Tensor:
    """Megatron's MLP activation: act(gate) * up for gated units (fc1 rows [gate; up]), else act(h).
    ``gelu_approximate='tanh'``: Megatron's fused bias-GELU kernel (``bias_gelu_impl``, the tanh approximation)."""
    act = {"silu": F.silu, "gelu": lambda t: F.gelu(t, approximate=gelu_approximate),
           "squared_relu": lambda t: torch.pow(F.relu(t), 2)}[config.activation]
    if config.gated_linear_unit:
        gate, up = torch.chunk(h, 2, dim=-1)
        return act(gate) * up
    return act(h)


def _fc1_rows(config: MegatronMoEExtConfig, ffn: int) -> int:
    return 2 * ffn if config.gated_linear_unit else ffn


# -- attention -----------------------------------------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """Megatron's RotaryEmbedding: inv_freq over the first rotary_percent of the head dim, optional Llama-3
    scaling, positions divided by the interpolation factor, non-interleaved (rotate_half)."""

    def __init__(self, config: MegatronMoEExtConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self.compute_inv_freq(config), persistent=False)
        self.interpolation = config.rotary_interpolation_factor

    @classmethod
    def compute_inv_freq(cls, config: MegatronMoEExtConfig) -> Tensor:
        dim = config.head_dim
        if config.rotary_percent < 1.0:
            dim = int(dim * config.rotary_percent)
        inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        if config.rotary_llama3_scaling:
            inv_freq = cls._llama3_scaling(inv_freq, config.rotary_llama3_factor)
        return inv_freq

    @staticmethod
    def _llama3_scaling(freqs: Tensor, factor: float, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                        old_context_len: int = 8192) -> Tensor:
        # megatron/core/models/common/embeddings/rotary_pos_embedding.py, RotaryEmbedding._apply_scaling
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / freqs
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)

    def forward(self, positions_BS: Tensor) -> Tensor:
        """Angles [B, S, 1, rot_dim] (the two halves repeated, as Megatron's ``cat((freqs, freqs))``)."""
        seq = positions_BS.to(torch.float32)
        if self.interpolation is not None:
            seq = seq * (1 / self.interpolation)
        freqs = seq.unsqueeze(-1) * self.inv_freq.float()
        return torch.cat((freqs, freqs), dim=-1).unsqueeze(2)


def apply_rotary(t_BSnd: Tensor, freqs_BS1r: Tensor) -> Tensor:
    """Megatron's ``_apply_rotary_pos_emb_bshd`` (rotate_half), the channels past rot_dim unchanged."""
    rot_dim = freqs_BS1r.shape[-1]
    t, t_pass = t_BSnd[..., :rot_dim], t_BSnd[..., rot_dim:]
    cos_, sin_ = torch.cos(freqs_BS1r).to(t.dtype), torch.sin(freqs_BS1r).to(t.dtype)
    x1, x2 = torch.chunk(t, 2, dim=-1)
    t = t * cos_ + torch.cat((-x2, x1), dim=-1) * sin_
    return torch.cat((t, t_pass), dim=-1)


class SelfAttention(nn.Module):
    """Megatron's SelfAttention + DotProductAttention, causal, grouped queries."""

    def __init__(self, config: MegatronMoEExtConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        nh, ng, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.nh, self.ng, self.hd, self.hpg = nh, ng, hd, nh // ng
        self.linear_qkv = NormLinear(config, config.hidden_size, ng * (self.hpg + 2) * hd, bias=config.add_qkv_bias)
        self.linear_proj = nn.Linear(nh * hd, config.hidden_size, bias=config.add_bias_linear)
        self.q_layernorm = Norm(config, hd) if config.qk_layernorm else None
        self.k_layernorm = Norm(config, hd) if config.qk_layernorm else None
        self.scale = 1.0 / math.sqrt(hd)

    def forward(self, x_BSh: Tensor, freqs: Tensor | None, mask_B1SL: Tensor, cache: Cache | None) -> Tensor:
        B, S, _ = x_BSh.shape
        # Rows per query group: [q_1 .. q_hpg, k, v], each hd wide.
        qkv = self.linear_qkv(x_BSh).view(B, S, self.ng, (self.hpg + 2) * self.hd)
        q, k, v = torch.split(qkv, [self.hpg * self.hd, self.hd, self.hd], dim=-1)
        q = q.reshape(B, S, self.nh, self.hd)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if freqs is not None:
            q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, hd]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # Query head j belongs to group j // hpg (Megatron's repeat_interleave of keys and values).
        k, v = k.repeat_interleave(self.hpg, dim=1), v.repeat_interleave(self.hpg, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(mask_B1SL, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(B, S, self.nh * self.hd)
        return self.linear_proj(ctx)


# -- MLPs ----------------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Megatron's MLP: fc1 (rows [gate; up] when gated), activation, fc2; ``norm=True`` stores the pre-MLP norm
    in fc1 (a dense layer), otherwise plain linears (shared experts, PEER's dense branch). ``bias``: fc1 and fc2
    biases (Megatron adds fc2's in its bias-dropout-add, here in the linear: the same sum)."""

    def __init__(self, config: MegatronMoEExtConfig, ffn: int, *, norm: bool, gate: bool = False,
                 bias: bool = False) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        if norm:
            self.linear_fc1 = NormLinear(config, h, _fc1_rows(config, ffn), bias=bias)
        else:
            self.linear_fc1 = nn.Linear(h, _fc1_rows(config, ffn), bias=bias)
        self.linear_fc2 = nn.Linear(ffn, h, bias=bias)
        self.gate_weight = nn.Parameter(torch.empty(1, h)) if gate else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear_fc2(_activation(self.config, self.linear_fc1(x), self.config.mlp_gelu_approximate))
        if self.gate_weight is not None:  # SharedExpertMLP's gate
            out = out * torch.sigmoid(F.linear(x, self.gate_weight))
        return out


class TopKRouter(nn.Module):
    """Megatron's TopKRouter in eval (``topk_routing_with_score_function``, unfused): softmax with or without
    pre-softmax, sigmoid or sqrtsoftplus normalised over the top-k, expert bias for the selection only,
    group-limited top-k, scaling factor; with ``add_bias_linear`` a logit bias [E] (Megatron's ``router.bias``,
    fp32, added to the logits before the score function)."""

    def __init__(self, config: MegatronMoEExtConfig) -> None:
        super().__init__()
        self.config = config
        E = config.num_experts + config.moe_null_experts  # null experts are router outputs too
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(E)) if config.add_bias_linear else None
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.expert_bias = None
        # Noisy gating adds noise at train time only; the weight is kept so the state round-trips.
        self.noise_weight = nn.Parameter(torch.zeros(E, config.hidden_size)) if config.moe_router_noisy_gating else None

    def _group_limited_topk(self, scores_TE: Tensor, topk: int) -> tuple[Tensor, Tensor]:
        cfg = self.config
        T, E = scores_TE.shape
        groups, group_topk = cfg.moe_router_num_groups, cfg.moe_router_group_topk
        # Groups are ranked by the sum of their top-(topk / group_topk) scores (Megatron, not DeepSeek's top-2).
        group_scores = scores_TE.view(T, groups, -1).topk(topk // group_topk, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(T, groups, E // groups).reshape(T, -1)
        return torch.topk(scores_TE.masked_fill(~score_mask.bool(), float("-inf")), k=topk, dim=-1)

    def _topk(self, scores_TE: Tensor, topk: int) -> tuple[Tensor, Tensor]:
        if self.config.moe_router_group_topk:
            return self._group_limited_topk(scores_TE, topk)
        return torch.topk(scores_TE, k=topk, dim=1)

    def forward(self, x_Th: Tensor) -> tuple[Tensor, Tensor]:
        """(probs_TK in the router dtype, expert ids_TK)."""
        cfg = self.config
        dtype = _router_dtype(cfg.moe_router_dtype, x_Th.dtype)
        logits = F.linear(x_Th.to(dtype), self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))
        k = cfg.moe_router_topk
        if cfg.moe_router_score_function == "softmax":
            if cfg.moe_router_pre_softmax:
                probs, ids = self._topk(torch.softmax(logits, dim=-1, dtype=torch.float32), k)
            else:
                scores, ids = self._topk(logits, k)
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        else:
            if cfg.moe_router_score_function == "sigmoid":
                scores = torch.sigmoid(logits.float())
            else:
                scores = F.softplus(logits.float()).sqrt()
            if self.expert_bias is not None:
                _, ids = self._topk(scores + self.expert_bias.float(), k)
                scores = torch.gather(scores, dim=1, index=ids)
            else:
                scores, ids = self._topk(scores, k)
            probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if k > 1 else scores
        if cfg.moe_router_topk_scaling_factor:
            probs = probs * cfg.moe_router_topk_scaling_factor
        return probs.type_as(logits), ids


class ProductKeyRouter(nn.Module):
    """Our product-key router (``layers/product_key_router.py``) in eval: queries W_q x (+ b_q) normalised per head,
    half scores against row/column sub-keys, each head's exact top-k in its own pool (selection biases when
    bias balancing is on: separable row/column biases, a per-expert bias on the candidate pairs), Megatron's gates."""

    def __init__(self, config: MegatronMoEExtConfig) -> None:
        super().__init__()
        self.config = config
        H, D = config.moe_pk_heads, config.moe_pk_key_dim
        self.rows, self.cols = config.product_key_grid()
        self.k = config.moe_router_topk // H
        self.subkey_topk = config.moe_pk_subkey_topk
        self.query_weight = nn.Parameter(torch.empty(H * D, config.hidden_size))
        # add_bias_linear: the query projection's bias replaces Megatron's router.bias (not separable).
        self.query_bias = nn.Parameter(torch.zeros(H * D)) if config.add_bias_linear else None
        self.row_keys = nn.Parameter(torch.empty(H, self.rows, D // 2))
        self.col_keys = nn.Parameter(torch.empty(H, self.cols, D // 2))
        self.query_norm = QueryNorm(config.moe_pk_query_norm, H, D, eps=config.query_norm_eps)
        if config.moe_pk_bias_balancing:
            self.register_buffer("row_bias", torch.zeros(H, self.rows))
            self.register_buffer("col_bias", torch.zeros(H, self.cols))
        else:
            self.row_bias = self.col_bias = None
        if config.moe_pk_expert_bias_balancing:
            self.register_buffer("pk_expert_bias", torch.zeros(H, self.rows * self.cols))
        else:
            self.pk_expert_bias = None
        if config.moe_router_noisy_gating:  # train-time noise only; kept so the state round-trips
            self.noise_row_weight = nn.Parameter(torch.zeros(H * self.rows, config.hidden_size))
            self.noise_col_weight = nn.Parameter(torch.zeros(H * self.cols, config.hidden_size))

    def forward(self, x_Th: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.config
        H, D = cfg.moe_pk_heads, cfg.moe_pk_key_dim
        dtype = torch.float64 if cfg.moe_router_dtype == "fp64" else torch.float32
        bias = self.query_bias.to(dtype) if self.query_bias is not None else None
        q_THD = F.linear(x_Th.to(dtype), self.query_weight.to(dtype), bias).view(-1, H, D)
        q_THD = self.query_norm(q_THD).to(dtype)
        a_THn1, b_THn2 = product_key_half_scores(q_THD, (self.row_keys.to(dtype), self.col_keys.to(dtype)))
        biased = self.row_bias is not None
        scores_THk, local_THk = biased_topk_from_half_scores(
            a_THn1, b_THn2, self.k, subkey_topk=self.subkey_topk,
            row_bias_Hn1=self.row_bias.float() if biased else None, col_bias_Hn2=self.col_bias.float() if biased else None,
            expert_bias_HN=self.pk_expert_bias.float() if self.pk_expert_bias is not None else None,
        )
        logits_TK = scores_THk.reshape(scores_THk.shape[0], -1)
        pre = cfg.moe_router_score_function == "softmax" and cfg.moe_router_pre_softmax
        probs_TK = router_gates(
            logits_TK, score_function=cfg.moe_router_score_function, pre_softmax=cfg.moe_router_pre_softmax,
            topk=cfg.moe_router_topk, scaling_factor=cfg.moe_router_topk_scaling_factor,
            logz_T=product_key_log_partition(a_THn1, b_THn2) if pre else None,
        )
        out_dtype = x_Th.dtype if cfg.moe_router_dtype is None else dtype
        return probs_TK.to(out_dtype), pooled_expert_ids(local_THk, self.rows * self.cols)


class ExpertChoiceRouter(nn.Module):
    """Our expert-choice router (``layers/expert_choice_router.py``) at inference: scores = softmax over the N + M
    logits (x W^T + b in the router dtype; softmax in fp32, fp64 with ``moe_router_dtype`` 'fp64'), then the
    causal rule of ``moe_ec_eval_rule`` token by token: 'threshold' (e iff score >= ec_thresholds[e]) or
    'token_choice' (the top moe_router_topk scores); gate = score, not renormalised. ids_TK [T, N + M]: column e
    holds e where chosen, else -1."""

    def __init__(self, config: MegatronMoEExtConfig) -> None:
        super().__init__()
        self.config = config
        E = config.num_experts + config.moe_null_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(E)) if config.add_bias_linear else None
        self.register_buffer("ec_thresholds", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("ec_threshold_mass", torch.zeros(1, dtype=torch.float32))  # training state

    def forward(self, x_Th: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.config
        dtype = _router_dtype(cfg.moe_router_dtype, x_Th.dtype)
        logits_TE = F.linear(x_Th.to(dtype), self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))
        scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float64 if cfg.moe_router_dtype == "fp64"
                                  else torch.float32)
        if cfg.moe_ec_eval_rule == "threshold":
            map_TE = scores_TE >= self.ec_thresholds.to(scores_TE.dtype)
        else:
            idx_TK = torch.topk(scores_TE, cfg.moe_router_topk, dim=-1).indices
            map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(1, idx_TK, True)
        probs_TE = (scores_TE * map_TE).to(logits_TE.dtype)
        ids_TE = torch.arange(map_TE.shape[1], device=map_TE.device).expand_as(map_TE)
        return probs_TE, torch.where(map_TE, ids_TE, torch.full_like(ids_TE, -1))


class ReluRouter(nn.Module):
    """Our ReLU router (ReMoE; ``layers/relu_router.py``) at inference: gates = ReLU(x W^T + b) in fp32 (logits
    in the router dtype), expert e iff its gate > 0, gate not renormalised; probs in the logits' dtype.
    ``relu_l1_coeff`` [1] is the training controller's coefficient (kept so the state round-trips)."""

    def __init__(self, config: MegatronMoEExtConfig) -> None:
        super().__init__()
        self.config = config
        E = config.num_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(E)) if config.add_bias_linear else None
        self.register_buffer("relu_l1_coeff", torch.full((1,), config.moe_relu_l1_coeff, dtype=torch.float32))

    def forward(self, x_Th: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.config
        dtype = _router_dtype(cfg.moe_router_dtype, x_Th.dtype)
        logits_TE = F.linear(x_Th.to(dtype), self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))
        gates_TE = torch.relu(logits_TE.float())
        ids_TE = torch.arange(gates_TE.shape[1], device=gates_TE.device).expand_as(gates_TE)
        return gates_TE.to(logits_TE.dtype), torch.where(gates_TE > 0, ids_TE, torch.full_like(ids_TE, -1))


_ROUTERS = {"topk": TopKRouter, "product_key": ProductKeyRouter, "expert_choice": ExpertChoiceRouter,
            "relu": ReluRouter}


class _Stacked(nn.Module):
    """One stacked expert weight [E, out, in] (and bias [E, out]), so names read ``linear_fc1.weight`` as in
    Megatron's checkpoints."""

    def __init__(self, *shape: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape))
        self.bias = nn.Parameter(torch.zeros(*shape[:2])) if bias else None


class StackedExperts(nn.Module):
    """All experts of a layer: fc1 [E, F1, h] (rows [gate; up]) and fc2 [E, h, F], optional biases b1 [E, F1] and
    b2 [E, h]; out = fc2(act(fc1 x + b1) * p) + b2 * p (SequentialMLP's ``per_token_scale``; with
    ``moe_apply_probs_on_input`` x is scaled by p instead and b2 is not)."""

    def __init__(self, config: MegatronMoEExtConfig) -> None:
        super().__init__()
        self.config = config
        E, F_, h = config.num_experts, config.moe_ffn_hidden_size, config.hidden_size
        self.linear_fc1 = _Stacked(E, _fc1_rows(config, F_), h, bias=config.add_bias_linear)
        self.linear_fc2 = _Stacked(E, h, F_, bias=config.add_bias_linear)

    def forward(self, x_Th: Tensor, probs_TK: Tensor, ids_TK: Tensor) -> Tensor:
        T, K = ids_TK.shape
        out_Th = torch.zeros_like(x_Th)
        flat_ids = ids_TK.reshape(-1)
        token_P = torch.arange(T, device=x_Th.device).repeat_interleave(K)
        probs_P = probs_TK.reshape(-1)
        for e in torch.unique(flat_ids).tolist():
            if not 0 <= e < self.config.num_experts:  # an empty slot (-1) or a null expert: no compute, no output
                continue
            sel = (flat_ids == e).nonzero(as_tuple=True)[0]
            rows, p = token_P[sel], probs_P[sel].unsqueeze(-1)
            x_nh = x_Th[rows]
            if self.config.moe_apply_probs_on_input:
                x_nh, p = (p * x_nh).to(x_nh.dtype), torch.ones_like(p)
            b1, b2 = self.linear_fc1.bias, self.linear_fc2.bias
            a_nF = _activation(self.config, F.linear(x_nh, self.linear_fc1.weight[e], None if b1 is None else b1[e]))
            y_nh = F.linear((a_nF * p).to(a_nF.dtype), self.linear_fc2.weight[e])
            if b2 is not None:
                y_nh = (y_nh + b2[e] * p).to(y_nh.dtype)
            out_Th.index_add_(0, rows, y_nh.to(out_Th.dtype))
        return out_Th


class _ExpertsSlot(nn.Module):
    """Megatron's experts slot (``mlp.experts``), whose checkpoint keys add one more ``experts.``."""

    def __init__(self, config: MegatronMoEExtConfig) -> None:
        super().__init__()
        self.experts = StackedExperts(config)


class MoELayer(nn.Module):
    """Megatron's MoELayer: router, routed experts, optional shared experts (gated or not)."""

    def __init__(self, config: MegatronMoEExtConfig) -> None:
        super().__init__()
        self.linear_fc1 = NormLinear(config, config.hidden_size, None)  # the layer's pre-MLP norm
        self.router = _ROUTERS[config.moe_router_type](config)
        self.experts = _ExpertsSlot(config)
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size:
            self.shared_experts = MLP(config, config.moe_shared_expert_intermediate_size, norm=False,
                                      gate=config.moe_shared_expert_gate)

    def forward(self, x_BSh: Tensor) -> Tensor:
        B, S, h = x_BSh.shape
        x_Th = self.linear_fc1.norm(x_BSh).reshape(B * S, h)
        probs_TK, ids_TK = self.router(x_Th)
        out_Th = self.experts.experts(x_Th, probs_TK, ids_TK)
        if self.shared_experts is not None:
            out_Th = out_Th + self.shared_experts(x_Th)
        return out_Th.view(B, S, h)


class PEERLayer(nn.Module):
    """Our PEER layer (``layers/peer.py``) in eval: per head a query W_q x (+ b_q) normalised, the exact top-k
    single-neuron experts of the shared n x n grid by product keys, gates, f(x) = sum g act(u . x) v, plus the dense
    branch."""

    def __init__(self, config: MegatronMoEExtConfig) -> None:
        super().__init__()
        self.config = config
        H, D, h = config.moe_peer_heads, config.moe_peer_key_dim, config.hidden_size
        n = math.isqrt(config.moe_peer_num_experts)
        self.linear_fc1 = NormLinear(config, h, None)  # the layer's pre-MLP norm
        self.query_weight = nn.Parameter(torch.empty(H * D, h))
        # add_bias_linear: the query projection's bias (the single-neuron experts have none).
        self.query_bias = nn.Parameter(torch.zeros(H * D)) if config.add_bias_linear else None
        self.row_keys = nn.Parameter(torch.empty(H, n, D // 2))
        self.col_keys = nn.Parameter(torch.empty(H, n, D // 2))
        self.query_norm = QueryNorm(config.moe_peer_query_norm, H, D, eps=config.query_norm_eps)
        self.u = nn.Parameter(torch.empty(config.moe_peer_table_rows, h))
        self.v = nn.Parameter(torch.empty(config.moe_peer_table_rows, h))
        self.shared_mlp = None
        if config.moe_peer_shared_ffn_hidden_size:
            self.shared_mlp = MLP(config, config.moe_peer_shared_ffn_hidden_size, norm=False,
                                  bias=config.add_bias_linear)

    def forward(self, x_BSh: Tensor) -> Tensor:
        cfg = self.config
        B, S, h = x_BSh.shape
        H, D, k = cfg.moe_peer_heads, cfg.moe_peer_key_dim, cfg.moe_peer_topk
        x_Th = self.linear_fc1.norm(x_BSh).reshape(B * S, h)
        bias = self.query_bias.to(x_Th.dtype) if self.query_bias is not None else None
        q_THD = F.linear(x_Th, self.query_weight.to(x_Th.dtype), bias).view(-1, H, D)
        q_THD = self.query_norm(q_THD).float()
        a_THn, b_THn = product_key_half_scores(q_THD, (self.row_keys.float(), self.col_keys.float()))
        scores_THk, ids_THk = topk_from_half_scores(a_THn, b_THn, k, subkey_topk=cfg.moe_peer_subkey_topk)
        gates_THk = peer_gates(scores_THk, cfg.moe_peer_gate)
        T = x_Th.shape[0]
        out_Th = peer_experts_reference(x_Th, self.u, self.v, ids_THk.reshape(-1), gates_THk.reshape(-1),
                                        uniform_offsets(T, H * k, x_Th.device), cfg.moe_peer_activation)
        if self.shared_mlp is not None:
            out_Th = out_Th + self.shared_mlp(x_Th)
        return out_Th.view(B, S, h)


class TransformerLayer(nn.Module):
    """x + attention(norm(x)), then + mlp(norm(.)) (the norms live in linear_qkv and mlp.linear_fc1)."""

    def __init__(self, config: MegatronMoEExtConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attention = SelfAttention(config, layer_idx)
        kind = config.mlp_kinds[layer_idx]
        if kind == "moe":
            self.mlp = MoELayer(config)
        elif kind == "peer":
            self.mlp = PEERLayer(config)
        else:
            self.mlp = MLP(config, config.ffn_hidden_size, norm=True, bias=config.add_bias_linear)

    def forward(self, x_BSh: Tensor, freqs: Tensor | None, mask_B1SL: Tensor, cache: Cache | None) -> Tensor:
        x_BSh = x_BSh + self.self_attention(x_BSh, freqs, mask_B1SL, cache)
        return x_BSh + self.mlp(x_BSh)


class _Embedding(nn.Module):
    """Megatron's LanguageModelEmbedding: word embeddings, plus learned absolute position embeddings
    [max_position_embeddings, h] with ``position_embedding_type='learned_absolute'``."""

    def __init__(self, config: MegatronMoEExtConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)


class _Decoder(nn.Module):
    def __init__(self, config: MegatronMoEExtConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = Norm(config, config.hidden_size)


# -- the Hugging Face model ----------------------------------------------------------------------------------------


class MegatronMoEExtPreTrainedModel(PreTrainedModel):
    config: MegatronMoEExtConfig
    config_class = MegatronMoEExtConfig
    base_model_prefix = "decoder"
    _no_split_modules: ClassVar[list[str]] = ["TransformerLayer"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["past_key_values"]
    # Routers stay fp32 under a bf16/fp16 load, as Megatron keeps its expert bias (and computes routing) in fp32.
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["router"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Fresh weights for a model built from a config alone (loading overwrites them): norms 1, biases and
        running means 0, running variances 1, every other weight N(0, initializer_range)."""
        std = getattr(self.config, "initializer_range", 0.02) or 0.02
        if isinstance(module, RotaryEmbedding):  # a non-persistent buffer: recomputed, never loaded
            init.copy_(module.inv_freq, module.compute_inv_freq(module.config))
        for name, param in module.named_parameters(recurse=False):
            if "bias" in name or name.startswith("noise_"):
                init.zeros_(param)
            elif name == "layer_norm_weight" or (isinstance(module, (Norm, QueryNorm)) and name == "weight"):
                init.ones_(param)
            else:
                init.normal_(param, mean=0.0, std=std)
        for name, buf in module.named_buffers(recurse=False):
            if name == "running_var":
                init.ones_(buf)
            elif name in ("running_mean", "expert_bias", "row_bias", "col_bias", "pk_expert_bias", "ec_thresholds",
                          "ec_threshold_mass"):
                init.zeros_(buf)
            elif name == "relu_l1_coeff":
                init.constant_(buf, module.config.moe_relu_l1_coeff)


class MegatronMoEExtForCausalLM(MegatronMoEExtPreTrainedModel, GenerationMixin):
    """Causal LM with Megatron's module tree: ``embedding``, ``decoder`` (layers, final_layernorm), ``output_layer``."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"output_layer.weight": "embedding.word_embeddings.weight"}

    def __init__(self, config: MegatronMoEExtConfig) -> None:
        super().__init__(config)
        self.embedding = _Embedding(config)
        self.decoder = _Decoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config) if config.position_embedding_type == "rope" else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embedding.word_embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.output_layer

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.output_layer = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [B, S, vocab]. ``attention_mask`` [B, L] (1 = attend) masks keys on top of causality;
        positions default to the cache length + arange(S) (Megatron has no padding, hence no position shift).
        The KV cache comes as ``cache`` (transformers >= 5.25, what ``generate`` passes there) or
        ``past_key_values`` (earlier 5.x)."""
        x_BSh = self.embedding.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, S, _ = x_BSh.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        given = cache if cache is not None else past_key_values
        cache = (given if given is not None else DynamicCache(config=self.config)) if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=x_BSh.device).unsqueeze(0).expand(B, S)
        if self.embedding.position_embeddings is not None:
            x_BSh = x_BSh + self.embedding.position_embeddings(position_ids)
        L = past + S
        q_pos = torch.arange(past, L, device=x_BSh.device)
        mask_B1SL = (torch.arange(L, device=x_BSh.device)[None, :] > q_pos[:, None])[None, None]
        if attention_mask is not None and attention_mask.dim() == 2:
            mask_B1SL = mask_B1SL | (attention_mask[:, None, None, -L:] == 0)
        mask_B1SL = mask_B1SL.expand(B, 1, S, L)
        freqs = self.rotary(position_ids) if self.rotary is not None else None
        for layer in self.decoder.layers:
            x_BSh = layer(x_BSh, freqs, mask_B1SL, cache)
        logits = self.output_layer(self.decoder.final_layernorm(x_BSh))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE_FIELD: cache})


__all__ = ["MegatronMoEExtForCausalLM", "MegatronMoEExtPreTrainedModel"]
