"""``MegatronMoEExtConfig``: the Hugging Face configuration of a megatron-moe-ext model exported as remote code.

Shipped inside every exported folder next to ``modeling_megatron_moe_ext.py`` (``auto_map`` in config.json) and
loaded with ``trust_remote_code=True``; it imports transformers only. Field names follow Megatron's arguments
(``moe_router_topk`` is ``--moe-router-topk``) except where transformers has a standard name
(``num_key_value_heads`` = ``--num-query-groups``, ``head_dim`` = ``--kv-channels``, ``norm_eps`` =
``--norm-epsilon``, ``vocab_size`` = the padded vocabulary, ``tie_word_embeddings``). The per-layer MLP kinds are
``mlp_kinds`` because transformers validates ``layer_types`` and ``mlp_layer_types`` against its own names.
``__post_init__`` raises ValueError naming the field and the fix.
"""

from __future__ import annotations

import math
from typing import ClassVar

from transformers import PreTrainedConfig

MLP_KINDS = ("dense", "moe", "peer")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
ACTIVATIONS = ("silu", "gelu", "squared_relu")
POSITION_EMBEDDINGS = ("rope", "learned_absolute", "none")
ROUTER_TYPES = ("topk", "product_key", "expert_choice", "relu")
EC_EVAL_RULES = ("threshold", "token_choice")
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
QUERY_NORMS = ("batchnorm", "layernorm", "rmsnorm", "none")
PEER_ACTIVATIONS = ("gelu", "relu", "silu")
PEER_GATES = ("softmax", "sigmoid")
ROUTER_DTYPES = (None, "fp32", "fp64")


class MegatronMoEExtConfig(PreTrainedConfig):
    """GPT decoder with Megatron semantics: GQA attention with RoPE or learned absolute positions, RMSNorm/LayerNorm,
    optional linear biases, (gated) MLPs, Megatron MoE layers (TopKRouter or our product-key router, stacked
    fine-grained experts, shared experts) and PEER layers."""

    model_type = "megatron_moe_ext"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    # -- transformer ---------------------------------------------------------------------------------------------
    vocab_size: int = 512
    """Rows of the embedding and output layer (Megatron's padded vocabulary)."""
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    """Megatron's query groups (``--num-query-groups``; = heads without GQA)."""
    head_dim: int = 16
    """Megatron's ``--kv-channels``."""
    ffn_hidden_size: int = 256
    """Hidden size of the dense MLPs (``mlp_kinds`` 'dense')."""
    normalization: str = "RMSNorm"
    norm_eps: float = 1e-5
    qk_layernorm: bool = False
    """Per-head norm (``normalization``) of queries and keys before RoPE (``--qk-layernorm``)."""
    add_qkv_bias: bool = False
    """Bias of the QKV projection (``linear_qkv.bias``; Megatron sets it with ``add_bias_linear``)."""
    add_bias_linear: bool = False
    """Megatron's ``add_bias_linear`` (its default; ``--disable-bias-linear`` turns it off): biases on the attention
    output projection, on fc1/fc2 of the dense MLPs, of the routed experts (stacked [E, F1] and [E, h]; the routing
    probability scales the fc2 bias too, as SequentialMLP's ``per_token_scale``) and of PEER's dense branch, and on
    the TopKRouter's logits (``router.bias`` [E], before the score function). Megatron's shared experts have none."""
    activation: str = "silu"
    """MLP activation: 'silu', 'gelu' (exact erf) or 'squared_relu'; with ``gated_linear_unit`` act(gate) * up."""
    gated_linear_unit: bool = True
    """fc1 rows are [gate; up] (``--swiglu``)."""
    mlp_gelu_approximate: str = "none"
    """GELU of Megatron's MLP modules (dense layers, PEER's dense branch) as torch's ``approximate``: 'tanh' where
    the run fused the bias into the GELU (``--bias-gelu-fusion``, Megatron's default with biases), whose kernel
    is the tanh approximation; 'none' (exact erf) otherwise. Routed experts always compute the exact GELU."""
    position_embedding_type: str = "rope"
    """'rope', 'learned_absolute' (Megatron's default: ``embedding.position_embeddings`` [max_position_embeddings,
    h] added to the word embeddings) or 'none'."""
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    """Fraction of each head's channels rotated (the first ones)."""
    rotary_llama3_scaling: bool = False
    """Llama-3.x frequency scaling (``--use-rope-scaling``; original context 8192, low/high factors 1/4)."""
    rotary_llama3_factor: float = 8.0
    """``--rope-scaling-factor``."""
    rotary_interpolation_factor: float | None = None
    """Positions divided by this (``--rotary-seq-len-interpolation-factor``)."""
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    use_cache: bool = True
    mlp_kinds: list[str] | None = None
    """Per layer: 'dense', 'moe' or 'peer' (default: all 'dense')."""

    # -- MoE layers ----------------------------------------------------------------------------------------------
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int = 2
    moe_router_type: str = "topk"
    """'topk' (Megatron's TopKRouter), 'product_key', 'expert_choice' (its causal rule, ``moe_ec_eval_rule``) or
    'relu' (gates ReLU(logits), ReMoE): ours."""
    moe_null_experts: int = 0
    """M zero-computation experts: the router has num_experts + M outputs (ids >= num_experts are null; a null
    selection adds nothing), for the top-k, product-key (grid of num_experts + M cells) and expert-choice routers."""
    moe_ec_eval_rule: str = "threshold"
    """Expert choice at inference (causal, token by token): 'threshold' (expert e iff score >= the trained
    ``ec_thresholds[e]``) or 'token_choice' (the top moe_router_topk scores); gate = the softmax score."""
    moe_ec_capacity_factor: float = 1.0
    """Expert choice in training (kept for ``import-hf``; inference uses the causal rule)."""
    moe_relu_target_sparsity: float | None = None
    moe_relu_l1_coeff: float = 1e-8
    moe_relu_l1_update_rate: float = 1.2
    """ReLU router's training controller (kept for ``import-hf``; the current coefficient is ``relu_l1_coeff``)."""
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: float | None = None
    moe_router_enable_expert_bias: bool = False
    """Selection on scores + expert_bias (sigmoid/sqrtsoftplus), gates from the unbiased scores."""
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None
    moe_router_dtype: str | None = None
    """Router computation dtype: None (the input's), 'fp32' or 'fp64'."""
    moe_router_noisy_gating: bool = False
    """The routers carry noise weights (used at train time only)."""
    moe_apply_probs_on_input: bool = False
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    moe_pk_heads: int = 1
    moe_pk_key_dim: int = 128
    moe_pk_subkey_topk: int | None = None
    moe_pk_grid_rows: int | None = None
    """Rows of each head's expert grid (default: square)."""
    moe_pk_query_norm: str = "batchnorm"
    moe_pk_bias_balancing: bool = False
    """The product-key router carries separable selection biases row_bias/col_bias."""
    moe_pk_expert_bias_balancing: bool = False
    """The product-key router carries a per-expert selection bias pk_expert_bias [heads, experts/heads], added
    to each token's candidate pairs when they are combined."""

    # -- PEER layers ---------------------------------------------------------------------------------------------
    moe_peer_num_experts: int | None = None
    moe_peer_table_rows: int | None = None
    """Rows of the stored u/v tables (>= experts: Megatron pads them to a multiple of its shards)."""
    moe_peer_heads: int = 8
    moe_peer_topk: int = 16
    moe_peer_key_dim: int = 128
    moe_peer_subkey_topk: int | None = None
    moe_peer_query_norm: str = "batchnorm"
    moe_peer_activation: str = "gelu"
    moe_peer_gate: str = "softmax"
    moe_peer_shared_ffn_hidden_size: int | None = None
    query_norm_eps: float = 1e-5
    """Epsilon of the product-key and PEER query norms."""

    def __post_init__(self, **kwargs) -> None:
        if self.mlp_kinds is None:
            self.mlp_kinds = ["dense"] * self.num_hidden_layers
        self.mlp_kinds = list(self.mlp_kinds)
        self._check()
        super().__post_init__(**kwargs)

    def _check(self) -> None:
        def bad(field: str, value, fix: str) -> ValueError:
            return ValueError(f"MegatronMoEExtConfig: {field}={value!r}; fix: {fix}")

        choices = [("normalization", NORMALIZATIONS), ("activation", ACTIVATIONS),
                   ("position_embedding_type", POSITION_EMBEDDINGS), ("mlp_gelu_approximate", ("none", "tanh")),
                   ("moe_router_type", ROUTER_TYPES),
                   ("moe_router_score_function", SCORE_FUNCTIONS), ("moe_pk_query_norm", QUERY_NORMS),
                   ("moe_peer_query_norm", QUERY_NORMS), ("moe_peer_activation", PEER_ACTIVATIONS),
                   ("moe_peer_gate", PEER_GATES), ("moe_router_dtype", ROUTER_DTYPES)]
        for field, allowed in choices:
            if getattr(self, field) not in allowed:
                raise bad(field, getattr(self, field), f"one of {allowed}")
        if len(self.mlp_kinds) != self.num_hidden_layers or any(k not in MLP_KINDS for k in self.mlp_kinds):
            raise bad("mlp_kinds", self.mlp_kinds, f"{self.num_hidden_layers} entries of {MLP_KINDS}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", self.num_key_value_heads,
                      f"a divisor of num_attention_heads={self.num_attention_heads}")
        if "moe" in self.mlp_kinds and not (self.num_experts and self.moe_ffn_hidden_size):
            raise bad("num_experts", self.num_experts, "set num_experts and moe_ffn_hidden_size for 'moe' layers")
        if self.mlp_gelu_approximate != "none" and (self.activation, self.gated_linear_unit) != ("gelu", False):
            raise bad("mlp_gelu_approximate", self.mlp_gelu_approximate,
                      f"'none' (activation={self.activation!r}, gated_linear_unit={self.gated_linear_unit})")
        if self.add_bias_linear and "moe" in self.mlp_kinds and self.moe_shared_expert_intermediate_size:
            raise bad("add_bias_linear", True, "False with shared experts (Megatron's SharedExpertMLP has no biases)")
        if "peer" in self.mlp_kinds:
            n = math.isqrt(self.moe_peer_num_experts or 0)
            if not self.moe_peer_num_experts or n * n != self.moe_peer_num_experts:
                raise bad("moe_peer_num_experts", self.moe_peer_num_experts, "a perfect square n*n for 'peer' layers")
            if self.moe_peer_table_rows is None:
                self.moe_peer_table_rows = self.moe_peer_num_experts
            if self.moe_peer_table_rows < self.moe_peer_num_experts:
                raise bad("moe_peer_table_rows", self.moe_peer_table_rows, f">= {self.moe_peer_num_experts}")
            if self.moe_peer_key_dim % 2:
                raise bad("moe_peer_key_dim", self.moe_peer_key_dim, "an even number")
        if "moe" in self.mlp_kinds and self.moe_router_type == "product_key":
            if self.moe_router_score_function not in ("softmax", "sigmoid"):
                raise bad("moe_router_score_function", self.moe_router_score_function, "softmax or sigmoid")
            cells = self.num_experts + self.moe_null_experts
            if cells % self.moe_pk_heads or self.moe_router_topk % self.moe_pk_heads:
                raise bad("moe_pk_heads", self.moe_pk_heads,
                          "a divisor of num_experts + moe_null_experts and moe_router_topk")
            if self.moe_pk_key_dim % 2:
                raise bad("moe_pk_key_dim", self.moe_pk_key_dim, "an even number")
            pool = cells // self.moe_pk_heads
            rows = self.moe_pk_grid_rows or math.isqrt(pool)
            if pool % rows or (self.moe_pk_grid_rows is None and rows * rows != pool):
                raise bad("moe_pk_grid_rows", self.moe_pk_grid_rows,
                          f"a divisor of the {pool} experts per head (or a perfect-square pool)")
        if self.moe_ec_eval_rule not in EC_EVAL_RULES:
            raise bad("moe_ec_eval_rule", self.moe_ec_eval_rule, f"one of {EC_EVAL_RULES}")
        if not isinstance(self.moe_null_experts, int) or self.moe_null_experts < 0:
            raise bad("moe_null_experts", self.moe_null_experts, "an int >= 0")
        if self.moe_null_experts and self.moe_router_type == "relu":
            raise bad("moe_null_experts", self.moe_null_experts, "0 with the ReLU router (a zero gate skips an expert)")
        if bool(self.moe_router_num_groups) != bool(self.moe_router_group_topk):
            raise bad("moe_router_group_topk", self.moe_router_group_topk, "set both num_groups and group_topk, or none")

    def product_key_grid(self) -> tuple[int, int]:
        """(rows, cols) of each product-key router head's expert grid (null experts are cells too)."""
        pool = (self.num_experts + self.moe_null_experts) // self.moe_pk_heads
        rows = self.moe_pk_grid_rows or math.isqrt(pool)
        return rows, pool // rows


__all__ = ["MegatronMoEExtConfig"]
