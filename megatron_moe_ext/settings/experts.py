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

EXPERT_BACKENDS = ("grouped", "segmented", "padded", "loop", "eager", "megatron", "te")
DEFAULT_EXPERT_BACKEND = "grouped"
# FP8 recipes the 'te' backend quantizes (kernels/te_grouped.py fp8_plan; 'delayed' runs with
# current per-tensor scaling there); Megatron's Fp8Recipe values.
TE_FP8_RECIPES = ("delayed", "tensorwise", "mxfp8")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertSettings:
    """The experts of the MoE layers: ``backend`` (``MoEExtConfig.moe_expert_backend``) and whether
    they carry biases (``add_bias_linear``: fc1 [E, F1] and fc2 [E, H] per layer)."""

    backend: str
    bias: bool

    @property
    def ours(self) -> bool:
        """FineGrainedExperts fills the experts slot (every backend but Megatron's own experts)."""
        return self.backend != "megatron"


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
    * FP8 with a backend other than 'te' (those compute in the parameter dtype), an FP8 recipe the 'te'
      backend does not quantize, and FP4 (no backend quantizes it).
    """
    backend = get("moe_expert_backend")
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"--moe-expert-backend {backend!r} is unknown; choose from {', '.join(EXPERT_BACKENDS)}")
    settings = ExpertSettings(backend=backend, bias=bool(get("add_bias_linear")))
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
            f"not FP8; fix: --moe-expert-backend te (TE's FP8 grouped GEMMs on our weights), {megatron}"
        )
    recipe = _name(get("fp8_recipe"))
    if fp8 and recipe not in TE_FP8_RECIPES:
        raise ValueError(
            f"--fp8-recipe {recipe} with --moe-expert-backend te: it quantizes the recipes "
            f"{', '.join(TE_FP8_RECIPES)}; fix: --fp8-recipe tensorwise (or {', '.join(TE_FP8_RECIPES[::2])}), "
            f"{megatron}"
        )
    return settings
