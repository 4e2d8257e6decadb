"""Expert backend and what our experts (``FineGrainedExperts``) can honour: ``ExpertSettings``.

Pure Python (no torch), so the launcher refuses a setting our experts cannot honour before any rank
starts, and the config and the layer apply the same rules. Every refusal is a ValueError naming the
values and the fix.

Our experts (every backend but 'megatron') compute, per expert e and routed row t,
``out[t] = W2_e (act(W1_e x[t] + b1_e) * p[t]) + b2_e * p[t]``: Megatron's SequentialMLP with
``add_bias_linear`` (megatron/core/transformer/mlp.py, ``MLP.forward`` with ``per_token_scale``), GLU
clamp and linear offset included. Every backend takes the expert biases (``kernels/expert_mlp.py``;
'te' adds them around TE's grouped GEMMs as torch ops), so biases are never refused. What is
refused, with the reason, is in ``expert_settings``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from megatron_moe_ext.settings.granularity import FP8_ALIGNMENT, _divisors, _nearest

EXPERT_BACKENDS = ("grouped", "segmented", "padded", "loop", "eager", "megatron", "te")
DEFAULT_EXPERT_BACKEND = "grouped"
# FP8 recipes the 'te' backend quantizes (kernels/te_grouped.py fp8_plan; 'delayed' runs with
# current per-tensor scaling there); Megatron's Fp8Recipe values.
TE_FP8_RECIPES = ("delayed", "tensorwise", "mxfp8")
# --moe-fp8-format / --moe-fp8-recipe: FP8 experts through torch's scaled matmul on our non-'te'
# backends (kernels/fp8_experts.py). Formats as Megatron's --fp8-format (e4m3 everywhere; hybrid =
# e4m3 forward, e5m2 gradients); recipes with current scaling: 'tensorwise' (Megatron's
# Fp8Recipe.tensorwise, one scale per tensor) and 'rowwise' (per row of a GEMM's left operand, per
# column of its right one; torchao's meaning).
MOE_FP8_FORMATS = ("e4m3", "hybrid")
MOE_FP8_RECIPES = ("tensorwise", "rowwise")
DEFAULT_MOE_FP8_RECIPE = "tensorwise"
# FP8 GEMMs (CUDA's torch._scaled_mm / _scaled_grouped_mm, cuBLASLt) need every dimension a multiple of 16.
FP8_GEMM_ALIGNMENT = FP8_ALIGNMENT["default"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertSettings:
    """The experts of the MoE layers: ``backend`` (``MoEExtConfig.moe_expert_backend``) and whether
    they carry biases (``add_bias_linear``: fc1 [E, F1] and fc2 [E, H] per layer)."""

    backend: str
    bias: bool
    fp8_format: str | None = None
    """--moe-fp8-format: None = the experts compute in the parameter dtype."""
    fp8_recipe: str | None = None
    """--moe-fp8-recipe when ``fp8_format`` is set (None when FP8 is off)."""

    @property
    def ours(self) -> bool:
        """FineGrainedExperts fills the experts slot (every backend but Megatron's own experts)."""
        return self.backend != "megatron"

    @property
    def fp8(self) -> bool:
        """Our experts compute their GEMMs in FP8 (``kernels/fp8_experts.expert_mlp_fp8``)."""
        return self.fp8_format is not None


def _name(value: Any) -> str:
    """An enum's value (Megatron's ``Fp8Recipe`` is a str enum), else the value as text."""
    return str(getattr(value, "value", value))


def expert_settings(get: Callable[[str], Any]) -> ExpertSettings:
    """The expert settings, checked, reading by TransformerConfig/MoEExtConfig field name through
    ``get(name)`` (the config itself, or Megatron's parsed args through a name map: ``num_moe_experts``
    is ``args.num_experts``).

    Refused with our experts (MoE layers present, backend not 'megatron'), each with its fix:

    * expert tensor parallel size > 1 (None = unset: the flag path then defaults it to 1): the stacked
      expert weights are not split over TP;
    * ``moe_latent_size``: Megatron's experts then work in the latent dimension, ours in the hidden one;
    * ``moe_mlp_glu_interleave_size``: a TEGroupedMLP layout of fc1's gate/up rows; ours keeps
      SequentialMLP's [gate; up] (checkpoints move between them);
    * ``use_te_activation_func``: TE's activation modules (TE's GELU is tanh-approximated); ours applies
      ``activation_func`` in torch;
    * Megatron's FP8 (``--fp8-format``, Transformer Engine, whole model) with a backend other than 'te'
      (those compute in the parameter dtype, or in FP8 through ``--moe-fp8-format``), an FP8 recipe the
      'te' backend does not quantize, and FP4 (no backend quantizes it);
    * ``--moe-fp8-format`` with the 'te' backend (TE's own FP8: ``--fp8-format``) or 'megatron' (Megatron's
      experts: ``--fp8-format`` with Transformer Engine), and with expert GEMM dimensions FP8 GEMMs cannot
      take (``_check_fp8_alignment``).
    """
    backend = get("moe_expert_backend")
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"--moe-expert-backend {backend!r} is unknown; choose from {', '.join(EXPERT_BACKENDS)}")
    fp8_format = get("moe_fp8_format")
    fp8_recipe = None
    if fp8_format is not None:
        fp8_recipe = _check_moe_fp8(get, backend, fp8_format)
    settings = ExpertSettings(backend=backend, bias=bool(get("add_bias_linear")), fp8_format=fp8_format,
                              fp8_recipe=fp8_recipe)
    if not settings.ours or not get("num_moe_experts"):
        return settings
    with_ours = f"with --moe-expert-backend {backend} (our FineGrainedExperts)"
    megatron = "or --moe-expert-backend megatron (Megatron's own experts)"
    etp = get("expert_tensor_parallel_size")
    if etp is not None and etp != 1:
        raise ValueError(
            f"--expert-tensor-parallel-size {etp} {with_ours}: fine-grained experts are too small to split over "
            f"tensor parallelism, their stacked weights are not sharded; fix: --expert-tensor-parallel-size 1 (the "
            f"default with our experts), {megatron}"
        )
    latent = get("moe_latent_size")
    if latent:
        raise ValueError(
            f"--moe-latent-size {latent} {with_ours}: our experts map the hidden size, not a latent one; fix: drop "
            f"--moe-latent-size, {megatron}"
        )
    interleave = get("moe_mlp_glu_interleave_size")
    if interleave:
        raise ValueError(
            f"--moe-mlp-glu-interleave-size {interleave} {with_ours}: our experts store fc1 as SequentialMLP does "
            f"([gate; up], not interleaved); fix: drop --moe-mlp-glu-interleave-size, {megatron}"
        )
    if get("use_te_activation_func"):
        raise ValueError(
            f"--use-te-activation-func {with_ours}: our experts apply the config's activation function in torch, "
            f"not Transformer Engine's activation modules; fix: drop --use-te-activation-func, {megatron}"
        )
    fp8, fp4 = get("fp8"), get("fp4")
    if fp4:
        raise ValueError(
            f"--fp4-format {_name(fp4)} {with_ours}: no backend of ours quantizes to FP4; fix: drop --fp4-format, "
            f"{megatron}"
        )
    if fp8 and backend != "te":
        raise ValueError(
            f"--fp8-format {_name(fp8)} {with_ours}: this backend computes the experts in the parameter dtype, "
            f"not Transformer Engine's FP8; fix: --moe-expert-backend te (TE's FP8 grouped GEMMs on our weights), "
            f"or --moe-fp8-format {_name(fp8)} instead of --fp8-format (FP8 experts through torch's scaled matmul, "
            f"no TE needed; the rest of the model in the parameter dtype), {megatron}"
        )
    recipe = _name(get("fp8_recipe"))
    if fp8 and recipe not in TE_FP8_RECIPES:
        raise ValueError(
            f"--fp8-recipe {recipe} with --moe-expert-backend te: it quantizes the recipes "
            f"{', '.join(TE_FP8_RECIPES)}; fix: --fp8-recipe tensorwise (or {', '.join(TE_FP8_RECIPES[::2])}), "
            f"{megatron}"
        )
    return settings


def _check_moe_fp8(get: Callable[[str], Any], backend: str, fp8_format: str) -> str:
    """``--moe-fp8-format``'s checks (see ``expert_settings``); returns the recipe."""
    if fp8_format not in MOE_FP8_FORMATS:
        raise ValueError(f"--moe-fp8-format {fp8_format!r} is unknown; choose from {', '.join(MOE_FP8_FORMATS)}")
    recipe = get("moe_fp8_recipe")
    if recipe not in MOE_FP8_RECIPES:
        raise ValueError(f"--moe-fp8-recipe {recipe!r} is unknown; choose from {', '.join(MOE_FP8_RECIPES)}")
    if backend == "te":
        raise ValueError(
            f"--moe-fp8-format {fp8_format} with --moe-expert-backend te: the 'te' backend quantizes through "
            f"Transformer Engine's autocast; fix: --fp8-format {fp8_format} --fp8-recipe tensorwise instead of "
            f"--moe-fp8-format, or a backend of ours without TE (--moe-expert-backend {DEFAULT_EXPERT_BACKEND})"
        )
    if backend == "megatron":
        raise ValueError(
            f"--moe-fp8-format {fp8_format} with --moe-expert-backend megatron: it applies to our FineGrainedExperts "
            f"only; fix: --moe-expert-backend {DEFAULT_EXPERT_BACKEND} (our experts, FP8 through torch's scaled "
            f"matmul), or --fp8-format {fp8_format} with Transformer Engine for Megatron's own experts"
        )
    if get("num_moe_experts"):
        _check_fp8_alignment(get, fp8_format)
    return recipe


def _check_fp8_alignment(get: Callable[[str], Any], fp8_format: str) -> None:
    """Every GEMM dimension of an expert (hidden size H, expert FFN size F, and F1 = 2F for GLUs, aligned
    whenever F is) must be a multiple of FP8_GEMM_ALIGNMENT; refused naming the nearest valid setting:
    the nearest --moe-granularity whose expert size is aligned when a granularity derives the size, the
    nearest aligned --moe-ffn-hidden-size otherwise. (F unset: Megatron's default 4H, or a multiple of 64
    with SwiGLU, is aligned whenever H is.)"""
    align = FP8_GEMM_ALIGNMENT
    hidden = get("hidden_size")
    if hidden % align:
        nearest = max(align, _nearest([align * (hidden // align), align * (hidden // align + 1)], hidden))
        raise ValueError(
            f"--moe-fp8-format {fp8_format} with --hidden-size {hidden}: FP8 GEMMs need every expert dimension "
            f"to be a multiple of {align}; fix: --hidden-size {nearest} (nearest multiple of {align})"
        )
    ffn = get("moe_ffn_hidden_size") or get("ffn_hidden_size")
    if ffn is None or ffn % align == 0:
        return
    granularity, dense = get("moe_granularity"), get("ffn_hidden_size")
    if granularity:
        valid = [g for g in _divisors(dense) if (dense // g) % align == 0]
        fix = (f"--moe-granularity {_nearest(valid, granularity)} (nearest G whose expert size "
               f"{dense}/G is a multiple of {align})" if valid else
               f"an --ffn-hidden-size that is a multiple of {align} (no G works for {dense})")
        raise ValueError(
            f"--moe-fp8-format {fp8_format} with --moe-granularity {granularity}: the expert size "
            f"--ffn-hidden-size / G = {dense}/{granularity} = {ffn} is not a multiple of {align}, which FP8 GEMMs "
            f"need; fix: {fix}"
        )
    nearest = max(align, _nearest([align * (ffn // align), align * (ffn // align + 1)], ffn))
    raise ValueError(
        f"--moe-fp8-format {fp8_format} with expert FFN size {ffn}: FP8 GEMMs need it (and fc1's {2 * ffn} rows "
        f"with GLUs) to be a multiple of {align}; fix: --moe-ffn-hidden-size {nearest} (nearest multiple of {align})"
    )
