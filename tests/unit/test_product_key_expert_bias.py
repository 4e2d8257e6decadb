"""Per-expert selection bias of the product-key router (``--moe-pk-expert-bias-balancing``): the
selection it makes against a brute-force biased top-k over each token's candidate grid, unbiased
scores for the gates, the bias update rules and the settings checks.

Legend: T tokens, H heads, k top-k per head, k' sub-key top-k, n1 x n2 grid per head, N = n1*n2.
"""

from __future__ import annotations

import pytest
import torch

from megatron_moe_ext.balancing.bias_update import selection_bias_step
from megatron_moe_ext.kernels.product_key_core import (
    biased_topk_from_half_scores,
    topk_from_half_scores,
)


def brute_force_candidate_topk(
    a_THn1: torch.Tensor, b_THn2: torch.Tensor, k: int, subkey_topk: int,
    row_bias_Hn1: torch.Tensor, col_bias_Hn2: torch.Tensor, expert_bias_HN: torch.Tensor,
) -> torch.Tensor:
    """Local ids_THk (sorted) of the top-k of (a_i + r_i) + (b_j + c_j) + e_ij over every (i, j) whose
    row is among the k' best of a + r and whose column is among the k' best of b + c: the full
    [T, H, n1, n2] grid, masked (the semantics, small grids only)."""
    T, H, n1 = a_THn1.shape
    n2 = b_THn2.shape[-1]
    ar_THn1, bc_THn2 = a_THn1 + row_bias_Hn1, b_THn2 + col_bias_Hn2
    rows_THk1 = torch.topk(ar_THn1, min(subkey_topk, n1), dim=-1).indices
    cols_THk2 = torch.topk(bc_THn2, min(subkey_topk, n2), dim=-1).indices
    in_rows_THn1 = torch.zeros(T, H, n1, dtype=torch.bool).scatter_(-1, rows_THk1, True)
    in_cols_THn2 = torch.zeros(T, H, n2, dtype=torch.bool).scatter_(-1, cols_THk2, True)
    full_THN = (ar_THn1.unsqueeze(-1) + bc_THn2.unsqueeze(-2)).reshape(T, H, -1) + expert_bias_HN
    grid_THN = (in_rows_THn1.unsqueeze(-1) & in_cols_THn2.unsqueeze(-2)).reshape(T, H, -1)
    ids_THk = torch.topk(full_THN.masked_fill(~grid_THN, float("-inf")), k, dim=-1).indices
    return ids_THk.sort(dim=-1).values


@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize(("n1", "n2", "k", "subkey_topk"), [(4, 4, 2, 2), (6, 5, 2, 3), (8, 8, 3, 5), (4, 4, 2, 4)])
def test_selection_equals_brute_force_over_the_candidate_grid(separable: bool, n1: int, n2: int, k: int, subkey_topk: int) -> None:
    g = torch.Generator().manual_seed(n1 * 100 + subkey_topk)
    T, H = 64, 2
    a_THn1, b_THn2 = torch.randn(T, H, n1, generator=g), torch.randn(T, H, n2, generator=g)
    zeros = (torch.zeros(H, n1), torch.zeros(H, n2))
    row_Hn1, col_Hn2 = (torch.randn(H, n1, generator=g), torch.randn(H, n2, generator=g)) if separable else zeros
    expert_HN = torch.randn(H, n1 * n2, generator=g)

    scores_THk, ids_THk = biased_topk_from_half_scores(
        a_THn1, b_THn2, k, subkey_topk=subkey_topk, row_bias_Hn1=row_Hn1 if separable else None,
        col_bias_Hn2=col_Hn2 if separable else None, expert_bias_HN=expert_HN,
    )
    expected = brute_force_candidate_topk(a_THn1, b_THn2, k, subkey_topk, row_Hn1, col_Hn2, expert_HN)
    assert torch.equal(ids_THk.sort(dim=-1).values, expected)
    # The gates' scores are the unbiased a_i + b_j of the chosen experts.
    rows_THk, cols_THk = ids_THk // n2, ids_THk % n2
    torch.testing.assert_close(scores_THk, a_THn1.gather(-1, rows_THk) + b_THn2.gather(-1, cols_THk))
    if subkey_topk >= max(n1, n2):  # the candidate grid is the whole grid: Megatron's expert-bias top-k over N
        full_THN = (a_THn1 + row_Hn1).unsqueeze(-1) + (b_THn2 + col_Hn2).unsqueeze(-2)
        dense = torch.topk(full_THN.reshape(T, H, -1) + expert_HN, k, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(ids_THk.sort(dim=-1).values, dense)


def test_expert_bias_moves_tokens_off_a_penalised_expert_with_unbiased_gradients() -> None:
    g = torch.Generator().manual_seed(3)
    T, H, n, k = 256, 1, 4, 2
    a_THn = torch.randn(T, H, n, generator=g).requires_grad_()
    b_THn = torch.randn(T, H, n, generator=g).requires_grad_()
    _, plain_THk = topk_from_half_scores(a_THn.detach(), b_THn.detach(), k)
    busiest = int(torch.bincount(plain_THk.reshape(-1), minlength=n * n).argmax())
    expert_HN = torch.zeros(H, n * n)
    expert_HN[0, busiest] = -100.0  # beyond any score gap: never chosen while another candidate pair exists

    scores_THk, ids_THk = biased_topk_from_half_scores(a_THn, b_THn, k, expert_bias_HN=expert_HN)
    assert int((plain_THk == busiest).sum()) > 0
    assert int((ids_THk == busiest).sum()) == 0
    # Tokens that did not pick the penalised expert keep their selection.
    untouched_T = ~(plain_THk == busiest).any(-1).squeeze(-1)
    assert torch.equal(ids_THk[untouched_T].sort(-1).values, plain_THk[untouched_T].sort(-1).values)
    # Gradients reach a and b through the unbiased scores only (the bias is a constant of selection).
    scores_THk.sum().backward()
    rows_THk, cols_THk = ids_THk // n, ids_THk % n
    grad_a = torch.zeros_like(a_THn).scatter_add_(-1, rows_THk, torch.ones_like(scores_THk))
    grad_b = torch.zeros_like(b_THn).scatter_add_(-1, cols_THk, torch.ones_like(scores_THk))
    torch.testing.assert_close(a_THn.grad, grad_a)
    torch.testing.assert_close(b_THn.grad, grad_b)


def test_zero_expert_bias_changes_nothing() -> None:
    g = torch.Generator().manual_seed(4)
    a_THn, b_THn = torch.randn(32, 2, 5, generator=g), torch.randn(32, 2, 5, generator=g)
    plain = topk_from_half_scores(a_THn, b_THn, 2, subkey_topk=3)
    biased = biased_topk_from_half_scores(a_THn, b_THn, 2, subkey_topk=3, expert_bias_HN=torch.zeros(2, 25))
    torch.testing.assert_close(biased[0], plain[0])
    assert torch.equal(biased[1], plain[1])


def test_update_rules() -> None:
    counts_HX = torch.tensor([[0.0, 2.0, 4.0, 10.0], [4.0, 4.0, 4.0, 4.0]])  # means 4 and 4
    torch.testing.assert_close(selection_bias_step(counts_HX, "sign"),
                               torch.tensor([[1.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]))
    # relative: (mean - count) / mean, saturating at +-1 (the sign rule's step).
    torch.testing.assert_close(selection_bias_step(counts_HX, "relative"),
                               torch.tensor([[1.0, 0.5, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]))
    # No selections at all (mean 0): no step, no division by zero.
    assert torch.equal(selection_bias_step(torch.zeros(1, 3), "relative"), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="'sign' or 'relative'"):
        selection_bias_step(counts_HX, "proportional")


def _settings(**overrides):
    values = {
        "moe_router_type": "product_key", "num_moe_experts": 16, "moe_router_topk": 2, "moe_pk_heads": 1,
        "moe_pk_key_dim": 8, "moe_pk_subkey_topk": None, "moe_pk_grid_rows": None, "moe_pk_bias_balancing": False,
        "moe_pk_expert_bias_balancing": True, "moe_pk_bias_update_rule": "sign",
        "moe_router_score_function": "softmax", "moe_router_load_balancing_type": "none",
    }
    values.update(overrides)
    return lambda name: values.get(name)


def test_settings_checks() -> None:
    from megatron_moe_ext.settings.router import router_settings

    router_settings(_settings())  # top-2 on a 4 x 4 grid: 4 candidate pairs for 2 slots
    router_settings(_settings(moe_router_topk=1, moe_pk_subkey_topk=2))
    with pytest.raises(ValueError, match=r"1 x 1 = 1 candidate pairs for 1 slots.*fix: --moe-pk-subkey-topk 2"):
        router_settings(_settings(moe_router_topk=1))
    with pytest.raises(ValueError, match=r"1 x 1 = 1 candidate pairs"):  # a 1 x 16 grid, top-1
        router_settings(_settings(moe_router_topk=1, moe_pk_grid_rows=1))
    router_settings(_settings(moe_router_topk=1, moe_pk_grid_rows=1, moe_pk_subkey_topk=2))
    with pytest.raises(ValueError, match="--moe-router-type product_key"):
        router_settings(_settings(moe_router_type="topk"))
    with pytest.raises(ValueError, match="'relatve' is unknown; fix: one of sign, relative"):
        router_settings(_settings(moe_pk_bias_update_rule="relatve"))
    with pytest.raises(ValueError, match="no selection bias to update"):
        router_settings(_settings(moe_pk_expert_bias_balancing=False, moe_pk_bias_update_rule="relative"))


def test_expert_bias_removes_a_pair_imbalance_that_separable_biases_cannot() -> None:
    """Token type t prefers row t and column t: rows and columns are balanced, the diagonal experts
    carry ~2.4x the others (the tiny training run's failure mode, in miniature). Row/column biases
    stay at a fixed point (balanced marginals give no signal); the per-expert bias spreads the load."""
    g = torch.Generator().manual_seed(0)
    T, n, k = 4096, 4, 2
    onehot_T1n = torch.nn.functional.one_hot(torch.randint(0, n, (T,), generator=g), n).float().unsqueeze(1)
    a_T1n, b_T1n = torch.randn(T, 1, n, generator=g) + 2 * onehot_T1n, torch.randn(T, 1, n, generator=g) + 2 * onehot_T1n

    def max_violation_after(steps: int, per_expert: bool) -> float:
        row_1n, col_1n, expert_1N = torch.zeros(1, n), torch.zeros(1, n), torch.zeros(1, n * n)
        for _ in range(steps + 1):
            _, ids_T1k = biased_topk_from_half_scores(a_T1n, b_T1n, k, row_bias_Hn1=row_1n, col_bias_Hn2=col_1n,
                                                      expert_bias_HN=expert_1N if per_expert else None)
            counts_N = torch.bincount(ids_T1k.reshape(-1), minlength=n * n).float()
            grid_nn = counts_N.view(n, n)
            row_1n += 1e-2 * selection_bias_step(grid_nn.sum(1).view(1, n))
            col_1n += 1e-2 * selection_bias_step(grid_nn.sum(0).view(1, n))
            if per_expert:
                expert_1N += 1e-2 * selection_bias_step(counts_N.view(1, -1))
        return float((counts_N.max() - counts_N.mean()) / counts_N.mean())

    before, separable = max_violation_after(0, False), max_violation_after(200, False)
    both = max_violation_after(200, True)
    print(f"MaxVio: unbiased {before:.3f}, row/column biases {separable:.3f}, + per-expert bias {both:.3f}")
    assert before > 0.75 and separable > 0.75
    assert both < 0.1
