"""``kernels/fp8_scaling.py``: known answers of the current-scaling bookkeeping (amax, scale = fp8_max / amax,
saturation, zero tensors, rowwise shapes) and the quantize/dequantize error bound of each format.

Legend: M rows, K contraction dimension, N columns of a GEMM operand.
"""

from __future__ import annotations

import pytest
import torch

from megatron_moe_ext.kernels.fp8_scaling import (
    FP8_DTYPES,
    amax,
    dequantize,
    fp8_max,
    quantize,
    quantize_operand,
    scale_from_amax,
)

E4M3, E5M2 = FP8_DTYPES["e4m3"], FP8_DTYPES["e5m2"]
# Unit roundoff 2^-p (p significant bits: 3 or 2 mantissa bits + the implicit one) and half the spacing of
# the subnormals (smallest subnormal 2^-9 for e4m3fn, 2^-16 for e5m2), in units of the scaled values.
UNIT_ROUNDOFF = {E4M3: 2.0**-4, E5M2: 2.0**-3}
HALF_SUBNORMAL_STEP = {E4M3: 2.0**-10, E5M2: 2.0**-17}


def test_fp8_max_of_the_formats() -> None:
    assert fp8_max(E4M3) == 448.0 and fp8_max(E5M2) == 57344.0


def test_amax_tensorwise_and_rowwise() -> None:
    t_MK = torch.tensor([[1.0, -3.0, 0.5], [2.0, 0.25, -0.125]])
    assert amax(t_MK, recipe="tensorwise", dim=-1).item() == 3.0
    assert amax(t_MK, recipe="tensorwise", dim=-1).shape == ()
    assert amax(t_MK, recipe="rowwise", dim=-1).tolist() == [[3.0], [2.0]]  # left operand: per row
    assert amax(t_MK, recipe="rowwise", dim=0).tolist() == [[2.0, 3.0, 0.5]]  # right operand: per column
    assert amax(t_MK.to(torch.bfloat16), recipe="tensorwise", dim=-1).dtype == torch.float32
    assert amax(t_MK[:0], recipe="tensorwise", dim=-1).item() == 0.0  # an expert without rows
    with pytest.raises(ValueError, match="recipe 'blockwise' is unknown; choose from tensorwise, rowwise"):
        amax(t_MK, recipe="blockwise", dim=-1)


def test_scale_is_fp8_max_over_amax_and_one_for_zeros() -> None:
    amax_ = torch.tensor([[3.0], [0.0], [448.0]])
    f32_448_over_3 = torch.tensor(448.0 / 3.0, dtype=torch.float32).item()  # 448/3 rounded to float32
    assert scale_from_amax(amax_, E4M3).tolist() == [[f32_448_over_3], [1.0], [1.0]]
    assert scale_from_amax(torch.tensor(2.0), E5M2).item() == 57344.0 / 2.0
    # A subnormal amax would overflow float32: the scale is clamped to float32's max, stays finite.
    tiny = scale_from_amax(torch.tensor(1e-45), E4M3)
    assert torch.isfinite(tiny) and tiny.item() == torch.finfo(torch.float32).max


def test_zero_tensor_quantizes_to_zeros() -> None:
    zeros_MK = torch.zeros(4, 8)
    q, inv = quantize_operand(zeros_MK, dtype=E4M3, recipe="tensorwise", dim=-1)
    assert inv.item() == 1.0 and q.float().abs().sum().item() == 0.0
    q, inv = quantize_operand(zeros_MK, dtype=E5M2, recipe="rowwise", dim=-1)
    assert inv.tolist() == [[1.0]] * 4 and q.float().abs().sum().item() == 0.0


def test_amax_maps_to_fp8_max_and_saturation_clamps() -> None:
    t = torch.tensor([3.0, -1.5, 0.0])
    q, inv = quantize_operand(t.view(1, 3), dtype=E4M3, recipe="tensorwise", dim=-1)
    assert q.float().tolist() == [[448.0, -224.0, 0.0]]
    assert dequantize(q, 1 / inv)[0].tolist() == pytest.approx([3.0, -1.5, 0.0], rel=2**-22)
    # Values beyond the range saturate to +-fp8_max instead of becoming inf/NaN.
    big = torch.tensor([1000.0, -1e6])
    assert quantize(big, torch.tensor(1.0), E4M3).float().tolist() == [448.0, -448.0]
    assert quantize(torch.tensor([1e6]), torch.tensor(1.0), E5M2).float().tolist() == [57344.0]


def test_cast_rounds_to_nearest_even() -> None:
    # e4m3 between 1 and 2 has spacing 1/8: ties go to the even mantissa.
    t = torch.tensor([1.0625, 1.1875, 1.2, 1.3125])
    assert quantize(t, torch.tensor(1.0), E4M3).float().tolist() == [1.0, 1.25, 1.25, 1.25]
    # e5m2 between 1 and 2 has spacing 1/4.
    assert quantize(torch.tensor([1.125, 1.375, 1.3]), torch.tensor(1.0), E5M2).float().tolist() == [1.0, 1.5, 1.25]


def test_rowwise_operand_scale_shapes() -> None:
    a_MK, b_KN = torch.randn(5, 16), torch.randn(16, 7)
    qa, inv_a = quantize_operand(a_MK, dtype=E4M3, recipe="rowwise", dim=-1)
    qb, inv_b = quantize_operand(b_KN, dtype=E5M2, recipe="rowwise", dim=0)
    assert (qa.dtype, qa.shape, inv_a.shape) == (E4M3, (5, 16), (5, 1))
    assert (qb.dtype, qb.shape, inv_b.shape) == (E5M2, (16, 7), (1, 7))
    # Each row's (column's) largest magnitude maps to fp8_max exactly.
    assert qa.float().abs().amax(dim=1).tolist() == [448.0] * 5
    assert qb.float().abs().amax(dim=0).tolist() == [57344.0] * 7
    _, inv_t = quantize_operand(a_MK, dtype=E4M3, recipe="tensorwise", dim=-1)
    assert inv_t.shape == ()


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_quantize_dequantize_error_bound(dtype: torch.dtype, recipe: str) -> None:
    """|dequant(quant(t)) - t| <= u |t| + eta elementwise: u the unit roundoff of the normal range, eta =
    half the subnormal spacing divided by the scale (the absolute error below the normal range), plus
    3 float32 roundings (t * scale, the scale, its inverse) relative to |t|."""
    torch.manual_seed(0)
    t_MK = torch.randn(64, 256) * torch.logspace(-6, 2, 64).unsqueeze(1)  # rows over 8 decades
    q, inv = quantize_operand(t_MK, dtype=dtype, recipe=recipe, dim=-1)
    err = (q.float() * inv - t_MK).abs()
    u = UNIT_ROUNDOFF[dtype] + 3 * 2.0**-24
    bound = u * t_MK.abs() + HALF_SUBNORMAL_STEP[dtype] * inv
    assert (err <= bound).all(), (err - bound).max()
    # Nearly reached: the worst normal-range case, a tie just above 1 + u, errs u / (1 + u) of |t|, i.e.
    # 1 / (1 + u) = 0.89 (e5m2) or 0.94 (e4m3) of the bound.
    assert (err / bound).max() > 0.85
