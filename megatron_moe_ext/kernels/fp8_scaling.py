"""FP8 current scaling: amax -> scale -> saturating cast, per tensor or per row (pure functions).

Current scaling (no history across steps): the scale of a tensor is computed from the tensor
itself just before it is cast, ``scale = fp8_max / amax`` with ``amax = max |t|`` taken over the
whole tensor ('tensorwise', Megatron's ``Fp8Recipe.tensorwise``, Transformer Engine's
``Float8CurrentScaling``) or over each slice along the GEMM's contraction dimension ('rowwise':
per row of a GEMM's left operand, per column of its right one; torchao's ``Float8LinearRecipeName
.ROWWISE``). The scaled tensor is clamped to +-fp8_max (saturation) and rounded to nearest even by
the cast; ``torch._scaled_mm`` takes the inverse scales (dequantization factors) of both operands.
Micikevicius et al. 2022, "FP8 Formats for Deep Learning" (arXiv 2209.05433), sections 3-4:
e4m3 (max 448, 3 mantissa bits) for weights and activations, e5m2 (max 57344, 2 mantissa bits)
for gradients in the "hybrid" format.

An all-zero slice (amax 0) gets scale 1: its quantized values are exact zeros whatever the scale.
A scale that would overflow float32 (amax below fp8_max / float32 max) is clamped to float32 max.

Legend: M rows, K contraction dimension, N columns of a GEMM ``[M, K] @ [K, N]``.
"""

from __future__ import annotations

import torch

from megatron_moe_ext.settings.experts import MOE_FP8_RECIPES as RECIPES

# Our --moe-fp8-format element formats -> torch dtypes.
FP8_DTYPES: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an FP8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def amax(t: torch.Tensor, *, recipe: str, dim: int) -> torch.Tensor:
    """max |t| in float32: a 0-d tensor ('tensorwise'), or per slice along ``dim`` with ``dim`` kept
    ('rowwise': dim=-1 of an [M, K] left operand gives [M, 1], dim=0 of a [K, N] right one [1, N])."""
    if recipe == "tensorwise":
        return t.detach().abs().amax().float() if t.numel() else t.new_zeros((), dtype=torch.float32)
    if recipe == "rowwise":
        return t.detach().abs().amax(dim=dim, keepdim=True).float()
    raise ValueError(f"FP8 recipe {recipe!r} is unknown; choose from {', '.join(RECIPES)}")


def scale_from_amax(amax_: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``fp8_max / amax`` (float32, same shape): 1 where amax is 0, clamped to float32's max."""
    top = fp8_max(dtype)
    # A tensor by tensor division: correctly rounded (a Python scalar over a tensor may be computed as
    # a product with the reciprocal, one float32 ulp off).
    top_ = torch.full_like(amax_, top, dtype=torch.float32)
    scale = torch.where(amax_ > 0, top_ / amax_.clamp(min=torch.finfo(torch.float32).tiny), 1.0)
    return scale.clamp(max=torch.finfo(torch.float32).max)


def quantize(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``saturate(t * scale)`` cast to ``dtype`` (round to nearest even), the product in float32."""
    top = fp8_max(dtype)
    return (t.float() * scale).clamp(-top, top).to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q / scale``: what the scaled GEMM multiplies."""
    return q.float() / scale


def quantize_operand(
    t: torch.Tensor, *, dtype: torch.dtype, recipe: str, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A GEMM operand cast with current scaling along its contraction dimension ``dim`` (-1 for the
    left [M, K] operand, 0 for the right [K, N] one): (fp8 tensor, inverse scale for ``_scaled_mm``)."""
    scale = scale_from_amax(amax(t, recipe=recipe, dim=dim), dtype)
    return quantize(t, scale, dtype), scale.reciprocal()
