"""Our experts land in Megatron's MoE slots, and only there."""

from __future__ import annotations

import functools

from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_moe_ext.layers.fine_grained_experts import FineGrainedExperts
from megatron_moe_ext.specs import hybrid_stack_spec_with_experts


def _experts_of(mlp_spec):
    assert isinstance(mlp_spec, functools.partial) and issubclass(mlp_spec.func, MoELayer)
    return mlp_spec.keywords["submodules"].experts


def test_hybrid_stack_spec_gets_fine_grained_experts_and_keeps_the_rest() -> None:
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    new = hybrid_stack_spec_with_experts(hybrid_stack_spec)
    assert _experts_of(new.submodules.moe_layer.submodules.mlp) is FineGrainedExperts
    assert _experts_of(hybrid_stack_spec.submodules.moe_layer.submodules.mlp) is not FineGrainedExperts  # not mutated
    old_sub, new_sub = hybrid_stack_spec.submodules, new.submodules
    for name in ("mamba_layer", "attention_layer", "mlp_layer"):
        assert getattr(new_sub, name) is getattr(old_sub, name)
    # Router, dispatcher-related and shared-expert slots are untouched.
    old_moe = hybrid_stack_spec.submodules.moe_layer.submodules.mlp.keywords["submodules"]
    new_moe = new.submodules.moe_layer.submodules.mlp.keywords["submodules"]
    assert new_moe.router is old_moe.router and new_moe.shared_experts is old_moe.shared_experts
