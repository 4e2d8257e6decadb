"""Parameter/FLOP accounting: hand-computed configs, granularity invariance, Megatron's own FLOP
formula, and the ``flops`` command."""

from __future__ import annotations

import json

import pytest

from megatron_moe_ext.accounting import ModelShape, account, format_report, shape_from_args
from megatron_moe_ext.granularity import derive_fine_grained

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
