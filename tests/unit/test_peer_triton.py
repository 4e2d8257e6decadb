"""Triton PEER backend against the eager reference, forward and backward.

Without a GPU the kernels run on CPU tensors under the Triton interpreter. TRITON_INTERPRET=1 must
be set before Triton is imported, so those checks run in one subprocess (this file executed as a
script), which reports every case as JSON; the tests below then assert case by case.
The ``gpu`` tests run the same comparisons natively on CUDA at production-like shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_moe_ext.kernels.peer_experts import ACTIVATIONS, peer_experts

REPO_ROOT = Path(__file__).resolve().parents[2]
GRAD_NAMES = ("x", "u", "v", "gates")


def make_inputs(T: int, K: int, N: int, h: int, dtype: torch.dtype, device: str, seed: int = 0,
                ragged: bool = True) -> dict[str, torch.Tensor]:
    """Random PEER inputs; ragged: per-token counts in [0, K] with every fourth token empty."""
    gen = torch.Generator().manual_seed(seed)
    if ragged:
        counts = torch.randint(0, K + 1, (T,), generator=gen)
        counts[::4] = 0
    else:
        counts = torch.full((T,), K)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    P = int(offsets[-1])
    return {
        "x": torch.randn(T, h, generator=gen).to(device, dtype),
        "u": (torch.randn(N, h, generator=gen) * h ** -0.5).to(device, dtype),  # dots ~ N(0, 1)
        "v": torch.randn(N, h, generator=gen).to(device, dtype),
        "ids": torch.randint(0, N, (P,), generator=gen).to(device),
        "gates": torch.rand(P, generator=gen).to(device),
        "offsets": offsets.to(device),
        "dy": torch.randn(T, h, generator=gen).to(device, dtype),
    }


def run_backend(inputs: dict[str, torch.Tensor], backend: str, activation: str, *, deterministic: bool = False,
                main_grad: bool = False, main_grad_start: float = 0.0,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients (fp32) of one forward + backward; ``dtype`` recasts x, u, v, dy first.

    ``main_grad``: u and v carry Megatron's fp32 ``main_grad`` (filled with ``main_grad_start``, as if
    earlier micro-batches had accumulated into it); their gradients are read back from it."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    x, u, v = (cast(inputs[k]).clone().requires_grad_() for k in ("x", "u", "v"))
    gates = inputs["gates"].clone().requires_grad_()
    if main_grad:
        for table in (u, v):
            table.main_grad = torch.full(table.shape, main_grad_start, dtype=torch.float32, device=table.device)
            table.grad_added_to_main_grad = False
    out = peer_experts(x, u, v, inputs["ids"], gates, inputs["offsets"], activation, backend=backend,
                       deterministic=deterministic)
    out.backward(cast(inputs["dy"]))
    grads = {"x": x.grad, "gates": gates.grad}
    for name, table in (("u", u), ("v", v)):
        if main_grad:
            assert table.grad_added_to_main_grad is True, f"{name}.grad_added_to_main_grad not set"
            grads[name] = table.main_grad - main_grad_start
        else:
            grads[name] = table.grad
    return out.detach().float(), {k: g.float() for k, g in grads.items()}


def assert_matches(got: tuple, want: tuple, tol: float) -> None:
    """Relative tolerance per element plus an absolute floor scaled by the tensor's magnitude."""
    pairs = [("out", got[0], want[0])] + [(f"grad {k}", got[1][k], want[1][k]) for k in GRAD_NAMES]
    for what, g, w in pairs:
        atol = tol * max(1.0, float(w.abs().max())) if w.numel() else tol
        torch.testing.assert_close(g, w, rtol=tol, atol=atol, msg=lambda m, what=what: f"{what}: {m}")


def compare(inputs: dict[str, torch.Tensor], activation: str, *, deterministic: bool, tol: float,
            dtype: torch.dtype | None = None, main_grad: bool = False, main_grad_start: float = 0.0) -> None:
    """Triton (in ``dtype``) against eager in fp32 on the same values."""
    want = run_backend(inputs, "eager", activation, dtype=torch.float32)
    got = run_backend(inputs, "triton", activation, deterministic=deterministic, dtype=dtype, main_grad=main_grad,
                      main_grad_start=main_grad_start)
    assert_matches(got, want, tol)


def rounded(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """x, u, v, dy rounded to ``dtype`` but kept fp32: the reference sees exactly the kernel's values."""
    return {k: (t.to(dtype).float() if t.is_floating_point() and k != "gates" else t) for k, t in inputs.items()}


def assert_bitwise_repeatable(inputs: dict[str, torch.Tensor], activation: str, dtype: torch.dtype | None = None) -> None:
    first = run_backend(inputs, "triton", activation, deterministic=True, dtype=dtype)
    second = run_backend(inputs, "triton", activation, deterministic=True, dtype=dtype)
    assert torch.equal(first[0], second[0]), "out differs between runs"
    for k in GRAD_NAMES:
        assert torch.equal(first[1][k], second[1][k]), f"grad {k} differs between runs"


# ---------------------------------------------------------------- interpreter (CPU) cases

TINY = {"T": 12, "K": 4, "N": 20, "h": 24}  # h not a power of two; N small so expert rows repeat
FP32_TOL = 1e-5


def _cpu_cases() -> dict[str, object]:
    """name -> zero-argument check, run inside the TRITON_INTERPRET=1 subprocess."""
    from megatron_moe_ext.kernels import peer_triton

    def with_blocks(check, max_block_h: int | None = None, tile: int = 64):
        # Small tiles so a token's pairs span several BLOCK_P blocks (tail masking included);
        # max_block_h below h forces the looped wide-row path.
        def run() -> None:
            saved = peer_triton.MAX_BLOCK_H, peer_triton._TILE_ELEMS
            peer_triton.MAX_BLOCK_H = max_block_h or saved[0]
            peer_triton._TILE_ELEMS = tile
            try:
                check()
            finally:
                peer_triton.MAX_BLOCK_H, peer_triton._TILE_ELEMS = saved
        return run

    inputs = make_inputs(**TINY, dtype=torch.float32, device="cpu")
    cases: dict[str, object] = {}
    for act in ACTIVATIONS:
        for det in (False, True):
            cases[f"{act}-det{int(det)}"] = with_blocks(
                lambda act=act, det=det: compare(inputs, act, deterministic=det, tol=FP32_TOL))
    for det in (False, True):  # h = 24 in blocks of 8: the wide-row (h loop) kernels
        cases[f"wide_h-det{int(det)}"] = with_blocks(
            lambda det=det: compare(inputs, "silu", deterministic=det, tol=FP32_TOL), max_block_h=8, tile=16)
        cases[f"main_grad-det{int(det)}"] = with_blocks(
            lambda det=det: compare(inputs, "gelu", deterministic=det, tol=FP32_TOL, main_grad=True, main_grad_start=0.5))
    cases["uniform_counts"] = with_blocks(
        lambda: compare(make_inputs(**TINY, dtype=torch.float32, device="cpu", ragged=False), "relu",
                        deterministic=False, tol=FP32_TOL))
    for det in (False, True):  # the interpreter emulates bf16 too
        cases[f"bf16-det{int(det)}"] = with_blocks(
            lambda det=det: compare(rounded(inputs, torch.bfloat16), "gelu", deterministic=det, tol=2e-2,
                                    dtype=torch.bfloat16))
    cases["partial_grads"] = with_blocks(lambda: check_partial_grads(inputs))
    cases["no_pairs"] = with_blocks(check_no_pairs)
    cases["bitwise_deterministic"] = with_blocks(lambda: assert_bitwise_repeatable(inputs, "gelu"))
    return cases


CPU_CASE_NAMES = [f"{a}-det{d}" for a in ACTIVATIONS for d in (0, 1)] + [
    "wide_h-det0", "main_grad-det0", "wide_h-det1", "main_grad-det1", "uniform_counts", "bf16-det0", "bf16-det1",
    "partial_grads", "no_pairs", "bitwise_deterministic"]


def check_partial_grads(inputs: dict[str, torch.Tensor]) -> None:
    """Only the tables need gradients (frozen x and gates): the kernels skip the other outputs."""
    for det in (False, True):
        grads = []
        for backend in ("eager", "triton"):
            u, v = (inputs[k].clone().requires_grad_() for k in ("u", "v"))
            out = peer_experts(inputs["x"], u, v, inputs["ids"], inputs["gates"], inputs["offsets"], "gelu",
                               backend=backend, deterministic=det)
            grads.append(torch.autograd.grad(out, (u, v), inputs["dy"]))
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want, rtol=FP32_TOL, atol=FP32_TOL * float(want.abs().max()))
    # Frozen tables (only x and gates need gradients): no table work, inputs left untouched.
    for det in (False, True):
        grads = []
        for backend in ("eager", "triton"):
            x, gates = inputs["x"].clone().requires_grad_(), inputs["gates"].clone().requires_grad_()
            out = peer_experts(x, inputs["u"], inputs["v"], inputs["ids"], gates, inputs["offsets"], "silu",
                               backend=backend, deterministic=det)
            grads.append(torch.autograd.grad(out, (x, gates), inputs["dy"]))
            assert torch.equal(gates.detach(), inputs["gates"]) and torch.equal(x.detach(), inputs["x"])
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want, rtol=FP32_TOL, atol=FP32_TOL * float(want.abs().max()))


def check_no_pairs() -> None:
    """Every token empty (P = 0): zero output and gradients, no launch over pairs."""
    inputs = make_inputs(T=3, K=0, N=5, h=24, dtype=torch.float32, device="cpu")
    for det in (False, True):
        out, grads = run_backend(inputs, "triton", "gelu", deterministic=det)
        assert not out.any() and all(not g.any() for g in grads.values())
        assert grads["gates"].shape == (0,)


def _script_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from megatron_moe_ext.kernels import peer_triton

    results: dict[str, str] = {}
    if not peer_triton.available():
        results = {name: "SKIP triton is not importable" for name in CPU_CASE_NAMES}
    else:
        for name, check in _cpu_cases().items():
            try:
                check()
                results[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - any failure (Triton's included) is reported per case
                results[name] = f"{type(exc).__name__}: {exc}"
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], check=False, env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter run failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("case", CPU_CASE_NAMES)
def test_triton_interpreter_matches_eager(interpreter_results: dict[str, str], case: str) -> None:
    result = interpreter_results[case]
    if result.startswith("SKIP"):
        pytest.skip(result)
    assert result == "ok", result


def test_module_imports_and_reports_availability() -> None:
    from megatron_moe_ext.kernels import peer_triton

    assert isinstance(peer_triton.available(), bool)


def test_module_imports_without_triton() -> None:
    """A None entry in sys.modules makes ``import triton`` raise ImportError, as when it is absent."""
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "from megatron_moe_ext.kernels import peer_triton\n"
            "assert peer_triton.available() is False\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- native CUDA cases

GPU_SHAPE = {"T": 2048, "K": 128, "N": 65536, "h": 512}
GPU_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # fp32: P-term sums in another order


@pytest.fixture(scope="module")
def gpu_inputs() -> dict[str, torch.Tensor]:
    return make_inputs(**GPU_SHAPE, dtype=torch.float32, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_triton_cuda_matches_eager(gpu_inputs, activation: str, deterministic: bool, dtype: torch.dtype) -> None:
    # Values are drawn in fp32 and cast, so bf16 is compared with eager fp32 on the same (rounded) values.
    compare(rounded(gpu_inputs, dtype), activation, deterministic=deterministic, tol=GPU_TOL[dtype], dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_triton_cuda_main_grad(gpu_inputs, deterministic: bool, dtype: torch.dtype) -> None:
    compare(rounded(gpu_inputs, dtype), "gelu", deterministic=deterministic, tol=GPU_TOL[dtype], dtype=dtype, main_grad=True)


@pytest.mark.gpu
def test_triton_cuda_deterministic_is_bitwise(gpu_inputs) -> None:
    assert_bitwise_repeatable(gpu_inputs, "gelu")


@pytest.mark.gpu
def test_triton_cuda_wide_hidden() -> None:
    """h = 4096 exceeds MAX_BLOCK_H: the looped wide-row kernels."""
    inputs = make_inputs(T=256, K=32, N=4096, h=4096, dtype=torch.float32, device="cuda")
    for det in (False, True):
        compare(inputs, "silu", deterministic=det, tol=1e-4)


if __name__ == "__main__":
    _script_main()
