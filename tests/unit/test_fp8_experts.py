"""``kernels/fp8_experts.expert_mlp_fp8`` against the float32 reference ``expert_mlp_eager``: forward and every
gradient (dX, dW1, dW2, db1, db2, dprobs), both recipes and formats, with and without biases and GLU (SwiGLU),
an expert without rows included, within an error bound derived below from the FP8 formats' rounding.

Error bound (written before running; no constant here was adjusted to make a test pass).

One quantized operand. ``quantize_operand`` casts X' (the operand as computed, X' = X + dX with |dX| <= e_X
elementwise, e_X the error carried from earlier steps) to FP8 with scale s = fp8_max / amax(X') of its
tensor or row/column. Round to nearest in the normal range errs at most u |.| with the unit roundoff
u = 2^-p (p significant bits: u = 2^-4 for e4m3, 2^-3 for e5m2); below it (subnormals) at most half the
smallest spacing, nu = 2^-10 (e4m3) or 2^-17 (e5m2), in scaled units, i.e. eta = nu / s = nu amax / fp8_max
after dequantization. float32 adds 3 roundings (X' s, s, 1/s): u_q = u + 3 * 2^-24. So

    |Q(X') - X| <= D_X := e_X + u_q (|X| + e_X) + eta,   eta <= nu amax(|X| + e_X) / fp8_max.

One GEMM C = A B over K (A [M, K], B [K, N']). Per product |Q(A')Q(B') - AB| <= D_A |B| + |A| D_B + D_A D_B
(= ((1 + u_a)(1 + u_b) - 1) |A||B| without carried errors or subnormals, the brief's gamma), summed over k,
plus the float32 accumulation of the FP8 GEMM and of the reference, each <= gamma_K (|A| + D_A)(|B| + D_B)
with gamma_K = K 2^-24 / (1 - K 2^-24):

    |C_fp8 - C| <= D_A @ |B| + |A| @ D_B + D_A @ D_B + 2 gamma_K (|A| + D_A) @ (|B| + D_B).

Chaining (forward): h = x W1^T + b1 carries e_h = the fc1 bound; the activation with |act'| <= L1 (sup over
the reals, computed below from the function) gives |act(h') - act(h)| <= L1 e_h; for SwiGLU act = silu(g) v,
|silu(g')v' - silu(g)v| <= L1 e_g (|v| + e_v) + |silu(g)| e_v; s = act * p carries e_s = p e_act; fc2 is one
GEMM with e_A = e_s; the output is compared with out.

Backward, with the reference's exact upstream gradient G: dS = G W2 (no carried error), dW2 = G^T S
(carried e_s), db2 = sum_rows G p (float32 only); dA = dS p carries e_dA = p e_dS; dp = sum_f dS act + sum_h G b2
carries sum_f (e_dS (|act| + e_act) + |dS| e_act); dH = act'(h) dA: for a one-input activation
|act'(h') dA' - act'(h) dA| <= L2 e_h (|dA| + e_dA) + |act'(h)| e_dA (L2 = sup |act''|); for SwiGLU dG = silu'(g) v dA
and dV = silu(g) dA, each a product of factors with carried errors, bounded by
|x'y'z' - xyz| <= (|x| + e_x)(|y| + e_y)(|z| + e_z) - |x||y||z|. Then dX = dH W1 and dW1 = dH^T x are GEMMs
with the carried e_dH, db1 = sum_rows dH carries sum_rows e_dH. Elementwise float32 steps add 2^-20 of the
reference magnitude (a few float32 roundings, also carried through the chain's float32 steps).

Legend: N rows grouped by expert, n one expert's rows, E experts, H hidden, F expert hidden, F1 = F or 2F.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from megatron_moe_ext.kernels.expert_mlp import expert_mlp_eager
from megatron_moe_ext.kernels.fp8_experts import expert_mlp_fp8
from megatron_moe_ext.kernels.fp8_scaling import FP8_DTYPES, fp8_max

E4M3, E5M2 = FP8_DTYPES["e4m3"], FP8_DTYPES["e5m2"]
UNIT_ROUNDOFF = {E4M3: 2.0**-4, E5M2: 2.0**-3}
HALF_SUBNORMAL_STEP = {E4M3: 2.0**-10, E5M2: 2.0**-17}
FLOAT32_SLACK = 2.0**-20  # a few float32 roundings of an elementwise step, relative to the magnitude
COUNTS = [5, 0, 7, 12]  # an expert without rows
H, F_ = 32, 16


def swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(h, 2, dim=-1)
    return F.silu(gate) * up


def _sup_derivatives(fn) -> tuple[float, float]:
    """sup |f'| and sup |f''| of a scalar function, from autograd on a fine float64 grid over [-30, 30]
    (both derivatives of GELU and SiLU are largest near 0 and vanish in the tails), plus 1% for the grid."""
    t = torch.linspace(-30, 30, 600001, dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(fn(t).sum(), t, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), t)
    return 1.01 * d1.abs().max().item(), 1.01 * d2.abs().max().item()


GELU_L1, GELU_L2 = _sup_derivatives(F.gelu)
SILU_L1, SILU_L2 = _sup_derivatives(F.silu)


def _operand_error(x: torch.Tensor, e_x: torch.Tensor, dtype: torch.dtype, recipe: str, dim: int) -> torch.Tensor:
    """D_X: bound on |Q(X') - X| (module docstring), the amax per tensor or along the contraction ``dim``."""
    u = UNIT_ROUNDOFF[dtype] + 3 * 2.0**-24
    top = (x.abs() + e_x)
    amax = top.amax() if recipe == "tensorwise" else top.amax(dim=dim, keepdim=True)
    return e_x + u * top + HALF_SUBNORMAL_STEP[dtype] * amax / fp8_max(dtype)


def gemm_bound(a_MK, b_KN, e_a, e_b, a_dtype, b_dtype, recipe, *, out_u: float = 0.0) -> torch.Tensor:
    """Bound on |C_fp8 - C| for C = a @ b with carried operand errors (module docstring); ``out_u``: the unit
    roundoff of the GEMM's output dtype when it is not float32 (CUDA's rowwise and grouped scaled GEMMs write
    bfloat16, u = 2^-8), relative to |C_fp8| <= (|A| + D_A) @ (|B| + D_B)."""
    if a_MK.shape[0] == 0 or a_MK.shape[1] == 0:
        return a_MK.new_zeros(a_MK.shape[0], b_KN.shape[1])
    d_a = _operand_error(a_MK, e_a, a_dtype, recipe, dim=-1)
    d_b = _operand_error(b_KN, e_b, b_dtype, recipe, dim=0)
    k = a_MK.shape[1]
    gamma_k = k * 2.0**-24 / (1 - k * 2.0**-24)
    return (d_a @ b_KN.abs() + a_MK.abs() @ d_b + d_a @ d_b
            + (2 * gamma_k + out_u) * (a_MK.abs() + d_a) @ (b_KN.abs() + d_b))


def _product_bound(*pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """|prod x' - prod x| <= prod (|x| + e_x) - prod |x| for factors x with errors e_x."""
    with_err, exact = 1.0, 1.0
    for x, e in pairs:
        with_err, exact = with_err * (x.abs() + e), exact * x.abs()
    return with_err - exact


def reference_bounds(
    inputs: dict, g_NH: torch.Tensor, *, glu: bool, recipe: str, fp8_format: str, out_u: float = 0.0
) -> dict:
    """Elementwise bounds of the forward output and every gradient, from float64 reference intermediates
    (``out_u``: see ``gemm_bound``)."""
    gemm = functools.partial(gemm_bound, out_u=out_u)
    d = {k: (v.detach().double() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    g_dtype = E5M2 if fp8_format == "hybrid" else E4M3
    out_b, dx_b, dp_b = [], [], []
    dw1_b, dw2_b, db1_b, db2_b = [], [], [], []
    g_NH = g_NH.double()
    start = 0
    for e, n in enumerate(COUNTS):
        x, p, g = d["x"][start:start + n], d["p"][start:start + n, None], g_NH[start:start + n]
        start += n
        w1, w2 = d["w1"][e], d["w2"][e]
        h = x @ w1.t() + (d["b1"][e] if d["b1"] is not None else 0)
        e_h = (gemm(x, w1.t(), torch.zeros_like(x), torch.zeros_like(w1.t()), E4M3, E4M3, recipe)
               + FLOAT32_SLACK * h.abs())
        if glu:
            gate, up = h.chunk(2, dim=-1)
            e_gate, e_up = e_h.chunk(2, dim=-1)
            act = F.silu(gate) * up
            e_act = SILU_L1 * e_gate * (up.abs() + e_up) + F.silu(gate).abs() * e_up
        else:
            act = F.gelu(h)
            e_act = GELU_L1 * e_h
        e_act = e_act + FLOAT32_SLACK * act.abs()
        s = act * p
        e_s = e_act * p + FLOAT32_SLACK * s.abs()
        out = s @ w2.t()
        e_out = gemm(s, w2.t(), e_s, torch.zeros_like(w2.t()), E4M3, E4M3, recipe)
        if d["b2"] is not None:
            out = out + d["b2"][e] * p
        out_b.append(e_out + FLOAT32_SLACK * out.abs())
        # Backward.
        ds = g @ w2
        e_ds = (gemm(g, w2, torch.zeros_like(g), torch.zeros_like(w2), g_dtype, E4M3, recipe)
                + FLOAT32_SLACK * ds.abs())
        dw2_b.append(gemm(g.t(), s, torch.zeros_like(g.t()), e_s, g_dtype, E4M3, recipe))
        db2_b.append(FLOAT32_SLACK * (g * p).abs().sum(0) * max(n, 1))
        e_dp = (e_ds * (act.abs() + e_act) + ds.abs() * e_act).sum(-1)
        dp_scale = (ds * act).abs().sum(-1) + ((g * d["b2"][e]).abs().sum(-1) if d["b2"] is not None else 0)
        dp_b.append(e_dp + FLOAT32_SLACK * dp_scale * H)
        da, e_da = ds * p, e_ds * p + FLOAT32_SLACK * (ds * p).abs()
        if glu:
            gate_, _ = h.chunk(2, dim=-1)
            gate_ = gate_.clone().requires_grad_(True)
            (silu_d1,) = torch.autograd.grad(F.silu(gate_).sum(), gate_)
            gate, up = h.chunk(2, dim=-1)
            e_gate, e_up = e_h.chunk(2, dim=-1)
            dgate = silu_d1 * up * da
            e_dgate = _product_bound((silu_d1, SILU_L2 * e_gate), (up, e_up), (da, e_da))
            dup = F.silu(gate) * da
            e_dup = _product_bound((F.silu(gate), SILU_L1 * e_gate), (da, e_da))
            dh, e_dh = torch.cat([dgate, dup], -1), torch.cat([e_dgate, e_dup], -1)
        else:
            h_ = h.clone().requires_grad_(True)
            (gelu_d1,) = torch.autograd.grad(F.gelu(h_).sum(), h_)
            dh = gelu_d1 * da
            e_dh = GELU_L2 * e_h * (da.abs() + e_da) + gelu_d1.abs() * e_da
        e_dh = e_dh + FLOAT32_SLACK * dh.abs()
        dx_b.append(gemm(dh, w1, e_dh, torch.zeros_like(w1), g_dtype, E4M3, recipe))
        dw1_b.append(gemm(dh.t(), x, e_dh.t(), torch.zeros_like(x), g_dtype, E4M3, recipe))
        db1_b.append(e_dh.sum(0) + FLOAT32_SLACK * dh.abs().sum(0) * max(n, 1))
    bounds = {"out": torch.cat(out_b), "x": torch.cat(dx_b), "w1": torch.stack(dw1_b), "w2": torch.stack(dw2_b),
              "p": torch.cat(dp_b)}
    if d["b1"] is not None:
        bounds["b1"] = torch.stack(db1_b)
        bounds["b2"] = torch.stack(db2_b)
    return bounds


def make_inputs(*, glu: bool, bias: bool, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    n, e, f1 = sum(COUNTS), len(COUNTS), 2 * F_ if glu else F_
    return {
        "x": torch.randn(n, H, requires_grad=True),
        "w1": (torch.randn(e, f1, H) / H**0.5).requires_grad_(True),
        "w2": (torch.randn(e, H, F_) / F_**0.5).requires_grad_(True),
        "p": torch.rand(n).requires_grad_(True),
        "b1": (0.1 * torch.randn(e, f1)).requires_grad_(True) if bias else None,
        "b2": (0.1 * torch.randn(e, H)).requires_grad_(True) if bias else None,
    }


def run(kernel, inputs: dict, g_NH: torch.Tensor, activation, **kwargs) -> dict:
    names = [k for k, v in inputs.items() if v is not None]
    out = kernel(inputs["x"], COUNTS, inputs["w1"], inputs["w2"], inputs["p"], activation,
                 b1_EF1=inputs["b1"], b2_EH=inputs["b2"], **kwargs)
    grads = torch.autograd.grad(out, [inputs[k] for k in names], g_NH)
    return {"out": out.detach(), **dict(zip(names, grads))}


@pytest.mark.parametrize("fp8_format", ["hybrid", "e4m3"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("glu", [False, True], ids=["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fp8_experts_within_the_derived_bound(fp8_format: str, recipe: str, glu: bool, bias: bool) -> None:
    inputs = make_inputs(glu=glu, bias=bias)
    activation = swiglu if glu else F.gelu
    g_NH = torch.randn(sum(COUNTS), H)
    ref = run(expert_mlp_eager, inputs, g_NH, activation)
    got = run(expert_mlp_fp8, inputs, g_NH, activation, recipe=recipe, fp8_format=fp8_format)
    bounds = reference_bounds(inputs, g_NH, glu=glu, recipe=recipe, fp8_format=fp8_format)
    assert set(bounds) == set(ref)
    for name, bound in bounds.items():
        err = (got[name].double() - ref[name].double()).abs()
        assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape, name
        assert (err <= bound).all(), f"{name}: max excess {(err - bound).max().item():.3g}"
    # The expert without rows gets exact zero weight gradients.
    assert got["w1"][1].abs().sum() == 0 and got["w2"][1].abs().sum() == 0


def test_fp8_is_really_quantized() -> None:
    """The FP8 result differs from the float32 reference (the bound above is not met by a float32 path),
    the formats differ in backward only, and the recipes in both directions."""
    inputs = make_inputs(glu=True, bias=True)
    g_NH = torch.randn(sum(COUNTS), H)
    ref = run(expert_mlp_eager, inputs, g_NH, swiglu)
    hybrid = run(expert_mlp_fp8, inputs, g_NH, swiglu, recipe="tensorwise", fp8_format="hybrid")
    e4m3 = run(expert_mlp_fp8, inputs, g_NH, swiglu, recipe="tensorwise", fp8_format="e4m3")
    rowwise = run(expert_mlp_fp8, inputs, g_NH, swiglu, recipe="rowwise", fp8_format="hybrid")
    assert not torch.allclose(hybrid["out"], ref["out"], rtol=1e-4, atol=1e-4)
    assert torch.equal(hybrid["out"], e4m3["out"]) and not torch.equal(hybrid["x"], e4m3["x"])
    assert not torch.equal(hybrid["out"], rowwise["out"])


def test_bf16_parameters_get_bf16_gradients() -> None:
    """Master weights stay in the parameter dtype: outputs and gradients come back in bf16."""
    inputs = make_inputs(glu=True, bias=True)
    inputs = {k: (v.detach().bfloat16().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    got = run(expert_mlp_fp8, inputs, torch.randn(sum(COUNTS), H, dtype=torch.bfloat16), swiglu)
    assert all(t.dtype == torch.bfloat16 for t in got.values())


def test_refuses_bad_arguments() -> None:
    inputs = make_inputs(glu=False, bias=False)
    args = (inputs["x"], COUNTS, inputs["w1"], inputs["w2"], inputs["p"], F.gelu)
    with pytest.raises(ValueError, match="FP8 recipe 'blockwise' is unknown; choose from tensorwise, rowwise"):
        expert_mlp_fp8(*args, recipe="blockwise")
    with pytest.raises(ValueError, match="FP8 format 'e5m2' is unknown; choose from e4m3, hybrid"):
        expert_mlp_fp8(*args, fp8_format="e5m2")
    with pytest.raises(ValueError, match="4 counts summing to 24; expected 4 experts and 23 rows"):
        expert_mlp_fp8(inputs["x"][:23], COUNTS, *args[2:])


def test_the_bound_catches_bookkeeping_mistakes() -> None:
    """The derived bound is a worst case (on these inputs ~20x the observed error, which adds up like a random
    walk), yet it fails a kernel whose scale bookkeeping is off by a factor of 2 (a dequantization scale
    applied twice for a power-of-two amax) or that multiplies rows by another expert's weights."""
    inputs = make_inputs(glu=True, bias=True)
    g_NH = torch.randn(sum(COUNTS), H)
    ref = run(expert_mlp_eager, inputs, g_NH, swiglu)
    bound = reference_bounds(inputs, g_NH, glu=True, recipe="tensorwise", fp8_format="hybrid")["out"]
    x, w1, w2, p, b1, b2 = (inputs[k].detach() for k in ("x", "w1", "w2", "p", "b1", "b2"))
    doubled = expert_mlp_eager(2 * x, COUNTS, w1, w2, p, swiglu, b1_EF1=b1, b2_EH=b2)
    wrong_expert = expert_mlp_eager(x, COUNTS, w1, w2.flip(0), p, swiglu, b1_EF1=b1, b2_EH=b2)
    for wrong in (doubled, wrong_expert):
        assert ((wrong.double() - ref["out"].double()).abs() > bound).any()


@pytest.mark.gpu
@pytest.mark.parametrize("fp8_format", ["hybrid", "e4m3"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_cuda_fp8_experts_within_the_derived_bound(fp8_format: str, recipe: str) -> None:
    """The CUDA path (``torch._scaled_grouped_mm`` on Hopper and later with these 16-aligned sizes, per-expert
    ``torch._scaled_mm`` before) against the float32 reference on CPU, within the same derived bound plus the
    bfloat16 rounding of the GEMM outputs (u = 2^-8)."""
    from megatron_moe_ext.kernels.fp8_experts import grouped_supported

    inputs = make_inputs(glu=True, bias=True)
    g_NH = torch.randn(sum(COUNTS), H)
    ref = run(expert_mlp_eager, inputs, g_NH, swiglu)
    on_gpu = {k: (v.detach().cuda().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    got = {k: v.cpu() for k, v in run(expert_mlp_fp8, on_gpu, g_NH.cuda(), swiglu, recipe=recipe,
                                       fp8_format=fp8_format).items()}
    bounds = reference_bounds(inputs, g_NH, glu=True, recipe=recipe, fp8_format=fp8_format, out_u=2.0**-8)
    for name, bound in bounds.items():
        err = (got[name].double() - ref[name].double()).abs()
        assert (err <= bound).all(), f"{name}: max excess {(err - bound).max().item():.3g}"
    if torch.cuda.get_device_capability() >= (9, 0):
        assert grouped_supported(on_gpu["x"], on_gpu["w1"], on_gpu["w2"])
