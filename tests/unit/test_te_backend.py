"""The 'te' expert backend (Transformer Engine grouped GEMMs on our stacked weights).

CPU tier: the refusals without TE / on CPU tensors, the lazy registration, and the kernel's own
logic (autograd function, empty experts, FP8 row padding, recipe dispatch, TE signature
adaptation) driven through stand-ins for TE's grouped GEMM and quantizers.
GPU tier (``gpu`` and Transformer Engine): the real kernel against the eager reference.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from megatron_moe_ext._compat import HAVE_TE
from megatron_moe_ext.kernels import te_grouped
from megatron_moe_ext.kernels.expert_mlp import EXPERT_MLP_KERNELS, get_expert_mlp_kernel


def gelu(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(h, 2, dim=-1)
    return F.silu(gate) * up


def make_inputs(counts, hidden, ffn, gated, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts, n = len(counts), sum(counts)
    x = torch.randn(n, hidden, generator=gen).to(device, dtype)
    w1 = (0.1 * torch.randn(experts, (2 if gated else 1) * ffn, hidden, generator=gen)).to(device, dtype)
    w2 = (0.1 * torch.randn(experts, hidden, ffn, generator=gen)).to(device, dtype)
    probs = torch.rand(n, generator=gen).to(device, torch.float32)
    grad = torch.randn(n, hidden, generator=gen).to(device, dtype)
    return x, w1, w2, probs, grad


def run(kernel, counts, inputs, gated):
    x, w1, w2, probs, grad = (t.clone() for t in inputs)
    leaves = [t.requires_grad_() for t in (x, w1, w2, probs)]
    out = kernel(x, counts, w1, w2, probs, swiglu if gated else gelu)
    out.backward(grad)
    return out.detach().float(), [t.grad.float() for t in leaves]


# ------------------------------------------------------------------------------------------------
# CPU tier: refusals and registration


def test_te_kernel_refuses_without_te_or_on_cpu() -> None:
    x, w1, w2, probs, _ = make_inputs([3, 2], 16, 8, False)
    kernel = get_expert_mlp_kernel("te")
    if not HAVE_TE:
        with pytest.raises(ValueError, match=re.escape(te_grouped.TE_MISSING_MESSAGE)):
            kernel(x, [3, 2], w1, w2, probs, gelu)
    else:
        with pytest.raises(ValueError, match="CUDA tensors only.*device cpu"):
            kernel(x, [3, 2], w1, w2, probs, gelu)


def test_te_missing_message_is_the_documented_one() -> None:
    assert te_grouped.TE_MISSING_MESSAGE == (
        "moe_expert_backend='te' needs Transformer Engine (pip install 'megatron-moe-ext[gpu]' on a GPU "
        "machine); choose 'grouped' or 'eager'"
    )


def test_te_kernel_names_the_device_when_te_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(te_grouped._compat, "HAVE_TE", True)
    x, w1, w2, probs, _ = make_inputs([3, 2], 16, 8, False)
    with pytest.raises(ValueError, match=r"CUDA tensors only, got the expert input on device cpu"):
        te_grouped.expert_mlp_te(x, [3, 2], w1, w2, probs, gelu)


def test_get_te_kernel_does_not_import_transformer_engine() -> None:
    kernel = get_expert_mlp_kernel("te")
    assert kernel is EXPERT_MLP_KERNELS["te"]
    if not HAVE_TE:
        assert "transformer_engine" not in sys.modules
    # In a fresh interpreter, also where TE is installed: neither TE nor te_grouped gets imported.
    code = (
        "import sys\n"
        "from megatron_moe_ext.kernels.expert_mlp import get_expert_mlp_kernel\n"
        "get_expert_mlp_kernel('te')\n"
        "print(sorted(m for m in sys.modules if m.startswith('transformer_engine') or m.endswith('te_grouped')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout


def test_config_accepts_te_backend() -> None:
    from megatron_moe_ext.config import EXPERT_BACKENDS
    from megatron_moe_ext.testing.tiny import tiny_config

    assert "te" in EXPERT_BACKENDS
    assert tiny_config(moe_expert_backend="te").moe_expert_backend == "te"


# ------------------------------------------------------------------------------------------------
# CPU tier: the kernel's logic through stand-ins for TE


class FakeGemm:
    """TE's grouped GEMM semantics (``getGemmOutputShape``): out[i] = op_b(B[i]) @ op_a(A[i]), with
    op_a = transpose when layout[0] == 'T' (A is [out, in] then), op_b = transpose when layout[1] == 'T'.
    Records every call; ``align`` asserts FP8 row alignment."""

    def __init__(self, align: int | None = None) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.align = align

    def __call__(self, A, B, out, *, layout, m_splits, grad, use_split_accumulator):
        assert len(A) == len(B) == len(out) == len(m_splits)
        assert all(m > 0 for m in m_splits), "empty experts must be left out"
        if self.align is not None:
            assert all(m % self.align == 0 for m in m_splits), m_splits
        self.calls.append((layout, list(m_splits)))
        for a, b, o in zip(A, B, out):
            a, b = unwrap(a), unwrap(b)
            aa = a.t() if layout[0] == "T" else a
            bb = b.t() if layout[1] == "T" else b
            o.copy_(bb @ aa)


@dataclasses.dataclass
class FakeQuantized:
    """Stand-in for a quantized tensor: bf16-rounded data plus the usages it was made with."""

    data: torch.Tensor
    rowwise: bool
    columnwise: bool
    dtype: str


def unwrap(t):
    return t.data.to(torch.float32) if isinstance(t, FakeQuantized) else t


class FakeQuantizer:
    made: list[tuple] = []

    def __init__(self, fp8_dtype, device=None, *, rowwise=True, columnwise=True, **extra) -> None:
        self.dtype, self.rowwise, self.columnwise, self.extra = fp8_dtype, rowwise, columnwise, extra
        self.internal = False
        FakeQuantizer.made.append((type(self).__name__, fp8_dtype, rowwise, columnwise, tuple(sorted(extra))))

    def __call__(self, t: torch.Tensor) -> FakeQuantized:
        return FakeQuantized(t.to(torch.bfloat16), self.rowwise, self.columnwise, self.dtype)


class FakeMXFP8Quantizer(FakeQuantizer):
    pass


class FakeRecipe:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def delayed(self) -> bool:
        return self.kind == "delayed"

    def float8_current_scaling(self) -> bool:
        return self.kind == "current"

    def mxfp8(self) -> bool:
        return self.kind == "mxfp8"

    def float8_block_scaling(self) -> bool:
        return self.kind == "block"


def fake_api(gemm: FakeGemm, recipe: FakeRecipe | None = None) -> te_grouped.TEApi:
    state = types.SimpleNamespace(is_fp8_enabled=lambda: recipe is not None, get_fp8_recipe=lambda: recipe)
    return te_grouped.TEApi(
        version="fake",
        grouped_gemm=gemm,
        fp8_state=state,
        get_fp8_te_dtype=lambda r, fprop: "e4m3" if fprop else "e5m2",
        float8_current_scaling_quantizer=FakeQuantizer,
        mxfp8_quantizer=FakeMXFP8Quantizer,
    )


FAKE_CASES = {
    "balanced": [6, 6, 6, 6],
    "imbalanced_with_empty": [0, 9, 1, 0, 5, 3, 0, 2],
    "all_empty": [0, 0, 0],
}


@pytest.mark.parametrize("name", sorted(FAKE_CASES))
@pytest.mark.parametrize("gated", [False, True])
def test_kernel_logic_matches_eager_through_a_stand_in_gemm(name: str, gated: bool) -> None:
    counts = FAKE_CASES[name]
    inputs = make_inputs(counts, 16, 8, gated)
    gemm = FakeGemm()
    kernel = lambda *args: te_grouped.expert_mlp_with_api(fake_api(gemm), *args)  # noqa: E731
    ref_out, ref_grads = run(get_expert_mlp_kernel("eager"), counts, inputs, gated)
    out, grads = run(kernel, counts, inputs, gated)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for got, want, what in zip(grads, ref_grads, ("x", "w1", "w2", "probs")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {what}: {m}")
    active = [c for c in counts if c]
    if active:  # fc1, fc2 forward; then fc2 dgrad+wgrad, fc1 dgrad+wgrad
        assert [layout for layout, _ in gemm.calls] == ["TN", "TN", "NN", "NT", "NN", "NT"]
        assert all(m == active for _, m in gemm.calls)
    else:
        assert gemm.calls == []


def test_weight_grad_only_skips_dgrad() -> None:
    x, w1, w2, probs, grad = make_inputs([4, 0, 3], 16, 8, False)
    w1.requires_grad_()
    gemm = FakeGemm()
    out = te_grouped.expert_mlp_with_api(fake_api(gemm), x, [4, 0, 3], w1, w2, probs, gelu)
    out.backward(grad)
    # fc2 needs dgrad (to reach w1) but no wgrad; fc1 needs wgrad only.
    assert [layout for layout, _ in gemm.calls] == ["TN", "TN", "NN", "NT"]
    assert torch.all(w1.grad[1] == 0)


@pytest.mark.parametrize("recipe,align,quantizer", [("delayed", 16, "FakeQuantizer"),
                                                    ("current", 16, "FakeQuantizer"),
                                                    ("mxfp8", 32, "FakeMXFP8Quantizer")])
def test_fp8_pads_rows_quantizes_and_unpads(recipe: str, align: int, quantizer: str) -> None:
    counts = [0, 9, 1, 0, 35, 3, 16, 2]
    inputs = make_inputs(counts, 32, 32, True)
    gemm = FakeGemm(align=align)
    FakeQuantizer.made.clear()
    kernel = lambda *args: te_grouped.expert_mlp_with_api(fake_api(gemm, FakeRecipe(recipe)), *args)  # noqa: E731
    ref_out, ref_grads = run(get_expert_mlp_kernel("eager"), counts, inputs, True)
    out, grads = run(kernel, counts, inputs, True)
    padded = [-(-c // align) * align for c in counts if c]
    assert all(m == padded for _, m in gemm.calls) and len(gemm.calls) == 6
    # bf16-rounded operands: loose agreement; the padding must not leak into any gradient.
    rel = ((out - ref_out).norm() / ref_out.norm()).item()
    assert rel < 2e-2, rel
    for got, want in zip(grads, ref_grads):
        assert ((got - want).norm() / want.norm()).item() < 2e-2
    kinds = {m[0] for m in FakeQuantizer.made}
    assert kinds == {quantizer}
    dtypes = {m[1] for m in FakeQuantizer.made}
    assert dtypes == {"e4m3", "e5m2"}  # forward operands E4M3, output gradients E5M2
    # Everything needs dgrad and wgrad here, so every operand is quantized both row- and column-wise.
    assert {(m[2], m[3]) for m in FakeQuantizer.made} == {(True, True)}


def test_fp8_refuses_unaligned_dims_and_unsupported_recipes() -> None:
    x, w1, w2, probs, _ = make_inputs([3, 2], 24, 8, False)
    with pytest.raises(ValueError, match=r"multiples of 16; got \{'hidden': 24, 'fc1 rows': 8, 'expert hidden': 8\}"):
        te_grouped.expert_mlp_with_api(fake_api(FakeGemm(), FakeRecipe("delayed")), x, [3, 2], w1, w2, probs, gelu)
    x, w1, w2, probs, _ = make_inputs([3, 2], 32, 32, False)
    with pytest.raises(ValueError, match="the active recipe is FakeRecipe"):
        te_grouped.expert_mlp_with_api(fake_api(FakeGemm(), FakeRecipe("block")), x, [3, 2], w1, w2, probs, gelu)


def test_bad_counts_are_refused() -> None:
    x, w1, w2, probs, _ = make_inputs([3, 2], 16, 8, False)
    with pytest.raises(ValueError, match=r"tokens_per_expert=\[3, 1\] must give 2 non-negative counts summing to 5"):
        te_grouped.expert_mlp_with_api(fake_api(FakeGemm()), x, [3, 1], w1, w2, probs, gelu)


def test_aligned_counts_layout() -> None:
    padded, dest = te_grouped.aligned_counts([0, 3, 16, 1], 16, torch.device("cpu"))
    assert padded == [0, 16, 16, 16]
    assert dest.tolist() == [0, 1, 2, *range(16, 32), 32]
    assert te_grouped.aligned_counts([16, 0, 32], 16, torch.device("cpu")) == ([16, 0, 32], None)


def test_general_grouped_gemm_signatures_of_each_te_release() -> None:
    seen = {}

    def te_2_0(A, B, out, out_dtype, workspaces, layout="TN", m_splits=None, gelu=False, grad=False,
               accumulate=False, bias=None, use_bias=False, use_split_accumulator=False, D_dtype=None,
               single_output=False):
        seen["2.0"] = dict(workspaces=workspaces, layout=layout, out_dtype=out_dtype, single_output=single_output)

    def te_2_10(A, B, out, out_dtype, layout="TN", m_splits=None, gelu=False, grad=False, accumulate=False,
                bias=None, use_bias=False, use_split_accumulator=False, D_dtype=None, single_output=False):
        seen["2.10"] = dict(layout=layout, m_splits=m_splits)

    def te_2_11(A, B, out, quantization_params, out_dtype, layout="TN", m_splits=None, gelu=False, grad=False,
                accumulate=False, bias=None, use_bias=False, use_split_accumulator=False, D_dtype=None,
                single_output=False):
        seen["2.11"] = dict(quantization_params=quantization_params, grad=grad, accumulate=accumulate)

    out = [torch.empty(2, 2)]
    args = dict(layout="NT", m_splits=[2], grad=True, use_split_accumulator=True)
    te_grouped.adapt_general_grouped_gemm(te_2_0, lambda: ["ws"])([1], [2], out, **args)
    te_grouped.adapt_general_grouped_gemm(te_2_10)([1], [2], out, **args)
    te_grouped.adapt_general_grouped_gemm(te_2_11)([1], [2], out, **args)
    assert seen == {
        "2.0": dict(workspaces=["ws"], layout="NT", out_dtype=torch.float32, single_output=False),
        "2.10": dict(layout="NT", m_splits=[2]),
        "2.11": dict(quantization_params=[None], grad=True, accumulate=False),
    }

    def te_1_x(A, B, out, dtype, workspaces, gelu=False, gelu_input=None, grad=False, accumulate=False,
               layout="TN", bias=None, use_bias=False):
        pass

    with pytest.raises(ValueError, match="lacks m_splits, out_dtype, single_output, use_split_accumulator"):
        te_grouped.adapt_general_grouped_gemm(te_1_x, lambda: [])


# ------------------------------------------------------------------------------------------------
# GPU tier: the real Transformer Engine


GPU_COUNTS = {
    "balanced": [32, 32, 32, 32],
    "imbalanced_with_empty": [16, 0, 40, 8, 24, 1, 0, 33],
}


def _report(what: str, got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got - want).abs()
    rel = (diff.norm() / want.norm().clamp_min(1e-12)).item()
    print(f"{what}: max |diff| {diff.max().item():.3e}  mean |diff| {diff.mean().item():.3e}  rel {rel:.3e}")
    return rel


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(GPU_COUNTS))
@pytest.mark.parametrize("gated", [False, True])
def test_te_kernel_matches_eager_on_gpu(dtype: torch.dtype, name: str, gated: bool) -> None:
    pytest.importorskip("transformer_engine")
    counts = GPU_COUNTS[name]
    inputs = make_inputs(counts, 64, 32, gated, dtype=dtype, device="cuda")
    ref_out, ref_grads = run(get_expert_mlp_kernel("eager"), counts, inputs, gated)
    out, grads = run(get_expert_mlp_kernel("te"), counts, inputs, gated)
    # TE runs FP32 GEMMs on TF32 tensor cores; torch's eager matmuls are full FP32 by default.
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    _report(f"{dtype} {name} out", out, ref_out)
    torch.testing.assert_close(out, ref_out, **tol)
    for got, want, what in zip(grads, ref_grads, ("x", "w1", "w2", "probs")):
        _report(f"{dtype} {name} grad {what}", got, want)
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"grad {what}: {m}")
    assert torch.all(grads[1][[e for e, c in enumerate(counts) if c == 0]] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe_name", ["DelayedScaling", "Float8CurrentScaling"])
@pytest.mark.parametrize("gated", [False, True])
def test_te_kernel_fp8_on_gpu(recipe_name: str, gated: bool) -> None:
    te = pytest.importorskip("transformer_engine")
    import transformer_engine.pytorch as te_pt
    from transformer_engine.common import recipe as te_recipe

    if not hasattr(te_recipe, recipe_name):
        pytest.skip(f"Transformer Engine {getattr(te, '__version__', '?')} has no {recipe_name}")
    check = getattr(te_pt, "is_fp8_available", None)
    if check is not None:
        available = check()
        ok = available[0] if isinstance(available, tuple) else available
        if not ok:
            pytest.skip(f"FP8 not available on this GPU: {available}")
    counts = [17, 0, 40, 5, 23, 1, 0, 33]  # not multiples of 16: exercises the padding
    inputs = make_inputs(counts, 64, 32, gated, dtype=torch.bfloat16, device="cuda")
    ref_out, ref_grads = run(get_expert_mlp_kernel("eager"), counts, inputs, gated)
    with te_pt.fp8_autocast(enabled=True, fp8_recipe=getattr(te_recipe, recipe_name)()):
        x, w1, w2, probs, grad = (t.clone() for t in inputs)
        leaves = [t.requires_grad_() for t in (x, w1, w2, probs)]
        out = get_expert_mlp_kernel("te")(x, counts, w1, w2, probs, swiglu if gated else gelu)
    out.backward(grad)
    assert out.shape == ref_out.shape
    assert _report(f"fp8 {recipe_name} out", out.detach().float(), ref_out) < 0.1
    for t, want, what in zip(leaves, ref_grads, ("x", "w1", "w2", "probs")):
        assert _report(f"fp8 {recipe_name} grad {what}", t.grad.float(), want) < 0.1, what
