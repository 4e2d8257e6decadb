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


def run(kernel, counts, hidden, ffn, gated, dtype=torch.float32, device="cpu", seed=0, activation=None,
        transposed_x=False):
    gen = torch.Generator().manual_seed(seed)
    experts, n = len(counts), sum(counts)
    if transposed_x:  # same values, non-contiguous layout
        x = torch.randn(hidden, n, generator=gen).t().to(device, dtype).requires_grad_()
    else:
        x = torch.randn(n, hidden, generator=gen).to(device, dtype).requires_grad_()
    w1 = (0.1 * torch.randn(experts, (2 if gated else 1) * ffn, hidden, generator=gen)).to(device, dtype).requires_grad_()
    w2 = (0.1 * torch.randn(experts, hidden, ffn, generator=gen)).to(device, dtype).requires_grad_()
    probs = torch.rand(n, generator=gen).to(device, torch.float32).requires_grad_()
    out = kernel(x, counts, w1, w2, probs, activation or (swiglu if gated else gelu))
    grad = torch.randn(out.shape, generator=gen).to(device, dtype)
    out.backward(grad)
    return out.detach().float(), [t.grad.float() for t in (x, w1, w2, probs)]


COUNT_CASES = {
    "balanced": [6, 6, 6, 6],
    "imbalanced_with_empty": [0, 9, 1, 0, 5, 3, 0, 2],
    "one_expert": [7],
    "g64_like": [2] * 64,
    "uneven_g16_like": [3, 0, 1, 7, 2, 2, 0, 5, 1, 1, 4, 0, 9, 2, 3, 1],
}
CPU_KERNELS = ["loop", "padded", "segmented", "grouped"]


@pytest.mark.parametrize("name", CPU_KERNELS)
@pytest.mark.parametrize("case", sorted(COUNT_CASES))
@pytest.mark.parametrize("gated", [False, True])
def test_kernel_matches_eager(name: str, case: str, gated: bool) -> None:
    counts = COUNT_CASES[case]
    ref_out, ref_grads = run(get_expert_mlp_kernel("eager"), counts, 16, 8, gated)
    out, grads = run(get_expert_mlp_kernel(name), counts, 16, 8, gated)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for got, want, what in zip(grads, ref_grads, ("x", "w1", "w2", "probs")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {what}: {m}")


@pytest.mark.parametrize("name", CPU_KERNELS)
def test_all_experts_empty_gives_empty_output(name: str) -> None:
    x = torch.zeros(0, 4)
    out = get_expert_mlp_kernel(name)(x, [0, 0], torch.zeros(2, 3, 4), torch.zeros(2, 4, 3), torch.zeros(0), gelu)
    assert out.shape == (0, 4)


@pytest.mark.parametrize("block_rows", [1, 3, 7, 1000])
@pytest.mark.parametrize("case", sorted(COUNT_CASES))
@pytest.mark.parametrize("gated", [False, True])
def test_segmented_row_blocks_match_eager(block_rows: int, case: str, gated: bool, monkeypatch) -> None:
    # Blocks of a few rows: experts split over blocks (weight gradients accumulated piece by piece)
    # and blocks holding several experts, empty ones among them.
    from megatron_moe_ext.kernels import expert_mlp

    counts, ffn = COUNT_CASES[case], 8
    monkeypatch.setattr(expert_mlp, "SEGMENTED_BLOCK_ELEMENTS", block_rows * (2 if gated else 1) * ffn)
    ref_out, ref_grads = run(get_expert_mlp_kernel("eager"), counts, 16, ffn, gated)
    out, grads = run(get_expert_mlp_kernel("segmented"), counts, 16, ffn, gated)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for got, want, what in zip(grads, ref_grads, ("x", "w1", "w2", "probs")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, what=what: f"grad {what}: {m}")


def test_row_blocks_pack_whole_experts_and_split_only_large_ones() -> None:
    from megatron_moe_ext.kernels.expert_mlp import SEGMENTED_SPLIT_FACTOR, _row_blocks

    assert SEGMENTED_SPLIT_FACTOR == 4
    counts = [0, 5, 1, 0, 2, 1, 13]
    # 3 rows per block: expert 1 (5 rows) alone, experts 2, 4 together, 5 alone (2 + 1 > 3 rows) and
    # expert 6 (13 > 4 x 3 rows) split in ceil(13 / 3) = 5 blocks of ceil(13 / 5) = 3 rows.
    assert _row_blocks(counts, width=2, block_elements=6) == [
        (0, 5, [(1, 0, 5)]),
        (5, 8, [(2, 5, 6), (4, 6, 8)]),
        (8, 9, [(5, 8, 9)]),
        (9, 12, [(6, 9, 12)]),
        (12, 15, [(6, 12, 15)]),
        (15, 18, [(6, 15, 18)]),
        (18, 21, [(6, 18, 21)]),
        (21, 22, [(6, 21, 22)]),
    ]
    assert _row_blocks([4, 4, 4, 4], width=1, block_elements=8) == [(0, 8, [(0, 0, 4), (1, 4, 8)]),
                                                                   (8, 16, [(2, 8, 12), (3, 12, 16)])]
    assert _row_blocks([0, 0], width=4, block_elements=100) == []


def test_runs_batch_consecutive_equal_experts_only() -> None:
    from megatron_moe_ext.kernels.expert_mlp import _runs

    counts = [2, 2, 0, 2, 3, 3, 2]
    starts = [0, 2, 4, 4, 6, 9, 12]
    pieces = [(0, 0, 2), (1, 2, 4), (3, 4, 6), (4, 6, 9), (5, 9, 12), (6, 12, 14)]
    assert [sum(counts[:e]) for e in range(len(counts))] == starts
    # (first expert, experts, first row, rows each, continues an expert of the previous block)
    assert _runs(pieces, starts) == [(0, 2, 0, 2, False), (3, 1, 4, 2, False), (4, 2, 6, 3, False), (6, 1, 12, 2, False)]
    # A block starting inside expert 4 (rows 7-8 of its 6-8): that piece stays alone.
    assert _runs([(4, 7, 9), (5, 9, 11)], starts) == [(4, 1, 7, 2, True), (5, 1, 9, 2, False)]


@pytest.mark.parametrize("gated", [False, True])
def test_segmented_with_no_rows_matches_eager_backward_too(gated: bool) -> None:
    # An EP rank can receive no tokens at all: the output is [0, H], and backward still reaches the
    # weights (zero gradients), as with the eager reference, so gradient hooks fire on every rank.
    counts = [0, 0, 0]
    ref_out, ref_grads = run(get_expert_mlp_kernel("eager"), counts, 16, 8, gated)
    out, grads = run(get_expert_mlp_kernel("segmented"), counts, 16, 8, gated)
    assert out.shape == ref_out.shape == (0, 16)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)
    assert not grads[1].any() and not grads[2].any()


@pytest.mark.parametrize("gated", [False, True])
def test_segmented_bf16_matches_eager(gated: bool) -> None:
    # bf16 activations and weights with fp32 probabilities, as Megatron's router hands them over:
    # the dtypes of output and gradients must be those of the reference, the values close.
    counts = [5, 0, 12, 3, 0, 8]
    ref_out, ref_grads = run(get_expert_mlp_kernel("eager"), counts, 32, 16, gated, dtype=torch.bfloat16)
    out, grads = run(get_expert_mlp_kernel("segmented"), counts, 32, 16, gated, dtype=torch.bfloat16)
    torch.testing.assert_close(out, ref_out, rtol=2e-2, atol=2e-2)
    for got, want, what in zip(grads, ref_grads, ("x", "w1", "w2", "probs")):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2, msg=lambda m, what=what: f"grad {what}: {m}")


def test_segmented_keeps_the_reference_dtypes() -> None:
    gen = torch.Generator().manual_seed(0)
    counts = [2, 0, 3]
    x = torch.randn(5, 8, generator=gen).bfloat16().requires_grad_()
    w1 = torch.randn(3, 4, 8, generator=gen).bfloat16().requires_grad_()
    w2 = torch.randn(3, 8, 4, generator=gen).bfloat16().requires_grad_()
    probs = torch.rand(5, generator=gen).requires_grad_()
    dtypes = []
    for name in ("eager", "segmented"):
        out = get_expert_mlp_kernel(name)(x, counts, w1, w2, probs, gelu)
        out.sum().backward()  # a stride-0 output gradient
        dtypes.append([out.dtype] + [t.grad.dtype for t in (x, w1, w2, probs)])
        for t in (x, w1, w2, probs):
            t.grad = None
    assert dtypes[0] == dtypes[1] == [torch.bfloat16] * 4 + [torch.float32]


def test_segmented_non_contiguous_input_matches_eager() -> None:
    counts = [4, 0, 6, 2]
    ref_out, ref_grads = run(get_expert_mlp_kernel("eager"), counts, 16, 8, True, transposed_x=True)
    out, grads = run(get_expert_mlp_kernel("segmented"), counts, 16, 8, True, transposed_x=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("needs", ["x", "w1", "w2", "probs", "w1_w2"])
def test_segmented_computes_only_the_requested_gradients(needs: str) -> None:
    gen = torch.Generator().manual_seed(3)
    counts = [3, 0, 4]
    tensors = {
        "x": torch.randn(7, 8, generator=gen), "w1": torch.randn(3, 12, 8, generator=gen),
        "w2": torch.randn(3, 8, 6, generator=gen), "probs": torch.rand(7, generator=gen),
    }
    grads = {}
    for name in ("eager", "segmented"):
        inputs = {k: v.clone().requires_grad_(k in needs.split("_")) for k, v in tensors.items()}
        out = get_expert_mlp_kernel(name)(inputs["x"], counts, inputs["w1"], inputs["w2"], inputs["probs"], swiglu)
        out.backward(torch.ones_like(out))
        grads[name] = {k: v.grad for k, v in inputs.items()}
    for k in tensors:
        if k in needs.split("_"):
            torch.testing.assert_close(grads["segmented"][k], grads["eager"][k], rtol=1e-5, atol=1e-5)
        else:
            assert grads["segmented"][k] is None


def test_segmented_backward_twice_with_retained_graph_and_inference() -> None:
    gen = torch.Generator().manual_seed(4)
    counts = [3, 0, 4]
    x = torch.randn(7, 8, generator=gen).requires_grad_()
    w1, w2 = torch.randn(3, 12, 8, generator=gen).requires_grad_(), torch.randn(3, 8, 6, generator=gen).requires_grad_()
    probs = torch.rand(7, generator=gen).requires_grad_()
    grads = {}
    for name in ("eager", "segmented"):
        out = get_expert_mlp_kernel(name)(x, counts, w1, w2, probs, swiglu)
        out.sum().backward(retain_graph=True)
        out.sum().backward()
        grads[name] = [t.grad.clone() for t in (x, w1, w2, probs)]
        for t in (x, w1, w2, probs):
            t.grad = None
    for got, want in zip(grads["segmented"], grads["eager"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = get_expert_mlp_kernel("segmented")(x, counts, w1, w2, probs, swiglu)
        ref = get_expert_mlp_kernel("eager")(x, counts, w1, w2, probs, swiglu)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_segmented_rejects_counts_that_do_not_match_the_rows() -> None:
    x, w1, w2 = torch.zeros(5, 4), torch.zeros(2, 3, 4), torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="2 counts summing to 4; expected 2 experts and 5 rows"):
        get_expert_mlp_kernel("segmented")(x, [1, 3], w1, w2, torch.zeros(5), gelu)
    with pytest.raises(ValueError, match="3 counts summing to 5; expected 2 experts"):
        get_expert_mlp_kernel("segmented")(x, [1, 3, 1], w1, w2, torch.zeros(5), gelu)


def segmented_under_cpu_runtime() -> dict:
    """Runs in a fresh rank process with the CPU runtime's torch-function mode entered, which the
    segmented kernel's loops bypass: the results must not change, and the activation (not
    bypassed) still gets CUDA device arguments rewritten, forward and backward."""

    def gelu_with_device_literal(h: torch.Tensor) -> torch.Tensor:
        return F.gelu(h) * torch.ones((), device="cuda", dtype=h.dtype)

    counts = [3, 0, 5, 1, 0, 7]
    results = {}
    for name in ("eager", "segmented"):
        for gated in (False, True):
            activation = None if gated else gelu_with_device_literal
            results[name, gated] = run(get_expert_mlp_kernel(name), counts, 16, 8, gated, activation=activation)
    return {gated: (results["eager", gated], results["segmented", gated]) for gated in (False, True)}


def test_segmented_matches_eager_under_the_cpu_runtime() -> None:
    from megatron_moe_ext.testing import run_distributed

    (results,) = run_distributed(segmented_under_cpu_runtime, 1)
    for (ref_out, ref_grads), (out, grads) in results.values():
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


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


def test_grouped_picks_the_segmented_kernel_on_cpu(monkeypatch) -> None:
    from megatron_moe_ext.kernels import expert_mlp

    calls = []
    original = expert_mlp.expert_mlp_segmented
    monkeypatch.setattr(expert_mlp, "expert_mlp_segmented", lambda *a, **k: calls.append("segmented") or original(*a, **k))
    for ffn in (8, 512):  # every expert size
        run(get_expert_mlp_kernel("grouped"), [3, 5], 8, ffn, False)
    assert calls == ["segmented", "segmented"]
