"""What the native Hugging Face targets (``qwen3_moe``, ``qwen2_moe``, ``glm4_moe``) share: the tensor mapping
between the canonical Megatron state and the per-expert on-disk HF names, the common config fields, and the
checks that no native target can pass.

Pure torch (no transformers, no megatron imports): the converter core runs with torch + safetensors only.
The mapping is a table of names plus three named transforms (QKV split/merge by query group, gate/up split of
a SwiGLU fc1, stacking of per-expert tensors); the facts behind it are in ``shared/notes/hf-export.md``.

The three targets differ only in what ``NativeLayout`` names: whether the MoE block has a shared expert and
under which name, whether it is gated, and whether the router has a selection bias. Everything else (the
attention, norms, dense MLPs, routed experts, embeddings) is the same table for all of them.

Legend: L layers, H hidden, E experts, F expert hidden, Fd dense hidden, Fs shared-expert hidden, G query
groups, Q query heads per group, S = Q + 2 slots of a query group in the fused QKV, D head dim, A = heads * D
attention width, V (padded) vocabulary.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

# ---------------------------------------------------------------------------------------------------------
# Canonical (Megatron torch_dist, local spec) names, per layer prefix ``decoder.layers.<i>.``. The first name
# of each tuple is what import writes; later ones are accepted on export (TE-spec and in-memory names).
# ---------------------------------------------------------------------------------------------------------
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = ("decoder.final_layernorm.weight", "decoder.final_norm.weight")
INPUT_NORM = ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
PRE_MLP_NORM = ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
QKV = "self_attention.linear_qkv.weight"
QKV_BIAS = "self_attention.linear_qkv.bias"
Q_NORM = "self_attention.q_layernorm.weight"
K_NORM = "self_attention.k_layernorm.weight"
PROJ = "self_attention.linear_proj.weight"
DENSE_FC1 = "mlp.linear_fc1.weight"
DENSE_FC2 = "mlp.linear_fc2.weight"
ROUTER = "mlp.router.weight"
EXPERT_BIAS = "mlp.router.expert_bias"
EXPERTS_FC1 = "mlp.experts.experts.linear_fc1.weight"
EXPERTS_FC2 = "mlp.experts.experts.linear_fc2.weight"
SHARED_FC1 = "mlp.shared_experts.linear_fc1.weight"
SHARED_FC2 = "mlp.shared_experts.linear_fc2.weight"
SHARED_GATE = "mlp.shared_experts.gate_weight"
# Training-only tensors a native model has no use for: dropped on export (documented in unsupported()).
IGNORED_LAYER_TENSORS = (
    "mlp.router.noise_weight",  # our noisy top-k gating: noise is added only in training
)

# Config keys this package adds to an exported config.json so that import restores the exact Megatron model
# where the native encoding is equivalent but not unique (HF configs keep unknown keys as attributes).
UNGATED_SHARED_KEY = "megatron_shared_expert_ungated"
EXPERT_BIAS_KEY = "megatron_expert_bias"


def layer(i: int) -> str:
    return f"decoder.layers.{i}."


def hf_layer(i: int) -> str:
    return f"model.layers.{i}."


# ---------------------------------------------------------------------------------------------------------
# Architecture facts read from Megatron's argument namespace
# ---------------------------------------------------------------------------------------------------------
def _get(args: argparse.Namespace, name: str, default=None):
    return getattr(args, name, default)


def query_groups(args: argparse.Namespace) -> int:
    """G: Megatron's --num-query-groups counts only with --group-query-attention (its default is 1 otherwise)."""
    if _get(args, "group_query_attention") and _get(args, "num_query_groups"):
        return int(args.num_query_groups)
    return int(args.num_attention_heads)


def head_dim(args: argparse.Namespace) -> int:
    """D = --kv-channels (validate_args sets hidden/heads when unset)."""
    return int(_get(args, "kv_channels") or args.hidden_size // args.num_attention_heads)


def moe_pattern(args: argparse.Namespace) -> list[bool]:
    """Per layer: is it an MoE layer (Megatron's get_gpt_decoder_block_spec reading of --moe-layer-freq)."""
    if not _get(args, "num_experts"):
        return [False] * args.num_layers
    freq = _get(args, "moe_layer_freq", 1)
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(args.num_layers)]
    if len(freq) != args.num_layers:
        raise ValueError(f"--moe-layer-freq {freq} has {len(freq)} entries for --num-layers {args.num_layers}")
    return [bool(x) for x in freq]


def moe_ffn(args: argparse.Namespace) -> int:
    """F: --moe-ffn-hidden-size (validate_args defaults it to --ffn-hidden-size)."""
    return int(_get(args, "moe_ffn_hidden_size") or args.ffn_hidden_size)


def shared_size(args: argparse.Namespace) -> int:
    """Fs (0 without a shared expert); our --moe-num-shared-experts is already folded in by the flag path."""
    return int(_get(args, "moe_shared_expert_intermediate_size") or 0)


def balancing_types(args: argparse.Namespace) -> list[str]:
    value = _get(args, "moe_router_load_balancing_type")
    return list(value) if isinstance(value, (list, tuple)) else [value]


def scaling_factor(args: argparse.Namespace) -> float:
    """Megatron multiplies the gates by --moe-router-topk-scaling-factor when it is truthy (``if scaling_factor``)."""
    return float(_get(args, "moe_router_topk_scaling_factor") or 1.0)


def group_routing(args: argparse.Namespace) -> tuple[int, int] | None:
    """(groups, selected groups) of group-limited routing, None when off (Megatron tests ``if group_topk``)."""
    group_topk = _get(args, "moe_router_group_topk")
    if not group_topk:
        return None
    return int(args.moe_router_num_groups), int(group_topk)


# ---------------------------------------------------------------------------------------------------------
# Checks shared by all native targets: one human-readable reason per thing none of them reproduces
# ---------------------------------------------------------------------------------------------------------
# Why a router of ours has no native equivalent (native routers: softmax/sigmoid top-k per token).
_ROUTER_REFUSALS = {
    "product_key": "the product-key router has no native equivalent",
    "expert_choice": "expert-choice routing (a variable number of experts per token, chosen at inference by a "
                     "per-expert threshold or the token's top-k of a softmax over all experts, ungated by top-k "
                     "renormalisation) has no native equivalent",
    "relu": "ReLU routing (gates ReLU(logits), any number of experts per token) has no native equivalent",
}


def common_reasons(args: argparse.Namespace) -> list[str]:
    """What no native target reproduces exactly, one reason each naming the Megatron flag.

    Not reasons (exact on every native target): our noisy gating (noise only in training; ``noise_weight`` is
    dropped), balancing losses/metrics and expert-bias updates (training only), fine-grained experts
    (--moe-granularity: E experts of --moe-ffn-hidden-size with a standard router), any --moe-expert-backend
    (all store [E, 2F, H] fc1 with gate rows first and run silu(gate) * up; checked end to end for ours and
    Megatron's SequentialMLP), --moe-router-dtype, fusions, routing replay (a no-op unless an RL loop sets an
    action), qk-clip (it edits the saved weights themselves)."""
    r: list[str] = []

    def refuse(cond: object, why: str) -> None:
        if cond:
            r.append(why)

    refuse(not _get(args, "num_experts"), "a dense model (--num-experts unset): the native targets are MoE "
                                           "architectures")
    router = _get(args, "moe_router_type")
    refuse(router not in (None, "topk"),  # None: saved before router types existed
           f"--moe-router-type {router!r}: {_ROUTER_REFUSALS.get(router, 'no native equivalent')}")
    refuse(_get(args, "moe_null_experts"),
           f"--moe-null-experts {_get(args, 'moe_null_experts')}: native routers have no zero-computation experts "
           "(every selected expert computes, and the router has one output per expert)")
    refuse(_get(args, "moe_peer_num_experts") is not None,
           f"--moe-peer-num-experts {_get(args, 'moe_peer_num_experts')}: PEER layers have no native equivalent")
    refuse(_get(args, "normalization", "LayerNorm") != "RMSNorm",
           f"--normalization {_get(args, 'normalization')}: native targets use RMSNorm")
    refuse(_get(args, "layernorm_zero_centered_gamma"),
           "--apply-layernorm-1p (zero-centred gamma): native RMSNorm multiplies by w, not 1 + w")
    refuse(not _get(args, "swiglu") or _get(args, "quick_geglu") or _get(args, "squared_relu"),
           "not --swiglu: native experts and MLPs are SwiGLU (silu(gate) * up)")
    refuse(_get(args, "activation_func_clamp_value") is not None,
           f"--activation-func-clamp-value {_get(args, 'activation_func_clamp_value')}: native SwiGLU is unclamped")
    refuse(_get(args, "glu_linear_offset", 0.0), f"--glu-linear-offset {_get(args, 'glu_linear_offset')}: native "
                                                 f"SwiGLU has no offset")
    refuse(_get(args, "moe_mlp_glu_interleave_size") or _get(args, "moe_shared_expert_glu_interleave_size"),
           "--moe-mlp-glu-interleave-size/--moe-shared-expert-glu-interleave-size: interleaved gate/up rows are "
           "not converted")
    refuse(_get(args, "add_bias_linear"), "add_bias_linear=True (Megatron's default): native MLPs, experts, routers "
                                          "and output projections have no bias; fix: train with --disable-bias-linear, "
                                          "or export with --target megatron_moe_ext (remote code)")
    pos = _get(args, "position_embedding_type", "learned_absolute")
    refuse(pos != "rope", f"--position-embedding-type {pos}: native targets use RoPE")
    refuse(_get(args, "rotary_interleaved"), "--rotary-interleaved: native RoPE rotates halves (rotate_half)")
    refuse(_get(args, "use_rope_scaling"), "--use-rope-scaling (Llama-3 RoPE scaling) is not converted")
    refuse(_get(args, "rotary_seq_len_interpolation_factor") not in (None, 1),
           f"--rotary-seq-len-interpolation-factor {_get(args, 'rotary_seq_len_interpolation_factor')} is not "
           f"converted")
    refuse(_get(args, "no_rope_freq"), f"--no-rope-freq {_get(args, 'no_rope_freq')}: layers without RoPE")
    refuse(_get(args, "multi_latent_attention"), "--multi-latent-attention (MLA): native targets use GQA")
    refuse(_get(args, "mtp_num_layers"), f"--mtp-num-layers {_get(args, 'mtp_num_layers')}: multi-token "
                                         f"prediction layers are not converted")
    refuse(_get(args, "attention_output_gate"), "--attention-output-gate: native attention has no output gate")
    refuse(_get(args, "qk_l2_norm"), "--qk-l2-norm: native QK-norm is a learned RMSNorm")
    refuse(_get(args, "softmax_type", "vanilla") != "vanilla",
           f"--softmax-type {_get(args, 'softmax_type')}: native attention uses the vanilla softmax")
    refuse(_get(args, "window_size") is not None, f"--window-size {_get(args, 'window_size')}: sliding-window "
                                                  f"attention is not converted")
    refuse(_get(args, "experimental_attention_variant") or _get(args, "linear_attention_freq"),
           "--experimental-attention-variant/--linear-attention-freq: native targets have softmax attention only")
    refuse(_get(args, "heterogeneous_layers_config_path") or _get(args, "heterogeneous_layers_config_encoded_json"),
           "--heterogeneous-layers-config-*: per-layer architectures are not converted")
    refuse(_get(args, "is_hybrid_model") or _get(args, "hybrid_layer_pattern") or _get(args, "hybrid_override_pattern"),
           "a hybrid model (--hybrid-layer-pattern): native targets are plain transformers")
    refuse(_get(args, "use_mup"), "--use-mup: muP multipliers on embeddings, attention and output are not "
                                  "expressible in native configs")
    refuse(_get(args, "apply_residual_connection_post_layernorm"),
           "--apply-residual-connection-post-layernorm: native residuals take the un-normalised input")
    refuse(_get(args, "moe_latent_size"), f"--moe-latent-size {_get(args, 'moe_latent_size')}: latent MoE has no "
                                          f"native equivalent")
    refuse(_get(args, "moe_expert_capacity_factor") is not None or _get(args, "moe_pad_expert_input_to_capacity"),
           f"--moe-expert-capacity-factor {_get(args, 'moe_expert_capacity_factor')}: token dropping also applies at "
           f"inference; native targets never drop tokens")
    refuse(_get(args, "moe_apply_probs_on_input"),
           "--moe-apply-probs-on-input: gates scale the expert input, native targets scale the output")
    refuse(_get(args, "moe_input_jitter_eps") is not None,
           f"--moe-input-jitter-eps {_get(args, 'moe_input_jitter_eps')}: Megatron multiplies router inputs by "
           f"random jitter in eval too")
    refuse(_get(args, "moe_router_force_load_balancing") or _get(args, "moe_router_force_biased") is not None,
           "--moe-router-force-load-balancing/--moe-router-force-biased: routing on random logits (benchmarks)")
    for kind in ("sinkhorn", "quantile_balancing"):
        refuse(kind in balancing_types(args), f"--moe-router-load-balancing-type {kind}: it changes which experts "
                                              f"are selected, not only the training loss")
    score = _get(args, "moe_router_score_function", "softmax")
    refuse(score not in ("softmax", "sigmoid"), f"--moe-router-score-function {score}: native routers use softmax "
                                                f"or sigmoid")
    return r


def dense_prefix(pattern: list[bool]) -> int | None:
    """k when the layers are k dense layers then only MoE layers (GLM's first_k_dense_replace), else None."""
    k = next((i for i, moe in enumerate(pattern) if moe), len(pattern))
    return k if all(pattern[k:]) else None


# ---------------------------------------------------------------------------------------------------------
# Named transforms
# ---------------------------------------------------------------------------------------------------------
def split_qkv(qkv: torch.Tensor, *, heads: int, groups: int, dim: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Megatron's fused QKV weight [G*(Q+2)*D, H] (or bias [G*(Q+2)*D]), ordered per query group as
    [q_1..q_Q, k, v], -> (q [G*Q*D, ...], k [G*D, ...], v [G*D, ...]) in HF's head-major order."""
    per_group = heads // groups
    rest = tuple(qkv.shape[1:])
    if qkv.shape[0] != groups * (per_group + 2) * dim:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows, expected {groups}*({per_group}+2)*{dim} for {heads} "
                         f"heads, {groups} query groups, head dim {dim}; the checkpoint does not match its arguments")
    qkv_GSD = qkv.reshape(groups, per_group + 2, dim, *rest)
    q = qkv_GSD[:, :per_group].reshape(groups * per_group * dim, *rest).clone()
    k = qkv_GSD[:, per_group].reshape(groups * dim, *rest).clone()
    v = qkv_GSD[:, per_group + 1].reshape(groups * dim, *rest).clone()
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, heads: int, groups: int,
              dim: int) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    per_group = heads // groups
    rest = tuple(q.shape[1:])
    q_GQD = q.reshape(groups, per_group, dim, *rest)
    k_G1D = k.reshape(groups, 1, dim, *rest)
    v_G1D = v.reshape(groups, 1, dim, *rest)
    return torch.cat([q_GQD, k_G1D, v_G1D], dim=1).reshape(groups * (per_group + 2) * dim, *rest)


def split_glu(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU fc1 [2F, H] = [gate; up] -> (gate [F, H], up [F, H]); copies, so the two never share storage
    (safetensors refuses shared tensors)."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.clone(), up.clone()


def merge_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


# ---------------------------------------------------------------------------------------------------------
# The mapping
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class NativeLayout:
    """How one native architecture names its MoE block (the rest of the mapping is common).

    ``shared``: HF module of the shared expert (``shared_expert``/``shared_experts``), None when the
    architecture has none; a model without one is then written with a zero-size shared expert (exact:
    an MLP of hidden size 0 adds 0). ``shared_gate``: HF name of the shared expert's sigmoid gate, None when
    the architecture's shared expert is ungated. ``expert_bias``: HF name of the router's selection bias, None
    when it has none. ``o_proj_bias``: the architecture's attention-bias switch also adds an output bias
    (Qwen3), written as zeros."""

    shared: str | None = None
    shared_gate: str | None = None
    expert_bias: str | None = None
    o_proj_bias: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Architecture:
    """The shape facts both directions of the mapping need."""

    num_layers: int
    heads: int
    groups: int
    head_dim: int
    moe: list[bool]
    tied: bool
    qkv_bias: bool
    qk_norm: bool
    shared: bool  # Megatron has a shared expert
    shared_gate: bool  # ... with a sigmoid gate
    expert_bias: bool  # Megatron's router has expert_bias


def architecture(args: argparse.Namespace) -> Architecture:
    """The mapping facts of a Megatron run."""
    return Architecture(
        num_layers=int(args.num_layers), heads=int(args.num_attention_heads), groups=query_groups(args),
        head_dim=head_dim(args), moe=moe_pattern(args), tied=not _get(args, "untie_embeddings_and_output_weights"),
        qkv_bias=bool(_get(args, "add_qkv_bias")), qk_norm=bool(_get(args, "qk_layernorm")),
        shared=shared_size(args) > 0, shared_gate=shared_size(args) > 0 and bool(_get(args, "moe_shared_expert_gate")),
        expert_bias=bool(_get(args, "moe_router_enable_expert_bias")),
    )


class _Source:
    """The canonical state being exported: every tensor must be used once (or be known training-only)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        self.used: set[str] = set()

    def has(self, *names: str) -> bool:
        return any(n in self.state for n in names)

    def take(self, *names: str) -> torch.Tensor:
        for name in names:
            if name in self.state:
                self.used.add(name)
                return self.state[name]
        raise ValueError(f"the checkpoint has no {names[0]}; it does not match its own arguments (a layer built "
                         f"differently from what the flags say?)")

    def check_all_used(self) -> None:
        left = sorted(n for n in set(self.state) - self.used
                      if not any(n.endswith("." + leaf) for leaf in IGNORED_LAYER_TENSORS))
        if left:
            raise ValueError(f"{len(left)} checkpoint tensors have no place in the exported model: "
                             f"{', '.join(left[:6])}{' ...' if len(left) > 6 else ''}; the converter does not know "
                             f"them, so the export would not be exact")


def export_tensors(arch: Architecture, state: dict[str, torch.Tensor], layout: NativeLayout) -> dict[str, torch.Tensor]:
    """Canonical state -> tensors under their per-expert on-disk HF names (see the module docstring)."""
    src = _Source(state)
    out: dict[str, torch.Tensor] = {}
    embedding_VH = src.take(EMBEDDING)
    out["model.embed_tokens.weight"] = embedding_VH
    out["model.norm.weight"] = src.take(*FINAL_NORM)
    if arch.tied:
        if src.has(OUTPUT) and not torch.equal(src.take(OUTPUT), embedding_VH):
            raise ValueError("tied embeddings (no --untie-embeddings-and-output-weights) but output_layer.weight "
                             "differs from the word embeddings")
    else:
        out["lm_head.weight"] = src.take(OUTPUT)
    for i in range(arch.num_layers):
        L, h = layer(i), hf_layer(i)
        out[h + "input_layernorm.weight"] = src.take(*(L + n for n in INPUT_NORM))
        out[h + "post_attention_layernorm.weight"] = src.take(*(L + n for n in PRE_MLP_NORM))
        dims = {"heads": arch.heads, "groups": arch.groups, "dim": arch.head_dim}
        for proj, t in zip("qkv", split_qkv(src.take(L + QKV), **dims)):
            out[h + f"self_attn.{proj}_proj.weight"] = t
        if arch.qkv_bias:
            for proj, t in zip("qkv", split_qkv(src.take(L + QKV_BIAS), **dims)):
                out[h + f"self_attn.{proj}_proj.bias"] = t
        proj_HA = src.take(L + PROJ)
        out[h + "self_attn.o_proj.weight"] = proj_HA
        if arch.qkv_bias and layout.o_proj_bias:
            out[h + "self_attn.o_proj.bias"] = proj_HA.new_zeros(proj_HA.shape[0])
        if arch.qk_norm:
            out[h + "self_attn.q_norm.weight"] = src.take(L + Q_NORM)
            out[h + "self_attn.k_norm.weight"] = src.take(L + K_NORM)
        if arch.moe[i]:
            out.update(_export_moe(arch, src, L, h, layout))
        else:
            gate, up = split_glu(src.take(L + DENSE_FC1))
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
            out[h + "mlp.down_proj.weight"] = src.take(L + DENSE_FC2)
    src.check_all_used()
    return out


def _export_moe(arch: Architecture, src: _Source, L: str, h: str, layout: NativeLayout) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    router_EH = src.take(L + ROUTER)
    out[h + "mlp.gate.weight"] = router_EH
    if layout.expert_bias is not None:
        # No Megatron expert bias: zeros select exactly as no bias (the bias only shifts the selection scores).
        bias_E = src.take(L + EXPERT_BIAS) if arch.expert_bias else torch.zeros(router_EH.shape[0])
        out[h + layout.expert_bias] = bias_E.float()
    fc1_E2FH, fc2_EHF = src.take(L + EXPERTS_FC1), src.take(L + EXPERTS_FC2)
    for e in range(fc1_E2FH.shape[0]):
        gate, up = split_glu(fc1_E2FH[e])
        out[h + f"mlp.experts.{e}.gate_proj.weight"] = gate
        out[h + f"mlp.experts.{e}.up_proj.weight"] = up
        out[h + f"mlp.experts.{e}.down_proj.weight"] = fc2_EHF[e].clone()
    if layout.shared is None:
        return out
    s = h + f"mlp.{layout.shared}."
    if arch.shared:
        gate, up = split_glu(src.take(L + SHARED_FC1))
        down_HFs = src.take(L + SHARED_FC2)
        if layout.shared_gate is not None and not arch.shared_gate:
            # An ungated shared expert through an always-gated one: sigmoid(0) = 0.5 exactly, and doubling W2 is
            # exact in any float format (a power-of-two scale), so 0.5 * (2 W2) h == W2 h bit for bit.
            out[h + layout.shared_gate] = router_EH.new_zeros(1, router_EH.shape[1])
            down_HFs = down_HFs * 2
        elif layout.shared_gate is not None:
            out[h + layout.shared_gate] = src.take(L + SHARED_GATE)
    else:
        # No shared expert: an MLP of hidden size 0 adds exactly 0 (transformers builds and loads it).
        H = router_EH.shape[1]
        gate, up, down_HFs = (router_EH.new_zeros(0, H), router_EH.new_zeros(0, H), router_EH.new_zeros(H, 0))
        if layout.shared_gate is not None:
            out[h + layout.shared_gate] = router_EH.new_zeros(1, H)
    out[s + "gate_proj.weight"], out[s + "up_proj.weight"], out[s + "down_proj.weight"] = gate, up, down_HFs
    return out


class _Tensors:
    """An HF folder's tensors being imported: every tensor must be used once."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ValueError(f"the HF folder has no tensor {name!r} that its config.json implies; fix: a complete "
                             f"folder (save_pretrained or export-hf)")
        self.used.add(name)
        return self.tensors[name]

    def check_all_used(self) -> None:
        left = sorted(set(self.tensors) - self.used)
        if left:
            raise ValueError(f"{len(left)} HF tensors have no place in the Megatron model its config.json describes: "
                             f"{', '.join(left[:6])}{' ...' if len(left) > 6 else ''}")


def import_tensors(arch: Architecture, tensors: dict[str, torch.Tensor], layout: NativeLayout, *,
                   num_experts: int, shared_ungated_marker: bool = False) -> dict[str, torch.Tensor]:
    """Inverse of :func:`export_tensors`: HF on-disk tensors -> canonical state (names as ``read_model_state``
    gives them for our local-spec models). ``arch`` describes the Megatron model import builds; with
    ``shared_ungated_marker`` (our export of an ungated shared expert) the zero gate is dropped and W2 halved."""
    src = _Tensors(tensors)
    out: dict[str, torch.Tensor] = {EMBEDDING: src.take("model.embed_tokens.weight"),
                                    FINAL_NORM[0]: src.take("model.norm.weight")}
    if not arch.tied:
        out[OUTPUT] = src.take("lm_head.weight")
    elif src.has("lm_head.weight") and not torch.equal(src.take("lm_head.weight"), out[EMBEDDING]):
        raise ValueError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight; "
                         "fix: tie_word_embeddings false")
    for i in range(arch.num_layers):
        L, h = layer(i), hf_layer(i)
        out[L + INPUT_NORM[0]] = src.take(h + "input_layernorm.weight")
        out[L + PRE_MLP_NORM[0]] = src.take(h + "post_attention_layernorm.weight")
        dims = {"heads": arch.heads, "groups": arch.groups, "dim": arch.head_dim}
        out[L + QKV] = merge_qkv(*(src.take(h + f"self_attn.{p}_proj.weight") for p in "qkv"), **dims)
        if arch.qkv_bias:
            out[L + QKV_BIAS] = merge_qkv(*(src.take(h + f"self_attn.{p}_proj.bias") for p in "qkv"), **dims)
        out[L + PROJ] = src.take(h + "self_attn.o_proj.weight")
        if arch.qkv_bias and layout.o_proj_bias:
            o_bias = src.take(h + "self_attn.o_proj.bias")
            if torch.count_nonzero(o_bias):
                raise ValueError(f"{h}self_attn.o_proj.bias is not zero: Megatron's --add-qkv-bias has no output "
                                 f"bias, so this model cannot be built exactly")
        if arch.qk_norm:
            out[L + Q_NORM] = src.take(h + "self_attn.q_norm.weight")
            out[L + K_NORM] = src.take(h + "self_attn.k_norm.weight")
        if arch.moe[i]:
            out.update(_import_moe(arch, src, L, h, layout, num_experts, shared_ungated_marker))
        else:
            out[L + DENSE_FC1] = merge_glu(src.take(h + "mlp.gate_proj.weight"), src.take(h + "mlp.up_proj.weight"))
            out[L + DENSE_FC2] = src.take(h + "mlp.down_proj.weight")
    src.check_all_used()
    return out


def _import_moe(arch: Architecture, src: _Tensors, L: str, h: str, layout: NativeLayout, num_experts: int,
                shared_ungated_marker: bool) -> dict[str, torch.Tensor]:
    out = {L + ROUTER: src.take(h + "mlp.gate.weight")}
    if layout.expert_bias is not None:
        bias_E = src.take(h + layout.expert_bias)
        if arch.expert_bias:
            out[L + EXPERT_BIAS] = bias_E
        elif torch.count_nonzero(bias_E):
            raise ValueError(f"{h}{layout.expert_bias} is not zero but the model is imported without expert bias")

    def expert(k: int, proj: str) -> torch.Tensor:
        return src.take(h + f"mlp.experts.{k}.{proj}_proj.weight")

    out[L + EXPERTS_FC1] = torch.stack([merge_glu(expert(k, "gate"), expert(k, "up")) for k in range(num_experts)])
    out[L + EXPERTS_FC2] = torch.stack([expert(k, "down") for k in range(num_experts)])
    if layout.shared is None:
        return out
    s = h + f"mlp.{layout.shared}."
    gate, up, down = (src.take(s + f"{p}_proj.weight") for p in ("gate", "up", "down"))
    hf_gate = src.take(h + layout.shared_gate) if layout.shared_gate is not None else None
    if not arch.shared:
        if gate.numel():
            raise ValueError(f"{s}gate_proj.weight has {gate.shape[0]} rows, but the model is imported without a "
                             f"shared expert")
        return out
    out[L + SHARED_FC1] = merge_glu(gate, up)
    if arch.shared_gate:
        out[L + SHARED_GATE] = hf_gate
    elif hf_gate is not None:
        if not shared_ungated_marker or torch.count_nonzero(hf_gate):
            raise ValueError(f"{h}{layout.shared_gate} cannot be dropped (not our zero gate of an ungated shared "
                             f"expert)")
        down = down / 2  # exact: undoes the export's power-of-two scale
    out[L + SHARED_FC2] = down
    return out


# ---------------------------------------------------------------------------------------------------------
# Config fields
# ---------------------------------------------------------------------------------------------------------
def common_config(args: argparse.Namespace, state: dict[str, torch.Tensor]) -> dict:
    """HF config fields every native target has (model-specific ones are added by each target)."""
    vocab = int(state[EMBEDDING].shape[0])  # the padded vocabulary: every embedding row is kept
    return {
        "vocab_size": vocab,
        "hidden_size": int(args.hidden_size),
        "intermediate_size": int(args.ffn_hidden_size),
        "num_hidden_layers": int(args.num_layers),
        "num_attention_heads": int(args.num_attention_heads),
        "num_key_value_heads": query_groups(args),
        "head_dim": head_dim(args),
        "hidden_act": "silu",
        "max_position_embeddings": int(_get(args, "max_position_embeddings") or _get(args, "seq_length")),
        "initializer_range": float(_get(args, "init_method_std", 0.02)),
        "rms_norm_eps": float(args.layernorm_epsilon),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(args.rotary_base)},
        "tie_word_embeddings": not _get(args, "untie_embeddings_and_output_weights"),
        "attention_dropout": 0.0,
        "use_cache": True,
        "moe_intermediate_size": moe_ffn(args),
        "num_experts_per_tok": int(args.moe_router_topk),
        "output_router_logits": False,
    }


class ConfigReader:
    """Reads an HF config dict with the HF class's defaults for absent keys; ValueError naming the field."""

    def __init__(self, config: dict, defaults: dict, model_type: str) -> None:
        self.config, self.defaults, self.model_type = config, defaults, model_type

    def __call__(self, key: str):
        if key in self.config and self.config[key] is not None:
            return self.config[key]
        if key in self.defaults:
            return self.defaults[key]
        raise ValueError(f"config.json ({self.model_type}) has no {key!r}; fix: a complete config (save_pretrained)")

    def refuse(self, key: str, why: str, fix: str) -> None:
        raise ValueError(f"config.json ({self.model_type}) {key}={self.config.get(key, self.defaults.get(key))!r}: "
                         f"{why}; fix: {fix}")


def rope(read: ConfigReader) -> tuple[int, float | None]:
    """(rotary base, partial rotary factor from rope_parameters if any) of an HF config; refuses scaled RoPE."""
    params = read.config.get("rope_parameters") or read.config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        read.refuse("rope_parameters", f"rope_type {rope_type!r} has no Megatron equivalent here", "default RoPE")
    theta = params.get("rope_theta", read.config.get("rope_theta", read.defaults.get("rope_theta", 10000.0)))
    if float(theta) != math.floor(float(theta)):
        read.refuse("rope_parameters", f"rope_theta {theta} is not an integer (Megatron's --rotary-base is an int)",
                    "an integral rope_theta")
    return int(theta), params.get("partial_rotary_factor")


def base_flags(read: ConfigReader, *, rope_theta: int, qkv_bias: bool, qk_norm: bool, moe: list[bool]) -> list[str]:
    """Megatron model flags every native import emits (attention, norms, sizes, experts, layer pattern)."""
    heads, groups = int(read("num_attention_heads")), int(read("num_key_value_heads"))
    hidden = int(read("hidden_size"))
    dim = int(read.config.get("head_dim") or hidden // heads)
    if read("hidden_act") != "silu":
        read.refuse("hidden_act", "Megatron's --swiglu is silu(gate) * up", "hidden_act silu")
    if heads % groups:
        read.refuse("num_key_value_heads", f"does not divide num_attention_heads {heads}", "a divisor")
    flags = ["--num-layers", str(read("num_hidden_layers")), "--hidden-size", str(hidden),
             "--ffn-hidden-size", str(read("intermediate_size")), "--num-attention-heads", str(heads)]
    if groups != heads:
        flags += ["--group-query-attention", "--num-query-groups", str(groups)]
    flags += ["--kv-channels", str(dim), "--normalization", "RMSNorm", "--norm-epsilon", repr(float(read("rms_norm_eps"))),
              "--swiglu", "--disable-bias-linear", "--position-embedding-type", "rope", "--rotary-base", str(rope_theta)]
    if qkv_bias:
        flags.append("--add-qkv-bias")
    if qk_norm:
        flags.append("--qk-layernorm")
    if not read("tie_word_embeddings"):
        flags.append("--untie-embeddings-and-output-weights")
    flags += ["--moe-ffn-hidden-size", str(read("moe_intermediate_size")),
              "--moe-router-topk", str(read("num_experts_per_tok"))]
    if not all(moe):
        flags += ["--moe-layer-freq", "[" + ",".join("1" if m else "0" for m in moe) + "]"]
    return flags


def qwen_import_prelude(read: ConfigReader, family: str, sliding: bool) -> tuple[float, list[bool]]:
    """What Qwen2-MoE and Qwen3-MoE imports check first: no sliding window, RoPE over the whole head; returns
    (rope theta, MoE pattern)."""
    if sliding:
        read.refuse("use_sliding_window", "Megatron's local attention has no sliding window here",
                    "use_sliding_window false")
    theta, partial = rope(read)
    if partial not in (None, 1.0):
        read.refuse("rope_parameters", f"partial_rotary_factor {partial}: {family} rotates the whole head",
                    "partial_rotary_factor 1.0")
    return theta, qwen_moe_layers(read)


def qwen_moe_layers(read: ConfigReader) -> list[bool]:
    """Qwen's layer rule: MoE unless in mlp_only_layers, and only every decoder_sparse_step-th layer."""
    n, step = int(read("num_hidden_layers")), int(read("decoder_sparse_step"))
    dense = set(read("mlp_only_layers") or [])
    if int(read("num_experts")) <= 0:
        read.refuse("num_experts", "a model without experts", "a MoE model")
    return [i not in dense and (i + 1) % step == 0 for i in range(n)]



def qwen_routing_reasons(args: argparse.Namespace, target: str) -> list[str]:
    """Qwen routers: softmax over all experts, top-k, optionally renormalised (norm_topk_prob), nothing else.
    Megatron's --moe-router-pre-softmax maps to norm_topk_prob false, its default to true (exact both ways)."""
    r = []
    score = _get(args, "moe_router_score_function", "softmax")
    if score != "softmax":
        r.append(f"--moe-router-score-function {score}: {target} routes by softmax")
    if scaling_factor(args) != 1.0:
        r.append(f"--moe-router-topk-scaling-factor {args.moe_router_topk_scaling_factor}: {target} has no gate "
                 f"scaling field (folding it into W2 would not round-trip)")
    if _get(args, "moe_router_num_groups") or _get(args, "moe_router_group_topk"):
        r.append(f"--moe-router-num-groups/--moe-router-group-topk: {target} has no group-limited routing")
    if _get(args, "moe_router_enable_expert_bias"):
        r.append(f"--moe-router-enable-expert-bias: {target} has no selection bias")
    return r


def rotary_percent(args: argparse.Namespace) -> float:
    return float(_get(args, "rotary_percent", 1.0) or 1.0)


def hf_architecture(read: ConfigReader, moe: list[bool], *, qkv_bias: bool, qk_norm: bool, shared: bool = False,
                    shared_gate: bool = False, expert_bias: bool = False) -> Architecture:
    """The mapping facts of an HF config (the Megatron model import builds)."""
    heads, hidden = int(read("num_attention_heads")), int(read("hidden_size"))
    return Architecture(
        num_layers=int(read("num_hidden_layers")), heads=heads, groups=int(read("num_key_value_heads")),
        head_dim=int(read.config.get("head_dim") or hidden // heads), moe=moe,
        tied=bool(read("tie_word_embeddings")), qkv_bias=qkv_bias, qk_norm=qk_norm, shared=shared,
        shared_gate=shared_gate, expert_bias=expert_bias)


def check_vocab(read: ConfigReader, state: dict[str, torch.Tensor]) -> None:
    rows = int(state[EMBEDDING].shape[0])
    if rows != int(read("vocab_size")):
        read.refuse("vocab_size", f"model.embed_tokens.weight has {rows} rows", f"vocab_size {rows}")
