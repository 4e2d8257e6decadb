"""``settings.experts.expert_settings``: the expert backend, biases, and what our experts refuse.

Pure-function tests over a dict getter (the config and the flag path pass their own getters; the
flag path's refusals before any rank starts are in tests/e2e/test_expert_refusals.py)."""

from __future__ import annotations

import re

import pytest

from megatron_moe_ext.settings.experts import (
    DEFAULT_EXPERT_BACKEND,
    EXPERT_BACKENDS,
    ExpertSettings,
    expert_settings,
)

# Megatron's defaults for the fields read (TransformerConfig), with 8 experts and our default backend.
DEFAULTS = {
    "moe_expert_backend": DEFAULT_EXPERT_BACKEND,
    "num_moe_experts": 8,
    "add_bias_linear": True,
    "expert_tensor_parallel_size": None,
    "moe_latent_size": None,
    "moe_mlp_glu_interleave_size": None,
    "use_te_activation_func": False,
    "fp8": None,
    "fp8_recipe": "delayed",
    "fp4": None,
    "moe_fp8_format": None,
}


def settings(**overrides) -> ExpertSettings:
    values = {**DEFAULTS, **overrides}
    return expert_settings(lambda name: values[name])


def test_the_backend_names_and_default() -> None:
    assert EXPERT_BACKENDS == ("grouped", "segmented", "padded", "loop", "eager", "megatron", "te")
    assert DEFAULT_EXPERT_BACKEND == "grouped"


def test_config_reexports_the_backends() -> None:
    import dataclasses

    from megatron_moe_ext import config

    assert config.EXPERT_BACKENDS is EXPERT_BACKENDS
    field = next(f for f in dataclasses.fields(config.MoEExtConfig) if f.name == "moe_expert_backend")
    assert field.default == DEFAULT_EXPERT_BACKEND


@pytest.mark.parametrize("backend", EXPERT_BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
def test_every_backend_takes_biases(backend: str, bias: bool) -> None:
    s = settings(moe_expert_backend=backend, add_bias_linear=bias)
    assert s == ExpertSettings(backend=backend, bias=bias)
    assert s.ours == (backend != "megatron")


def test_unknown_backend_names_the_choices() -> None:
    message = "--moe-expert-backend 'fast' is unknown; choose from grouped, segmented"
    with pytest.raises(ValueError, match=re.escape(message)):
        settings(moe_expert_backend="fast")


REFUSALS = {
    "etp": ({"expert_tensor_parallel_size": 2}, "--expert-tensor-parallel-size 2 with --moe-expert-backend grouped",
            "fix: --expert-tensor-parallel-size 1"),
    "latent": ({"moe_latent_size": 16}, "--moe-latent-size 16", "fix: drop --moe-latent-size"),
    "glu_interleave": ({"moe_mlp_glu_interleave_size": 8}, "--moe-mlp-glu-interleave-size 8",
                       "fix: drop --moe-mlp-glu-interleave-size"),
    "te_activation": ({"use_te_activation_func": True}, "--use-te-activation-func",
                      "fix: drop --use-te-activation-func"),
    "fp8_not_te": ({"fp8": "e4m3"}, "--fp8-format e4m3 with --moe-expert-backend grouped",
                   "fix: --moe-expert-backend te"),
    "fp8_recipe_te": ({"fp8": "hybrid", "fp8_recipe": "blockwise", "moe_expert_backend": "te"},
                      "--fp8-recipe blockwise with --moe-expert-backend te", "fix: --fp8-recipe tensorwise"),
    "fp4": ({"fp4": "e2m1", "moe_expert_backend": "te"}, "--fp4-format e2m1", "fix: drop --fp4-format"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_values_and_the_fix(case: str) -> None:
    overrides, values, fix = REFUSALS[case]
    with pytest.raises(ValueError) as err:
        settings(**overrides)
    assert values in str(err.value) and fix in str(err.value), str(err.value)
    assert "--moe-expert-backend megatron" in str(err.value)  # Megatron's own experts always work
    # Megatron's own experts: nothing of ours to refuse.
    assert settings(**{**overrides, "moe_expert_backend": "megatron"}).backend == "megatron"


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_nothing_is_refused_without_moe_layers(case: str) -> None:
    overrides, _, _ = REFUSALS[case]
    settings(**{**overrides, "num_moe_experts": None})


def test_accepted_values() -> None:
    settings(expert_tensor_parallel_size=1)  # explicit 1
    settings(expert_tensor_parallel_size=None)  # unset: the flag path makes it 1
    for recipe in ("delayed", "tensorwise", "mxfp8"):
        assert settings(fp8="hybrid", fp8_recipe=recipe, moe_expert_backend="te").backend == "te"


def test_fp8_recipe_enum_reads_as_its_value() -> None:
    enums = pytest.importorskip("megatron.core.enums")
    with pytest.raises(ValueError, match="--fp8-recipe blockwise with"):
        settings(fp8="e4m3", fp8_recipe=enums.Fp8Recipe.blockwise, moe_expert_backend="te")
    settings(fp8="e4m3", fp8_recipe=enums.Fp8Recipe.tensorwise, moe_expert_backend="te")


def test_settings_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, megatron_moe_ext.settings.experts; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_config_and_layer_settings_carry_the_experts() -> None:
    from megatron_moe_ext.testing.tiny import tiny_config

    config = tiny_config(add_bias_linear=True, moe_expert_backend="segmented")
    assert config.ext.experts == ExpertSettings(backend="segmented", bias=True)
    with pytest.raises(ValueError, match="--moe-latent-size 8 with --moe-expert-backend segmented"):
        tiny_config(moe_latent_size=8, moe_expert_backend="segmented")
