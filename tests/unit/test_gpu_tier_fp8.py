"""gpu tier: the FP8 torch path (``kernels/fp8_experts.expert_mlp_fp8``) on CUDA against the eager reference in
bf16, forward and backward, for both recipes and formats, gated and not, with biases.

FP8 rounds every GEMM operand (e4m3: 3 mantissa bits; e5m2 gradients under 'hybrid': 2), so the comparison is
the relative error of norms, well under what a wrong scale or a transposed operand gives (order 1). The body
(``check_fp8``) takes the device, so it is also correct on CPU (where the torch path runs per expert).

Legend: N grouped rows, E experts, H hidden size, F expert hidden size, F1 = F or 2F (gated).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_moe_ext.kernels.expert_mlp import get_expert_mlp_kernel

COUNTS = [32, 16, 48, 0, 16]  # multiples of 16 (CUDA's FP8 GEMMs), one empty expert
HIDDEN, FFN = 64, 32
REL_TOL = {"e4m3": 0.1, "hybrid": 0.15}  # e5m2 gradients lose one more mantissa bit


def swiglu(h_NF1: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(h_NF1, 2, dim=-1)
    return F.silu(gate) * up


def run(kernel, gated: bool, device: str, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    n, experts, f1 = sum(COUNTS), len(COUNTS), (2 if gated else 1) * FFN
    leaves = [
        torch.randn(n, HIDDEN, generator=gen),  # x_NH
        0.1 * torch.randn(experts, f1, HIDDEN, generator=gen),  # w1_EF1H
        0.1 * torch.randn(experts, HIDDEN, FFN, generator=gen),  # w2_EHF
        0.1 * torch.randn(experts, f1, generator=gen),  # b1_EF1
        0.1 * torch.randn(experts, HIDDEN, generator=gen),  # b2_EH
    ]
    leaves = [t.to(device, torch.bfloat16).requires_grad_() for t in leaves]
    probs_N = torch.rand(n, generator=gen).to(device).requires_grad_()
    grad_NH = torch.randn(n, HIDDEN, generator=gen).to(device, torch.bfloat16)
    x_NH, w1_EF1H, w2_EHF, b1_EF1, b2_EH = leaves
    out_NH = kernel(x_NH, COUNTS, w1_EF1H, w2_EHF, probs_N, swiglu if gated else F.gelu, b1_EF1=b1_EF1, b2_EH=b2_EH,
                    **kwargs)
    out_NH.backward(grad_NH)
    return out_NH.detach().float(), [t.grad.float() for t in [*leaves, probs_N]]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def check_fp8(recipe: str, fp8_format: str, gated: bool, device: str) -> None:
    from megatron_moe_ext.kernels.fp8_experts import expert_mlp_fp8  # lazily: a test error, not a collection one

    want_out, want_grads = run(get_expert_mlp_kernel("eager"), gated, device)
    got_out, got_grads = run(expert_mlp_fp8, gated, device, recipe=recipe, fp8_format=fp8_format)
    tol = REL_TOL[fp8_format]
    assert got_out.shape == want_out.shape
    assert relative_error(got_out, want_out) < tol, f"output: {relative_error(got_out, want_out):.2e}"
    for got, want, what in zip(got_grads, want_grads, ("x", "w1", "w2", "b1", "b2", "probs")):
        assert got.shape == want.shape, what
        assert relative_error(got, want) < tol, f"grad {what}: {relative_error(got, want):.2e}"
    empty = COUNTS.index(0)
    for grad in got_grads[1:5]:  # w1, w2, b1, b2 of the expert without rows
        assert torch.all(grad[empty] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
@pytest.mark.parametrize("fp8_format", ["hybrid", "e4m3"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_torch_path_matches_eager_on_gpu(recipe: str, fp8_format: str, gated: bool) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"FP8 GEMMs need compute capability >= 8.9, this GPU has {torch.cuda.get_device_capability()}")
    check_fp8(recipe, fp8_format, gated, "cuda")
