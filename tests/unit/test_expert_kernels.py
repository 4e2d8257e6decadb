"""Expert MLP kernels against the eager reference loop, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_moe_ext.kernels.expert_mlp import EXPERT_MLP_KERNELS, get_expert_mlp_kernel


def gelu(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(h, 2, dim=-1)
    return F.silu(gate) * up


def run(kernel, counts, hidden, ffn, gated, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts, n = len(counts), sum(counts)
    x = torch.randn(n, hidden, generator=gen).to(device, dtype).requires_grad_()
    w1 = (0.1 * torch.randn(experts, (2 if gated else 1) * ffn, hidden, generator=gen)).to(device, dtype).requires_grad_()
    w2 = (0.1 * torch.randn(experts, hidden, ffn, generator=gen)).to(device, dtype).requires_grad_()
    probs = torch.rand(n, generator=gen).to(device, torch.float32).requires_grad_()
    out = kernel(x, counts, w1, w2, probs, swiglu if gated else gelu)
    grad = torch.randn(out.shape, generator=gen).to(device, dtype)
    out.backward(grad)
    return out.detach().float(), [t.grad.float() for t in (x, w1, w2, probs)]


COUNT_CASES = {
    "balanced": [6, 6, 6, 6],
    "imbalanced_with_empty": [0, 9, 1, 0, 5, 3, 0, 2],
    "one_expert": [7],
    "g64_like": [2] * 64,
}


@pytest.mark.parametrize("name", ["loop", "padded", "grouped"])
@pytest.mark.parametrize("case", sorted(COUNT_CASES))
@pytest.mark.parametrize("gated", [False, True])
def test_kernel_matches_eager(name: str, case: str, gated: bool) -> None:
    counts = COUNT_CASES[case]
    ref_out, ref_grads = run(get_expert_mlp_kernel("eager"), counts, 16, 8, gated)
    out, grads = run(get_expert_mlp_kernel(name), counts, 16, 8, gated)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for got, want, what in zip(grads, ref_grads, ("x", "w1", "w2", "probs")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {what}: {m}")


def test_all_experts_empty_gives_empty_output() -> None:
    x = torch.zeros(0, 4)
    out = get_expert_mlp_kernel("padded")(x, [0, 0], torch.zeros(2, 3, 4), torch.zeros(2, 4, 3), torch.zeros(0), gelu)
    assert out.shape == (0, 4)


def test_unknown_kernel_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown expert kernel 'fast'; choose from " + ", ".join(EXPERT_MLP_KERNELS)):
        get_expert_mlp_kernel("fast")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
def test_grouped_mm_on_gpu_matches_eager(dtype: torch.dtype, gated: bool) -> None:
    counts = [16, 0, 32, 8, 24, 16, 0, 32]
    ref_out, ref_grads = run(get_expert_mlp_kernel("eager"), counts, 64, 32, gated, dtype=dtype, device="cuda")
    out, grads = run(get_expert_mlp_kernel("grouped_mm"), counts, 64, 32, gated, dtype=dtype, device="cuda")
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    print("max |out diff|", (out - ref_out).abs().max().item(), "mean", (out - ref_out).abs().mean().item())
    torch.testing.assert_close(out, ref_out, **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol)


def test_grouped_picks_the_loop_for_large_experts_on_cpu() -> None:
    from megatron_moe_ext.kernels import expert_mlp

    calls = []
    original = expert_mlp.expert_mlp_loop
    expert_mlp.expert_mlp_loop = lambda *a: calls.append("loop") or original(*a)
    try:
        run(get_expert_mlp_kernel("grouped"), [3, 5], 8, expert_mlp.CPU_LOOP_MIN_EXPERT_SIZE, False)
        run(get_expert_mlp_kernel("grouped"), [3, 5], 8, 8, False)
    finally:
        expert_mlp.expert_mlp_loop = original
    assert calls == ["loop"]
