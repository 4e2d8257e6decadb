"""Router choice and product-key geometry: layouts, and every bad input refused with a fix."""

from __future__ import annotations

import warnings

import pytest

from megatron_moe_ext.settings.router import check_router_choice, product_key_layout


def test_layouts() -> None:
    lay = product_key_layout(4096, 8, heads=1, key_dim=128)
    assert (lay.heads, lay.rows, lay.cols, lay.k, lay.subkey_topk, lay.pool_size) == (1, 64, 64, 8, 8, 4096)
    lay = product_key_layout(2 * 1024, 8, heads=2, key_dim=128, subkey_topk=16)
    assert (lay.rows, lay.cols, lay.k, lay.subkey_topk) == (32, 32, 4, 16)
    lay = product_key_layout(128, 2, heads=1, key_dim=128, grid_rows=8)
    assert (lay.rows, lay.cols) == (8, 16)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(num_experts=120, topk=2), "not a perfect square"),
        (dict(num_experts=120, topk=2), "100 or 121"),
        (dict(num_experts=64, topk=2, key_dim=7), "even"),
        (dict(num_experts=64, topk=4, subkey_topk=2), "subkey-topk 2 < top-k per head 4"),
        (dict(num_experts=64, topk=9), "exceeds the 8 sub-keys"),
        (dict(num_experts=64, topk=3, heads=2), "not divisible by --moe-pk-heads 2"),
        (dict(num_experts=72, topk=4, heads=5), "num_experts=72 is not divisible"),
        (dict(num_experts=64, topk=2, grid_rows=6), "does not divide"),
        (dict(num_experts=None, topk=2), "needs MoE experts"),
    ],
)
def test_bad_geometry_is_refused_with_a_fix(kwargs: dict, needle: str) -> None:
    num_experts, topk = kwargs.pop("num_experts"), kwargs.pop("topk")
    kwargs = {"heads": 1, "key_dim": 128, **kwargs}
    with pytest.raises(ValueError, match="fix|needs") as err:
        product_key_layout(num_experts, topk, **kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(load_balancing_type="sinkhorn"), "sinkhorn"),
        (dict(load_balancing_type=["aux_loss", "quantile_balancing"]), "quantile_balancing"),
        (dict(score_function="sqrtsoftplus"), "sqrtsoftplus"),
        (dict(expert_bias=True), "--moe-router-enable-expert-bias"),
        (dict(num_groups=2, group_topk=1), "group"),
        (dict(router_fusion=True), "--moe-router-fusion"),
    ],
)
def test_megatron_options_product_keys_cannot_honour(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match="fix") as err:
        check_router_choice("product_key", **kwargs)
    assert needle in str(err.value)
    check_router_choice("topk", **kwargs)  # Megatron's own router takes them


def test_config_refuses_before_building() -> None:
    from megatron_moe_ext.testing.tiny import tiny_config

    with pytest.raises(ValueError, match="perfect square"):
        tiny_config(num_moe_experts=6, moe_router_type="product_key")
    with pytest.raises(ValueError, match="sinkhorn"):
        tiny_config(num_moe_experts=16, moe_router_type="product_key", moe_router_load_balancing_type="sinkhorn")
    config = tiny_config(num_moe_experts=16, moe_router_type="product_key", moe_pk_key_dim=8)
    assert config.moe_pk_query_norm == "batchnorm"


BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--disable-bias-linear", "--no-bias-gelu-fusion", "--no-rope-fusion"]


def test_flags_reach_the_config_and_bad_flags_fail_at_parse(capsys) -> None:
    from megatron_moe_ext.args import config_from_args, parse_megatron_args

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = parse_megatron_args(
            BASE + ["--num-experts", "32", "--moe-router-topk", "4", "--moe-router-type", "product_key",
                    "--moe-pk-heads", "2", "--moe-pk-key-dim", "16", "--moe-pk-query-norm", "batchnorm",
                    "--moe-router-noisy-gating", "--moe-pk-grid-rows", "4", "--moe-pk-subkey-topk", "3"],
            validate=False,
        )
        args.params_dtype = __import__("torch").float32
        config = config_from_args(args)
    assert (config.moe_router_type, config.moe_pk_heads, config.moe_pk_key_dim) == ("product_key", 2, 16)
    assert (config.moe_pk_query_norm, config.moe_router_noisy_gating) == ("batchnorm", True)
    assert (config.moe_pk_grid_rows, config.moe_pk_subkey_topk) == (4, 3)
    with pytest.raises(SystemExit) as exit_info:
        parse_megatron_args(
            BASE + ["--num-experts", "32", "--moe-router-type", "product_key"], validate=False
        )
    assert exit_info.value.code == 2
    assert "not a perfect square" in capsys.readouterr().err
