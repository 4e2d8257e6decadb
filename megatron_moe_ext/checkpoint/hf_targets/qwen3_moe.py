"""Target ``qwen3_moe`` (transformers' Qwen3MoeForCausalLM): softmax top-k routing, per-head QK RMSNorm, no
shared expert.

Exact for: Megatron softmax routing with ``--moe-router-pre-softmax`` off (top-k of the logits, softmax over the
k = softmax over all experts then top-k renormalised: ``norm_topk_prob`` true) or on (softmax, top-k, no
renormalisation: ``norm_topk_prob`` false); ``--qk-layernorm`` (required: Qwen3 always normalises q and k per
head); GQA and any ``--kv-channels`` (``head_dim``); dense layers anywhere (``mlp_only_layers``); tied or untied
embeddings; ``--add-qkv-bias`` (``attention_bias`` also gives o_proj a bias, written as zeros).
Refused (see ``unsupported``): shared experts, sigmoid scores, expert bias, gate scaling, group-limited routing,
partial RoPE, and everything in ``native_common.common_reasons``.
"""

from __future__ import annotations

import argparse

import torch

from megatron_moe_ext.checkpoint.hf_targets import native_common as nc
from megatron_moe_ext.checkpoint.hf_targets.base import HFModel

MODEL_TYPE = "qwen3_moe"
LAYOUT = nc.NativeLayout(o_proj_bias=True)
# Qwen3MoeConfig's defaults (transformers 5.23) for keys a config.json may leave out.
HF_DEFAULTS = {"attention_bias": False, "use_sliding_window": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
               "norm_topk_prob": False, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "hidden_act": "silu",
               "num_key_value_heads": 4}


class Qwen3MoeTarget:
    name = MODEL_TYPE
    native = True

    def unsupported(self, args: argparse.Namespace) -> list[str]:
        r = nc.common_reasons(args) + nc.qwen_routing_reasons(args, MODEL_TYPE)
        if not getattr(args, "qk_layernorm", False):
            r.append("no --qk-layernorm: qwen3_moe always applies per-head RMSNorm to q and k")
        if nc.shared_size(args):
            r.append(f"--moe-shared-expert-intermediate-size {nc.shared_size(args)}: qwen3_moe has no shared expert")
        if nc.rotary_percent(args) != 1.0:
            r.append(f"--rotary-percent {args.rotary_percent}: qwen3_moe rotates the whole head")
        return r

    def export(self, args: argparse.Namespace, state: dict[str, torch.Tensor]) -> HFModel:
        pattern = nc.moe_pattern(args)
        config = {
            "model_type": MODEL_TYPE,
            "architectures": ["Qwen3MoeForCausalLM"],
            **nc.common_config(args, state),
            "attention_bias": bool(getattr(args, "add_qkv_bias", False)),
            "use_sliding_window": False,
            "sliding_window": None,
            "num_experts": int(args.num_experts),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, moe in enumerate(pattern) if not moe],
            "norm_topk_prob": not args.moe_router_pre_softmax,
        }
        return HFModel(config=config, tensors=nc.export_tensors(nc.architecture(args), state, LAYOUT))

    def import_model(self, config: dict, tensors: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, torch.Tensor]]:
        read = nc.ConfigReader(config, HF_DEFAULTS, MODEL_TYPE)
        theta, moe = nc.qwen_import_prelude(read, "Qwen3", bool(read("use_sliding_window")))
        qkv_bias = bool(read("attention_bias"))
        flags = nc.base_flags(read, rope_theta=theta, qkv_bias=qkv_bias, qk_norm=True, moe=moe)
        flags += ["--num-experts", str(read("num_experts")), "--moe-router-score-function", "softmax"]
        if not read("norm_topk_prob"):
            flags.append("--moe-router-pre-softmax")
        arch = nc.hf_architecture(read, moe, qkv_bias=qkv_bias, qk_norm=True)
        state = nc.import_tensors(arch, tensors, LAYOUT, num_experts=int(read("num_experts")))
        nc.check_vocab(read, state)
        return flags, state


TARGET = Qwen3MoeTarget()
