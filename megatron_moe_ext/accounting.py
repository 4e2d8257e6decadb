"""Parameter and FLOP accounting for Megatron GPT models, dense or MoE (pure arithmetic, stdlib only).

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
    router      per MoE layer: E*h  [+ E b]  [+ E*h noise weights with noisy gating]
                product keys (Hk heads, D key dim, n1 x n2 grid per head): Hk*D*h (query) + Hk*(n1+n2)*D/2
                (sub-keys) + query-norm affine (Hk*D rmsnorm, 2*Hk*D layernorm/batchnorm)
                [+ Hk*(n1+n2)*h noise weights]
    norms       L * 2*n(h) (input + pre-MLP) + n(h) (final)
Active parameters per token: total minus the (E - k) experts a token does not visit in each MoE layer
(embeddings, router and shared experts count as active).

Forward FLOPs per token (matmuls only, 2*m*n*k; causal attention averages s/2 keys per query, as in
Megatron's ``num_floating_point_operations``):
    attention   per layer: 2*h*(nq + 2*nkv)*d + 2*nq*d*h       (QKV and output projections)
                         + 2*nq*d*(s/2) + 2*nq*d*(s/2)          (QK^T scores, attention over values)
    dense MLP   per dense layer: 2*g*f*h + 2*f*h
    MoE         per MoE layer: k*(2*g*fe*h + 2*fe*h) + 2*g*fs*h + 2*fs*h [+ 2*h shared gate]
    router      per MoE layer: 2*h*E   (the only term that grows with the number of experts) [x2 noisy]
                product keys: 2*h*Hk*D + 2*Hk*(n1+n2)*D/2  [+ 2*h*Hk*(n1+n2) noisy]: O(sqrt E)
    logits      2*h*V
NOT counted: norms, activations, softmax, biases, residual adds, embedding lookups, token dispatch.
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
    pk_heads: int = 1
    pk_key_dim: int = 128
    pk_grid_rows: int | None = None
    pk_query_norm: str = "batchnorm"

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

    def _check_moe(self) -> None:
        if self.num_experts is None:
            raise ValueError(f"moe_layer_pattern={list(self.moe_layer_pattern)} has MoE layers but num_experts is None; fix: set num_experts")
        if self.moe_ffn_hidden_size is None:
            object.__setattr__(self, "moe_ffn_hidden_size", self.ffn_hidden_size)
        _positive("num_experts", self.num_experts)
        _positive("moe_ffn_hidden_size", self.moe_ffn_hidden_size)
        if self.topk is None or not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"topk={self.topk} must be in 1..num_experts={self.num_experts}")
        if self.shared_expert_intermediate_size is not None:
            _positive("shared_expert_intermediate_size", self.shared_expert_intermediate_size)
            if self.add_bias_linear:
                # Megatron's SharedExpertMLP asserts this; a shape it cannot build has no accounting.
                raise ValueError("shared experts do not support biases in Megatron; fix: add_bias_linear=False (--disable-bias-linear)")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class Accounting:
    """Parameter counts and per-token FLOPs of one ModelShape (num_experts/moe_ffn_hidden_size/topk
    are 0 for a dense model). total = embedding + attention + mlp + router + norm params."""

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
    n_moe = sum(shape.moe_layer_pattern)
    n_dense = shape.num_layers - n_moe
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
    router_layer, router_flops_layer = _router_terms(shape, h, E, k, bias) if n_moe else (0, 0)
    router = n_moe * router_layer
    attention = shape.num_layers * attn_layer
    norms = shape.num_layers * 2 * norm(h) + norm(h)
    total = embedding + attention + mlp_params + router + norms
    active_expert = n_moe * k * one_expert
    # Matmul FLOPs only: 2 per multiply-add. Causal attention: each query sees s/2 keys on average,
    # so QK^T and attention-over-values cost 2*nq*d*(s/2) each, 2*nq*d*s together.
    attn_flops = shape.num_layers * (2 * h * qkv_rows + 2 * nq * d * h + 2 * nq * d * s)
    dense_mlp_flops = 2 * (g + 1) * shape.ffn_hidden_size * h
    moe_flops = k * 2 * (g + 1) * fe * h + 2 * (g + 1) * fs * h + (2 * h if fs and shape.shared_expert_gate else 0)
    mlp_flops = n_dense * dense_mlp_flops + n_moe * moe_flops
    router_flops = n_moe * router_flops_layer
    logits_flops = 2 * h * V
    forward = attn_flops + mlp_flops + router_flops + logits_flops
    return Accounting(
        shape=shape,
        num_experts=E,
        moe_ffn_hidden_size=fe,
        topk=k,
        num_moe_layers=n_moe,
        total_params=total,
        active_params=total - (expert_params - active_expert),
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
    )


def _router_terms(shape: ModelShape, h: int, E: int, k: int, bias: int) -> tuple[int, int]:
    """(parameters, forward FLOPs per token) of one MoE layer's router."""
    if shape.router_type != "product_key":
        noisy = 2 if shape.noisy_gating else 1
        return noisy * E * h + bias * E, noisy * 2 * h * E
    from megatron_moe_ext.router_settings import product_key_layout

    lay = product_key_layout(E, k, heads=shape.pk_heads, key_dim=shape.pk_key_dim, grid_rows=shape.pk_grid_rows)
    Hk, D, sides = lay.heads, shape.pk_key_dim, lay.rows + lay.cols
    norm = {"none": 0, "rmsnorm": 1, "layernorm": 2, "batchnorm": 2}[shape.pk_query_norm] * Hk * D
    params = Hk * D * h + Hk * sides * D // 2 + norm
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


def shape_from_args(args: Any) -> ModelShape:
    """ModelShape from Megatron's parsed args (an argparse Namespace; validated or not)."""
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
        freq = getattr(args, "moe_layer_freq", 1)
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
        shared_expert_gate=bool(getattr(args, "moe_shared_expert_gate", False)),
        router_type=getattr(args, "moe_router_type", "topk"),
        noisy_gating=bool(getattr(args, "moe_router_noisy_gating", False)),
        pk_heads=getattr(args, "moe_pk_heads", 1),
        pk_key_dim=getattr(args, "moe_pk_key_dim", 128),
        pk_grid_rows=getattr(args, "moe_pk_grid_rows", None),
        pk_query_norm=getattr(args, "moe_pk_query_norm", "batchnorm"),
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
    if shape.router_type != "product_key":
        return f"  [dense top-k{noisy}]"
    from megatron_moe_ext.router_settings import product_key_layout

    lay = product_key_layout(acc.num_experts, acc.topk, heads=shape.pk_heads, key_dim=shape.pk_key_dim,
                             grid_rows=shape.pk_grid_rows)
    return (f"  [product-key: {lay.heads} head(s) x {lay.rows}x{lay.cols} grid, d_key {shape.pk_key_dim}, "
            f"{shape.pk_query_norm} queries{noisy}]")


def format_report(acc: Accounting) -> str:
    """A short table: parameters in millions, FLOPs per token in GFLOP/MFLOP."""
    moe = f"{acc.num_experts} experts x {acc.moe_ffn_hidden_size}, top-{acc.topk}" if acc.num_moe_layers else "dense"
    rows = [
        ("layers (MoE)", f"{acc.shape.num_layers} ({acc.num_moe_layers}: {moe})"),
        ("total params", _params(acc.total_params)),
        ("active params", _params(acc.active_params)),
        ("  embedding", _params(acc.embedding_params)),
        ("  attention", _params(acc.attention_params)),
        ("  mlp/experts", _params(acc.mlp_params)),
        ("  router", _params(acc.router_params) + _router_kind(acc)),
        ("  norms", _params(acc.norm_params)),
        ("forward / token", _flops(acc.forward_flops_per_token)),
        ("  attention", _flops(acc.attention_flops_per_token)),
        ("  mlp/experts", _flops(acc.mlp_flops_per_token)),
        ("  router", _flops(acc.router_flops_per_token)),
        ("  logits", _flops(acc.logits_flops_per_token)),
        ("training / token", _flops(acc.training_flops_per_token) + " (3x forward)"),
        ("inference / token", _flops(acc.inference_flops_per_token) + " (forward)"),
    ]
    lines = [f"{name:<18} {value}" for name, value in rows]
    lines.append(
        f"Counted: matmul FLOPs (2*m*n*k) of QKV/output projections, causal attention (seq_length/2 keys "
        f"per query, seq_length={acc.shape.seq_length}), MLP/top-k experts/shared experts, router, logits; "
        "not norms, activations, softmax, biases or embedding lookups."
    )
    return "\n".join(lines)
