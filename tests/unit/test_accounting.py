"""Parameter/FLOP accounting: hand-computed configs, granularity invariance, Megatron's own FLOP
formula, and the ``flops`` command."""

from __future__ import annotations

import json
from typing import Any

import pytest

from megatron_moe_ext.accounting import ModelShape, account, format_report, shape_from_args
from megatron_moe_ext.settings.granularity import derive_fine_grained

COMMON = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
          "--seq-length", "128", "--max-position-embeddings", "128", "--vocab-size", "257"]


def test_dense_hand_computed() -> None:
    # L=2, h=32, 4 heads in 2 groups, d=8, f=64, V=128, s=16, biases, LayerNorm, tied, learned positions.
    shape = ModelShape(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                       vocab_size=128, seq_length=16, add_bias_linear=True, normalization="LayerNorm",
                       share_embeddings_and_output_weights=True, position_embedding_type="learned_absolute")
    acc = account(shape)
    embedding = 128 * 32 + 16 * 32                       # words + positions (tied output layer)
    qkv_rows = (4 + 2 * 2) * 8                            # 64
    attention = 2 * (qkv_rows * 32 + qkv_rows + 32 * 32 + 32)  # qkv W+b, proj W+b
    mlp = 2 * (64 * 32 + 64 + 32 * 64 + 32)               # fc1 W+b, fc2 W+b
    norms = 2 * 2 * (32 + 32) + (32 + 32)                 # input + pre-MLP per layer, final
    assert (acc.embedding_params, acc.attention_params, acc.mlp_params, acc.norm_params) == (4608, 6336, 8384, 320)
    assert (embedding, attention, mlp, norms) == (4608, 6336, 8384, 320)
    assert acc.total_params == acc.active_params == 19648 == embedding + attention + mlp + norms
    assert acc.router_params == 0 and acc.num_experts == 0 and acc.topk == 0
    attn_flops = 2 * (2 * 32 * qkv_rows + 2 * 32 * 32 + 2 * 4 * 8 * (16 // 2) + 2 * 4 * 8 * (16 // 2))
    mlp_flops = 2 * (2 * 32 * 64 + 2 * 64 * 32)
    logits = 2 * 32 * 128
    assert (acc.attention_flops_per_token, acc.mlp_flops_per_token, acc.logits_flops_per_token) == (14336, 16384, 8192)
    assert acc.forward_flops_per_token == attn_flops + mlp_flops + logits == 38912
    assert acc.training_flops_per_token == 3 * 38912
    assert acc.inference_flops_per_token == 38912


def test_moe_hand_computed() -> None:
    # Layer 0 MoE (4 experts of 16, top-2, shared expert of 32), layer 1 dense; SwiGLU, no biases,
    # RMSNorm with qk norms, untied embeddings, RoPE.
    shape = ModelShape(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64,
                       seq_length=16, gated_linear_unit=True, add_bias_linear=False, normalization="RMSNorm",
                       qk_layernorm=True, share_embeddings_and_output_weights=False, position_embedding_type="rope",
                       moe_layer_pattern=(1, 0), num_experts=4, moe_ffn_hidden_size=16, topk=2,
                       shared_expert_intermediate_size=32)
    acc = account(shape)
    embedding = 64 * 32 + 64 * 32                  # words + untied output layer
    attention = 2 * ((4 + 2 * 4) * 8 * 32 + 32 * 32 + 8 + 8)  # qkv, proj, q/k RMSNorm
    expert = 2 * 16 * 32 + 32 * 16                 # gated fc1 + fc2 = 1536
    shared = 2 * 32 * 32 + 32 * 32                 # 3072
    dense = 2 * 64 * 32 + 32 * 64                  # 6144
    router = 4 * 32
    norms = 2 * 2 * 32 + 32
    assert (embedding, attention, expert, shared, dense, router, norms) == (4096, 8224, 1536, 3072, 6144, 128, 160)
    assert acc.embedding_params == embedding and acc.attention_params == attention
    assert acc.expert_params == 4 * expert and acc.active_expert_params == 2 * expert
    assert acc.shared_expert_params == shared and acc.router_params == router and acc.norm_params == norms
    assert acc.mlp_params == 4 * expert + shared + dense == 15360
    assert acc.total_params == embedding + attention + 15360 + router + norms == 27968
    assert acc.active_params == 27968 - (4 - 2) * expert == 24896
    attn_flops = 2 * (2 * 32 * 96 + 2 * 32 * 32 + 2 * 32 * 8 + 2 * 32 * 8)  # qkv, proj, QK^T and AV over s/2 keys
    moe_flops = 2 * (2 * 32 * 32 + 2 * 16 * 32) + (2 * 32 * 64 + 2 * 32 * 32)  # top-2 experts + shared
    dense_flops = 2 * 32 * 128 + 2 * 64 * 32
    router_flops = 2 * 32 * 4
    logits = 2 * 32 * 64
    assert (attn_flops, moe_flops, dense_flops) == (18432, 12288, 12288)
    assert acc.router_flops_per_token == router_flops == 256
    assert acc.mlp_flops_per_token == moe_flops + dense_flops
    assert acc.forward_flops_per_token == attn_flops + moe_flops + dense_flops + router_flops + logits == 47360
    assert acc.training_flops_per_token == 3 * 47360


def test_granularity_invariance() -> None:
    h, f, layers = 64, 256, 2
    base = None
    for G in (1, 2, 4, 8):
        sizes = derive_fine_grained(f, G, 8, 1)
        acc = account(ModelShape(num_layers=layers, hidden_size=h, num_attention_heads=4, ffn_hidden_size=f,
                                 vocab_size=256, seq_length=128, gated_linear_unit=True, add_bias_linear=False,
                                 num_experts=sizes.num_experts, moe_ffn_hidden_size=sizes.moe_ffn_hidden_size,
                                 topk=sizes.topk))
        assert (acc.num_experts, acc.moe_ffn_hidden_size, acc.topk) == (8 * G, f // G, G)
        assert acc.router_flops_per_token == layers * 2 * h * 8 * G
        if base is None:
            base = acc
            continue
        assert acc.expert_params == base.expert_params == layers * 8 * 3 * h * f
        assert acc.active_expert_params == base.active_expert_params == layers * 3 * h * f
        assert acc.total_params - base.total_params == acc.router_params - base.router_params == layers * h * 8 * (G - 1)
        assert acc.active_params - base.active_params == layers * h * 8 * (G - 1)
        # Forward FLOPs differ only by the router term, 2*h*E*G per MoE layer.
        assert acc.forward_flops_per_token - base.forward_flops_per_token == layers * 2 * h * 8 * (G - 1)
        assert acc.mlp_flops_per_token == base.mlp_flops_per_token


def test_shape_from_args_follows_megatron() -> None:
    from megatron_moe_ext.args import parse_megatron_args

    args = parse_megatron_args([*COMMON, "--num-experts", "4", "--moe-layer-freq", "2", "--num-layers", "4",
                                "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "32",
                                "--untie-embeddings-and-output-weights", "--tensor-model-parallel-size", "2"],
                               validate=False)
    shape = shape_from_args(args)
    assert shape.vocab_size == 512  # 257 padded to a multiple of 128 * TP=2
    assert shape.moe_layer_pattern == (1, 0, 1, 0)
    assert (shape.num_query_groups, shape.kv_channels, shape.moe_ffn_hidden_size, shape.topk) == (2, 32, 256, 2)
    assert not shape.share_embeddings_and_output_weights
    args = parse_megatron_args([*COMMON, "--num-experts", "4", "--moe-layer-freq", "([1]*1+[0]*1)*1"], validate=False)
    assert shape_from_args(args).moe_layer_pattern == (1, 0)
    args.padded_vocab_size = 300  # an explicit padded size wins over the padding rule
    assert shape_from_args(args).vocab_size == 300


@pytest.mark.parametrize("extra", [[], ["--swiglu", "--num-experts", "8", "--moe-router-topk", "2",
                                        "--moe-shared-expert-intermediate-size", "128", "--disable-bias-linear",
                                        "--moe-layer-freq", "2", "--num-layers", "4", "--group-query-attention",
                                        "--num-query-groups", "2"]])
def test_matches_megatron_flops_formula_plus_router(extra: list[str]) -> None:
    # Megatron's num_floating_point_operations counts the same matmuls (same causal s/2 convention)
    # except the router: ours = Megatron's + 3 * router term.
    from megatron.training.training import num_floating_point_operations

    from megatron_moe_ext.args import parse_megatron_args

    args = parse_megatron_args([*COMMON, *extra], validate=False)
    acc = account(shape_from_args(args))
    args.kv_channels = acc.shape.kv_channels
    args.num_query_groups = acc.shape.num_query_groups
    args.moe_ffn_hidden_size = acc.shape.moe_ffn_hidden_size
    args.padded_vocab_size = acc.shape.vocab_size
    batch = 3
    megatron = num_floating_point_operations(args, batch)
    ours = batch * args.seq_length * acc.training_flops_per_token
    assert ours - megatron == batch * args.seq_length * 3 * acc.router_flops_per_token


def test_bad_shapes_name_the_fix() -> None:
    with pytest.raises(ValueError, match="topk=9 must be in 1..num_experts=8"):
        ModelShape(num_layers=1, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16, vocab_size=8,
                   seq_length=4, num_experts=8, topk=9)
    with pytest.raises(ValueError, match="disable-bias-linear"):
        ModelShape(num_layers=1, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16, vocab_size=8,
                   seq_length=4, num_experts=8, topk=1, shared_expert_intermediate_size=16)
    with pytest.raises(ValueError, match="num_layers=2 entries"):
        ModelShape(num_layers=2, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16, vocab_size=8,
                   seq_length=4, num_experts=8, topk=1, moe_layer_pattern=(1,))


def test_format_report_states_what_is_counted() -> None:
    text = format_report(account(ModelShape(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                            vocab_size=64, seq_length=16, num_experts=4, topk=2)))
    assert "total params" in text and "active params" in text and "MFLOP" in text
    assert "Counted:" in text and "seq_length/2" in text


def test_flops_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    from megatron_moe_ext.cli import main

    assert main(["flops", *COMMON, "--num-experts", "4", "--moe-router-topk", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON object
    for key in ("num_experts", "moe_ffn_hidden_size", "topk", "total_params", "active_params", "router_params",
                "forward_flops_per_token"):
        assert key in out
    assert (out["num_experts"], out["moe_ffn_hidden_size"], out["topk"]) == (4, 256, 2)
    assert out["router_params"] == 2 * (4 * 64 + 4)  # weight + bias (Megatron's default add_bias_linear)

    assert main(["flops", *COMMON, "--moe-granularity", "8", "--moe-expansion-rate", "4", "--swiglu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["num_experts"], out["moe_ffn_hidden_size"], out["topk"]) == (32, 32, 8)
    assert out["router_flops_per_token"] == 2 * 2 * 64 * 32
    assert out["shape"]["vocab_size"] == 384


def test_flops_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    from megatron_moe_ext.cli import main

    assert main(["flops", *COMMON]) == 0
    out = capsys.readouterr().out
    assert "total params" in out and "dense" in out


def test_flops_cli_conflicting_experts_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from megatron_moe_ext.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["flops", *COMMON, "--moe-granularity", "8", "--moe-expansion-rate", "4", "--num-experts", "16", "--json"])
    assert exc.value.code == 2
    assert "--num-experts 16 (G implies 32)" in capsys.readouterr().err


def test_flops_cli_needs_vocab_size(capsys: pytest.CaptureFixture[str]) -> None:
    from megatron_moe_ext.cli import main

    argv = [a for a in COMMON if a not in ("--vocab-size", "257")]
    with pytest.raises(SystemExit) as exc:
        main(["flops", *argv, "--json"])
    assert exc.value.code == 2
    assert "flops needs --vocab-size" in capsys.readouterr().err


def test_product_key_router_hand_computed_and_sqrt_growth() -> None:
    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=64,
                seq_length=16, add_bias_linear=False, normalization="RMSNorm", topk=4)
    pk = account(ModelShape(**base, num_experts=2 * 64, router_type="product_key", pk_heads=2, pk_key_dim=16,
                            pk_query_norm="batchnorm", noisy_gating=True))
    # 2 heads of 8x8: query 2*16*64, sub-keys 2*(8+8)*8, batchnorm affine 2*2*16, noise 2*(8+8)*64.
    assert pk.router_params == 2 * 16 * 64 + 2 * 16 * 8 + 2 * 2 * 16 + 2 * 16 * 64
    assert pk.router_flops_per_token == 2 * 64 * 32 + 2 * 2 * 16 * 8 + 2 * 64 * 2 * 16
    dense = account(ModelShape(**base, num_experts=128, noisy_gating=True))
    assert dense.router_params == 2 * 128 * 64 and dense.router_flops_per_token == 2 * 2 * 64 * 128
    # 256x more experts: the dense router term grows 256x, the product-key one at most sqrt(256) = 16x.
    small, large = (account(ModelShape(**base, num_experts=n, router_type="product_key", pk_key_dim=16))
                    for n in (64, 64 * 256))
    assert large.router_flops_per_token <= 16 * small.router_flops_per_token


# -- PEER layers ------------------------------------------------------------------------------------
# The example of tests/distributed/test_peer.py: h=32, N=64 (8x8 grid), 2 heads x top-4 (G=8), D=8,
# batchnorm queries, a dense branch of 16 (ungated, no biases).
PEER_EXAMPLE = dict(moe_peer_num_experts=64, moe_peer_heads=2, moe_peer_topk=4, moe_peer_key_dim=8,
                    moe_peer_layers="2", moe_peer_shared_ffn_hidden_size=16)
PEER_BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64,
                 seq_length=16, add_bias_linear=False, position_embedding_type="rope",
                 share_embeddings_and_output_weights=False)  # build_tiny_gpt: GPTModel's default, untied


def test_peer_layer_counts_hand_computed() -> None:
    from megatron_moe_ext.accounting import peer_layer_counts

    c = peer_layer_counts(32, 64, 2, 4, 8, None, "batchnorm", 16, False)
    query, subkeys, norm = 2 * 8 * 32, 2 * 2 * 8 * (8 // 2), 2 * 2 * 8   # W_q, row+col keys, BN weight+bias
    tables, active_tables = 2 * 64 * 32, 2 * (2 * 4) * 32                # u+v; G=8 rows of each per token
    dense = 16 * 32 + 32 * 16                                             # fc1 + fc2
    assert (query, subkeys, norm, tables, active_tables, dense) == (512, 128, 32, 4096, 512, 1024)
    assert (c.granularity, c.grid, c.subkey_topk) == (8, 8, 4)
    assert (c.query_params, c.subkey_params, c.query_norm_params) == (query, subkeys, norm)
    assert (c.table_params, c.active_table_params, c.shared_params) == (tables, active_tables, dense)
    assert c.params_total == query + subkeys + norm + tables + dense == 5792
    assert c.params_active == 5792 - tables + active_tables == 2208
    assert c.retrieval_params == 672
    f_query = 2 * 32 * 2 * 8            # 1024
    f_subkeys = 2 * 2 * (2 * 8) * 4     # 256: each head scores 2n=16 half keys of D/2=4
    f_candidates = 2 * 4 * 4            # 32 additions: kp^2 per head
    f_experts = 2 * 8 * 32 + 2 * 8 * 32  # 1024: u dots + gated v sum
    f_gates = 8                          # gate x activation, one multiply per expert
    f_dense = 2 * 16 * 32 + 2 * 32 * 16  # 2048
    assert (c.query_flops, c.subkey_score_flops, c.candidate_sum_flops) == (f_query, f_subkeys, f_candidates)
    assert (c.expert_flops, c.gate_flops, c.shared_flops) == (f_experts, f_gates, f_dense)
    assert c.flops_per_token_forward == f_query + f_subkeys + f_candidates + f_experts + f_gates + f_dense == 4392
    assert c.retrieval_flops == 1312

    # Gated dense branch with biases, rmsnorm, kp = 6 > k: fc1 doubles, norm = H*D, H*kp^2 candidates.
    c = peer_layer_counts(32, 64, 2, 4, 8, 6, "rmsnorm", 16, True, add_bias=True)
    assert c.shared_params == 2 * 16 * 32 + 32 * 16 + (2 * 16 + 32) == 1600
    assert c.query_norm_params == 2 * 8 and c.candidate_sum_flops == 2 * 36
    assert c.shared_flops == 2 * 2 * 16 * 32 + 2 * 16 * 32
    # No norm parameters, no branch.
    c = peer_layer_counts(32, 64, 2, 4, 8, None, "none", None, False)
    assert c.query_norm_params == 0 and c.shared_params == c.shared_flops == 0
    assert c.params_total == 512 + 128 + 4096


def test_peer_layer_counts_size_a_flop_matched_dense_ffn() -> None:
    # The benchmark use: a dense FFN of f hidden units costs 2*(g+1)*f*h per token.
    from megatron_moe_ext.accounting import peer_layer_counts

    h = 1024
    c = peer_layer_counts(h, 1024 * 1024, 8, 16, 128, None, "batchnorm", None, False)
    assert c.granularity == 128 and c.grid == 1024
    # Experts: 4*G*h; retrieval: 2*h*H*D + 2*H*2n*D/2 + H*k^2; the tables do not cost FLOPs.
    assert c.flops_per_token_forward == 4 * 128 * h + 128 + 2 * h * 8 * 128 + 2 * 8 * 2048 * 64 + 8 * 256
    assert c.params_total - c.params_active == 2 * (1024 * 1024 - 128) * h
    f = c.flops_per_token_forward / (2 * 2 * h)
    # Paper-sized retrieval (H*D = 1024 = h, n = 1024) costs 8x the experts' 4*G*h: the FLOP-matched
    # ungated FFN has ~1153 units, not the G = 128 a FLOP count of the experts alone would suggest.
    assert c.retrieval_flops == 8 * c.expert_flops + 2048 and round(f) == 1153


def test_peer_layer_counts_bad_input_names_the_fix() -> None:
    from megatron_moe_ext.accounting import peer_layer_counts

    with pytest.raises(ValueError, match="not a perfect square.*fix: use 49 or 64"):
        peer_layer_counts(32, 50, 2, 4, 8)
    with pytest.raises(ValueError, match="query_norm='group' is unknown; fix: choose from"):
        peer_layer_counts(32, 64, 2, 4, 8, query_norm="group")
    with pytest.raises(ValueError, match="shared_ffn_hidden_size=-4 must be a positive integer"):
        peer_layer_counts(32, 64, 2, 4, 8, shared_ffn_hidden_size=-4)
    with pytest.raises(ValueError, match="hidden=0 must be a positive integer"):
        peer_layer_counts(0, 64, 2, 4, 8)
    with pytest.raises(ValueError, match="moe_peer_layers='5' names layer"):
        ModelShape(**PEER_BASE, peer_num_experts=64, peer_layers="5")


def test_peer_model_hand_computed() -> None:
    # Layer 1 MoE (4 experts top-2), layer 2: the MoE replaced by the PEER example.
    moe = dict(num_experts=4, topk=2)
    peer = dict(peer_num_experts=64, peer_heads=2, peer_topk=4, peer_key_dim=8, peer_layers="2",
                peer_shared_ffn_hidden_size=16)
    acc = account(ModelShape(**PEER_BASE, **moe, **peer))
    plain = account(ModelShape(**PEER_BASE, **moe))
    expert, router = 64 * 32 + 32 * 64, 4 * 32
    assert acc.num_moe_layers == 1 and acc.num_peer_layers == 1 and acc.peer_granularity == 8
    assert acc.mlp_params == plain.mlp_params - 4 * expert and acc.router_params == plain.router_params - router
    assert acc.peer_params == 5792 and acc.peer_active_params == 2208 and acc.peer_retrieval_params == 672
    assert acc.total_params == plain.total_params - 4 * expert - router + 5792
    assert acc.active_params == acc.total_params - 2 * expert - (5792 - 2208)
    assert acc.peer_flops_per_token == 4392 and acc.peer_retrieval_flops_per_token == 1312
    assert acc.forward_flops_per_token == plain.forward_flops_per_token - 2 * (2 * 64 * 32 * 2) - 2 * 32 * 4 + 4392
    assert acc.training_flops_per_token == 3 * acc.forward_flops_per_token
    # Dense model, PEER in every layer: no dense MLP left; 'middle' of 3 layers is layer 2.
    acc = account(ModelShape(**PEER_BASE, **{**peer, "peer_layers": "all"}))
    assert (acc.num_moe_layers, acc.num_peer_layers, acc.mlp_params, acc.peer_params) == (0, 2, 0, 2 * 5792)
    acc = account(ModelShape(**{**PEER_BASE, "num_layers": 3}, **{**peer, "peer_layers": "middle"}))
    assert acc.shape.peer_layer_numbers() == (2,)
    assert acc.mlp_params == 2 * (64 * 32 + 32 * 64) and acc.peer_params == 5792
    # G, not N, sets the active count: 16x more experts only add inactive table rows.
    small = account(ModelShape(**PEER_BASE, **peer))
    large = account(ModelShape(**PEER_BASE, **{**peer, "peer_num_experts": 64 * 16}))
    subkeys = 2 * 2 * (32 - 8) * (8 // 2)  # 2 heads x 2n sub-keys of D/2, n: 8 -> 32
    assert large.active_params - small.active_params == subkeys
    assert large.total_params - small.total_params == 2 * (1024 - 64) * 32 + subkeys


def test_peer_shape_from_args() -> None:
    import argparse

    from megatron_moe_ext.args import parse_megatron_args

    args = parse_megatron_args([*COMMON, "--num-layers", "4", "--moe-peer-num-experts", "64", "--moe-peer-heads", "2",
                                "--moe-peer-topk", "4", "--moe-peer-key-dim", "8", "--moe-peer-layers", "2,4",
                                "--moe-peer-subkey-topk", "6", "--moe-peer-query-norm", "rmsnorm",
                                "--moe-peer-shared-ffn-hidden-size", "16"], validate=False)
    shape = shape_from_args(args)
    assert (shape.peer_num_experts, shape.peer_heads, shape.peer_topk, shape.peer_key_dim) == (64, 2, 4, 8)
    assert (shape.peer_subkey_topk, shape.peer_query_norm, shape.peer_shared_ffn_hidden_size) == (6, "rmsnorm", 16)
    assert shape.peer_layer_numbers() == (2, 4)
    assert account(shape).num_peer_layers == 2
    assert shape_from_args(parse_megatron_args(COMMON, validate=False)).peer_layer_numbers() == ()
    # A namespace without our flags (Megatron's own parser): no PEER layer.
    plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("moe_peer_")})
    shape = shape_from_args(plain)
    assert shape.peer_num_experts is None and account(shape).num_peer_layers == 0


def test_flops_cli_peer(capsys: pytest.CaptureFixture[str]) -> None:
    from megatron_moe_ext.cli import main

    peer = ["--moe-peer-num-experts", "64", "--moe-peer-heads", "2", "--moe-peer-topk", "4", "--moe-peer-key-dim",
            "8", "--moe-peer-layers", "2", "--moe-peer-shared-ffn-hidden-size", "16"]
    assert main(["flops", *COMMON, *peer]) == 0
    out = capsys.readouterr().out
    assert "PEER layers        1 (layer 2: 64 experts = 8x8, 2 head(s) x top-4, G=8" in out
    assert "dense branch 16" in out and "  peer active" in out and "PEER: query, sub-key scores" in out
    assert main(["flops", *COMMON, *peer, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["num_peer_layers"], out["peer_granularity"]) == (1, 8)
    # h=64 with biases (Megatron's default): retrieval 2*8*64 + 2*2*8*4 + 2*2*8, tables 2*64*64,
    # dense branch 16*64 + 64*16 + (16 + 64) biases.
    assert out["peer_params"] == 1024 + 16 + 128 + 32 + 8192 + 2048 + 80  # + H*D query bias (Megatron's default biases)
    assert out["shape"]["peer_layers"] == "2"
    assert main(["flops", *COMMON]) == 0
    assert "PEER" not in capsys.readouterr().out


def count_peer_model_params(cases: list[tuple[str, dict]]) -> dict[str, dict[str, Any]]:
    """Build each tiny PEER GPT on this rank: total parameters and, per layer, its MLP slot's parameters."""
    from megatron_moe_ext.testing.tiny import build_tiny_gpt, initialize_parallel, tiny_config

    initialize_parallel()
    out = {}
    for name, overrides in cases:
        model = build_tiny_gpt(tiny_config(**overrides))
        mlp: dict[int, int] = {}
        for pname, p in model.named_parameters():
            parts = pname.split(".")
            if parts[:2] == ["decoder", "layers"] and parts[3] == "mlp":
                mlp[int(parts[2]) + 1] = mlp.get(int(parts[2]) + 1, 0) + p.numel()
        out[name] = {"total": sum(p.numel() for p in model.parameters()), "mlp": mlp}
    return out


# (name, tiny_config overrides, ModelShape kwargs beyond tiny_config's: 2 layers, h=32, f=64, LayerNorm,
# no biases, rope, untied embeddings, vocab 64, seq 16).
PEER_MODELS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("moe_then_peer", PEER_EXAMPLE,
     dict(num_experts=4, topk=2, peer_num_experts=64, peer_heads=2, peer_topk=4, peer_key_dim=8, peer_layers="2",
          peer_shared_ffn_hidden_size=16)),
    ("dense_all_gated_biased_layernorm",
     dict(PEER_EXAMPLE, num_moe_experts=None, moe_peer_layers="all", gated_linear_unit=True, add_bias_linear=True,
          moe_peer_query_norm="layernorm", moe_peer_subkey_topk=6),
     dict(gated_linear_unit=True, add_bias_linear=True, peer_num_experts=64, peer_heads=2, peer_topk=4,
          peer_key_dim=8, peer_layers="all", peer_subkey_topk=6, peer_query_norm="layernorm",
          peer_shared_ffn_hidden_size=16)),
    ("middle_of_3_rmsnorm_no_branch",
     dict(num_layers=3, num_moe_experts=None, moe_peer_num_experts=36, moe_peer_heads=3, moe_peer_topk=2,
          moe_peer_key_dim=4, moe_peer_query_norm="rmsnorm"),
     dict(num_layers=3, peer_num_experts=36, peer_heads=3, peer_topk=2, peer_key_dim=4, peer_query_norm="rmsnorm")),
]


def test_peer_params_match_built_model() -> None:
    from megatron_moe_ext.accounting import peer_layer_counts
    from megatron_moe_ext.testing import run_distributed

    counts = run_distributed(count_peer_model_params, 1, [(n, o) for n, o, _ in PEER_MODELS])[0]
    for name, _, kwargs in PEER_MODELS:
        shape = ModelShape(**{**PEER_BASE, **kwargs})
        acc = account(shape)
        got = counts[name]
        assert got["total"] == acc.total_params, (name, got, acc)
        one = peer_layer_counts(shape.hidden_size, shape.peer_num_experts, shape.peer_heads, shape.peer_topk,
                                shape.peer_key_dim, shape.peer_subkey_topk, shape.peer_query_norm,
                                shape.peer_shared_ffn_hidden_size, shape.gated_linear_unit,
                                add_bias=shape.add_bias_linear)
        for layer in shape.peer_layer_numbers():
            assert got["mlp"][layer] == one.params_total, (name, layer, got, one)
        assert sum(got["mlp"][i] for i in shape.peer_layer_numbers()) == acc.peer_params
