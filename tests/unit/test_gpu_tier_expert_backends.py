"""gpu tier: every expert MLP backend of ``kernels/expert_mlp.py`` against the eager reference on CUDA, bf16 and
fp32, forward and backward (gated and not, imbalanced counts with empty experts).

The other gpu tests cover grouped_mm (tests/unit/test_expert_kernels.py), grouped_mm / grouped / segmented with
biases (test_expert_kernel_biases.py) and te (test_te_backend.py); this file adds loop and padded and runs all of
them on one case without biases. The body (``check_backend``) takes the device, so it is also correct on CPU.

Legend: N grouped rows, E experts, H hidden size, F expert hidden size, F1 = F or 2F (gated).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_moe_ext.kernels.expert_mlp import get_expert_mlp_kernel

COUNTS = [16, 0, 40, 8, 24, 1, 0, 33]  # imbalanced, two empty experts
HIDDEN, FFN = 64, 32  # multiples of 8: torch's grouped GEMM takes them in bf16
BACKENDS = ["loop", "padded", "segmented", "grouped_mm", "grouped"]
# Relative error of norms against eager in the same dtype: bf16 rounds GEMM outputs differently per backend.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def swiglu(h_NF1: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(h_NF1, 2, dim=-1)
    return F.silu(gate) * up


def run(name: str, gated: bool, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and the gradients of x, w1, w2, probs for one fixed random case."""
    gen = torch.Generator().manual_seed(7)
    n, experts = sum(COUNTS), len(COUNTS)
    x_NH = torch.randn(n, HIDDEN, generator=gen).to(device, dtype).requires_grad_()
    w1_EF1H = (0.1 * torch.randn(experts, (2 if gated else 1) * FFN, HIDDEN, generator=gen)).to(device, dtype)
    w2_EHF = (0.1 * torch.randn(experts, HIDDEN, FFN, generator=gen)).to(device, dtype)
    probs_N = torch.rand(n, generator=gen).to(device).requires_grad_()
    grad_NH = torch.randn(n, HIDDEN, generator=gen).to(device, dtype)
    leaves = [x_NH, w1_EF1H.requires_grad_(), w2_EHF.requires_grad_(), probs_N]
    out_NH = get_expert_mlp_kernel(name)(x_NH, COUNTS, w1_EF1H, w2_EHF, probs_N, swiglu if gated else F.gelu)
    out_NH.backward(grad_NH)
    return out_NH.detach().float(), [t.grad.float() for t in leaves]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def check_backend(name: str, gated: bool, dtype: torch.dtype, device: str) -> None:
    want_out, want_grads = run("eager", gated, dtype, device)
    got_out, got_grads = run(name, gated, dtype, device)
    assert got_out.shape == want_out.shape
    tol = REL_TOL[dtype]
    assert relative_error(got_out, want_out) < tol, f"{name} output: {relative_error(got_out, want_out):.2e}"
    for got, want, what in zip(got_grads, want_grads, ("x", "w1", "w2", "probs")):
        assert got.shape == want.shape, what
        assert relative_error(got, want) < tol, f"{name} grad {what}: {relative_error(got, want):.2e}"
    # Experts without rows get exactly zero weight gradients.
    empty = [e for e, c in enumerate(COUNTS) if c == 0]
    assert torch.all(got_grads[1][empty] == 0) and torch.all(got_grads[2][empty] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
@pytest.mark.parametrize("name", BACKENDS)
def test_backend_matches_eager_on_gpu(name: str, gated: bool, dtype: torch.dtype) -> None:
    check_backend(name, gated, dtype, "cuda")
