"""``--moe-fp8-format`` / ``--moe-fp8-recipe`` in ``settings.experts.expert_settings``: what they set, and what
is refused with the values and the fix (pure functions over a dict getter; the launcher's exit 2 is in
tests/e2e/test_fp8_rowwise_train.py)."""

from __future__ import annotations

import pytest

from megatron_moe_ext.settings.experts import (
    DEFAULT_EXPERT_BACKEND,
    DEFAULT_MOE_FP8_RECIPE,
    MOE_FP8_FORMATS,
    MOE_FP8_RECIPES,
    ExpertSettings,
    expert_settings,
)

# Megatron's defaults for the fields read, 8 experts of 256 on hidden 64, FP8 experts on.
DEFAULTS = {
    "moe_expert_backend": DEFAULT_EXPERT_BACKEND, "num_moe_experts": 8, "add_bias_linear": True,
    "expert_tensor_parallel_size": None, "moe_latent_size": None, "moe_mlp_glu_interleave_size": None,
    "use_te_activation_func": False, "fp8": None, "fp8_recipe": "delayed", "fp4": None,
    "moe_fp8_format": "hybrid", "moe_fp8_recipe": DEFAULT_MOE_FP8_RECIPE, "hidden_size": 64,
    "ffn_hidden_size": 256, "moe_ffn_hidden_size": 256, "moe_granularity": None,
}


def settings(**overrides) -> ExpertSettings:
    values = {**DEFAULTS, **overrides}
    return expert_settings(lambda name: values[name])


def test_choices_and_default() -> None:
    assert MOE_FP8_FORMATS == ("e4m3", "hybrid") and MOE_FP8_RECIPES == ("tensorwise", "rowwise")
    assert DEFAULT_MOE_FP8_RECIPE == "tensorwise"


@pytest.mark.parametrize("fp8_format", MOE_FP8_FORMATS)
@pytest.mark.parametrize("recipe", MOE_FP8_RECIPES)
def test_fp8_settings_are_kept(fp8_format: str, recipe: str) -> None:
    s = settings(moe_fp8_format=fp8_format, moe_fp8_recipe=recipe)
    assert s == ExpertSettings(backend="grouped", bias=True, fp8_format=fp8_format, fp8_recipe=recipe) and s.fp8


def test_off_means_no_recipe() -> None:
    s = settings(moe_fp8_format=None, moe_fp8_recipe="rowwise", hidden_size=70)  # nothing FP8 is checked
    assert s == ExpertSettings(backend="grouped", bias=True) and not s.fp8 and s.fp8_recipe is None


REFUSED = {
    "te": (dict(moe_expert_backend="te"), "--moe-fp8-format hybrid with --moe-expert-backend te",
           "fix: --fp8-format hybrid --fp8-recipe tensorwise instead of --moe-fp8-format"),
    "megatron": (dict(moe_expert_backend="megatron"), "--moe-fp8-format hybrid with --moe-expert-backend megatron",
                 "fix: --moe-expert-backend grouped"),
    "format": (dict(moe_fp8_format="e5m2"), "--moe-fp8-format 'e5m2' is unknown", "choose from e4m3, hybrid"),
    "recipe": (dict(moe_fp8_recipe="blockwise"), "--moe-fp8-recipe 'blockwise' is unknown",
               "choose from tensorwise, rowwise"),
    "hidden": (dict(hidden_size=72), "--moe-fp8-format hybrid with --hidden-size 72", "fix: --hidden-size 64"),
    "hidden_small": (dict(hidden_size=8), "with --hidden-size 8", "fix: --hidden-size 16"),
    "ffn": (dict(moe_ffn_hidden_size=40, ffn_hidden_size=None), "with expert FFN size 40",
            "fix: --moe-ffn-hidden-size 32"),
    "ffn_glu": (dict(moe_ffn_hidden_size=44), "expert FFN size 44: FP8 GEMMs need it (and fc1's 88 rows with GLUs)",
                "fix: --moe-ffn-hidden-size 48"),
    # G=32 of 256: experts of 8; the divisors of 256 with experts a multiple of 16 are 1..16: nearest 16.
    "granularity": (dict(moe_granularity=32, moe_ffn_hidden_size=8),
                    "--moe-granularity 32: the expert size --ffn-hidden-size / G = 256/32 = 8",
                    "fix: --moe-granularity 16 (nearest G whose expert size 256/G is a multiple of 16)"),
    "granularity_none": (dict(moe_granularity=3, ffn_hidden_size=24, moe_ffn_hidden_size=8), "24/3 = 8",
                         "fix: an --ffn-hidden-size that is a multiple of 16 (no G works for 24)"),
    "megatron_fp8": (dict(fp8="e4m3", moe_fp8_format=None), "--fp8-format e4m3 with --moe-expert-backend grouped",
                     "or --moe-fp8-format e4m3 instead of --fp8-format"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_name_the_values_and_the_fix(case: str) -> None:
    overrides, values, fix = REFUSED[case]
    with pytest.raises(ValueError) as err:
        settings(**overrides)
    assert values in str(err.value) and fix in str(err.value), str(err.value)


def test_aligned_sizes_pass() -> None:
    assert settings(hidden_size=48, moe_ffn_hidden_size=16).fp8
    assert settings(moe_granularity=16, moe_ffn_hidden_size=16).fp8
    assert settings(moe_ffn_hidden_size=None, ffn_hidden_size=None).fp8  # Megatron's default 4H: aligned with H
    assert settings(num_moe_experts=None, hidden_size=70).fp8  # no MoE layer: no expert GEMM to align


def test_config_carries_the_fp8_settings() -> None:
    from megatron_moe_ext.testing.tiny import tiny_config

    ours = {"moe_expert_backend": "grouped"}  # tiny_config's default is Megatron's experts
    config = tiny_config(**ours, moe_fp8_format="e4m3", moe_fp8_recipe="rowwise")
    assert (config.ext.experts.fp8_format, config.ext.experts.fp8_recipe) == ("e4m3", "rowwise")
    assert not tiny_config(**ours).ext.experts.fp8
    with pytest.raises(ValueError, match="--moe-fp8-format 'e5m2' is unknown; choose from e4m3, hybrid"):
        tiny_config(**ours, moe_fp8_format="e5m2")
