"""Layer and block specs for Megatron's GPTModel.

``moe_ext_gpt_block_spec`` is what our entries use: the same block with this package's layers in
Megatron's slots, chosen by the config: ``FineGrainedExperts`` in the MoE layers' experts slot
unless ``moe_expert_backend == 'megatron'``; in the router slot ``ProductKeyRouter`` for
``moe_router_type == 'product_key'``, ``BalancedTopKRouter`` (``BalancedNoisyTopKRouter`` with noise)
for the top-k router with --moe-balance-losses or --moe-balance-metrics, ``NoisyTopKRouter`` for
noisy gating alone, else Megatron's TopKRouter.

``local_gpt_block_spec`` is Megatron's own local (non-TE) decoder block spec, with every norm
replaced by ``SequenceParallelTorchNorm`` so that sequence parallelism works without TE/apex. It has
the ``(config, vp_stage=None)`` signature that ``GPTModelConfig.transformer_layer_spec`` accepts as
a callable (megatron/training/models/gpt.py), so the train entry, the launcher and tests share it.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.layers.balanced_router import BalancedNoisyTopKRouter, BalancedTopKRouter
from megatron_moe_ext.layers.fine_grained_experts import FineGrainedExperts
from megatron_moe_ext.layers.noisy_gating import NoisyTopKRouter
from megatron_moe_ext.layers.norms import SequenceParallelTorchNorm
from megatron_moe_ext.layers.peer import PEERLayer, local_mlp_builder
from megatron_moe_ext.layers.product_key_router import ProductKeyRouter
from megatron_moe_ext.settings import ext_settings


_REPLACEABLE_NORMS: tuple[type, ...] = (WrappedTorchNorm,)
try:  # apex's norm, when apex is installed, is what the local spec picks instead
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

    _REPLACEABLE_NORMS += (FusedLayerNorm,)
except ImportError:
    pass


def _with_norm(layer_spec: ModuleSpec, norm: type) -> ModuleSpec:
    sub = layer_spec.submodules
    attn = sub.self_attention
    attn_sub = attn.submodules
    # Only the torch/apex norms are swapped; IdentityOp and L2Norm (no parameters) stay.
    replacements = {
        name: norm
        for name in ("q_layernorm", "k_layernorm")
        if getattr(attn_sub, name, None) in _REPLACEABLE_NORMS
    }
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn_sub, **replacements))
    new_sub = dataclasses.replace(
        sub,
        input_layernorm=IdentityOp if sub.input_layernorm is IdentityOp else norm,
        pre_mlp_layernorm=IdentityOp if sub.pre_mlp_layernorm is IdentityOp else norm,
        self_attention=attn,
    )
    return dataclasses.replace(layer_spec, submodules=new_sub)


def local_gpt_block_spec(config: TransformerConfig, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """Megatron's local GPT decoder block spec with sequence-parallel-capable torch norms.

    ``config`` is a TransformerConfig, or a ``GPTModelConfig`` (whose builder passes itself).
    """
    config = getattr(config, "transformer", config)
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization=config.normalization, vp_stage=vp_stage
    )
    layers = [_with_norm(spec, SequenceParallelTorchNorm) for spec in block.layer_specs]
    return dataclasses.replace(block, layer_specs=layers, layer_norm=SequenceParallelTorchNorm)


def _with_moe_submodules(layer_spec: ModuleSpec, **replacements: type) -> ModuleSpec:
    """The layer spec with its MoELayer's submodules (experts, router) replaced; dense layers unchanged."""
    mlp = layer_spec.submodules.mlp
    if not replacements or not (
        isinstance(mlp, functools.partial) and isinstance(mlp.func, type) and issubclass(mlp.func, MoELayer)
    ):
        return layer_spec
    moe_submodules = dataclasses.replace(mlp.keywords["submodules"], **replacements)
    new_mlp = functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": moe_submodules})
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=new_mlp))


def _with_experts(layer_spec: ModuleSpec, experts: type) -> ModuleSpec:
    """The layer spec with ``experts`` in its MoELayer's experts slot (dense layers unchanged)."""
    return _with_moe_submodules(layer_spec, experts=experts)


def router_class(config: TransformerConfig) -> type | None:
    """The router our config asks for, or None for Megatron's own TopKRouter.

    ProductKeyRouter carries noisy gating and the balance losses/metrics itself; the dense router
    becomes a subclass only for the options that need one (balancing, noise, or both).
    """
    ext = ext_settings(config)
    if ext.router.router_type == "product_key":
        return ProductKeyRouter
    if ext.router.router_type == "expert_choice":
        from megatron_moe_ext.layers.expert_choice_router import ExpertChoiceRouter

        return ExpertChoiceRouter
    if ext.router.router_type == "relu":
        from megatron_moe_ext.layers.relu_router import ReluRouter

        return ReluRouter
    if ext.router.null_experts:
        from megatron_moe_ext.layers.null_experts import NullExpertTopKRouter

        return NullExpertTopKRouter
    noisy = ext.router.noisy_gating
    if ext.balance.requested:
        return BalancedNoisyTopKRouter if noisy else BalancedTopKRouter
    if noisy:
        return NoisyTopKRouter
    return None


def moe_ext_gpt_block_spec(config: TransformerConfig, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """``local_gpt_block_spec`` with this package's layers chosen by the config's fields."""
    config = getattr(config, "transformer", config)
    ext = ext_settings(config)
    block = local_gpt_block_spec(config, vp_stage=vp_stage)
    replacements: dict[str, type] = {}
    if ext.experts.ours:
        replacements["experts"] = FineGrainedExperts
    router = router_class(config)
    if router is not None:
        replacements["router"] = router
    layers = [_with_moe_submodules(spec, **replacements) for spec in block.layer_specs]
    peer_numbers = set(ext.peer.layers)
    if peer_numbers:
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        offset = get_transformer_layer_offset(config, vp_stage)
        layers = [_with_peer(spec) if offset + i + 1 in peer_numbers else spec for i, spec in enumerate(layers)]
    return dataclasses.replace(block, layer_specs=layers)


def _with_peer(layer_spec: ModuleSpec) -> ModuleSpec:
    """The layer spec with a PEER layer in its MLP slot (Megatron's dense MLP as its shared
    branch) and a real pre-MLP norm.

    The checkpoint-key map of the norm is kept: TransformerBlock stacks each key over all layers,
    so a PEER layer's norm must be saved under the same name as its neighbours' (a mixed stack
    with two names fails Megatron's sharding validation)."""
    sub = layer_spec.submodules
    peer = functools.partial(PEERLayer, shared_mlp=local_mlp_builder())
    norm = sub.pre_mlp_layernorm if sub.pre_mlp_layernorm is not IdentityOp else SequenceParallelTorchNorm
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(sub, mlp=peer, pre_mlp_layernorm=norm))


def hybrid_stack_spec_with_experts(stack_spec: ModuleSpec | None = None, experts: type = FineGrainedExperts) -> ModuleSpec:
    """Megatron's HybridModel stack spec with ``experts`` in its MoE layers (same MLP slot as GPT).

    Building a HybridModel needs Transformer Engine and the mamba kernels, so this is exercised on
    GPU machines; on CPU only the spec itself is checked.
    """
    if stack_spec is None:
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as stack_spec
    moe_layer = _with_experts(stack_spec.submodules.moe_layer, experts)
    return dataclasses.replace(stack_spec, submodules=dataclasses.replace(stack_spec.submodules, moe_layer=moe_layer))
