"""The accounting's parameter counts equal those of real Megatron GPTModels (local spec, one rank),
PEER layers included."""

from __future__ import annotations

from typing import Any

from megatron_moe_ext.accounting import ModelShape, account

SEQ = 16
VOCAB = 64

# (name, tiny_config overrides, GPTModel kwargs, ModelShape for the same model).
# tiny_config: 2 layers, h=32, ffn=64, 4 heads, 4 experts top-2, no biases, LayerNorm.
BASE = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=VOCAB,
            seq_length=SEQ, add_bias_linear=False, normalization="LayerNorm")
MOE = dict(num_experts=4, topk=2)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], ModelShape]] = [
    ("dense", dict(num_moe_experts=None),
     dict(position_embedding_type="rope", share_embeddings_and_output_weights=True),
     ModelShape(**BASE, position_embedding_type="rope")),
    ("moe_4x_top2", {},
     dict(position_embedding_type="rope", share_embeddings_and_output_weights=True),
     ModelShape(**BASE, **MOE, position_embedding_type="rope")),
    ("swiglu_fine_shared_rms_qknorm",
     dict(gated_linear_unit=True, moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=32,
          normalization="RMSNorm", qk_layernorm=True),
     dict(position_embedding_type="rope", share_embeddings_and_output_weights=True),
     ModelShape(**{**BASE, "normalization": "RMSNorm"}, **MOE, gated_linear_unit=True, moe_ffn_hidden_size=16,
                shared_expert_intermediate_size=32, qk_layernorm=True, position_embedding_type="rope")),
    ("untied_with_biases", dict(add_bias_linear=True, qk_layernorm=True),
     dict(position_embedding_type="rope", share_embeddings_and_output_weights=False),
     ModelShape(**{**BASE, "add_bias_linear": True}, **MOE, qk_layernorm=True, position_embedding_type="rope",
                share_embeddings_and_output_weights=False)),
    ("learned_absolute", dict(num_moe_experts=None, add_bias_linear=True),
     dict(position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True, max_sequence_length=24),
     ModelShape(**{**BASE, "add_bias_linear": True}, position_embedding_type="learned_absolute",
                max_position_embeddings=24)),
    ("alternating_gqa_shared_gate",
     dict(num_layers=4, moe_layer_freq=[1, 0, 1, 0], num_query_groups=2, kv_channels=16, gated_linear_unit=True,
          moe_shared_expert_intermediate_size=64, moe_shared_expert_gate=True),
     dict(position_embedding_type="rope", share_embeddings_and_output_weights=False),
     ModelShape(**{**BASE, "num_layers": 4}, **MOE, moe_layer_pattern=(1, 0, 1, 0), num_query_groups=2,
                kv_channels=16, gated_linear_unit=True, shared_expert_intermediate_size=64, shared_expert_gate=True,
                position_embedding_type="rope", share_embeddings_and_output_weights=False)),
    ("product_key_router_layernorm",
     dict(num_moe_experts=16, moe_router_type="product_key", moe_pk_key_dim=8, moe_pk_query_norm="layernorm"),
     dict(position_embedding_type="rope", share_embeddings_and_output_weights=True),
     ModelShape(**BASE, num_experts=16, topk=2, router_type="product_key", pk_key_dim=8, pk_query_norm="layernorm",
                position_embedding_type="rope")),
    ("product_key_two_heads_rect_noisy",
     dict(num_moe_experts=24, moe_router_topk=4, moe_router_type="product_key", moe_pk_heads=2, moe_pk_key_dim=8,
          moe_pk_grid_rows=3, moe_router_noisy_gating=True),
     dict(position_embedding_type="rope", share_embeddings_and_output_weights=True),
     ModelShape(**BASE, num_experts=24, topk=4, router_type="product_key", pk_heads=2, pk_key_dim=8, pk_grid_rows=3,
                noisy_gating=True, position_embedding_type="rope")),
    ("noisy_topk", dict(moe_router_noisy_gating=True),
     dict(position_embedding_type="rope", share_embeddings_and_output_weights=True),
     ModelShape(**BASE, **MOE, noisy_gating=True, position_embedding_type="rope")),
    # PEER (8x8 experts, 2 heads x top-4) replacing layer 2's MoE, with a dense branch of 16.
    ("peer_replaces_moe_layer_2",
     dict(moe_peer_num_experts=64, moe_peer_heads=2, moe_peer_topk=4, moe_peer_key_dim=8, moe_peer_layers="2",
          moe_peer_shared_ffn_hidden_size=16),
     dict(position_embedding_type="rope", share_embeddings_and_output_weights=True),
     ModelShape(**BASE, **MOE, peer_num_experts=64, peer_heads=2, peer_topk=4, peer_key_dim=8, peer_layers="2",
                peer_shared_ffn_hidden_size=16, position_embedding_type="rope")),
    ("peer_all_dense_gated_biased",
     dict(num_moe_experts=None, add_bias_linear=True, gated_linear_unit=True, moe_peer_num_experts=49,
          moe_peer_heads=3, moe_peer_topk=2, moe_peer_key_dim=6, moe_peer_layers="all", moe_peer_query_norm="rmsnorm",
          moe_peer_shared_ffn_hidden_size=8),
     dict(position_embedding_type="rope", share_embeddings_and_output_weights=False),
     ModelShape(**{**BASE, "add_bias_linear": True}, gated_linear_unit=True, peer_num_experts=49, peer_heads=3,
                peer_topk=2, peer_key_dim=6, peer_layers="all", peer_query_norm="rmsnorm",
                peer_shared_ffn_hidden_size=8, position_embedding_type="rope",
                share_embeddings_and_output_weights=False)),
]


def count_megatron_params(cases: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> dict[str, dict[str, int]]:
    """Build each GPTModel on this rank and count its parameters (total and router)."""
    from megatron.core.models.gpt import GPTModel

    from megatron_moe_ext.layers.peer import PEERLayer
    from megatron_moe_ext.specs import moe_ext_gpt_block_spec
    from megatron_moe_ext.testing.tiny import initialize_parallel, tiny_config

    initialize_parallel()
    out = {}
    for name, overrides, model_kwargs in cases:
        config = tiny_config(**overrides)
        kwargs = {"vocab_size": VOCAB, "max_sequence_length": SEQ, **model_kwargs}
        model = GPTModel(config=config, transformer_layer_spec=moe_ext_gpt_block_spec(config), **kwargs)
        named = dict(model.named_parameters())
        out[name] = {
            "total": sum(p.numel() for p in model.parameters()),
            "router_weight": sum(p.numel() for n, p in named.items() if n.endswith(".router.weight")),
            "router": sum(p.numel() for n, p in named.items() if ".router." in n),
            # PEERLayer's own parameters (query, sub-keys, query norm, u, v, dense branch).
            "peer": sum(p.numel() for mod in model.modules() if isinstance(mod, PEERLayer) for p in mod.parameters()),
        }
    return out


def test_param_counts_match_megatron() -> None:
    from megatron_moe_ext.testing import run_distributed

    # One process for all configs: each run_distributed call pays ~10 s of imports.
    counts = run_distributed(count_megatron_params, 1, [(n, o, k) for n, o, k, _ in CASES])[0]
    for name, _, _, shape in CASES:
        acc = account(shape)
        got = counts[name]
        assert got["total"] == acc.total_params, (name, got, acc)
        assert got["router"] == acc.router_params, (name, got, acc)
        # Megatron's router weight is [num_experts, hidden] per MoE layer; product keys have none.
        dense_gate = shape.router_type != "product_key"
        assert got["router_weight"] == dense_gate * acc.num_moe_layers * acc.num_experts * shape.hidden_size, name
        assert got["peer"] == acc.peer_params, (name, got, acc)
