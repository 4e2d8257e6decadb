"""gpu tier: the product-key core (``kernels/product_keys.py``) on CUDA against the brute-force reference,
forward (ids, scores) and backward (gradients of queries and sub-keys).

fp64 is exact as on CPU (tests/unit/test_product_keys.py); fp32 compares the tokens whose reference top-(K+1)
has no near-tie (a GEMM in another order may swap two scores closer than rounding). The body (``check_topk``)
takes the device, so it is also correct on CPU.

Legend: T tokens, H heads, D d_key (D2 = D/2), n sub-keys per side, K top-k.
"""

from __future__ import annotations

import pytest
import torch

from megatron_moe_ext.kernels.product_keys import product_key_topk, product_key_topk_reference

T, H, D, N_SIDE, K = 48, 4, 32, 32, 8
TIE_GAP = {torch.float64: 1e-9, torch.float32: 1e-4}
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def inputs(dtype: torch.dtype, device: str, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [T, H, D] and sub-keys [H, 2, n, D2] (or [2, n, D2] shared), drawn in fp64 and cast."""
    gen = torch.Generator().manual_seed(11)
    q_THD = torch.randn(T, H, D, generator=gen, dtype=torch.float64).to(device, dtype)
    lead = () if shared else (H,)
    keys = torch.randn(*lead, 2, N_SIDE, D // 2, generator=gen, dtype=torch.float64).to(device, dtype)
    return q_THD, keys


def run(fn, dtype: torch.dtype, device: str, shared: bool):
    q_THD, keys = (t.requires_grad_() for t in inputs(dtype, device, shared))
    w_THK = torch.randn(T, H, K, generator=torch.Generator().manual_seed(12), dtype=torch.float64).to(device, dtype)
    scores_THK, ids_THK = fn(q_THD, keys, K)
    (scores_THK * w_THK).sum().backward()
    return scores_THK.detach(), ids_THK, q_THD.grad, keys.grad


def check_topk(dtype: torch.dtype, device: str, shared: bool) -> None:
    fast = run(product_key_topk, dtype, device, shared)
    ref = run(product_key_topk_reference, dtype, device, shared)
    assert fast[0].device.type == torch.device(device).type
    assert fast[1].dtype == torch.int64 and fast[1].shape == (T, H, K)
    assert (fast[0][..., :-1] >= fast[0][..., 1:]).all(), "scores must be sorted descending"
    # Tokens (all heads) whose reference top-(K+1) has no near-tie: there the selection is unique.
    q_THD, keys = inputs(dtype, device, shared)
    top_THK1 = product_key_topk_reference(q_THD, keys, K + 1)[0]
    clear_T = ((top_THK1[..., :-1] - top_THK1[..., 1:]).amin(dim=(1, 2)) > TIE_GAP[dtype])
    assert clear_T.float().mean().item() > 0.5, "too many near-ties to compare: change the seed"
    assert torch.equal(fast[1][clear_T], ref[1][clear_T])
    torch.testing.assert_close(fast[0][clear_T], ref[0][clear_T], rtol=TOL[dtype], atol=TOL[dtype])
    if dtype == torch.float64:
        assert bool(clear_T.all()), "fp64 random scores have no near-ties"
    if bool(clear_T.all()):  # the gradients flow through the selected pairs: comparable when every token's are
        for got, want in zip(fast[2:], ref[2:]):
            torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_product_key_topk_matches_reference_on_gpu(dtype: torch.dtype, shared: bool) -> None:
    check_topk(dtype, "cuda", shared)
