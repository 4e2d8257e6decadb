"""Target ``glm4_moe`` (transformers' Glm4MoeForCausalLM): DeepSeek-V3 routing (sigmoid scores, selection on
score + ``e_score_correction_bias``, group-limited top-k, gates renormalised and scaled) with ungated shared
experts, GQA with optional per-head QK-norm and partial RoPE.

Exact for: Megatron ``--moe-router-score-function sigmoid`` (Megatron renormalises the k gates when k > 1, so
``norm_topk_prob`` = k > 1), ``--moe-router-enable-expert-bias`` (selection only, as in HF; without it the bias is
written as zeros, which select the same experts, and ``config.json`` records ``megatron_expert_bias: false`` so
import leaves it off), ``--moe-router-topk-scaling-factor`` (``routed_scaling_factor``), group-limited routing
when top-k // group-top-k == 2 (HF scores a group by the sum of its top-2 scores, Megatron by its top
(k // group-top-k)), ungated shared experts whose size is a multiple of ``--moe-ffn-hidden-size``
(``n_shared_experts``; none = 0), a dense prefix (``first_k_dense_replace``), ``--rotary-percent``
(``partial_rotary_factor``, written explicitly: GLM's default is 0.5), ``--qk-layernorm`` (``use_qk_norm``),
``--add-qkv-bias`` (``attention_bias``: q/k/v only), tied or untied embeddings.
Refused (see ``unsupported``): softmax scores, gated shared experts, other group geometries, dense layers after
an MoE layer, and everything in ``native_common.common_reasons``.
"""

from __future__ import annotations

import argparse

import torch

from megatron_moe_ext.checkpoint.hf_targets import native_common as nc
from megatron_moe_ext.checkpoint.hf_targets.base import HFModel

MODEL_TYPE = "glm4_moe"
LAYOUT = nc.NativeLayout(shared="shared_experts", expert_bias="mlp.gate.e_score_correction_bias")
# Glm4MoeConfig's defaults (transformers 5.23) for keys a config.json may leave out (partial_rotary_factor 0.5
# is applied by the config class itself when neither rope_parameters nor the top level has one).
HF_DEFAULTS = {"attention_bias": False, "use_qk_norm": False, "n_shared_experts": 1, "routed_scaling_factor": 1.0,
               "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
               "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "hidden_act": "silu", "num_key_value_heads": 8,
               "num_nextn_predict_layers": 1, "partial_rotary_factor": 0.5}


class Glm4MoeTarget:
    name = MODEL_TYPE
    native = True

    def unsupported(self, args: argparse.Namespace) -> list[str]:
        r = nc.common_reasons(args)
        score = getattr(args, "moe_router_score_function", "softmax")
        if score != "sigmoid":
            r.append(f"--moe-router-score-function {score}: glm4_moe routes by sigmoid scores")
        groups = nc.group_routing(args)
        topk = int(getattr(args, "moe_router_topk", 0) or 0)
        if groups is not None and topk // groups[1] != 2:
            r.append(f"--moe-router-topk {topk} with --moe-router-group-topk {groups[1]}: Megatron scores a group by "
                     f"its top-{topk // groups[1]} sum, glm4_moe by its top-2 (exact only when top-k // group-top-k "
                     f"== 2)")
        experts = int(getattr(args, "num_experts", 0) or 0)
        if groups is None and 0 < experts < 2:
            r.append(f"--num-experts {experts}: glm4_moe scores its single group by a top-2, which needs >= 2 experts")
        shared, ffn = nc.shared_size(args), nc.moe_ffn(args)
        if shared and getattr(args, "moe_shared_expert_gate", False):
            r.append("--moe-shared-expert-gate: glm4_moe's shared experts are ungated")
        if shared and ffn and shared % ffn:
            r.append(f"--moe-shared-expert-intermediate-size {shared} is not a multiple of --moe-ffn-hidden-size "
                     f"{ffn} (glm4_moe sizes shared experts as n_shared_experts * moe_intermediate_size)")
        if experts and nc.dense_prefix(nc.moe_pattern(args)) is None:
            r.append(f"--moe-layer-freq {getattr(args, 'moe_layer_freq', None)}: glm4_moe can only make the first k "
                     f"layers dense (first_k_dense_replace)")
        return r

    def export(self, args: argparse.Namespace, state: dict[str, torch.Tensor]) -> HFModel:
        arch = nc.architecture(args)
        groups = nc.group_routing(args) or (1, 1)
        partial = nc.rotary_percent(args)
        config = {
            "model_type": MODEL_TYPE,
            "architectures": ["Glm4MoeForCausalLM"],
            **nc.common_config(args, state),
            "attention_bias": arch.qkv_bias,
            "use_qk_norm": arch.qk_norm,
            "partial_rotary_factor": partial,
            "n_routed_experts": int(args.num_experts),
            "n_shared_experts": nc.shared_size(args) // nc.moe_ffn(args),
            "routed_scaling_factor": nc.scaling_factor(args),
            "n_group": groups[0],
            "topk_group": groups[1],
            "first_k_dense_replace": nc.dense_prefix(arch.moe),
            "norm_topk_prob": int(args.moe_router_topk) > 1,
            "num_nextn_predict_layers": 0,
        }
        config["rope_parameters"]["partial_rotary_factor"] = partial
        if not arch.expert_bias:
            config[nc.EXPERT_BIAS_KEY] = False
        tensors = nc.export_tensors(arch, state, LAYOUT)
        keep = {name for name in tensors if name.endswith(LAYOUT.expert_bias)}
        return HFModel(config=config, tensors=tensors, keep_fp32=keep)

    def import_model(self, config: dict, tensors: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, torch.Tensor]]:
        read = nc.ConfigReader(config, HF_DEFAULTS, MODEL_TYPE)
        mtp = int(read("num_nextn_predict_layers"))
        if mtp:
            read.refuse("num_nextn_predict_layers", "multi-token prediction layers are not converted",
                        "num_nextn_predict_layers 0 (drop the MTP layers' tensors)")
        theta, partial = nc.rope(read)
        partial = float(partial if partial is not None else read("partial_rotary_factor"))
        n_layers = int(read("num_hidden_layers"))
        k = min(int(read("first_k_dense_replace")), n_layers)
        moe = [i >= k for i in range(n_layers)]
        experts, topk = int(read("n_routed_experts")), int(read("num_experts_per_tok"))
        if bool(read("norm_topk_prob")) != (topk > 1):
            read.refuse("norm_topk_prob", f"Megatron's sigmoid router renormalises exactly when top-k > 1 (top-k "
                        f"{topk})", f"norm_topk_prob {topk > 1}")
        n_group, topk_group = int(read("n_group")), int(read("topk_group"))
        flags = nc.base_flags(read, rope_theta=theta, qkv_bias=bool(read("attention_bias")),
                              qk_norm=bool(read("use_qk_norm")), moe=moe)
        if partial != 1.0:
            flags += ["--rotary-percent", repr(partial)]
        flags += ["--num-experts", str(experts), "--moe-router-score-function", "sigmoid"]
        if float(read("routed_scaling_factor")) != 1.0:
            flags += ["--moe-router-topk-scaling-factor", repr(float(read("routed_scaling_factor")))]
        if topk_group < n_group:  # all groups kept = no group limit
            if topk // topk_group != 2:
                read.refuse("topk_group", f"HF scores a group by its top-2, Megatron by its top-(num_experts_per_tok "
                            f"// topk_group) = top-{topk // topk_group}", "num_experts_per_tok == 2 * topk_group")
            flags += ["--moe-router-num-groups", str(n_group), "--moe-router-group-topk", str(topk_group)]
        # The bias stays off only for our export of a model without one (marker, and still all zero).
        biases = [t for name, t in tensors.items() if name.endswith(LAYOUT.expert_bias)]
        expert_bias = config.get(nc.EXPERT_BIAS_KEY) is not False or any(torch.count_nonzero(b) for b in biases)
        if expert_bias:
            flags.append("--moe-router-enable-expert-bias")
        shared = int(read("n_shared_experts")) * int(read("moe_intermediate_size"))
        if shared:
            flags += ["--moe-shared-expert-intermediate-size", str(shared)]
        arch = nc.hf_architecture(read, moe, qkv_bias=bool(read("attention_bias")), qk_norm=bool(read("use_qk_norm")),
                                  shared=shared > 0, expert_bias=expert_bias)
        state = nc.import_tensors(arch, tensors, LAYOUT, num_experts=experts)
        nc.check_vocab(read, state)
        return flags, state


TARGET = Glm4MoeTarget()
