"""Expert MLP kernels with expert biases (Megatron's add_bias_linear) against the eager reference,
forward and backward: ``out = W2 (act(W1 x + b1) * p) + b2 * p`` per expert.

Legend: N token rows grouped by expert, E experts, H hidden, F expert hidden, F1 = F or 2F (gated).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_moe_ext.kernels import te_grouped
from megatron_moe_ext.kernels.expert_mlp import get_expert_mlp_kernel
from test_te_backend import FakeGemm, FakeRecipe, fake_api

NAMES = ("x", "w1", "w2", "probs", "b1", "b2")


def gelu(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(h, 2, dim=-1)
    return F.silu(gate) * up


def make(counts, hidden, ffn, gated, dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    experts, n, fc1_rows = len(counts), sum(counts), (2 if gated else 1) * ffn
    return {
        "x": torch.randn(n, hidden, generator=gen).to(dtype),
        "w1": (0.1 * torch.randn(experts, fc1_rows, hidden, generator=gen)).to(dtype),
        "w2": (0.1 * torch.randn(experts, hidden, ffn, generator=gen)).to(dtype),
        "probs": torch.rand(n, generator=gen),
        # Biases of the size of the matmul outputs, so a missing or unscaled bias shows.
        "b1": torch.randn(experts, fc1_rows, generator=gen).to(dtype),
        "b2": torch.randn(experts, hidden, generator=gen).to(dtype),
        "grad": torch.randn(n, hidden, generator=gen).to(dtype),
    }


def run(kernel, counts, tensors, gated, *, needs=NAMES):
    leaves = {k: tensors[k].clone().requires_grad_(k in needs) for k in NAMES}
    out = kernel(leaves["x"], counts, leaves["w1"], leaves["w2"], leaves["probs"], swiglu if gated else gelu,
                 b1_EF1=leaves["b1"], b2_EH=leaves["b2"])
    out.backward(tensors["grad"])
    return out.detach().float(), {k: (None if t.grad is None else t.grad.float()) for k, t in leaves.items()}


def assert_matches(got, want, **tol) -> None:
    out, grads = got
    ref_out, ref_grads = want
    print("max |out diff|", (out - ref_out).abs().max().item() if out.numel() else 0.0)
    torch.testing.assert_close(out, ref_out, **tol)
    for k in NAMES:
        if ref_grads[k] is None:
            assert grads[k] is None, f"grad {k} computed but not requested"
            continue
        assert grads[k] is not None, f"grad {k} missing"
        torch.testing.assert_close(grads[k], ref_grads[k], **tol, msg=lambda m, k=k: f"grad {k}: {m}")


COUNT_CASES = {
    "balanced": [6, 6, 6, 6],
    "imbalanced_with_empty": [0, 9, 1, 0, 5, 3, 0, 2],
    "one_expert": [7],
}


def te_stand_in(*args, **kwargs):
    """The 'te' kernel's logic through a stand-in for TE's grouped GEMM (test_te_backend.py)."""
    return te_grouped.expert_mlp_with_api(fake_api(FakeGemm()), *args, **kwargs)


KERNELS = {
    "loop": get_expert_mlp_kernel("loop"),
    "padded": get_expert_mlp_kernel("padded"),
    "segmented": get_expert_mlp_kernel("segmented"),
    "grouped": get_expert_mlp_kernel("grouped"),
    "grouped_mm": get_expert_mlp_kernel("grouped_mm"),  # torch's grouped GEMM also runs on CPU
    "te_stand_in": te_stand_in,
}


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("case", sorted(COUNT_CASES))
@pytest.mark.parametrize("gated", [False, True])
def test_kernel_with_biases_matches_eager(name: str, case: str, gated: bool) -> None:
    counts = COUNT_CASES[case]
    tensors = make(counts, 16, 8, gated)
    want = run(get_expert_mlp_kernel("eager"), counts, tensors, gated)
    assert_matches(run(KERNELS[name], counts, tensors, gated), want, rtol=1e-5, atol=1e-5)


def test_eager_reference_is_megatrons_formula() -> None:
    # The reference itself, written out for one expert: fc1 bias before the activation, fc2 bias
    # scaled by the routing probability (megatron/core/transformer/mlp.py, MLP.forward).
    t = make([5], 8, 4, True)
    out = get_expert_mlp_kernel("eager")(t["x"], [5], t["w1"], t["w2"], t["probs"], swiglu,
                                         b1_EF1=t["b1"], b2_EH=t["b2"])
    p = t["probs"].unsqueeze(-1)
    want = (swiglu(t["x"] @ t["w1"][0].t() + t["b1"][0]) * p) @ t["w2"][0].t() + t["b2"][0] * p
    torch.testing.assert_close(out, want)
    unscaled = (swiglu(t["x"] @ t["w1"][0].t() + t["b1"][0]) * p) @ t["w2"][0].t() + t["b2"][0]
    assert not torch.allclose(out, unscaled, atol=1e-3), "negative control: an unscaled fc2 bias must differ"


@pytest.mark.parametrize("block_rows", [1, 3, 1000])
@pytest.mark.parametrize("gated", [False, True])
def test_segmented_blocks_with_biases_match_eager(block_rows: int, gated: bool, monkeypatch) -> None:
    # Experts split over blocks: bias gradients accumulate piece by piece.
    from megatron_moe_ext.kernels import expert_mlp

    counts, ffn = [3, 0, 1, 7, 2, 2, 0, 5], 8
    monkeypatch.setattr(expert_mlp, "SEGMENTED_BLOCK_ELEMENTS", block_rows * (2 if gated else 1) * ffn)
    tensors = make(counts, 16, ffn, gated, seed=1)
    want = run(get_expert_mlp_kernel("eager"), counts, tensors, gated)
    assert_matches(run(get_expert_mlp_kernel("segmented"), counts, tensors, gated), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("needs", ["b1", "b2", "probs", "x", "w2", "b1_b2"])
def test_segmented_computes_only_the_requested_gradients_with_biases(needs: str) -> None:
    counts = [3, 0, 4]
    tensors = make(counts, 8, 6, True, seed=3)
    want = run(get_expert_mlp_kernel("eager"), counts, tensors, True, needs=needs.split("_"))
    assert_matches(run(get_expert_mlp_kernel("segmented"), counts, tensors, True, needs=needs.split("_")), want,
                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["segmented", "loop", "padded"])
def test_bf16_with_biases_keeps_the_reference_dtypes_and_values(name: str) -> None:
    # bf16 activations, weights and biases with fp32 probabilities, as Megatron hands them over.
    counts = [5, 0, 12, 3]
    tensors = make(counts, 32, 16, True, dtype=torch.bfloat16, seed=2)
    leaves_dtypes = []
    for kernel in ("eager", name):
        leaves = {k: tensors[k].clone().requires_grad_() for k in NAMES}
        out = get_expert_mlp_kernel(kernel)(leaves["x"], counts, leaves["w1"], leaves["w2"], leaves["probs"], swiglu,
                                            b1_EF1=leaves["b1"], b2_EH=leaves["b2"])
        out.backward(tensors["grad"])
        leaves_dtypes.append([out.dtype] + [leaves[k].grad.dtype for k in NAMES])
    assert leaves_dtypes[0] == leaves_dtypes[1]
    want = run(get_expert_mlp_kernel("eager"), counts, tensors, True)
    assert_matches(run(get_expert_mlp_kernel(name), counts, tensors, True), want, rtol=2e-2, atol=5e-2)


def test_te_stand_in_under_fp8_padding_keeps_biases_out_of_padded_rows() -> None:
    # FP8 pads each expert's rows to 16: the padded rows get the fc1 bias, but with probability
    # zero nothing of them may reach the output or any gradient.
    counts = [0, 9, 1, 0, 35, 3]
    tensors = make(counts, 32, 32, True, seed=4)
    kernel = lambda *a, **k: te_grouped.expert_mlp_with_api(  # noqa: E731
        fake_api(FakeGemm(align=16), FakeRecipe("current")), *a, **k)
    out, grads = run(kernel, counts, tensors, True)
    ref_out, ref_grads = run(get_expert_mlp_kernel("eager"), counts, tensors, True)
    assert ((out - ref_out).norm() / ref_out.norm()).item() < 2e-2  # bf16-rounded GEMM operands
    for k in NAMES:
        assert ((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm()).item() < 2e-2, k


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["grouped_mm", "grouped", "segmented", "te"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_with_biases_matches_eager_on_gpu(name: str, dtype: torch.dtype) -> None:
    from megatron_moe_ext._compat import HAVE_TE

    if name == "te" and not HAVE_TE:
        pytest.skip("needs Transformer Engine")
    counts = [16, 0, 32, 8, 24, 16, 0, 32]
    tensors = {k: v.cuda() for k, v in make(counts, 64, 32, True, dtype=dtype).items()}
    want = run(get_expert_mlp_kernel("eager"), counts, tensors, True)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)  # TE: TF32
    assert_matches(run(get_expert_mlp_kernel(name), counts, tensors, True), want, **tol)
