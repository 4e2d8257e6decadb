"""G/E/k0 derivation table and its errors; MoEExtConfig conflicts; generated flags."""

from __future__ import annotations

import warnings

import pytest

from megatron_moe_ext.settings.granularity import derive_fine_grained

# (ffn, G, E, k0, shared) -> (experts, expert size, top-k, shared size)
TABLE = [
    (2048, 1, 8, 1, 0, (8, 2048, 1, None)),
    (2048, 2, 8, 1, 0, (16, 1024, 2, None)),
    (2048, 16, 8, 1, 0, (128, 128, 16, None)),
    (2048, 64, 8, 1, 0, (512, 32, 64, None)),
    (2048, 8, 4, 2, 1, (32, 256, 16, 256)),
    (14336, 7, 8, 2, 2, (56, 2048, 14, 4096)),  # the "8x14336 top-2 -> 56x2048 top-14" study
]


@pytest.mark.parametrize("ffn, g, e, k0, shared, expected", TABLE)
def test_derivation_table(ffn, g, e, k0, shared, expected) -> None:
    sizes = derive_fine_grained(ffn, g, e, k0, num_shared_experts=shared)
    assert (sizes.num_experts, sizes.moe_ffn_hidden_size, sizes.topk, sizes.shared_expert_intermediate_size) == expected
    # Constant compute: active expert width and total expert width do not depend on G.
    assert sizes.topk * sizes.moe_ffn_hidden_size == k0 * ffn
    assert sizes.num_experts * sizes.moe_ffn_hidden_size == e * ffn


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ffn_hidden_size=2048, granularity=3, expansion_rate=8), "G=3 does not divide ffn_hidden_size=2048 (expert size would be 682.667); nearest valid G: 2"),
        (dict(ffn_hidden_size=2048, granularity=24, expansion_rate=8), "nearest valid G: 16"),
        (dict(ffn_hidden_size=2048, granularity=4, expansion_rate=2, base_topk=3), "exceeds the number of experts"),
        (dict(ffn_hidden_size=2048, granularity=1, expansion_rate=6, expert_parallel_size=4), "nearest valid expansion rate: 4"),
        (dict(ffn_hidden_size=2048, granularity=256, expansion_rate=8, fp8_recipe="delayed"), "multiples of 16, but ffn_hidden_size/G = 2048/256 = 8; nearest valid G: 128"),
        (dict(ffn_hidden_size=2048, granularity=128, expansion_rate=8, fp8_recipe="mxfp8"), "multiples of 32"),
        (dict(ffn_hidden_size=2048, granularity=0, expansion_rate=8), "granularity=0 must be a positive integer"),
    ],
)
def test_bad_input_names_values_and_nearest_choice(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        derive_fine_grained(**kwargs)


def test_single_neuron_experts_point_to_peer() -> None:
    with pytest.warns(UserWarning, match="PEER layer"):
        sizes = derive_fine_grained(64, 64, 2, 1)
    assert sizes.moe_ffn_hidden_size == 1


def test_config_derives_and_refuses_conflicts() -> None:
    from megatron_moe_ext.testing.tiny import tiny_config

    config = tiny_config(moe_granularity=4, moe_expansion_rate=2, moe_base_topk=1)
    assert (config.num_moe_experts, config.moe_ffn_hidden_size, config.moe_router_topk) == (8, 16, 4)
    # The config and the flags share one check (settings/granularity.py), so its messages name the flags.
    with pytest.raises(ValueError, match=r"contradict --num-experts 4 \(G implies 8\)"):
        tiny_config(moe_granularity=4, moe_expansion_rate=2, num_moe_experts=4)
    with pytest.raises(ValueError, match="needs --moe-expansion-rate"):
        tiny_config(moe_granularity=4)
    with pytest.raises(ValueError, match="--moe-num-shared-experts 1 needs --moe-granularity"):
        tiny_config(moe_num_shared_experts=1)
    with pytest.raises(ValueError, match="--moe-expert-backend 'fast' is unknown"):
        tiny_config(moe_expert_backend="fast")


# Frozen: adding or renaming a flag is a deliberate change of this list (and of the docs).
OUR_FLAGS = [
    "--moe-granularity",
    "--moe-expansion-rate",
    "--moe-base-topk",
    "--moe-num-shared-experts",
    "--moe-expert-backend",
    "--moe-fp8-format",
    "--moe-fp8-recipe",
    "--moe-router-type",
    "--moe-router-noisy-gating",
    "--moe-pk-heads",
    "--moe-pk-key-dim",
    "--moe-pk-subkey-topk",
    "--moe-pk-grid-rows",
    "--moe-pk-query-norm",
    "--moe-pk-bias-balancing",
    "--moe-pk-expert-bias-balancing",
    "--moe-pk-bias-update-rule",
    "--moe-ec-capacity-factor",
    "--moe-ec-eval-rule",
    "--moe-relu-target-sparsity",
    "--moe-relu-l1-coeff",
    "--moe-relu-l1-update-rate",
    "--moe-null-experts",
    "--moe-balance-losses",
    "--moe-balance-coeffs",
    "--moe-balance-coeff-policy",
    "--moe-balance-metrics",
    "--moe-balance-usage-window",
    "--moe-peer-num-experts",
    "--moe-peer-layers",
    "--moe-peer-heads",
    "--moe-peer-topk",
    "--moe-peer-key-dim",
    "--moe-peer-subkey-topk",
    "--moe-peer-query-norm",
    "--moe-peer-activation",
    "--moe-peer-gate",
    "--moe-peer-shared-ffn-hidden-size",
    "--moe-peer-backend",
    "--moe-peer-chunk-pairs",
    "--moe-peer-deterministic",
    "--moe-peer-shard",
    "--moe-peer-table-lr-mult",
    "--moe-peer-table-wd-mult",
    "--moe-peer-subkey-loss-stride",
    "--moe-peer-subkey-loss-marginals",
]


def _megatron_parser():
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    return add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))


def test_flag_list_is_frozen_and_does_not_collide_with_megatron() -> None:
    import argparse

    from megatron_moe_ext.args import GROUP_TITLE, add_ext_args

    megatron_flags = {s for a in _megatron_parser()._actions for s in a.option_strings}
    collisions = [f for f in OUR_FLAGS if f in megatron_flags]
    assert not collisions, f"our flags collide with megatron-core's: {collisions}"
    parser = add_ext_args(argparse.ArgumentParser(allow_abbrev=False))
    group = next(g for g in parser._action_groups if g.title == GROUP_TITLE)
    assert [a.option_strings[0] for a in group._group_actions] == OUR_FLAGS
    assert all(a.help for a in group._group_actions), "every flag needs help from its field docstring"


def test_flags_round_trip_into_config() -> None:
    from megatron_moe_ext.args import config_from_args, parse_megatron_args

    argv = [
        "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
        "--seq-length", "16", "--max-position-embeddings", "16", "--moe-granularity", "4",
        "--moe-expansion-rate", "2", "--moe-base-topk", "2", "--moe-num-shared-experts", "1",
        "--moe-expert-backend", "eager", "--disable-bias-linear", "--no-bias-gelu-fusion", "--no-rope-fusion",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = parse_megatron_args(argv, validate=False)
        args.params_dtype = __import__("torch").float32
        config = config_from_args(args)
    assert (args.num_experts, args.moe_ffn_hidden_size, args.moe_router_topk) == (8, 64, 8)
    assert (config.moe_granularity, config.moe_expansion_rate, config.moe_base_topk) == (4, 2, 2)
    assert (config.num_moe_experts, config.moe_ffn_hidden_size, config.moe_router_topk) == (8, 64, 8)
    assert config.moe_shared_expert_intermediate_size == 64 and config.moe_expert_backend == "eager"


def test_explicit_megatron_flags_still_work_without_granularity() -> None:
    from megatron_moe_ext.args import parse_megatron_args

    args = parse_megatron_args(
        ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-experts", "6",
         "--moe-ffn-hidden-size", "32", "--seq-length", "16", "--max-position-embeddings", "16"],
        validate=False,
    )
    assert (args.num_experts, args.moe_ffn_hidden_size, args.moe_router_topk) == (6, 32, 2)


def test_our_experts_default_to_expert_tensor_parallel_size_1() -> None:
    from megatron_moe_ext.args import parse_megatron_args

    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-experts", "4",
            "--seq-length", "16", "--max-position-embeddings", "16", "--tensor-model-parallel-size", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert parse_megatron_args(base, validate=False).expert_tensor_parallel_size == 1
        megatron = parse_megatron_args([*base, "--moe-expert-backend", "megatron"], validate=False)
        assert megatron.expert_tensor_parallel_size is None  # Megatron's own default (= TP) applies
        explicit = parse_megatron_args([*base, "--moe-expert-backend", "megatron", "--expert-tensor-parallel-size", "2"],
                                       validate=False)
        assert explicit.expert_tensor_parallel_size == 2
        with pytest.raises(SystemExit):  # our experts refuse expert-TP > 1 before any rank starts (settings/experts.py)
            parse_megatron_args([*base, "--expert-tensor-parallel-size", "2"], validate=False)
