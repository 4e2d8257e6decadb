"""Product-key top-k against brute force over all N full keys: ids, scores and gradients; the per-side
candidates it exposes; bad inputs.

Legend: T tokens, H heads, K top-k, n1 / n2 sub-keys per side, N = n1*n2 experts, D d_key.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import megatron_moe_ext
from megatron_moe_ext.kernels.product_keys import (
    num_experts_to_grid,
    product_key_half_scores,
    product_key_topk,
    product_key_topk_reference,
    product_key_topk_with_candidates,
)


def make_inputs(tokens, heads, d_key, n1, n2, *, layout, dtype=torch.float64, seed=0):
    """Queries [T, H, D] and sub-keys in one of the layouts: 'per_head', 'shared', 'rect_per_head', 'rect_shared'."""
    gen = torch.Generator().manual_seed(seed)
    q_THD = torch.randn(tokens, heads, d_key, generator=gen, dtype=dtype)
    lead = (heads,) if layout in ("per_head", "rect_per_head") else ()
    if layout in ("per_head", "shared"):
        assert n1 == n2
        return q_THD, torch.randn(*lead, 2, n1, d_key // 2, generator=gen, dtype=dtype)  # [H,] 2, n, D/2
    rows = torch.randn(*lead, n1, d_key // 2, generator=gen, dtype=dtype)
    cols = torch.randn(*lead, n2, d_key // 2, generator=gen, dtype=dtype)
    return q_THD, (rows, cols)


def leaves(subkeys):
    return list(subkeys) if isinstance(subkeys, tuple) else [subkeys]


def run_with_grads(fn, q_THD, subkeys, k, subkey_topk, weights_THK):
    q = q_THD.clone().requires_grad_()
    keys = tuple(t.clone().requires_grad_() for t in leaves(subkeys))
    scores, ids = fn(q, keys if isinstance(subkeys, tuple) else keys[0], k, subkey_topk=subkey_topk)
    (scores * weights_THK).sum().backward()
    return scores.detach(), ids, [q.grad] + [t.grad for t in keys]


CASES = [  # (T, H, D, n1, n2, K, k', layout)
    (7, 1, 8, 4, 4, 1, None, "per_head"),
    (7, 3, 16, 8, 8, 4, None, "per_head"),
    (5, 2, 8, 8, 8, 8, None, "shared"),  # K == n
    (5, 4, 8, 6, 6, 20, None, "per_head"),  # K > n (exact: each side keeps all n)
    (6, 2, 12, 16, 16, 5, 9, "shared"),  # k' > K
    (6, 2, 8, 4, 16, 8, None, "rect_per_head"),  # K between n1 and n2
    (4, 3, 8, 10, 3, 12, 12, "rect_shared"),
    (3, 2, 8, 5, 7, 35, None, "rect_per_head"),  # K == N
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}H{c[1]}D{c[2]}n{c[3]}x{c[4]}K{c[5]}kp{c[6]}-{c[7]}")
def test_matches_brute_force_forward_and_backward(case):
    tokens, heads, d_key, n1, n2, k, kp, layout = case
    q_THD, subkeys = make_inputs(tokens, heads, d_key, n1, n2, layout=layout)
    w_THK = torch.randn(tokens, heads, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fast = run_with_grads(product_key_topk, q_THD, subkeys, k, kp, w_THK)
    ref = run_with_grads(product_key_topk_reference, q_THD, subkeys, k, kp, w_THK)
    # No ties in the reference's top-(K+1) (fp64 random), so the top-K set and order are unique.
    top_THK1 = product_key_topk_reference(q_THD, subkeys, min(k + 1, n1 * n2))[0]
    assert (top_THK1[..., :-1] - top_THK1[..., 1:]).min() > 1e-9
    assert fast[1].dtype == torch.int64 and fast[1].shape == (tokens, heads, k)
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=1e-9)
    assert (fast[0][..., :-1] >= fast[0][..., 1:]).all(), "scores must be sorted descending"
    for g_fast, g_ref in zip(fast[2], ref[2]):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["per_head", "shared"])
def test_fp32_matches_brute_force(layout):
    q_THD, subkeys = make_inputs(32, 4, 32, 16, 16, layout=layout, dtype=torch.float32, seed=3)
    scores, ids = product_key_topk(q_THD, subkeys, 8)
    ref_scores, ref_ids = product_key_topk_reference(q_THD, subkeys, 8)
    assert scores.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # fp32 on CPU: the compiled row top-k
def test_candidates_are_each_sides_top_kp_half_scores(dtype):
    q_THD, subkeys = make_inputs(9, 3, 16, 12, 12, layout="per_head", dtype=dtype, seed=4)
    scores, ids, candidates = product_key_topk_with_candidates(q_THD, subkeys, 4, subkey_topk=6)
    a_THk1, row_THk1, b_THk2, col_THk2 = candidates
    plain_scores, plain_ids = product_key_topk(q_THD, subkeys, 4, subkey_topk=6)
    assert torch.equal(ids, plain_ids) and torch.equal(scores, plain_scores)
    for vals, idx, half in zip((a_THk1, b_THk2), (row_THk1, col_THk2), product_key_half_scores(q_THD, subkeys)):
        ref_vals, ref_idx = half.topk(6, dim=-1)
        assert vals.shape == (9, 3, 6) and idx.dtype == torch.int64
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(vals, ref_vals)
    # Every selected expert's row and column are among the token's candidates.
    assert bool((ids // 12).unsqueeze(-1).eq(row_THk1.unsqueeze(-2)).any(-1).all())
    assert bool((ids % 12).unsqueeze(-1).eq(col_THk2.unsqueeze(-2)).any(-1).all())


def test_public_export():
    assert megatron_moe_ext.product_key_topk is product_key_topk
    assert "product_key_topk" in megatron_moe_ext.__all__


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel, self.max_op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.max_numel:
                self.max_numel, self.max_op = t.numel(), func
        return out


def test_million_experts_never_materialises_TN():
    tokens, heads, d_key, n, k = 4, 2, 8, 1024, 16  # N = 1M
    q_THD, subkeys = make_inputs(tokens, heads, d_key, n, n, layout="per_head", seed=5)
    q_THD.requires_grad_()
    subkeys.requires_grad_()
    with MaxNumel() as probe:
        scores, ids = product_key_topk(q_THD, subkeys, k)
        scores.sum().backward()
    # Largest intermediates are O(T H n) (sub-key scores) or the inputs' size, never O(N).
    assert probe.max_numel <= max(tokens * heads * n, subkeys.numel()), (probe.max_numel, probe.max_op)
    # Brute force for these few tokens, over row blocks of full keys (keeps memory small).
    with torch.no_grad():
        rows, cols = subkeys[:, 0], subkeys[:, 1]
        best_s, best_i = [], []
        for r0 in range(0, n, 128):
            keys_HBD = torch.cat([rows[:, r0:r0 + 128, None, :].expand(-1, -1, n, -1),
                                  cols[:, None, :, :].expand(-1, 128, -1, -1)], dim=-1).flatten(1, 2)
            s, i = torch.topk(torch.einsum("thd,hbd->thb", q_THD, keys_HBD), k, dim=-1)
            best_s.append(s)
            best_i.append(i + r0 * n)
        s, pos = torch.topk(torch.cat(best_s, -1), k, dim=-1)
        ids_ref = torch.gather(torch.cat(best_i, -1), -1, pos)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(scores.detach(), s, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shape=(3, 2, 7), keys=(2, 2, 4, 3), k=2), r"d_key=7 is odd.*even d_key"),
        (dict(shape=(3, 2, 8), keys=(2, 2, 4, 3), k=2), r"width 3.*d_key/2 = 4"),
        (dict(shape=(3, 2, 8), keys=(3, 2, 4, 4), k=2), r"per head for 3 heads.*H=2"),
        (dict(shape=(3, 8), keys=(2, 4, 4), k=2), r"expected \[T, H, D\]"),
        (dict(shape=(3, 2, 8), keys=(2, 5, 4, 4), k=2), r"expected \[H, 2, n, D/2\]"),
        (dict(shape=(3, 2, 8), keys=(2, 4, 4), k=0), r"k=0 must be in \[1, N\].*16"),
        (dict(shape=(3, 2, 8), keys=(2, 4, 4), k=17), r"k=17 must be in \[1, N\].*4\*4 = 16"),
        (dict(shape=(3, 2, 8), keys=(2, 4, 4), k=3, subkey_topk=2), r"subkey_topk=2 < 3 = min\(k=3, n=4\).*exact.*>= 3"),
        (dict(shape=(3, 2, 8), keys=(2, 4, 4), k=3, subkey_topk=5), r"subkey_topk=5 exceeds.*n1=4, n2=4.*<= 4"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, match):
    q = torch.randn(*kwargs["shape"])
    keys = torch.randn(*kwargs["keys"])
    for fn in (product_key_topk, product_key_topk_reference):
        with pytest.raises(ValueError, match=match):
            fn(q, keys, kwargs["k"], subkey_topk=kwargs.get("subkey_topk"))


def test_bad_rectangular_and_dtype_inputs():
    q = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match=r"both be"):
        product_key_topk(q, (torch.randn(2, 4, 4), torch.randn(5, 4)), 2)
    with pytest.raises(ValueError, match=r"float64.*cast"):
        product_key_topk(q, torch.randn(2, 4, 4, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match=r"k=21 must be in \[1, N\].*4\*5 = 20"):
        product_key_topk(q, (torch.randn(4, 4), torch.randn(5, 4)), 21)


def test_num_experts_to_grid():
    assert num_experts_to_grid(4096) == (64, 64)
    assert num_experts_to_grid(1) == (1, 1)
    assert num_experts_to_grid(2048, grid=(32, 64)) == (32, 64)
    with pytest.raises(ValueError, match=r"num_experts=2048 is not a perfect square.*2025 or 2116.*grid=\(n1, n2\)"):
        num_experts_to_grid(2048)
    with pytest.raises(ValueError, match=r"grid \(32, 32\) holds 1024 experts, not num_experts=2048"):
        num_experts_to_grid(2048, grid=(32, 32))
    with pytest.raises(ValueError, match=r"num_experts=0 must be >= 1"):
        num_experts_to_grid(0)


def test_benchmark_smoke(capsys):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_product_keys.py"
    spec = importlib.util.spec_from_file_location("bench_product_keys", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke"])
    out = capsys.readouterr().out
    assert "ratio vs first" in out and "goal" in out, out
