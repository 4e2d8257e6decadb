"""Parameter and FLOP accounting for Megatron GPT models, dense, MoE or with PEER layers (pure
arithmetic, stdlib only).

Legend: L layers (L_moe of them MoE), h hidden size, nq attention heads, nkv query groups (GQA),
d head dim (kv_channels), f dense FFN size, fe expert FFN size, fs shared-expert FFN size, E experts,
k top-k, V padded vocabulary, s sequence length, P max positions, g = 2 for gated (SwiGLU) fc1 else 1,
n(x) = 2x for LayerNorm (weight + bias) and x for RMSNorm.

Parameters (exactly what Megatron's ``GPTModel`` allocates; ``b`` = bias terms when add_bias_linear):
    embedding   V*h  [+ P*h learned_absolute positions]  [+ V*h untied output layer]
    attention   per layer: h*(nq + 2*nkv)*d + nq*d*h  [+ (nq + 2*nkv)*d + h b]  [+ 2*n(d) qk norms]
    dense MLP   per dense layer: g*f*h + f*h  [+ g*f + h b]
    experts     per MoE layer: E * (g*fe*h + fe*h  [+ g*fe + h b])
    shared      per MoE layer: g*fs*h + fs*h  [+ h shared-expert gate]   (Megatron: no bias allowed)
    router      per MoE layer: E'*h  [+ E' b]  [+ E'*h noise weights with noisy gating], E' = E + M
                (M null experts: the router has E + M outputs; expert choice and ReLU: E' = E)
                product keys (Hk heads, D key dim, n1 x n2 grid per head): Hk*D*h (query) + Hk*(n1+n2)*D/2
                (sub-keys) + query-norm affine (Hk*D rmsnorm, 2*Hk*D layernorm/batchnorm)
                [+ Hk*(n1+n2)*h noise weights]
    peer        per PEER layer (N = n*n single-neuron experts, H heads, k experts per head, D key dim,
                G = H*k experts per token, fp = dense-branch size): see ``peer_layer_counts``
                H*D*h (query) + H*2*n*D/2 (sub-keys) + query-norm affine (H*D rmsnorm, 2*H*D
                layernorm/batchnorm) + 2*N*h (tables u, v)  [+ g*fp*h + fp*h  [+ g*fp + h b] dense branch]
    norms       L * 2*n(h) (input + pre-MLP) + n(h) (final)
A PEER layer replaces the MLP (dense or MoE: no router, no experts) of the layers --moe-peer-layers names.
Active parameters per token: total minus the (E - a) experts a token does not visit in each MoE layer
(rounded to an integer when a is fractional)
and the N - G rows of u and of v it does not visit in each PEER layer (embeddings, routers, PEER
retrieval, shared experts and dense branches count as active).

Forward FLOPs per token (matmuls only, 2*m*n*k; causal attention averages s/2 keys per query, as in
Megatron's ``num_floating_point_operations``):
    attention   per layer: 2*h*(nq + 2*nkv)*d + 2*nq*d*h       (QKV and output projections)
                         + 2*nq*d*(s/2) + 2*nq*d*(s/2)          (QK^T scores, attention over values)
    dense MLP   per dense layer: 2*g*f*h + 2*f*h
    MoE         per MoE layer: a*(2*g*fe*h + 2*fe*h) + 2*g*fs*h + 2*fs*h [+ 2*h shared gate], rounded to
                an integer; a = expected real experts per token (``expected_active_experts``): k for
                top-k/product keys, k*E/(E+M) with M null experts, f*k for expert choice, (1-S)*E for
                ReLU routing, or the measured mean (``active_experts``, e.g. the logged active_experts)
    router      per MoE layer: 2*h*E'  (the only term that grows with the number of experts) [x2 noisy]
                product keys: 2*h*Hk*D + 2*Hk*(n1+n2)*D/2  [+ 2*h*Hk*(n1+n2) noisy]: O(sqrt E)
    peer        per PEER layer: 2*h*H*D (query) + 2*H*2*n*D/2 (sub-key scores) + H*kp^2 (candidate
                sums, kp = sub-key top-k: additions, 1 FLOP each) + 2*G*h (u dots) + 2*G*h (gated v sum)
                + G (gate x activation products, 1 each)  [+ 2*g*fp*h + 2*fp*h dense branch]
    logits      2*h*V
NOT counted: norms, activations, softmax, biases, residual adds, embedding lookups, token dispatch,
top-k selections (comparisons).
Training = 3 x forward (forward, backward w.r.t. activations, backward w.r.t. weights). Inference =
the same forward, averaged over a full causal sequence (prefill); KV-cache decoding of one token
against c cached positions would instead cost 2*nq*d*c + 2*nq*d*c in attention per layer.
Unlike Megatron's own formula, the router term is counted (it is what product-key retrieval removes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

_NORMS = ("LayerNorm", "RMSNorm")
_POSITIONS = ("rope", "learned_absolute", "yarn", "mrope", "none")  # only learned_absolute has params


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes that determine parameters and FLOPs; defaults follow Megatron's command-line defaults.

    None means "derive as Megatron does": num_query_groups -> heads, kv_channels -> hidden/heads,
    max_position_embeddings -> seq_length, moe_ffn_hidden_size -> ffn_hidden_size, moe_layer_pattern
    -> every layer MoE when num_experts is set, else all dense.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int
    num_query_groups: int | None = None
    kv_channels: int | None = None
    gated_linear_unit: bool = False
    add_bias_linear: bool = True
    normalization: str = "LayerNorm"
    qk_layernorm: bool = False
    share_embeddings_and_output_weights: bool = True
    position_embedding_type: str = "learned_absolute"
    max_position_embeddings: int | None = None
    moe_layer_pattern: tuple[int, ...] | None = None
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    topk: int | None = None
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    router_type: str = "topk"
    noisy_gating: bool = False
    null_experts: int = 0
    ec_capacity_factor: float = 1.0
    relu_target_sparsity: float | None = None
    active_experts: float | None = None
    pk_heads: int = 1
    pk_key_dim: int = 128
    pk_grid_rows: int | None = None
    pk_query_norm: str = "batchnorm"
    peer_num_experts: int | None = None
    peer_layers: str = "middle"
    peer_heads: int = 8
    peer_topk: int = 16
    peer_key_dim: int = 128
    peer_subkey_topk: int | None = None
    peer_query_norm: str = "batchnorm"
    peer_shared_ffn_hidden_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size", "seq_length"):
            _positive(name, getattr(self, name))
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; fix: pass kv_channels explicitly"
                )
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        if self.max_position_embeddings is None:
            object.__setattr__(self, "max_position_embeddings", self.seq_length)
        for name in ("num_query_groups", "kv_channels", "max_position_embeddings"):
            _positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by num_query_groups="
                f"{self.num_query_groups}; fix: choose a group count that divides the heads"
            )
        if self.normalization not in _NORMS:
            raise ValueError(f"normalization={self.normalization!r} is unknown; choose from {', '.join(_NORMS)}")
        if self.position_embedding_type not in _POSITIONS:
            raise ValueError(
                f"position_embedding_type={self.position_embedding_type!r} is unknown; choose from {', '.join(_POSITIONS)}"
            )
        pattern = self.moe_layer_pattern
        if pattern is None:
            pattern = (1 if self.num_experts else 0,) * self.num_layers
        pattern = tuple(int(p) for p in pattern)
        object.__setattr__(self, "moe_layer_pattern", pattern)
        if len(pattern) != self.num_layers or any(p not in (0, 1) for p in pattern):
            raise ValueError(
                f"moe_layer_pattern={list(pattern)} must hold num_layers={self.num_layers} entries of 0 (dense) or 1 (MoE)"
            )
        if any(pattern):
            self._check_moe()
        if self.peer_num_experts is not None:
            # Validates the geometry, the layer spec and the norm (ValueErrors name the fix).
            peer_layer_counts(
                self.hidden_size, self.peer_num_experts, self.peer_heads, self.peer_topk, self.peer_key_dim,
                self.peer_subkey_topk, self.peer_query_norm, self.peer_shared_ffn_hidden_size,
                self.gated_linear_unit,
            )
            self.peer_layer_numbers()

    def peer_layer_numbers(self) -> tuple[int, ...]:
        """1-based numbers of the layers whose MLP is a PEER layer (empty without peer_num_experts)."""
        if self.peer_num_experts is None:
            return ()
        from megatron_moe_ext.settings.peer import peer_layer_numbers

        return tuple(peer_layer_numbers(self.peer_layers, self.num_layers))

    def _check_moe(self) -> None:
        if self.num_experts is None:
            raise ValueError(f"moe_layer_pattern={list(self.moe_layer_pattern)} has MoE layers but num_experts is None; fix: set num_experts")
        if self.moe_ffn_hidden_size is None:
            object.__setattr__(self, "moe_ffn_hidden_size", self.ffn_hidden_size)
        _positive("num_experts", self.num_experts)
        _positive("moe_ffn_hidden_size", self.moe_ffn_hidden_size)
        if self.topk is None or not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"topk={self.topk} must be in 1..num_experts={self.num_experts}")
        if not isinstance(self.null_experts, int) or isinstance(self.null_experts, bool) or self.null_experts < 0:
            raise ValueError(f"null_experts={self.null_experts!r} must be an integer >= 0 (--moe-null-experts)")
        if self.null_experts and self.router_type == "relu":
            raise ValueError(f"null_experts={self.null_experts} with router_type relu: a zero ReLU gate already skips "
                             "an expert; fix: null_experts=0")
        if self.router_type == "expert_choice" and not self.ec_capacity_factor > 0:
            raise ValueError(f"ec_capacity_factor={self.ec_capacity_factor} must be > 0 (--moe-ec-capacity-factor); "
                             "fix: e.g. 1.0")
        if self.router_type == "relu" and self.relu_target_sparsity is not None and not 0 < self.relu_target_sparsity < 1:
            raise ValueError(f"relu_target_sparsity={self.relu_target_sparsity} must be in (0, 1) "
                             f"(--moe-relu-target-sparsity); fix: e.g. {1 - self.topk / self.num_experts}")
        if self.active_experts is not None and not 0 <= self.active_experts <= self.num_experts:
            raise ValueError(
                f"active_experts={self.active_experts} must be in [0, num_experts={self.num_experts}] (the mean number "
                "of real experts a token visits per MoE layer); fix: pass the measured mean, e.g. the logged "
                "active_experts")
        if self.shared_expert_intermediate_size is not None:
            _positive("shared_expert_intermediate_size", self.shared_expert_intermediate_size)
            if self.add_bias_linear:
                # Megatron's SharedExpertMLP asserts this; a shape it cannot build has no accounting.
                raise ValueError("shared experts do not support biases in Megatron; fix: add_bias_linear=False (--disable-bias-linear)")


def expected_active_experts(shape: ModelShape) -> float:
    """Expected real experts a token visits per MoE layer, a (0 without MoE layers).

    ``shape.active_experts`` (measured, e.g. the mean of the logged ``active_experts``) wins; else the
    nominal value of the router:
        top-k, product keys   k
        + M null experts      k * E / (E + M)   under balanced routing: each of the E + M outputs
                              receives the same share of the k slots (MoE++, Jin et al., ICLR 2025)
        expert choice         min(E, f * k)     each expert takes c = ceil(T * k / E * f) of a group's
                              T tokens (Zhou et al. 2022, Sec. 3.1), so E * c / T ~ f * k per token (the
                              ceiling adds at most E / T); null columns (if any) take their own tokens
        ReLU                  (1 - S) * E       at the target sparsity S (ReMoE, Wang et al., ICLR 2025);
                              S defaults to 1 - k / E
    """
    if shape.num_experts is None or not any(shape.moe_layer_pattern):
        return 0.0
    if shape.active_experts is not None:
        return float(shape.active_experts)
    E, k = shape.num_experts, shape.topk
    if shape.router_type == "expert_choice":
        return min(float(E), shape.ec_capacity_factor * k)
    if shape.router_type == "relu":
        target = 1.0 - k / E if shape.relu_target_sparsity is None else shape.relu_target_sparsity
        return (1.0 - target) * E
    return k * E / (E + shape.null_experts)


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


# Affine parameters of a PEER / product-key query norm, per (head, key-dim) feature. BatchNorm's
# running statistics are buffers, not parameters.
_QUERY_NORM_AFFINE = {"none": 0, "rmsnorm": 1, "layernorm": 2, "batchnorm": 2}


@dataclasses.dataclass(frozen=True)
class PEERCounts:
    """Parameters and forward FLOPs per token of ONE PEER layer (``peer_layer_counts``).

    params_total = query_params + subkey_params + query_norm_params + table_params + shared_params;
    params_active = params_total - table_params + active_table_params (a token reads G rows of u and v);
    flops_per_token_forward = query_flops + subkey_score_flops + candidate_sum_flops + expert_flops
    + gate_flops + shared_flops.
    """

    granularity: int  # G = heads * topk single-neuron experts per token
    grid: int  # n: sub-keys per side, N = n*n
    subkey_topk: int  # kp: sub-keys kept per side (kp^2 candidates per head)
    query_params: int
    subkey_params: int
    query_norm_params: int
    table_params: int
    active_table_params: int
    shared_params: int
    params_total: int
    params_active: int
    query_flops: int
    subkey_score_flops: int
    candidate_sum_flops: int
    expert_flops: int
    gate_flops: int
    shared_flops: int
    flops_per_token_forward: int

    @property
    def retrieval_params(self) -> int:
        """Query projection + sub-keys + query-norm affine (the PEER analogue of a router)."""
        return self.query_params + self.subkey_params + self.query_norm_params

    @property
    def retrieval_flops(self) -> int:
        """Query projection + sub-key scores + candidate sums: O(sqrt N) per token."""
        return self.query_flops + self.subkey_score_flops + self.candidate_sum_flops


def peer_layer_counts(
    hidden: int,
    num_experts: int,
    heads: int,
    topk: int,
    key_dim: int,
    subkey_topk: int | None = None,
    query_norm: str = "batchnorm",
    shared_ffn_hidden_size: int | None = None,
    gated: bool = False,
    *,
    add_bias: bool = False,
) -> PEERCounts:
    """Parameters and forward FLOPs per token of one PEER layer (He 2024), as ``PEERLayer`` builds it.

    Legend: h = hidden, N = num_experts = n*n, H = heads, k = topk, G = H*k, D = key_dim,
    kp = subkey_topk (default k, at most n), fp = shared_ffn_hidden_size, g = 2 if gated else 1.

    Parameters:
        query       H*D*h  [+ H*D with add_bias]  (W_q and its bias b_q; the experts have no bias)
        sub-keys    H * 2 * n * D/2               (row and column keys of each head)
        query norm  2*H*D batchnorm/layernorm, H*D rmsnorm, 0 none  (running statistics are buffers)
        tables      2*N*h total (u, v); active per token 2*G*h
        dense       g*fp*h + fp*h  [+ g*fp + h biases with add_bias]  (Megatron's MLP, always active)
    Forward FLOPs per token (2 per multiply-add):
        query       2*h*H*D
        sub-keys    2*H*2*n*D/2                   (each head scores its 2n half keys)
        candidates  H*kp^2                        (additions of row + column scores, 1 FLOP each)
        experts     2*G*h (u_e . x) + 2*G*h (sum of the G scaled v_e)
        gates       G                             (gate x act(u_e . x), 1 multiply each; the
                                                   activation and the softmax are not counted)
        dense       2*g*fp*h + 2*fp*h
    Top-k selections (comparisons) are not counted. The dense FFN of the same forward FLOPs has
    f = flops_per_token_forward / (2*(g+1)*h) hidden units.
    """
    from megatron_moe_ext.settings.peer import peer_layout

    _positive("hidden", hidden)
    # peer_layout checks the ranges (with the fix); a float would reach math.isqrt as a TypeError.
    for name, value in (("num_experts", num_experts), ("heads", heads), ("topk", topk), ("key_dim", key_dim)):
        if not isinstance(value, int) or isinstance(value, bool):  # ValueError: every bad setting here is one
            raise ValueError(f"{name}={value!r} must be an integer; fix: pass a whole number")  # noqa: TRY004
    if query_norm not in _QUERY_NORM_AFFINE:
        raise ValueError(f"query_norm={query_norm!r} is unknown; fix: choose from {', '.join(_QUERY_NORM_AFFINE)}")
    if shared_ffn_hidden_size is not None and shared_ffn_hidden_size != 0:
        _positive("shared_ffn_hidden_size", shared_ffn_hidden_size)
    lay = peer_layout(num_experts, heads=heads, topk=topk, key_dim=key_dim, subkey_topk=subkey_topk)
    H, D, n, kp, G = lay.heads, lay.key_dim, lay.grid, lay.subkey_topk, lay.granularity
    g = 2 if gated else 1
    fp = shared_ffn_hidden_size or 0
    query = H * D * hidden + (H * D if add_bias else 0)
    subkeys = H * 2 * n * (D // 2)
    norm = _QUERY_NORM_AFFINE[query_norm] * H * D
    tables = 2 * num_experts * hidden
    active_tables = 2 * G * hidden
    shared = (g * fp * hidden + fp * hidden + (g * fp + hidden if add_bias else 0)) if fp else 0
    total = query + subkeys + norm + tables + shared
    query_flops = 2 * hidden * H * D
    subkey_flops = 2 * H * 2 * n * (D // 2)
    candidate_flops = H * kp * kp
    expert_flops = 2 * G * hidden + 2 * G * hidden
    gate_flops = G
    shared_flops = 2 * (g + 1) * fp * hidden
    return PEERCounts(
        granularity=G,
        grid=n,
        subkey_topk=kp,
        query_params=query,
        subkey_params=subkeys,
        query_norm_params=norm,
        table_params=tables,
        active_table_params=active_tables,
        shared_params=shared,
        params_total=total,
        params_active=total - tables + active_tables,
        query_flops=query_flops,
        subkey_score_flops=subkey_flops,
        candidate_sum_flops=candidate_flops,
        expert_flops=expert_flops,
        gate_flops=gate_flops,
        shared_flops=shared_flops,
        flops_per_token_forward=query_flops + subkey_flops + candidate_flops + expert_flops + gate_flops + shared_flops,
    )


@dataclasses.dataclass(frozen=True)
class Accounting:
    """Parameter counts and per-token FLOPs of one ModelShape (num_experts/moe_ffn_hidden_size/topk
    are 0 for a dense model; the peer_* counts 0 without PEER layers).
    total = embedding + attention + mlp + router + peer + norm params; forward = attention + mlp +
    router + peer + logits FLOPs. num_moe_layers excludes MoE layers a PEER layer replaces;
    peer_granularity is G = heads * topk experts per token in each PEER layer."""

    shape: ModelShape
    num_experts: int
    moe_ffn_hidden_size: int
    topk: int
    num_moe_layers: int
    total_params: int
    active_params: int
    embedding_params: int
    attention_params: int
    mlp_params: int
    router_params: int
    norm_params: int
    expert_params: int
    active_expert_params: int
    shared_expert_params: int
    attention_flops_per_token: int
    mlp_flops_per_token: int
    router_flops_per_token: int
    logits_flops_per_token: int
    forward_flops_per_token: int
    training_flops_per_token: int
    inference_flops_per_token: int
    num_peer_layers: int = 0
    peer_granularity: int = 0
    peer_params: int = 0
    peer_active_params: int = 0
    peer_retrieval_params: int = 0
    peer_flops_per_token: int = 0
    peer_retrieval_flops_per_token: int = 0
    active_experts: float = 0.0  # a: expected real experts per token per MoE layer (expected_active_experts)
    active_experts_measured: bool = False  # a came from ModelShape.active_experts, not the router's nominal value

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every count plus the shape (moe_layer_pattern as a list)."""
        out = dataclasses.asdict(self)
        out["shape"]["moe_layer_pattern"] = list(self.shape.moe_layer_pattern)
        return out


def account(shape: ModelShape) -> Accounting:
    """Count parameters and forward/training/inference FLOPs per token (formulas: module docstring)."""
    h, d, s = shape.hidden_size, shape.kv_channels, shape.seq_length
    nq, nkv, V = shape.num_attention_heads, shape.num_query_groups, shape.vocab_size
    g = 2 if shape.gated_linear_unit else 1
    bias = 1 if shape.add_bias_linear else 0
    peer_numbers = set(shape.peer_layer_numbers())
    # A PEER layer takes the MLP slot whatever Megatron would have put there (dense MLP or MoE).
    n_moe = sum(p for i, p in enumerate(shape.moe_layer_pattern, start=1) if i not in peer_numbers)
    n_peer = len(peer_numbers)
    n_dense = shape.num_layers - n_moe - n_peer
    E, fe, k = (shape.num_experts, shape.moe_ffn_hidden_size, shape.topk) if n_moe else (0, 0, 0)
    fs = (shape.shared_expert_intermediate_size or 0) if n_moe else 0

    def norm(x: int) -> int:
        return 2 * x if shape.normalization == "LayerNorm" else x

    def mlp(ffn: int, with_bias: int) -> int:  # fc1 (g*ffn rows) + fc2, optionally with biases
        return g * ffn * h + ffn * h + with_bias * (g * ffn + h)

    qkv_rows = (nq + 2 * nkv) * d
    attn_layer = qkv_rows * h + nq * d * h + bias * (qkv_rows + h) + (2 * norm(d) if shape.qk_layernorm else 0)
    embedding = V * h
    embedding += shape.max_position_embeddings * h if shape.position_embedding_type == "learned_absolute" else 0
    embedding += 0 if shape.share_embeddings_and_output_weights else V * h
    one_expert = mlp(fe, bias) if n_moe else 0
    expert_params = n_moe * E * one_expert
    shared = n_moe * ((mlp(fs, 0) if fs else 0) + (h if fs and shape.shared_expert_gate else 0))
    mlp_params = n_dense * mlp(shape.ffn_hidden_size, bias) + expert_params + shared
    peer = _peer_counts(shape) if n_peer else None
    router_layer, router_flops_layer = _router_terms(shape, h, E, k, bias) if n_moe else (0, 0)
    router = n_moe * router_layer
    attention = shape.num_layers * attn_layer
    norms = shape.num_layers * 2 * norm(h) + norm(h)
    peer_params = n_peer * peer.params_total if peer else 0
    peer_inactive = n_peer * (peer.params_total - peer.params_active) if peer else 0
    total = embedding + attention + mlp_params + router + peer_params + norms
    active = expected_active_experts(shape) if n_moe else 0.0
    active_expert = round(n_moe * active * one_expert)
    # Matmul FLOPs only: 2 per multiply-add. Causal attention: each query sees s/2 keys on average,
    # so QK^T and attention-over-values cost 2*nq*d*(s/2) each, 2*nq*d*s together.
    attn_flops = shape.num_layers * (2 * h * qkv_rows + 2 * nq * d * h + 2 * nq * d * s)
    dense_mlp_flops = 2 * (g + 1) * shape.ffn_hidden_size * h
    shared_flops = 2 * (g + 1) * fs * h + (2 * h if fs and shape.shared_expert_gate else 0)
    expert_flops = round(n_moe * active * 2 * (g + 1) * fe * h)
    mlp_flops = n_dense * dense_mlp_flops + expert_flops + n_moe * shared_flops
    router_flops = n_moe * router_flops_layer
    logits_flops = 2 * h * V
    peer_flops = n_peer * peer.flops_per_token_forward if peer else 0
    forward = attn_flops + mlp_flops + router_flops + peer_flops + logits_flops
    return Accounting(
        shape=shape,
        num_experts=E,
        moe_ffn_hidden_size=fe,
        topk=k,
        num_moe_layers=n_moe,
        total_params=total,
        active_params=total - (expert_params - active_expert) - peer_inactive,
        embedding_params=embedding,
        attention_params=attention,
        mlp_params=mlp_params,
        router_params=router,
        norm_params=norms,
        expert_params=expert_params,
        active_expert_params=active_expert,
        shared_expert_params=shared,
        attention_flops_per_token=attn_flops,
        mlp_flops_per_token=mlp_flops,
        router_flops_per_token=router_flops,
        logits_flops_per_token=logits_flops,
        forward_flops_per_token=forward,
        training_flops_per_token=3 * forward,
        inference_flops_per_token=forward,
        num_peer_layers=n_peer,
        peer_granularity=peer.granularity if peer else 0,
        peer_params=peer_params,
        peer_active_params=peer_params - peer_inactive,
        peer_retrieval_params=n_peer * peer.retrieval_params if peer else 0,
        peer_flops_per_token=peer_flops,
        peer_retrieval_flops_per_token=n_peer * peer.retrieval_flops if peer else 0,
        active_experts=active,
        active_experts_measured=bool(n_moe) and shape.active_experts is not None,
    )


def _peer_counts(shape: ModelShape) -> PEERCounts:
    """One PEER layer of ``shape`` (the dense branch is Megatron's MLP: gated and biased as the model)."""
    return peer_layer_counts(
        shape.hidden_size, shape.peer_num_experts, shape.peer_heads, shape.peer_topk, shape.peer_key_dim,
        shape.peer_subkey_topk, shape.peer_query_norm, shape.peer_shared_ffn_hidden_size,
        shape.gated_linear_unit, add_bias=shape.add_bias_linear,
    )


def _router_terms(shape: ModelShape, h: int, E: int, k: int, bias: int) -> tuple[int, int]:
    """(parameters, forward FLOPs per token) of one MoE layer's router."""
    outputs = E + shape.null_experts  # null experts are router outputs (and product-key grid cells)
    if shape.router_type != "product_key":
        noisy = 2 if shape.noisy_gating else 1
        return noisy * outputs * h + bias * outputs, noisy * 2 * h * outputs
    from megatron_moe_ext.settings.router import product_key_layout

    lay = product_key_layout(outputs, k, heads=shape.pk_heads, key_dim=shape.pk_key_dim, grid_rows=shape.pk_grid_rows)
    Hk, D, sides = lay.heads, shape.pk_key_dim, lay.rows + lay.cols
    norm = _QUERY_NORM_AFFINE[shape.pk_query_norm] * Hk * D
    # Query W_q [Hk*D, h] (+ its bias b_q [Hk*D] with add_bias_linear; Megatron's dense router bias [E] is not
    # built: a per-expert logit offset is not separable over the grid), sub-keys, query norm.
    params = Hk * D * h + bias * Hk * D + Hk * sides * D // 2 + norm
    flops = 2 * h * Hk * D + 2 * Hk * sides * D // 2
    if shape.noisy_gating:
        params += Hk * sides * h
        flops += 2 * h * Hk * sides
    return params, flops


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tensor_parallel_size: int = 1) -> int:
    """Megatron's rule: round up to a multiple of divisible_by * tensor_parallel_size."""
    _positive("vocab_size", vocab_size)
    multiple = divisible_by * tensor_parallel_size
    return math.ceil(vocab_size / multiple) * multiple


# Megatron features whose parameters/FLOPs this module does not model: refuse rather than misreport.
_UNSUPPORTED = {
    "multi_latent_attention": "--multi-latent-attention",
    "mtp_num_layers": "--mtp-num-layers",
    "moe_latent_size": "--moe-latent-size",
    "attention_output_gate": "--attention-output-gate",
    "experimental_attention_variant": "--experimental-attention-variant",
}


# ModelShape field -> our flag's args name (MoEExtConfig field).
EXT_SHAPE_FIELDS = {
    "router_type": "moe_router_type",
    "noisy_gating": "moe_router_noisy_gating",
    "null_experts": "moe_null_experts",
    "ec_capacity_factor": "moe_ec_capacity_factor",
    "relu_target_sparsity": "moe_relu_target_sparsity",
    "pk_heads": "moe_pk_heads",
    "pk_key_dim": "moe_pk_key_dim",
    "pk_grid_rows": "moe_pk_grid_rows",
    "pk_query_norm": "moe_pk_query_norm",
    "peer_num_experts": "moe_peer_num_experts",
    "peer_layers": "moe_peer_layers",
    "peer_heads": "moe_peer_heads",
    "peer_topk": "moe_peer_topk",
    "peer_key_dim": "moe_peer_key_dim",
    "peer_subkey_topk": "moe_peer_subkey_topk",
    "peer_query_norm": "moe_peer_query_norm",
    "peer_shared_ffn_hidden_size": "moe_peer_shared_ffn_hidden_size",
}


def shape_from_args(args: Any) -> ModelShape:
    """ModelShape from Megatron's parsed args (an argparse Namespace; validated or not). Our flags that
    the namespace lacks (a parser without them) keep ModelShape's defaults (MoEExtConfig's, checked by
    tests/unit/test_settings_once.py): absent PEER flags mean no PEER layer."""
    for name, flag in _UNSUPPORTED.items():
        if getattr(args, name, None):
            raise ValueError(f"{flag} {getattr(args, name)!r} is not modelled by the accounting; fix: drop {flag}")
    h, heads = args.hidden_size, args.num_attention_heads
    ffn = args.ffn_hidden_size
    if ffn is None:  # Megatron's validate_args default (SwiGLU keeps ~the 4h parameter count)
        ffn = int((4 * h * 2 / 3) / 64) * 64 if args.swiglu else 4 * h
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else None
    vocab = getattr(args, "padded_vocab_size", None)
    if vocab is None:
        if args.vocab_size is None:
            raise ValueError("the vocabulary size is unknown; fix: pass --vocab-size (the tokenizer's size)")
        vocab = padded_vocab_size(args.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    pattern = None
    if args.num_experts is not None:
        freq = args.moe_layer_freq
        if isinstance(freq, int):
            if freq < 1:
                raise ValueError(f"--moe-layer-freq {freq} must be >= 1 (every Nth layer is MoE)")
            pattern = tuple(1 if i % freq == 0 else 0 for i in range(args.num_layers))
        else:
            pattern = tuple(freq)
    return ModelShape(
        num_layers=args.num_layers,
        hidden_size=h,
        num_attention_heads=heads,
        ffn_hidden_size=ffn,
        vocab_size=vocab,
        seq_length=args.seq_length,
        num_query_groups=groups,
        kv_channels=args.kv_channels,
        gated_linear_unit=bool(args.swiglu),
        add_bias_linear=bool(args.add_bias_linear),
        normalization=args.normalization,
        qk_layernorm=bool(args.qk_layernorm),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        max_position_embeddings=getattr(args, "max_position_embeddings", None),
        moe_layer_pattern=pattern,
        num_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        topk=args.moe_router_topk,
        shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        shared_expert_gate=bool(args.moe_shared_expert_gate),
        **{field: getattr(args, flag) for field, flag in EXT_SHAPE_FIELDS.items() if hasattr(args, flag)},
    )


def _flops(x: int) -> str:
    return f"{x / 1e9:10.3f} GFLOP" if x >= 1e8 else f"{x / 1e6:10.3f} MFLOP"


def _params(n: int) -> str:
    return f"{n / 1e6:10.3f} M  ({n:,})"


def _router_kind(acc: Accounting) -> str:
    if not acc.num_moe_layers:
        return ""
    shape = acc.shape
    noisy = ", noisy gating" if shape.noisy_gating else ""
    null = f", +{shape.null_experts} null experts" if shape.null_experts else ""
    if shape.router_type == "expert_choice":
        return f"  [expert choice, capacity factor {shape.ec_capacity_factor:g}{null}]"
    if shape.router_type == "relu":
        return "  [ReLU gates (ReMoE)]"
    if shape.router_type != "product_key":
        return f"  [dense top-k{noisy}{null}]"
    from megatron_moe_ext.settings.router import product_key_layout

    lay = product_key_layout(acc.num_experts + shape.null_experts, acc.topk, heads=shape.pk_heads, key_dim=shape.pk_key_dim,
                             grid_rows=shape.pk_grid_rows)
    return (f"  [product-key: {lay.heads} head(s) x {lay.rows}x{lay.cols} grid, d_key {shape.pk_key_dim}, "
            f"{shape.pk_query_norm} queries{noisy}{null}]")


def _peer_kind(acc: Accounting) -> str:
    """One line describing the PEER layers: which, N and its grid, heads x top-k, G, retrieval."""
    shape = acc.shape
    peer = _peer_counts(shape)
    numbers = ",".join(str(i) for i in shape.peer_layer_numbers())
    dense = f", dense branch {shape.peer_shared_ffn_hidden_size}" if shape.peer_shared_ffn_hidden_size else ""
    which = "layer" if acc.num_peer_layers == 1 else "layers"
    return (f"{acc.num_peer_layers} ({which} {numbers}: {shape.peer_num_experts} experts = {peer.grid}x{peer.grid}, "
            f"{shape.peer_heads} head(s) x top-{shape.peer_topk}, G={acc.peer_granularity}, d_key {shape.peer_key_dim}, "
            f"sub-key top-{peer.subkey_topk}, {shape.peer_query_norm} queries{dense})")


def _active_note(acc: Accounting) -> str:
    """Experts per token behind the expert FLOPs, and where the number comes from."""
    if not acc.num_moe_layers:
        return ""
    shape = acc.shape
    if acc.active_experts_measured:
        return f"  [{acc.active_experts:g} active experts/token, measured (--active-experts)]"
    if shape.router_type in ("topk", "product_key") and not shape.null_experts:
        return ""
    how = {"expert_choice": "capacity factor x top-k", "relu": "(1 - target sparsity) x experts"}.get(
        shape.router_type, "top-k x experts / (experts + null experts), balanced routing")
    return f"  [{acc.active_experts:.4g} active experts/token, nominal: {how}; measured: --active-experts]"


def format_report(acc: Accounting) -> str:
    """A short table: parameters in millions, FLOPs per token in GFLOP/MFLOP (PEER rows only when
    the model has PEER layers)."""
    moe = f"{acc.num_experts} experts x {acc.moe_ffn_hidden_size}, top-{acc.topk}" if acc.num_moe_layers else "dense"
    has_peer = acc.num_peer_layers > 0
    rows = [
        ("layers (MoE)", f"{acc.shape.num_layers} ({acc.num_moe_layers}: {moe})"),
        *([("PEER layers", _peer_kind(acc))] if has_peer else []),
        ("total params", _params(acc.total_params)),
        ("active params", _params(acc.active_params)),
        ("  embedding", _params(acc.embedding_params)),
        ("  attention", _params(acc.attention_params)),
        ("  mlp/experts", _params(acc.mlp_params)),
        ("  router", _params(acc.router_params) + _router_kind(acc)),
        *([("  peer", _params(acc.peer_params)),
           ("  peer active", _params(acc.peer_active_params) + f"  [retrieval {acc.peer_retrieval_params:,} + "
            f"2*G*h table rows + dense branch]")] if has_peer else []),
        ("  norms", _params(acc.norm_params)),
        ("forward / token", _flops(acc.forward_flops_per_token)),
        ("  attention", _flops(acc.attention_flops_per_token)),
        ("  mlp/experts", _flops(acc.mlp_flops_per_token) + _active_note(acc)),
        ("  router", _flops(acc.router_flops_per_token)),
        *([("  peer", _flops(acc.peer_flops_per_token) + f"  [retrieval {acc.peer_retrieval_flops_per_token:,}]")]
          if has_peer else []),
        ("  logits", _flops(acc.logits_flops_per_token)),
        ("training / token", _flops(acc.training_flops_per_token) + " (3x forward)"),
        ("inference / token", _flops(acc.inference_flops_per_token) + " (forward)"),
    ]
    lines = [f"{name:<18} {value}" for name, value in rows]
    peer_note = ("; PEER: query, sub-key scores, candidate sums (1 FLOP per addition), 2*G*h u dots + 2*G*h "
                 "gated v sums, G gate products, dense branch") if has_peer else ""
    lines.append(
        f"Counted: matmul FLOPs (2*m*n*k) of QKV/output projections, causal attention (seq_length/2 keys "
        f"per query, seq_length={acc.shape.seq_length}), MLP/top-k experts/shared experts, router, logits"
        f"{peer_note}; not norms, activations, softmax, top-k selections, biases or embedding lookups."
    )
    return "\n".join(lines)
