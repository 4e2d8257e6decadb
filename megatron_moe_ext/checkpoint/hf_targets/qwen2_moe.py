"""Target ``qwen2_moe`` (transformers' Qwen2MoeForCausalLM): softmax top-k routing plus one sigmoid-gated
shared expert, no QK-norm.

Exact for: Megatron softmax routing with or without ``--moe-router-pre-softmax`` (``norm_topk_prob`` false or
true, as for Qwen3); a shared expert with ``--moe-shared-expert-gate`` (Megatron's ``gate_weight`` [1, H] is
``shared_expert_gate.weight``, both compute ``sigmoid(x w) * shared(x)``); GQA, any ``--kv-channels``;
``--add-qkv-bias`` (``qkv_bias``: q/k/v only, like Megatron); dense layers anywhere; tied or untied embeddings.
Two encodings make models Qwen2-MoE cannot state directly exact:

- an *ungated* shared expert is written with a zero gate and 2*W2: sigmoid(0) = 0.5 and the power-of-two scale
  are exact in every float format. ``config.json`` records it (``megatron_shared_expert_ungated``), so import
  restores the ungated expert and W2 bit for bit (if the gate is still zero);
- *no* shared expert is a shared expert of hidden size 0 (``shared_expert_intermediate_size`` 0), which adds 0.

Refused (see ``unsupported``): ``--qk-layernorm``, sigmoid scores, expert bias, gate scaling, group-limited routing,
partial RoPE, and everything in ``native_common.common_reasons``.
"""

from __future__ import annotations

import argparse

import torch

from megatron_moe_ext.checkpoint.hf_targets import native_common as nc
from megatron_moe_ext.checkpoint.hf_targets.base import HFModel

MODEL_TYPE = "qwen2_moe"
LAYOUT = nc.NativeLayout(shared="shared_expert", shared_gate="mlp.shared_expert_gate.weight")
# Qwen2MoeConfig's defaults (transformers 5.23) for keys a config.json may leave out (note qkv_bias: True).
HF_DEFAULTS = {"qkv_bias": True, "use_sliding_window": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
               "norm_topk_prob": False, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "hidden_act": "silu",
               "num_key_value_heads": 16, "shared_expert_intermediate_size": 5632}


class Qwen2MoeTarget:
    name = MODEL_TYPE
    native = True

    def unsupported(self, args: argparse.Namespace) -> list[str]:
        r = nc.common_reasons(args) + nc.qwen_routing_reasons(args, MODEL_TYPE)
        if getattr(args, "qk_layernorm", False):
            r.append("--qk-layernorm: qwen2_moe has no QK-norm")
        if nc.rotary_percent(args) != 1.0:
            r.append(f"--rotary-percent {args.rotary_percent}: qwen2_moe rotates the whole head")
        return r

    def export(self, args: argparse.Namespace, state: dict[str, torch.Tensor]) -> HFModel:
        arch = nc.architecture(args)
        pattern = nc.moe_pattern(args)
        config = {
            "model_type": MODEL_TYPE,
            "architectures": ["Qwen2MoeForCausalLM"],
            **nc.common_config(args, state),
            "qkv_bias": arch.qkv_bias,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": int(args.num_layers),
            "layer_types": ["full_attention"] * int(args.num_layers),
            "num_experts": int(args.num_experts),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, moe in enumerate(pattern) if not moe],
            "norm_topk_prob": not args.moe_router_pre_softmax,
            "shared_expert_intermediate_size": nc.shared_size(args),
        }
        if arch.shared and not arch.shared_gate:
            config[nc.UNGATED_SHARED_KEY] = True
        return HFModel(config=config, tensors=nc.export_tensors(arch, state, LAYOUT))

    def import_model(self, config: dict, tensors: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, torch.Tensor]]:
        read = nc.ConfigReader(config, HF_DEFAULTS, MODEL_TYPE)
        theta, moe = nc.qwen_import_prelude(read, "Qwen2", bool(read("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or [])))
        qkv_bias = bool(read("qkv_bias"))
        shared = int(read("shared_expert_intermediate_size"))
        # Our ungated shared expert comes back ungated only while every gate is still the zero we wrote.
        gates = [t for name, t in tensors.items() if name.endswith(LAYOUT.shared_gate)]
        ungated = bool(config.get(nc.UNGATED_SHARED_KEY)) and not any(torch.count_nonzero(g) for g in gates)
        flags = nc.base_flags(read, rope_theta=theta, qkv_bias=qkv_bias, qk_norm=False, moe=moe)
        flags += ["--num-experts", str(read("num_experts")), "--moe-router-score-function", "softmax"]
        if not read("norm_topk_prob"):
            flags.append("--moe-router-pre-softmax")
        if shared:
            flags += ["--moe-shared-expert-intermediate-size", str(shared)]
            if not ungated:
                flags.append("--moe-shared-expert-gate")
        arch = nc.hf_architecture(read, moe, qkv_bias=qkv_bias, qk_norm=False, shared=shared > 0,
                                  shared_gate=shared > 0 and not ungated)
        state = nc.import_tensors(arch, tensors, LAYOUT, num_experts=int(read("num_experts")),
                                  shared_ungated_marker=ungated)
        nc.check_vocab(read, state)
        return flags, state


TARGET = Qwen2MoeTarget()
