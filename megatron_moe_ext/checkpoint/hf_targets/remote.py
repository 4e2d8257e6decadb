"""Target ``megatron_moe_ext``: our own architecture, shipped as remote code (``checkpoint/remote_code/``).

Every model this package trains that no native transformers architecture reproduces exactly (the product-key,
expert-choice and ReLU routers, null experts, PEER layers, softmax routing with shared experts and QK-norm, Megatron's default flags: linear biases,
GELU, LayerNorm, learned absolute positions, ...) exports here. The folder gets
``config.json`` with ``auto_map`` and the remote-code files; it loads with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

The tensors on disk are the canonical Megatron state itself (``checkpoint/torch_dist.py``): the remote model's
module tree has Megatron's names and layouts, so export and import are the identity on tensors (bit-exact), and
all the work is the config. ``expected_tensors`` lists the names and shapes a config implies (the remote model's
parameter tree, kept in step with it by a unit test); export and import refuse any state that differs, so nothing
is ever written that the model would not load exactly.

Copied files (flat in the folder, imported relatively): the configuration and modeling files, and the pure-torch
modules our Megatron layers run themselves: ``kernels/product_key_core.py`` (product-key retrieval and router
gates), ``kernels/peer_reference.py`` (PEER experts and gates), ``layers/query_norm.py``.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from megatron_moe_ext.checkpoint.hf_targets.base import HFModel

MODEL_TYPE = "megatron_moe_ext"
_PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODE_FILES: tuple[str, ...] = tuple(
    os.path.join(_PACKAGE, *parts) for parts in (
        ("checkpoint", "remote_code", "configuration_megatron_moe_ext.py"),
        ("checkpoint", "remote_code", "modeling_megatron_moe_ext.py"),
        ("kernels", "product_key_core.py"),
        ("kernels", "peer_reference.py"),
        ("layers", "query_norm.py"),
    )
)
AUTO_MAP = {
    "AutoConfig": "configuration_megatron_moe_ext.MegatronMoEExtConfig",
    "AutoModelForCausalLM": "modeling_megatron_moe_ext.MegatronMoEExtForCausalLM",
}


def _get(args: argparse.Namespace, name: str):
    """``args.<name>``, or for a namespace saved without that flag its default (``args.saved_arg``: from the
    flag definitions, never restated here)."""
    if hasattr(args, name):
        return getattr(args, name)
    from megatron_moe_ext.args import saved_arg  # Megatron's parser, only for a flag the checkpoint lacks

    return saved_arg(args, name)


def _peer_numbers(args: argparse.Namespace) -> list[int]:
    if not _get(args, "moe_peer_num_experts"):
        return []
    from megatron_moe_ext.settings.peer import peer_layer_numbers

    return peer_layer_numbers(args.moe_peer_layers, args.num_layers)  # a flag since PEER's first version


def mlp_kinds(args: argparse.Namespace) -> list[str]:
    """Per layer 'peer', 'moe' or 'dense', as our specs build them (PEER replaces whatever MLP the layer had)."""
    peer = set(_peer_numbers(args))
    freq = _get(args, "moe_layer_freq")
    pattern = [1 if i % freq == 0 else 0 for i in range(args.num_layers)] if isinstance(freq, int) else list(freq)
    kinds = []
    for i in range(args.num_layers):
        if i + 1 in peer:
            kinds.append("peer")
        elif _get(args, "num_experts") and pattern[i]:
            kinds.append("moe")
        else:
            kinds.append("dense")
    return kinds


def _activation(args: argparse.Namespace) -> tuple[str, bool]:
    if _get(args, "swiglu"):
        return "silu", True
    if _get(args, "squared_relu"):
        return "squared_relu", False
    return "gelu", False


def _mlp_gelu_approximate(args: argparse.Namespace) -> str:
    """'tanh' where Megatron's MLP modules ran its fused bias-GELU kernel (the tanh approximation): GELU, not gated,
    with biases and ``--bias-gelu-fusion`` (on by default; validate_args turns it off without biases)."""
    fused = _get(args, "bias_gelu_fusion") and _get(args, "add_bias_linear")
    return "tanh" if fused and _activation(args) == ("gelu", False) else "none"


def _max_positions(args: argparse.Namespace, state: dict[str, torch.Tensor]) -> int:
    """Rows of the learned position table where there is one, else the run's --max-position-embeddings."""
    table = state.get("embedding.position_embeddings.weight")
    if table is not None:
        return int(table.shape[0])
    return int(_get(args, "max_position_embeddings") or _get(args, "seq_length") or 4096)


class RemoteTarget:
    """The remote-code architecture (see the module docstring)."""

    name = MODEL_TYPE
    native = False

    # -- what the remote architecture does not implement ------------------------------------------------------------
    def unsupported(self, args: argparse.Namespace) -> list[str]:
        """One reason per Megatron setting that changes inference and that the remote model does not implement."""
        reasons: list[str] = []

        def refuse(condition: object, text: str) -> None:
            if condition:
                reasons.append(text)

        refuse(_get(args, "multi_latent_attention"), "multi-latent attention (--multi-latent-attention)")
        refuse(_get(args, "mtp_num_layers"), f"multi-token prediction (--mtp-num-layers {_get(args, 'mtp_num_layers')})")
        pos = _get(args, "position_embedding_type")
        refuse(pos not in ("rope", "learned_absolute", "none"),
               f"--position-embedding-type {pos} (rope, learned_absolute or none only)")
        refuse(_get(args, "rotary_interleaved"), "interleaved RoPE (--rotary-interleaved)")
        refuse(_get(args, "no_rope_freq"), "NoPE layers (--no-rope-freq)")
        refuse(_get(args, "mrope_section"), "multimodal RoPE (--mrope-section)")
        norm = _get(args, "normalization")
        refuse(norm not in ("RMSNorm", "LayerNorm"), f"--normalization {norm} (RMSNorm or LayerNorm only)")
        refuse(_get(args, "apply_layernorm_1p") or _get(args, "layernorm_zero_centered_gamma"),
               "zero-centred norm weights (--apply-layernorm-1p)")
        refuse(_get(args, "apply_residual_connection_post_layernorm"),
               "--apply-residual-connection-post-layernorm")
        refuse(_get(args, "attention_output_gate"), "gated attention output (--attention-output-gate)")
        softmax_type = _get(args, "softmax_type")
        refuse(softmax_type != "vanilla", f"--softmax-type {softmax_type} (vanilla only)")
        refuse(_get(args, "window_size") is not None, "sliding-window attention (--window-size)")
        refuse(_get(args, "qk_l2_norm"), "L2-normalised queries and keys (--qk-l2-norm)")
        refuse(_get(args, "apply_query_key_layer_scaling"), "--apply-query-key-layer-scaling")
        refuse(_get(args, "use_mup"), "muP scaling (--use-mup)")
        refuse(_get(args, "experimental_attention_variant"),
               f"--experimental-attention-variant {_get(args, 'experimental_attention_variant')}")
        refuse(_get(args, "linear_attention_freq"), "linear-attention layers (--linear-attention-freq)")
        refuse(_get(args, "heterogeneous_layers_config_path") or _get(args, "heterogeneous_layers_config_encoded_json"),
               "heterogeneous layer configs (--heterogeneous-layers-config-path)")
        refuse(_get(args, "openai_gelu"), "tanh-approximated GELU (--openai-gelu)")
        refuse(_activation(args)[0] == "gelu" and (_get(args, "use_te_activation_func")
                                                    or _get(args, "use_transformer_engine_op_fuser")),
               "GELU through Transformer Engine's activation ops (--use-te-activation-func, "
               "--use-transformer-engine-op-fuser) is not reproduced")
        refuse(_get(args, "quick_geglu"), "quick GeGLU (--quick-geglu)")
        refuse(_get(args, "glu_linear_offset"), "--glu-linear-offset")
        refuse(_get(args, "activation_func_clamp_value") is not None, "--activation-func-clamp-value")
        if _get(args, "num_experts") and "moe" in mlp_kinds(args):
            lb = _get(args, "moe_router_load_balancing_type")
            for kind in lb if isinstance(lb, list) else [lb]:
                refuse(kind in ("sinkhorn", "quantile_balancing"),
                       f"--moe-router-load-balancing-type {kind} (its routing is not top-k)")
            refuse(_get(args, "moe_expert_capacity_factor") is not None,
                   "token dropping (--moe-expert-capacity-factor): routing would depend on the batch")
            refuse(_get(args, "moe_router_force_load_balancing"), "--moe-router-force-load-balancing")
            refuse(_get(args, "moe_router_force_biased") is not None, "--moe-router-force-biased")
            refuse(_get(args, "moe_latent_size"), "latent MoE (--moe-latent-size)")
            refuse(_get(args, "moe_mlp_glu_interleave_size"), "interleaved expert GLU (--moe-mlp-glu-interleave-size)")
            refuse(_get(args, "moe_shared_expert_glu_interleave_size"),
                   "interleaved shared-expert GLU (--moe-shared-expert-glu-interleave-size)")
        return reasons

    # -- export ----------------------------------------------------------------------------------------------------
    def config_dict(self, args: argparse.Namespace, state: dict[str, torch.Tensor]) -> dict:
        """config.json content of the model of ``args`` (shapes the arguments leave open read from ``state``)."""
        kinds = mlp_kinds(args)
        nh = args.num_attention_heads
        ng = args.num_query_groups if _get(args, "group_query_attention") else nh
        activation, glu = _activation(args)
        emb = state["embedding.word_embeddings.weight"]
        tied = not _get(args, "untie_embeddings_and_output_weights")
        cfg: dict = {
            "model_type": MODEL_TYPE,
            "architectures": ["MegatronMoEExtForCausalLM"],
            "auto_map": dict(AUTO_MAP),
            "vocab_size": int(emb.shape[0]),
            "hidden_size": args.hidden_size,
            "num_hidden_layers": args.num_layers,
            "num_attention_heads": nh,
            "num_key_value_heads": ng,
            "head_dim": args.kv_channels or args.hidden_size // nh,
            "ffn_hidden_size": args.ffn_hidden_size,
            "normalization": args.normalization,
            "norm_eps": float(args.layernorm_epsilon),
            "qk_layernorm": bool(_get(args, "qk_layernorm")),
            # Megatron's linear_qkv has a bias with either flag (validate_args also sets add_qkv_bias).
            "add_qkv_bias": bool(_get(args, "add_qkv_bias") or _get(args, "add_bias_linear")),
            "add_bias_linear": bool(_get(args, "add_bias_linear")),
            "activation": activation,
            "gated_linear_unit": glu,
            "mlp_gelu_approximate": _mlp_gelu_approximate(args),
            "position_embedding_type": args.position_embedding_type,
            "rotary_base": float(args.rotary_base),
            "rotary_percent": float(args.rotary_percent),
            "rotary_llama3_scaling": bool(_get(args, "use_rope_scaling")),
            "rotary_llama3_factor": float(_get(args, "rope_scaling_factor")),
            "rotary_interpolation_factor": _get(args, "rotary_seq_len_interpolation_factor"),
            "max_position_embeddings": _max_positions(args, state),
            "tie_word_embeddings": tied,
            "mlp_kinds": kinds,
        }
        if "moe" in kinds:
            shared = _get(args, "moe_shared_expert_intermediate_size")
            for i, kind in enumerate(kinds):  # the derived size (fine-grained shared experts) as stored
                w = state.get(f"decoder.layers.{i}.mlp.shared_experts.linear_fc2.weight")
                if kind == "moe" and w is not None:
                    shared = int(w.shape[1])
                    break
            cfg.update({
                "num_experts": args.num_experts,
                "moe_ffn_hidden_size": args.moe_ffn_hidden_size,
                "moe_router_topk": args.moe_router_topk,
                "moe_router_type": _get(args, "moe_router_type"),
                "moe_router_score_function": _get(args, "moe_router_score_function"),
                "moe_router_pre_softmax": bool(_get(args, "moe_router_pre_softmax")),
                "moe_router_topk_scaling_factor": _get(args, "moe_router_topk_scaling_factor"),
                "moe_router_enable_expert_bias": bool(_get(args, "moe_router_enable_expert_bias")),
                "moe_router_num_groups": _get(args, "moe_router_num_groups"),
                "moe_router_group_topk": _get(args, "moe_router_group_topk"),
                "moe_router_dtype": _get(args, "moe_router_dtype"),
                "moe_router_noisy_gating": bool(_get(args, "moe_router_noisy_gating")),
                "moe_apply_probs_on_input": bool(_get(args, "moe_apply_probs_on_input")),
                "moe_shared_expert_intermediate_size": shared,
                "moe_shared_expert_gate": bool(_get(args, "moe_shared_expert_gate")),
            })
            cfg.update(_router_variant_config(args))
            if cfg["moe_router_type"] == "product_key":
                cfg.update({
                    "moe_pk_heads": _get(args, "moe_pk_heads"),
                    "moe_pk_key_dim": _get(args, "moe_pk_key_dim"),
                    "moe_pk_subkey_topk": _get(args, "moe_pk_subkey_topk"),
                    "moe_pk_grid_rows": _get(args, "moe_pk_grid_rows"),
                    "moe_pk_query_norm": _get(args, "moe_pk_query_norm"),
                    "moe_pk_bias_balancing": bool(_get(args, "moe_pk_bias_balancing")),
                    "moe_pk_expert_bias_balancing": bool(_get(args, "moe_pk_expert_bias_balancing")),
                })
        if "peer" in kinds:
            first = kinds.index("peer")
            cfg.update({
                "moe_peer_num_experts": args.moe_peer_num_experts,
                "moe_peer_table_rows": int(state[f"decoder.layers.{first}.mlp.u"].shape[0]),
                "moe_peer_heads": args.moe_peer_heads,
                "moe_peer_topk": args.moe_peer_topk,
                "moe_peer_key_dim": args.moe_peer_key_dim,
                "moe_peer_subkey_topk": _get(args, "moe_peer_subkey_topk"),
                "moe_peer_query_norm": _get(args, "moe_peer_query_norm"),
                "moe_peer_activation": _get(args, "moe_peer_activation"),
                "moe_peer_gate": _get(args, "moe_peer_gate"),
                "moe_peer_shared_ffn_hidden_size": _get(args, "moe_peer_shared_ffn_hidden_size"),
            })
        return cfg

    def export(self, args: argparse.Namespace, state: dict[str, torch.Tensor]) -> HFModel:
        reasons = self.unsupported(args)
        if reasons:
            raise ValueError(f"the {MODEL_TYPE} architecture cannot reproduce this model exactly: " + "; ".join(reasons))
        config = self.config_dict(args, state)
        tensors = dict(state)
        if config["tie_word_embeddings"] and "output_layer.weight" in tensors:
            if not torch.equal(tensors["output_layer.weight"], tensors["embedding.word_embeddings.weight"]):
                raise ValueError("tied embeddings, but output_layer.weight differs from the word embeddings")
            del tensors["output_layer.weight"]
        _check_tensors(config, tensors, "the checkpoint")
        keep = {n for n in tensors if n.endswith(_FP32_BUFFERS)}  # fp32 in Megatron
        return HFModel(config=config, tensors=tensors, keep_fp32=keep, code_files=list(CODE_FILES))

    # -- import ----------------------------------------------------------------------------------------------------
    def import_model(self, config: dict, tensors: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, torch.Tensor]]:
        if config.get("model_type") != MODEL_TYPE:
            raise ValueError(f"model_type {config.get('model_type')!r} is not {MODEL_TYPE!r}")
        cfg = _with_defaults(config)
        _check_tensors(cfg, tensors, "the folder")
        return model_flags(cfg), dict(tensors)


# Router buffers Megatron keeps in fp32 whatever the model's dtype (written in fp32 by every --dtype).
_FP32_BUFFERS = (".expert_bias", ".row_bias", ".col_bias", ".pk_expert_bias", ".ec_thresholds", ".ec_threshold_mass",
                 ".relu_l1_coeff")


def _router_variant_config(args: argparse.Namespace) -> dict:
    """config.json fields of the routers with variable experts per token (issue #22): null experts, the
    expert-choice causal rule (what inference runs) and the training settings ``import-hf`` restores."""
    router = _get(args, "moe_router_type")
    cfg: dict = {"moe_null_experts": int(_get(args, "moe_null_experts") or 0)}
    if router == "expert_choice":
        cfg.update({"moe_ec_eval_rule": _get(args, "moe_ec_eval_rule"),
                    "moe_ec_capacity_factor": float(_get(args, "moe_ec_capacity_factor"))})
    if router == "relu":
        cfg.update({"moe_relu_target_sparsity": _get(args, "moe_relu_target_sparsity"),
                    "moe_relu_l1_coeff": float(_get(args, "moe_relu_l1_coeff")),
                    "moe_relu_l1_update_rate": float(_get(args, "moe_relu_l1_update_rate"))})
    return cfg


# -- config -> tensors and flags -----------------------------------------------------------------------------------

_DEFAULTS = {  # MegatronMoEExtConfig's defaults for the fields a config.json may omit
    "num_key_value_heads": None, "ffn_hidden_size": None, "normalization": "RMSNorm", "norm_eps": 1e-5,
    "qk_layernorm": False, "add_qkv_bias": False, "add_bias_linear": False, "activation": "silu",
    "gated_linear_unit": True, "mlp_gelu_approximate": "none",
    "position_embedding_type": "rope", "rotary_base": 10000.0, "rotary_percent": 1.0, "rotary_llama3_scaling": False,
    "rotary_llama3_factor": 8.0, "rotary_interpolation_factor": None, "max_position_embeddings": 4096,
    "tie_word_embeddings": False, "mlp_kinds": None, "num_experts": None, "moe_ffn_hidden_size": None,
    "moe_router_topk": 2, "moe_router_type": "topk", "moe_router_score_function": "softmax",
    "moe_router_pre_softmax": False, "moe_router_topk_scaling_factor": None, "moe_router_enable_expert_bias": False,
    "moe_router_num_groups": None, "moe_router_group_topk": None, "moe_router_dtype": None,
    "moe_router_noisy_gating": False, "moe_apply_probs_on_input": False, "moe_shared_expert_intermediate_size": None,
    "moe_shared_expert_gate": False, "moe_pk_heads": 1, "moe_pk_key_dim": 128, "moe_pk_subkey_topk": None,
    "moe_pk_grid_rows": None, "moe_pk_query_norm": "batchnorm", "moe_pk_bias_balancing": False,
    "moe_pk_expert_bias_balancing": False, "moe_null_experts": 0, "moe_ec_eval_rule": "threshold",
    "moe_ec_capacity_factor": 1.0, "moe_relu_target_sparsity": None, "moe_relu_l1_coeff": 1e-8,
    "moe_relu_l1_update_rate": 1.2,
    "moe_peer_num_experts": None, "moe_peer_table_rows": None, "moe_peer_heads": 8, "moe_peer_topk": 16,
    "moe_peer_key_dim": 128, "moe_peer_subkey_topk": None, "moe_peer_query_norm": "batchnorm",
    "moe_peer_activation": "gelu", "moe_peer_gate": "softmax", "moe_peer_shared_ffn_hidden_size": None,
    "query_norm_eps": 1e-5,
}


def _with_defaults(config: dict) -> dict:
    cfg = {**_DEFAULTS, **config}
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
        if cfg.get(field) is None:
            raise ValueError(f"config.json has no {field}; fix: a folder written by export-hf")
    if cfg["num_key_value_heads"] is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if cfg["mlp_kinds"] is None:
        cfg["mlp_kinds"] = ["dense"] * cfg["num_hidden_layers"]
    if cfg["moe_peer_table_rows"] is None:
        cfg["moe_peer_table_rows"] = cfg["moe_peer_num_experts"]
    if cfg["query_norm_eps"] != 1e-5:
        raise ValueError(f"config.json query_norm_eps={cfg['query_norm_eps']}: our Megatron layers use 1e-5 and have no "
                         "flag for it; fix: 1e-5")
    return cfg


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the remote model of ``config`` holds (its state dict, tied output excluded)."""
    c = _with_defaults(config)
    h, nh, ng, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    layer_norm = c["normalization"] == "LayerNorm"

    def fc1_rows(ffn: int) -> int:
        return 2 * ffn if c["gated_linear_unit"] else ffn

    out: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (c["vocab_size"], h)}
    if c["position_embedding_type"] == "learned_absolute":
        out["embedding.position_embeddings.weight"] = (c["max_position_embeddings"], h)
    bias = c["add_bias_linear"]

    def norm(prefix: str, size: int, weight: str = "weight", bias: str = "bias") -> None:
        out[f"{prefix}{weight}"] = (size,)
        if layer_norm:
            out[f"{prefix}{bias}"] = (size,)

    def linear(prefix: str, rows: int, cols: int) -> None:
        """A linear layer's weight [rows, cols], and its bias [rows] with add_bias_linear."""
        out[f"{prefix}weight"] = (rows, cols)
        if bias:
            out[f"{prefix}bias"] = (rows,)

    for i, kind in enumerate(c["mlp_kinds"]):
        att = f"decoder.layers.{i}.self_attention."
        qkv_rows = ng * (nh // ng + 2) * hd
        out[f"{att}linear_qkv.weight"] = (qkv_rows, h)
        norm(f"{att}linear_qkv.", h, "layer_norm_weight", "layer_norm_bias")
        if c["add_qkv_bias"]:
            out[f"{att}linear_qkv.bias"] = (qkv_rows,)
        linear(f"{att}linear_proj.", h, nh * hd)
        if c["qk_layernorm"]:
            norm(f"{att}q_layernorm.", hd)
            norm(f"{att}k_layernorm.", hd)
        mlp = f"decoder.layers.{i}.mlp."
        norm(f"{mlp}linear_fc1.", h, "layer_norm_weight", "layer_norm_bias")
        if kind == "dense":
            linear(f"{mlp}linear_fc1.", fc1_rows(c["ffn_hidden_size"]), h)
            linear(f"{mlp}linear_fc2.", h, c["ffn_hidden_size"])
        elif kind == "moe":
            E, F = c["num_experts"], c["moe_ffn_hidden_size"]
            out[f"{mlp}experts.experts.linear_fc1.weight"] = (E, fc1_rows(F), h)
            out[f"{mlp}experts.experts.linear_fc2.weight"] = (E, h, F)
            if bias:  # stacked like the weights: [E, out]
                out[f"{mlp}experts.experts.linear_fc1.bias"] = (E, fc1_rows(F))
                out[f"{mlp}experts.experts.linear_fc2.bias"] = (E, h)
            M = c["moe_null_experts"]  # null experts: router outputs (grid cells) with no expert weights
            if c["moe_router_type"] == "product_key":
                H, D = c["moe_pk_heads"], c["moe_pk_key_dim"]
                pool = (E + M) // H
                rows = c["moe_pk_grid_rows"] or math.isqrt(pool)
                cols = pool // rows
                out[f"{mlp}router.query_weight"] = (H * D, h)
                if bias:  # the query projection's bias, in place of Megatron's router.bias [E]
                    out[f"{mlp}router.query_bias"] = (H * D,)
                out[f"{mlp}router.row_keys"] = (H, rows, D // 2)
                out[f"{mlp}router.col_keys"] = (H, cols, D // 2)
                _query_norm(out, f"{mlp}router.query_norm.", c["moe_pk_query_norm"], H, D)
                if c["moe_pk_bias_balancing"]:
                    out[f"{mlp}router.row_bias"] = (H, rows)
                    out[f"{mlp}router.col_bias"] = (H, cols)
                if c["moe_pk_expert_bias_balancing"]:
                    out[f"{mlp}router.pk_expert_bias"] = (H, pool)
                if c["moe_router_noisy_gating"]:
                    out[f"{mlp}router.noise_row_weight"] = (H * rows, h)
                    out[f"{mlp}router.noise_col_weight"] = (H * cols, h)
            else:
                linear(f"{mlp}router.", E + M, h)
                if c["moe_router_enable_expert_bias"]:
                    out[f"{mlp}router.expert_bias"] = (E + M,)
                if c["moe_router_noisy_gating"]:
                    out[f"{mlp}router.noise_weight"] = (E + M, h)
                if c["moe_router_type"] == "expert_choice":
                    out[f"{mlp}router.ec_thresholds"] = (E + M,)
                    out[f"{mlp}router.ec_threshold_mass"] = (1,)
                if c["moe_router_type"] == "relu":
                    out[f"{mlp}router.relu_l1_coeff"] = (1,)
            shared = c["moe_shared_expert_intermediate_size"]
            if shared:
                out[f"{mlp}shared_experts.linear_fc1.weight"] = (fc1_rows(shared), h)
                out[f"{mlp}shared_experts.linear_fc2.weight"] = (h, shared)
                if c["moe_shared_expert_gate"]:
                    out[f"{mlp}shared_experts.gate_weight"] = (1, h)
        else:
            H, D = c["moe_peer_heads"], c["moe_peer_key_dim"]
            n = math.isqrt(c["moe_peer_num_experts"])
            out[f"{mlp}query_weight"] = (H * D, h)
            if bias:  # the query projection's bias; the single-neuron experts u, v have none
                out[f"{mlp}query_bias"] = (H * D,)
            out[f"{mlp}row_keys"] = (H, n, D // 2)
            out[f"{mlp}col_keys"] = (H, n, D // 2)
            _query_norm(out, f"{mlp}query_norm.", c["moe_peer_query_norm"], H, D)
            out[f"{mlp}u"] = (c["moe_peer_table_rows"], h)
            out[f"{mlp}v"] = (c["moe_peer_table_rows"], h)
            shared = c["moe_peer_shared_ffn_hidden_size"]
            if shared:
                linear(f"{mlp}shared_mlp.linear_fc1.", fc1_rows(shared), h)
                linear(f"{mlp}shared_mlp.linear_fc2.", h, shared)
    norm("decoder.final_layernorm.", h)
    if not c["tie_word_embeddings"]:
        out["output_layer.weight"] = (c["vocab_size"], h)
    return out


def _query_norm(out: dict, prefix: str, kind: str, H: int, D: int) -> None:
    """``layers/query_norm.py``'s parameters and buffers."""
    if kind == "none":
        return
    out[f"{prefix}weight"] = (H, D)
    if kind in ("batchnorm", "layernorm"):
        out[f"{prefix}bias"] = (H, D)
    if kind == "batchnorm":
        out[f"{prefix}running_mean"] = (H, D)
        out[f"{prefix}running_var"] = (H, D)


def _check_tensors(config: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
    """ValueError listing every tensor missing, unexpected or of the wrong shape for ``config``."""
    expected = expected_tensors(config)
    problems = [f"missing {n} {s}" for n, s in expected.items() if n not in tensors]
    problems += [f"unexpected {n} {tuple(tensors[n].shape)}" for n in tensors if n not in expected]
    problems += [f"{n}: {tuple(tensors[n].shape)}, the architecture needs {s}"
                 for n, s in expected.items() if n in tensors and tuple(tensors[n].shape) != s]
    if problems:
        raise ValueError(f"{where} does not match the {MODEL_TYPE} architecture of its config ({len(problems)} "
                         f"problems): " + "; ".join(sorted(problems)[:10]))


def model_flags(config: dict) -> list[str]:
    """Flags of our train entry that build the model of ``config`` (architecture only: no tokenizer, vocabulary,
    sequence length or parallelism)."""
    c = _with_defaults(config)
    kinds = c["mlp_kinds"]
    flags = ["--num-layers", str(c["num_hidden_layers"]), "--hidden-size", str(c["hidden_size"]),
             "--num-attention-heads", str(c["num_attention_heads"]), "--kv-channels", str(c["head_dim"]),
             "--normalization", c["normalization"], "--norm-epsilon", repr(float(c["norm_eps"])),
             "--position-embedding-type", c["position_embedding_type"],
             "--max-position-embeddings", str(c["max_position_embeddings"])]
    if not c["add_bias_linear"]:  # Megatron's default is biases on (no flag turns them on)
        flags.append("--disable-bias-linear")
    if c["ffn_hidden_size"]:
        flags += ["--ffn-hidden-size", str(c["ffn_hidden_size"])]
    if c["num_key_value_heads"] != c["num_attention_heads"]:
        flags += ["--group-query-attention", "--num-query-groups", str(c["num_key_value_heads"])]
    if c["qk_layernorm"]:
        flags.append("--qk-layernorm")
    if c["add_qkv_bias"] and not c["add_bias_linear"]:
        flags.append("--add-qkv-bias")
    activation = (c["activation"], bool(c["gated_linear_unit"]))
    if c["mlp_gelu_approximate"] == "tanh" and not (c["add_bias_linear"] and activation == ("gelu", False)):
        raise ValueError(f"config.json mlp_gelu_approximate='tanh' needs add_bias_linear and an ungated gelu (Megatron's "
                         f"fused bias-GELU); fix: mlp_gelu_approximate 'none'")
    if c["add_bias_linear"] and activation == ("gelu", False) and c["mlp_gelu_approximate"] == "none":
        flags.append("--no-bias-gelu-fusion")  # exact GELU (the fused kernel, on by default, is the tanh one)
    if activation == ("silu", True):
        flags.append("--swiglu")
    elif activation == ("squared_relu", False):
        flags.append("--squared-relu")
    elif activation != ("gelu", False):
        raise ValueError(f"config.json activation={c['activation']!r} with gated_linear_unit={c['gated_linear_unit']}"
                         " has no Megatron flag; fix: silu+gated (--swiglu), gelu or squared_relu (not gated)")
    if c["position_embedding_type"] == "rope":
        flags += ["--rotary-base", _num(c["rotary_base"]), "--rotary-percent", repr(float(c["rotary_percent"]))]
        if c["rotary_llama3_scaling"]:
            flags += ["--use-rope-scaling", "--rope-scaling-factor", repr(float(c["rotary_llama3_factor"]))]
        if c["rotary_interpolation_factor"] is not None:
            flags += ["--rotary-seq-len-interpolation-factor", _num(c["rotary_interpolation_factor"])]
    if not c["tie_word_embeddings"]:
        flags.append("--untie-embeddings-and-output-weights")
    if "moe" in kinds:
        flags += _moe_flags(c, kinds)
    if "peer" in kinds:
        peer_layers = ",".join(str(i + 1) for i, k in enumerate(kinds) if k == "peer")
        flags += ["--moe-peer-num-experts", str(c["moe_peer_num_experts"]), "--moe-peer-layers", peer_layers,
                  "--moe-peer-heads", str(c["moe_peer_heads"]), "--moe-peer-topk", str(c["moe_peer_topk"]),
                  "--moe-peer-key-dim", str(c["moe_peer_key_dim"]), "--moe-peer-query-norm", c["moe_peer_query_norm"],
                  "--moe-peer-activation", c["moe_peer_activation"], "--moe-peer-gate", c["moe_peer_gate"]]
        if c["moe_peer_subkey_topk"] is not None:
            flags += ["--moe-peer-subkey-topk", str(c["moe_peer_subkey_topk"])]
        if c["moe_peer_shared_ffn_hidden_size"]:
            flags += ["--moe-peer-shared-ffn-hidden-size", str(c["moe_peer_shared_ffn_hidden_size"])]
    return flags


def _num(value: float) -> str:
    """An int-valued float as an int (Megatron's --rotary-base is an int flag)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _moe_flags(c: dict, kinds: list[str]) -> list[str]:
    # PEER layers replace the layer's MLP whatever Megatron's pattern says: mark them MoE when every other layer
    # is, so the common all-MoE model keeps --moe-layer-freq 1.
    non_peer = [k for k in kinds if k != "peer"]
    peer_bit = 1 if all(k == "moe" for k in non_peer) else 0
    pattern = [1 if k == "moe" else (peer_bit if k == "peer" else 0) for k in kinds]
    freq = "1" if all(pattern) else "[" + ",".join(map(str, pattern)) + "]"
    flags = ["--num-experts", str(c["num_experts"]), "--moe-ffn-hidden-size", str(c["moe_ffn_hidden_size"]),
             "--moe-router-topk", str(c["moe_router_topk"]), "--moe-layer-freq", freq,
             "--moe-router-score-function", c["moe_router_score_function"]]
    switches = [("moe_router_pre_softmax", "--moe-router-pre-softmax"),
                ("moe_router_enable_expert_bias", "--moe-router-enable-expert-bias"),
                ("moe_router_noisy_gating", "--moe-router-noisy-gating"),
                ("moe_apply_probs_on_input", "--moe-apply-probs-on-input"),
                ("moe_shared_expert_gate", "--moe-shared-expert-gate")]
    flags += [flag for field, flag in switches if c[field]]
    if c["moe_router_topk_scaling_factor"]:
        flags += ["--moe-router-topk-scaling-factor", repr(float(c["moe_router_topk_scaling_factor"]))]
    if c["moe_router_num_groups"]:
        flags += ["--moe-router-num-groups", str(c["moe_router_num_groups"]),
                  "--moe-router-group-topk", str(c["moe_router_group_topk"])]
    if c["moe_router_dtype"]:
        flags += ["--moe-router-dtype", c["moe_router_dtype"]]
    if c["moe_shared_expert_intermediate_size"]:
        flags += ["--moe-shared-expert-intermediate-size", str(c["moe_shared_expert_intermediate_size"])]
    if c["moe_null_experts"]:
        flags += ["--moe-null-experts", str(c["moe_null_experts"])]
    if c["moe_router_type"] == "expert_choice":
        flags += ["--moe-router-type", "expert_choice", "--moe-ec-eval-rule", c["moe_ec_eval_rule"],
                  "--moe-ec-capacity-factor", repr(float(c["moe_ec_capacity_factor"]))]
    if c["moe_router_type"] == "relu":
        flags += ["--moe-router-type", "relu", "--moe-relu-l1-coeff", repr(float(c["moe_relu_l1_coeff"])),
                  "--moe-relu-l1-update-rate", repr(float(c["moe_relu_l1_update_rate"]))]
        if c["moe_relu_target_sparsity"] is not None:
            flags += ["--moe-relu-target-sparsity", repr(float(c["moe_relu_target_sparsity"]))]
    if c["moe_router_type"] == "product_key":
        flags += ["--moe-router-type", "product_key", "--moe-pk-heads", str(c["moe_pk_heads"]),
                  "--moe-pk-key-dim", str(c["moe_pk_key_dim"]), "--moe-pk-query-norm", c["moe_pk_query_norm"]]
        if c["moe_pk_subkey_topk"] is not None:
            flags += ["--moe-pk-subkey-topk", str(c["moe_pk_subkey_topk"])]
        if c["moe_pk_grid_rows"] is not None:
            flags += ["--moe-pk-grid-rows", str(c["moe_pk_grid_rows"])]
        if c["moe_pk_bias_balancing"]:
            flags.append("--moe-pk-bias-balancing")
        if c["moe_pk_expert_bias_balancing"]:
            flags.append("--moe-pk-expert-bias-balancing")
    return flags


TARGET = RemoteTarget()
