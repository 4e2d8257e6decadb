"""Balance-loss settings: every bad combination refused with a fix (config and flags), the
coefficient policy, the router chosen, the tracked names, and the step metrics against metrics.py."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from megatron_moe_ext.settings.balancing import (
    DEFAULT_BALANCE_COEFF,
    balance_coefficients,
    check_balance_settings,
    tracked_names,
)

OK = dict(losses=None, coeffs=None, policy=None, metrics=False, usage_window=100, router_type="topk",
          num_experts=8, ep_size=1)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(losses=["subkey"]), "--moe-balance-losses subkey with --moe-router-type topk"),
        (dict(losses=["device"]), "--moe-balance-losses device with --expert-model-parallel-size 1"),
        (dict(losses=["communication"], ep_size=1), "--expert-model-parallel-size >= 2"),
        (dict(losses=["device"], ep_size=3), "--num-experts 8 is not divisible by --expert-model-parallel-size 3"),
        (dict(losses=["expert"], coeffs=[-0.1]), "-0.1 for the expert loss must be a finite number >= 0"),
        (dict(losses=["expert"], coeffs=[float("nan")]), "must be a finite number >= 0"),
        (dict(losses=["expert", "sequence"], coeffs=[0.1]), "has 1 values (0.1) for 2 losses (expert sequence)"),
        (dict(coeffs=[0.1]), "--moe-balance-coeffs 0.1 without --moe-balance-losses"),
        (dict(policy="constant"), "--moe-balance-coeff-policy constant without --moe-balance-losses"),
        (dict(losses=["expert"], policy="sqrt"), "--moe-balance-coeff-policy 'sqrt' is unknown"),
        (dict(losses=["expert", "expert"]), "names expert more than once"),
        (dict(losses=["experts"]), "'experts' is unknown; choose from expert, global_expert"),
        (dict(losses=[]), "is empty"),
        (dict(losses=["expert"], num_experts=None), "--moe-balance-losses needs MoE layers"),
        (dict(metrics=True, num_experts=None), "--moe-balance-metrics needs MoE layers"),
        (dict(metrics=True, usage_window=0), "--moe-balance-usage-window 0 must be an int >= 1"),
    ],
)
def test_bad_settings_are_refused_with_a_fix(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match="fix|choose from") as err:
        check_balance_settings(**{**OK, **kwargs})
    assert needle in str(err.value), str(err.value)


def test_good_settings_pass() -> None:
    check_balance_settings(**{**OK, "losses": ["expert", "global_expert", "sequence"], "coeffs": [0.1, 0, 1]})
    check_balance_settings(**{**OK, "losses": ["device", "communication"], "ep_size": 2, "metrics": True})
    check_balance_settings(**{**OK, "losses": ["subkey", "expert"], "router_type": "product_key"})


def test_coefficient_policy() -> None:
    # Default coefficients follow the default policy (constant_gradient: x sqrt(G)).
    assert balance_coefficients(["expert", "device"], None, None, 16) == [
        ("expert", DEFAULT_BALANCE_COEFF * 4), ("device", DEFAULT_BALANCE_COEFF * 4)]
    assert balance_coefficients(["expert"], None, None, None) == [("expert", DEFAULT_BALANCE_COEFF)]
    # Explicit coefficients are honoured as given ...
    assert balance_coefficients(["expert", "sequence"], [0.3, 0.0], None, 16) == [("expert", 0.3), ("sequence", 0.0)]
    # ... unless a policy is asked for too: then they are G = 1 weights.
    assert balance_coefficients(["expert"], [0.3], "constant_gradient_per_expert", 16) == [("expert", 0.3 * 16)]
    assert balance_coefficients(["expert"], None, "constant", 16) == [("expert", DEFAULT_BALANCE_COEFF)]
    assert balance_coefficients(None, None, None, 4) == []


def test_tracked_names() -> None:
    coefficients = [("expert", 0.1), ("sequence", 0.0), ("subkey", 0.2)]
    assert tracked_names(coefficients, metrics=False, product_key=True, ep_size=1) == [
        "expert_balance_loss", "subkey_balance_loss"]
    assert tracked_names([], metrics=True, product_key=True, ep_size=2) == [
        "max_violation", "load_entropy", "experts_used_fraction", "max_violation_ep_rank_max",
        "device_max_violation", "pk_rows_used", "pk_cols_used"]
    assert tracked_names([], metrics=True, product_key=False, ep_size=1) == [
        "max_violation", "load_entropy", "experts_used_fraction"]


def test_config_refuses_and_installs_the_step_hook() -> None:
    from megatron_moe_ext.balancing.bias_update import finalize_model_grads_with_balancing
    from megatron_moe_ext.testing.tiny import tiny_config

    with pytest.raises(ValueError, match="--moe-router-type product_key"):
        tiny_config(moe_balance_losses=["subkey"])
    with pytest.raises(ValueError, match="--expert-model-parallel-size >= 2"):
        tiny_config(moe_balance_losses=["device"])
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        tiny_config(moe_balance_losses=["expert"], moe_balance_coeffs=[-1.0])
    assert tiny_config(moe_balance_losses=["expert"]).finalize_model_grads_func is None
    for opts in (dict(moe_balance_losses=["global_expert"]), dict(moe_balance_metrics=True)):
        assert tiny_config(**opts).finalize_model_grads_func is finalize_model_grads_with_balancing


def test_router_class_follows_the_config() -> None:
    from megatron_moe_ext.layers.balanced_router import BalancedNoisyTopKRouter, BalancedTopKRouter
    from megatron_moe_ext.layers.noisy_gating import NoisyTopKRouter
    from megatron_moe_ext.layers.product_key_router import ProductKeyRouter
    from megatron_moe_ext.specs import router_class
    from megatron_moe_ext.testing.tiny import tiny_config

    assert router_class(tiny_config()) is None
    assert router_class(tiny_config(moe_balance_losses=["expert"])) is BalancedTopKRouter
    assert router_class(tiny_config(moe_balance_metrics=True)) is BalancedTopKRouter
    assert router_class(tiny_config(moe_balance_metrics=True, moe_router_noisy_gating=True)) is BalancedNoisyTopKRouter
    assert router_class(tiny_config(moe_router_noisy_gating=True)) is NoisyTopKRouter
    pk = tiny_config(num_moe_experts=16, moe_router_type="product_key", moe_balance_losses=["subkey"], moe_pk_key_dim=8)
    assert router_class(pk) is ProductKeyRouter


BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--disable-bias-linear", "--no-bias-gelu-fusion", "--no-rope-fusion"]


def test_flags_reach_the_config() -> None:
    from megatron_moe_ext.args import config_from_args, parse_megatron_args

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = parse_megatron_args(
            BASE + ["--num-experts", "8", "--expert-model-parallel-size", "2", "--moe-balance-losses", "global_expert",
                    "device", "--moe-balance-coeffs", "0.01", "0.02", "--moe-balance-coeff-policy", "constant_gradient",
                    "--moe-balance-metrics", "--moe-balance-usage-window", "7"],
            validate=False,
        )
        args.params_dtype = torch.float32
        config = config_from_args(args)
    assert config.moe_balance_losses == ["global_expert", "device"]
    assert config.moe_balance_coeffs == [0.01, 0.02]
    assert (config.moe_balance_coeff_policy, config.moe_balance_metrics, config.moe_balance_usage_window) == (
        "constant_gradient", True, 7)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--moe-balance-losses", "subkey"], "fix: --moe-router-type product_key"),
        (["--moe-balance-losses", "device"], "--moe-balance-losses device with --expert-model-parallel-size 1"),
        (["--moe-balance-losses", "expert", "--moe-balance-coeffs", "-0.5"], "-0.5 for the expert loss"),
        (["--moe-balance-losses", "expert", "sequence", "--moe-balance-coeffs", "0.1"], "one coefficient per loss"),
        (["--moe-balance-losses", "experts"], "invalid choice: 'experts'"),
    ],
)
def test_bad_flags_exit_with_usage_error(flags: list[str], needle: str, capsys) -> None:
    from megatron_moe_ext.args import parse_megatron_args

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as exit_info:
            parse_megatron_args(BASE + ["--num-experts", "8"] + flags, validate=False)
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_step_metrics_equal_pure_metrics() -> None:
    from megatron_moe_ext.balancing import metrics as M
    from megatron_moe_ext.balancing.step_metrics import step_load_metrics, usage_fraction

    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 50, (2 * 3 * 4,), generator=gen)
    counts[5] = 0
    got = step_load_metrics(counts, ep_size=4, grid=(2, 3, 4))
    usage = M.subkey_usage(counts.view(2, 3, 4).sum(-1), counts.view(2, 3, 4).sum(-2))
    expected = {
        "max_violation": M.max_violation(counts),
        "load_entropy": M.load_entropy(counts),
        "max_violation_ep_rank_max": float(M.max_violation_per_rank(counts, 4).max()),
        "device_max_violation": M.device_max_violation(counts, 4),
        "pk_rows_used": usage.row_fraction_used,
        "pk_cols_used": usage.col_fraction_used,
    }
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dim() == 0 and float(got[name]) == pytest.approx(value, rel=1e-6), name
    window = M.UsageWindow(24, 3)
    for step in (1, 2, 5):
        window.update(counts.roll(step) * (torch.arange(24) % step == 0), step)
        assert float(usage_fraction(window, step)) == pytest.approx(window.fraction_used(step))
    # No load at all: 0 rather than NaN (one idle layer must not turn the layer mean into NaN).
    assert all(float(v) == 0 for k, v in step_load_metrics(torch.zeros(8), ep_size=2).items() if k != "load_entropy")


def test_step_metrics_are_cheap_at_a_million_experts() -> None:
    from megatron_moe_ext.balancing.step_metrics import step_load_metrics

    counts = torch.randint(0, 3, (1 << 20,))
    step_load_metrics(counts, ep_size=64, grid=(1, 1024, 1024))  # warm-up
    start = time.perf_counter()
    got = step_load_metrics(counts, ep_size=64, grid=(1, 1024, 1024))
    elapsed = time.perf_counter() - start
    print(f"step metrics at N=2^20: {elapsed * 1e3:.1f} ms")
    assert got["pk_rows_used"] == 1.0 and elapsed < 1.0


def test_step_metrics_keep_precision_at_a_million_experts() -> None:
    """Integer counts take c*log(c) in fp32 (summed in fp64): checked against the fp64 pure metrics on
    sparse, heavy (counts beyond fp32's 24 bits) and concentrated loads at N = 2^20."""
    from megatron_moe_ext.balancing import metrics as M
    from megatron_moe_ext.balancing.step_metrics import step_load_metrics

    gen = torch.Generator().manual_seed(3)
    sparse = torch.bincount(torch.randint(0, 1 << 20, (262144,), generator=gen), minlength=1 << 20)
    heavy = torch.randint(10**7, 3 * 10**7, (1 << 20,), generator=gen)
    concentrated = torch.zeros(1 << 20, dtype=torch.long)
    concentrated[:3] = torch.tensor([10**9, 7, 1])
    for counts in (sparse, heavy, concentrated):
        got = step_load_metrics(counts)
        assert float(got["load_entropy"]) == pytest.approx(M.load_entropy(counts), rel=1e-5, abs=1e-7)
        assert float(got["max_violation"]) == pytest.approx(M.max_violation(counts), rel=1e-6)
