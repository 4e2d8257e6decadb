"""Balancing losses and metrics: value coeff at perfect balance and in expectation under random routing,
gradients (gradcheck, DP gradient scale, coefficient policy across G), references (Megatron's formula,
brute-force full softmax), padding, metrics on hand-made counts, and every ValueError.

Legend: T tokens, S sequence length, B sequences, N experts, K top-k, D EP ranks, H heads, n1 x n2 grid per
head, k top-k per head, G granularity, h hidden size.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_moe_ext.balancing import (
    UsageWindow,
    coefficient_for_granularity,
    communication_balance_loss,
    device_balance_loss,
    device_max_violation,
    device_token_counts,
    expected_devices_per_token,
    expert_balance_loss,
    expert_counts,
    global_batch_balance_loss,
    load_entropy,
    max_violation,
    max_violation_per_rank,
    sequence_balance_loss,
    sequence_counts,
    subkey_candidate_loss,
    subkey_counts,
    subkey_marginal_loss,
    subkey_usage,
)
from megatron_moe_ext.kernels.product_keys import topk_from_half_scores

COEFF = 0.01
GRANULARITIES = [1, 2, 4, 8, 16, 64]
f64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_scores(T: int, N: int, seed: int, *, spread: float = 1.0) -> torch.Tensor:
    """Normalised router scores, rows summing to 1 (softmax of N(0, spread^2) logits)."""
    return torch.softmax(spread * torch.randn(T, N, generator=gen(seed), dtype=f64), dim=-1)


def balanced_routing(T: int, N: int, K: int, D: int = 1) -> torch.Tensor:
    """Routing map [T, N] with every expert selected T*K/N times and, when K < D, every EP rank receiving the
    same number of tokens while each token reaches min(K, D) ranks.

    Position q in [0, N) names expert (q % D) * N/D + q // D (device-interleaved order); token t selects the
    K consecutive positions from t*K, so its picks cycle through the devices.
    """
    q_TK = (torch.arange(T).view(T, 1) * K + torch.arange(K).view(1, K)) % N
    ids_TK = (q_TK % D) * (N // D) + q_TK // D
    return torch.zeros(T, N, dtype=torch.bool).scatter(1, ids_TK, True)


def balanced_tokens(N: int, K: int, D: int = 1) -> int:
    # T*K must be a multiple of N (experts balanced) and T a multiple of D/gcd(K, D) (devices balanced).
    return 2 * math.lcm(N // math.gcd(N, K), D // math.gcd(D, K))


def random_routing(T: int, N: int, K: int, seed: int) -> torch.Tensor:
    """Uniformly random top-K subsets, independently per token."""
    ids_TK = torch.rand(T, N, generator=gen(seed)).topk(K, dim=-1).indices
    return torch.zeros(T, N, dtype=torch.bool).scatter(1, ids_TK, True)


# ----------------------------------------------------------------------------------------------------------
# Value coeff at perfect balance, for every granularity
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", GRANULARITIES)
def test_expert_level_losses_equal_coeff_at_perfect_balance(G: int) -> None:
    N, K = 8 * G, G
    T = balanced_tokens(N, K)
    map_TN = balanced_routing(T, N, K)
    counts_N = expert_counts(map_TN)
    assert torch.all(counts_N == T * K // N)
    # Non-uniform scores: at balance f_i = 1, so only sum_i P_i = 1 matters.
    scores_TN = random_scores(T, N, seed=G)
    close = {"rtol": 1e-12, "atol": 0}
    torch.testing.assert_close(expert_balance_loss(scores_TN, counts_N, T, K, COEFF), torch.tensor(COEFF, dtype=f64), **close)
    got = global_batch_balance_loss(scores_TN, counts_N, T, K, COEFF, group_tokens=T, dp_size=1)
    torch.testing.assert_close(got, torch.tensor(COEFF, dtype=f64), **close)
    # Per sequence: B = 3 sequences, each a balanced (rolled) routing of its own.
    maps_SBN = torch.stack([map_TN.roll(b, dims=0) for b in range(3)], dim=1)
    scores_SBN = torch.stack([random_scores(T, N, seed=100 + b) for b in range(3)], dim=1)
    got = sequence_balance_loss(scores_SBN, sequence_counts(maps_SBN), K, COEFF)
    torch.testing.assert_close(got, torch.tensor(COEFF, dtype=f64), **close)
    # Uniform scores give coeff for any routing (sum_i f_i = N); an imbalanced map with scores that follow it
    # must not: the loss sees the imbalance.
    uniform_TN = torch.full((T, N), 1.0 / N, dtype=f64)
    skewed_TN = torch.zeros(T, N, dtype=torch.bool)
    skewed_TN[:, :K] = True
    torch.testing.assert_close(expert_balance_loss(uniform_TN, expert_counts(skewed_TN), T, K, COEFF),
                               torch.tensor(COEFF, dtype=f64), **close)
    follows_TN = skewed_TN.to(f64) / K
    assert expert_balance_loss(follows_TN, expert_counts(skewed_TN), T, K, COEFF) == pytest.approx(COEFF * N / K)


@pytest.mark.parametrize("G", GRANULARITIES)
@pytest.mark.parametrize("D", [2, 4])
def test_device_and_communication_losses_equal_coeff_at_perfect_balance(G: int, D: int) -> None:
    N, K = 8 * G, G
    T = balanced_tokens(N, K, D)
    map_TN = balanced_routing(T, N, K, D)
    assert torch.all(expert_counts(map_TN) == T * K // N)
    tokens_D = device_token_counts(map_TN, D)
    assert torch.all(tokens_D == T * min(K, D) // D), "construction: each rank receives T * min(K, D) / D tokens"
    scores_TN = random_scores(T, N, seed=7 * G + D)
    expected = torch.tensor(COEFF, dtype=f64)
    close = {"rtol": 1e-12, "atol": 0}
    torch.testing.assert_close(device_balance_loss(scores_TN, expert_counts(map_TN), T, K, D, COEFF), expected, **close)
    torch.testing.assert_close(communication_balance_loss(scores_TN, map_TN, D, COEFF), expected, **close)
    torch.testing.assert_close(communication_balance_loss(scores_TN, map_TN, D, COEFF, max_devices=min(K, D)),
                               expected, **close)


def _balanced_subkey_counts(n1: int, n2: int, H: int, k: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(T, row_counts_Hn1, col_counts_Hn2) of a routing where every row and every column is used equally."""
    N = n1 * n2
    T = 2 * N // math.gcd(N, k)
    # Position q names grid cell (q % n1, q // n1): k consecutive positions are distinct cells; head h starts at h.
    q_THk = (torch.arange(T).view(T, 1, 1) * k + torch.arange(k).view(1, 1, k) + torch.arange(H).view(1, H, 1)) % N
    ids_THk = (q_THk % n1) * n2 + q_THk // n1
    rows_Hn1, cols_Hn2 = subkey_counts(ids_THk, n1, n2)
    assert torch.all(rows_Hn1 == T * k // n1) and torch.all(cols_Hn2 == T * k // n2)
    return T, rows_Hn1, cols_Hn2


@pytest.mark.parametrize("n1, n2", [(4, 4), (8, 2), (2, 16), (16, 16)])
@pytest.mark.parametrize("H, k", [(1, 1), (2, 4)])
def test_subkey_marginal_loss_equals_coeff_at_perfect_balance(n1: int, n2: int, H: int, k: int) -> None:
    T, rows_Hn1, cols_Hn2 = _balanced_subkey_counts(n1, n2, H, k)
    a_THn1 = torch.randn(T, H, n1, generator=gen(1), dtype=f64)
    b_THn2 = torch.randn(T, H, n2, generator=gen(2), dtype=f64)
    got = subkey_marginal_loss(a_THn1, b_THn2, rows_Hn1, cols_Hn2, T, k, COEFF)
    torch.testing.assert_close(got, torch.tensor(COEFF, dtype=f64), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Value coeff in expectation under uniformly random routing (T = 8192 tokens, seeded)
# ----------------------------------------------------------------------------------------------------------

RANDOM_T = 8192


@pytest.mark.parametrize("G", [1, 8, 64])
def test_random_routing_gives_coeff_within_2_percent(G: int) -> None:
    N, K, T = 8 * G, G, RANDOM_T
    map_TN = random_routing(T, N, K, seed=G)
    counts_N = expert_counts(map_TN)
    scores_TN = random_scores(T, N, seed=1000 + G, spread=0.5)
    assert expert_balance_loss(scores_TN, counts_N, T, K, COEFF).item() == pytest.approx(COEFF, rel=0.02)
    for D in (2, 4):
        assert device_balance_loss(scores_TN, counts_N, T, K, D, COEFF).item() == pytest.approx(COEFF, rel=0.02)
        m = expected_devices_per_token(N, K, D)
        got = communication_balance_loss(scores_TN, map_TN, D, COEFF, max_devices=m).item()
        assert got == pytest.approx(COEFF, rel=0.02)
        # The default M = min(K, D) counts full spread; random picks collide on a rank, so the value is m/min(K, D).
        got_default = communication_balance_loss(scores_TN, map_TN, D, COEFF).item()
        assert got_default == pytest.approx(COEFF * m / min(K, D), rel=0.02)


def test_random_subkey_routing_gives_coeff_within_2_percent() -> None:
    T, H, n1, n2, k = RANDOM_T, 2, 16, 8, 4
    ids_THk = torch.rand(T, H, n1 * n2, generator=gen(3)).topk(k, dim=-1).indices
    rows_Hn1, cols_Hn2 = subkey_counts(ids_THk, n1, n2)
    a_THn1 = 0.5 * torch.randn(T, H, n1, generator=gen(4), dtype=f64)
    b_THn2 = 0.5 * torch.randn(T, H, n2, generator=gen(5), dtype=f64)
    got = subkey_marginal_loss(a_THn1, b_THn2, rows_Hn1, cols_Hn2, T, k, COEFF).item()
    assert got == pytest.approx(COEFF, rel=0.02)


def test_expected_devices_per_token() -> None:
    assert expected_devices_per_token(8, 1, 4) == pytest.approx(1.0)
    assert expected_devices_per_token(8, 8, 4) == pytest.approx(4.0)
    # N = 4, K = 2, D = 2: a pair lands on one rank with probability 2/6.
    assert expected_devices_per_token(4, 2, 2) == pytest.approx(2 - 2 / 6)


# ----------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------


def test_gradcheck_every_loss() -> None:
    T, N, K, D = 6, 8, 2, 4
    map_TN = random_routing(T, N, K, seed=11)
    counts_N = expert_counts(map_TN)
    valid_T = torch.tensor([True, True, False, True, True, True])
    logits_TN = torch.randn(T, N, generator=gen(12), dtype=f64, requires_grad=True)
    scores_TN = torch.softmax(logits_TN.detach(), -1).requires_grad_()
    check = torch.autograd.gradcheck

    def check_all(x: torch.Tensor, to_scores) -> None:
        assert check(lambda s: expert_balance_loss(to_scores(s), counts_N, T, K, COEFF, valid_T=valid_T), (x,))
        assert check(lambda s: global_batch_balance_loss(to_scores(s), counts_N, 2 * T, K, COEFF, group_tokens=2 * T,
                                                         dp_size=2, valid_T=valid_T), (x,))
        assert check(lambda s: device_balance_loss(to_scores(s), counts_N, T, K, D, COEFF, valid_T=valid_T), (x,))
        assert check(lambda s: communication_balance_loss(to_scores(s), map_TN, D, COEFF, valid_T=valid_T), (x,))
        assert check(lambda s: sequence_balance_loss(to_scores(s).view(3, 2, N), sequence_counts(map_TN.view(3, 2, N)),
                                                     K, COEFF, valid_SB=valid_T.view(3, 2)), (x,))

    check_all(scores_TN, lambda s: s)  # the losses are linear in the scores ...
    check_all(logits_TN, lambda z: torch.softmax(z, -1))  # ... and through the router's softmax
    H, n1, n2, k = 2, 3, 4, 2
    a_THn1 = torch.randn(T, H, n1, generator=gen(13), dtype=f64, requires_grad=True)
    b_THn2 = torch.randn(T, H, n2, generator=gen(14), dtype=f64, requires_grad=True)
    _, ids_THk = topk_from_half_scores(a_THn1.detach(), b_THn2.detach(), k)
    rows_Hn1, cols_Hn2 = subkey_counts(ids_THk, n1, n2, valid_T=valid_T)
    assert check(lambda a, b: subkey_marginal_loss(a, b, rows_Hn1, cols_Hn2, T, k, COEFF, valid_T=valid_T),
                 (a_THn1, b_THn2))
    assert check(lambda a, b: subkey_candidate_loss(*_candidates(a, b, 2), rows_Hn1, cols_Hn2, T, k, COEFF,
                                                    valid_T=valid_T), (a_THn1, b_THn2))


def test_device_loss_equals_expert_loss_when_each_rank_holds_one_expert() -> None:
    T, N, K = 64, 8, 2
    map_TN = random_routing(T, N, K, seed=21)
    scores_TN = random_scores(T, N, seed=22).requires_grad_()
    valid_T = torch.arange(T) % 5 != 0
    counts_N = expert_counts(map_TN, valid_T=valid_T)
    n = int(valid_T.sum())
    exp = expert_balance_loss(scores_TN, counts_N, n, K, COEFF, valid_T=valid_T)
    dev = device_balance_loss(scores_TN, counts_N, n, K, N, COEFF, valid_T=valid_T)
    torch.testing.assert_close(dev, exp, rtol=1e-14, atol=0)
    (g_exp,), (g_dev,) = torch.autograd.grad(exp, scores_TN), torch.autograd.grad(dev, scores_TN)
    torch.testing.assert_close(g_dev, g_exp, rtol=1e-14, atol=0)
    # With fewer ranks the device loss differs: it ignores imbalance inside a rank.
    assert not torch.isclose(device_balance_loss(scores_TN, counts_N, n, K, 2, COEFF, valid_T=valid_T), exp)


def test_global_batch_dp_gradient_scale() -> None:
    """DP = 2 simulated in one process: a shared router weight, two ranks with unequal padding; the DDP average
    of the ranks' gradients must equal the gradient of the loss over the whole batch (the 1/dp_size bug)."""
    T, h, N, K, dp = 48, 6, 16, 4, 2
    x_Th = torch.randn(T, h, generator=gen(31), dtype=f64)
    W_hN = (0.3 * torch.randn(h, N, generator=gen(32), dtype=f64)).requires_grad_()
    map_TN = random_routing(T, N, K, seed=33)
    valid_T = torch.ones(T, dtype=torch.bool)
    valid_T[20:24] = False  # rank 0 holds tokens 0..23 (4 padding), rank 1 tokens 24..47 (none)
    counts_N = expert_counts(map_TN, valid_T=valid_T)  # all-reduced over DP
    n_valid = int(valid_T.sum())

    whole = expert_balance_loss(torch.softmax(x_Th @ W_hN, -1), counts_N, n_valid, K, COEFF, valid_T=valid_T)
    (g_whole,) = torch.autograd.grad(whole, W_hN)

    def rank_grads(loss_fn):
        grads, values = [], []
        for r in range(dp):
            sl = slice(r * T // dp, (r + 1) * T // dp)
            loss = loss_fn(torch.softmax(x_Th[sl] @ W_hN, -1), valid_T[sl])
            grads.append(torch.autograd.grad(loss, W_hN)[0])
            values.append(loss.detach())
        return sum(grads) / dp, sum(values) / dp  # DDP averages gradients; values averaged for logging

    g_avg, v_avg = rank_grads(lambda s, v: global_batch_balance_loss(s, counts_N, n_valid, K, COEFF,
                                                                     group_tokens=n_valid, dp_size=dp, valid_T=v))
    torch.testing.assert_close(g_avg, g_whole, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(v_avg, whole.detach(), rtol=1e-12, atol=0)
    # Megatron 0.19's share (dp_size=1): the averaged gradient is 1/dp too small.
    g_share, _ = rank_grads(lambda s, v: global_batch_balance_loss(s, counts_N, n_valid, K, COEFF,
                                                                   group_tokens=n_valid, dp_size=1, valid_T=v))
    torch.testing.assert_close(g_share * dp, g_whole, rtol=1e-12, atol=1e-15)
    # The local-mean loss is exact when the ranks hold equally many valid tokens ...
    g_local, _ = rank_grads(lambda s, v: expert_balance_loss(s, counts_N, n_valid, K, COEFF))
    whole_nopad = expert_balance_loss(torch.softmax(x_Th @ W_hN, -1), counts_N, n_valid, K, COEFF)
    torch.testing.assert_close(g_local, torch.autograd.grad(whole_nopad, W_hN)[0], rtol=1e-12, atol=1e-15)
    # ... and off by the per-rank token share when they do not.
    g_local_pad, _ = rank_grads(lambda s, v: expert_balance_loss(s, counts_N, n_valid, K, COEFF, valid_T=v))
    assert not torch.allclose(g_local_pad, g_whole, rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# References: Megatron's formula, the brute-force full softmax, padding
# ----------------------------------------------------------------------------------------------------------


def megatron_switch_loss(probs_TN, tokens_per_expert_N, total_num_tokens, topk, num_experts, coeff, padding_mask=None):
    """Transcribed from megatron-core 0.19.2 moe_utils.switch_load_balancing_loss_func (non-fused path):
    importing Megatron costs ~20 s here, too slow for a unit test."""
    if padding_mask is not None:
        probs_TN = probs_TN * padding_mask.unsqueeze(-1)
    return torch.sum(probs_TN.sum(dim=0) * tokens_per_expert_N) * (
        num_experts * coeff / (topk * total_num_tokens * total_num_tokens))


def test_matches_megatron_aux_and_seq_aux_loss() -> None:
    S, B, N, K = 16, 3, 12, 3
    T = S * B
    map_TN = random_routing(T, N, K, seed=41)
    scores_TN = random_scores(T, N, seed=42)
    valid_T = torch.arange(T) % 7 != 3
    counts_N = expert_counts(map_TN, valid_T=valid_T)
    n = int(valid_T.sum())
    ref = megatron_switch_loss(scores_TN, counts_N, n, K, N, COEFF, padding_mask=valid_T)
    torch.testing.assert_close(expert_balance_loss(scores_TN, counts_N, n, K, COEFF, valid_T=valid_T), ref)
    # Megatron's seq_aux_loss: fold B into the expert dim, then divide by B (no padding there).
    ref_seq = megatron_switch_loss(scores_TN.view(S, B * N), map_TN.view(S, B * N).sum(0), S, K, N, COEFF) / B
    got_seq = sequence_balance_loss(scores_TN.view(S, B, N), sequence_counts(map_TN.view(S, B, N)), K, COEFF)
    torch.testing.assert_close(got_seq, ref_seq)
    per_seq = [expert_balance_loss(scores_TN.view(S, B, N)[:, b], map_TN.view(S, B, N)[:, b].sum(0), S, K, COEFF)
               for b in range(B)]
    torch.testing.assert_close(got_seq, torch.stack(per_seq).mean())


def test_padding_changes_nothing() -> None:
    """Padding tokens with garbage scores (inf, NaN) change neither the losses nor the real tokens' gradients."""
    T, P, N, K, D = 24, 5, 8, 2, 4
    map_TN = random_routing(T, N, K, seed=51)
    scores_TN = random_scores(T, N, seed=52).requires_grad_()
    counts_N = expert_counts(map_TN)
    garbage_PN = torch.full((P, N), float("nan"), dtype=f64)
    garbage_PN[0] = float("inf")
    padded_TN = torch.cat([scores_TN, garbage_PN])
    padded_map = torch.cat([map_TN, torch.ones(P, N, dtype=torch.bool)])
    valid_T = torch.cat([torch.ones(T, dtype=torch.bool), torch.zeros(P, dtype=torch.bool)])
    assert torch.equal(expert_counts(padded_map, valid_T=valid_T), counts_N)
    pairs = [
        (expert_balance_loss(scores_TN, counts_N, T, K, COEFF),
         expert_balance_loss(padded_TN, counts_N, T, K, COEFF, valid_T=valid_T)),
        (device_balance_loss(scores_TN, counts_N, T, K, D, COEFF),
         device_balance_loss(padded_TN, counts_N, T, K, D, COEFF, valid_T=valid_T)),
        (communication_balance_loss(scores_TN, map_TN, D, COEFF),
         communication_balance_loss(padded_TN, padded_map, D, COEFF, valid_T=valid_T)),
    ]
    for plain, padded in pairs:
        torch.testing.assert_close(padded, plain, rtol=1e-14, atol=0)
        g_plain, g_padded = torch.autograd.grad(plain, scores_TN), torch.autograd.grad(padded, scores_TN)
        torch.testing.assert_close(g_padded, g_plain, rtol=1e-14, atol=0)
    # Sequence-wise: padding at the end of a sequence, and an all-padding sequence that leaves the mean.
    S = 6
    sc_SBN = random_scores(S * 3, N, seed=53).view(S, 3, N)
    map_SBN = random_routing(S * 3, N, K, seed=54).view(S, 3, N)
    valid_SB = torch.ones(S, 3, dtype=torch.bool)
    valid_SB[4:, 0] = False
    valid_SB[:, 2] = False
    got = sequence_balance_loss(sc_SBN, sequence_counts(map_SBN, valid_SB=valid_SB), K, COEFF, valid_SB=valid_SB)
    ref = (expert_balance_loss(sc_SBN[:4, 0], map_SBN[:4, 0].sum(0), 4, K, COEFF)
           + expert_balance_loss(sc_SBN[:, 1], map_SBN[:, 1].sum(0), S, K, COEFF)) / 2
    torch.testing.assert_close(got, ref)


def test_subkey_marginal_loss_matches_full_softmax_brute_force() -> None:
    T, H, n1, n2, k = 10, 2, 3, 4, 2
    a_THn1 = torch.randn(T, H, n1, generator=gen(61), dtype=f64, requires_grad=True)
    b_THn2 = torch.randn(T, H, n2, generator=gen(62), dtype=f64, requires_grad=True)
    valid_T = torch.arange(T) % 4 != 1
    _, ids_THk = topk_from_half_scores(a_THn1.detach(), b_THn2.detach(), k)
    rows_Hn1, cols_Hn2 = subkey_counts(ids_THk, n1, n2, valid_T=valid_T)

    # Counts by brute force: one-hot over the n1*n2 experts of each head, then marginalise the grid.
    onehot_THN = torch.zeros(T, H, n1 * n2).scatter(-1, ids_THk, 1.0) * valid_T.view(T, 1, 1)
    grid_Hnn = onehot_THN.sum(0).view(H, n1, n2)
    assert torch.equal(rows_Hn1, grid_Hnn.sum(-1).long()) and torch.equal(cols_Hn2, grid_Hnn.sum(-2).long())
    for h in range(H):  # and by bincount of the ids
        ids = ids_THk[valid_T, h].reshape(-1)
        assert torch.equal(rows_Hn1[h], torch.bincount(ids // n2, minlength=n1))
        assert torch.equal(cols_Hn2[h], torch.bincount(ids % n2, minlength=n2))

    def brute(a, b):
        full_THnn = torch.softmax((a.unsqueeze(-1) + b.unsqueeze(-2)).flatten(-2), -1).view(T, H, n1, n2)
        n = valid_T.sum().to(f64)
        P_row_Hn1 = full_THnn[valid_T].sum(-1).sum(0) / n  # row marginal of the full [T, N] softmax
        P_col_Hn2 = full_THnn[valid_T].sum(-2).sum(0) / n
        f_row, f_col = rows_Hn1 * n1 / (k * n), cols_Hn2 * n2 / (k * n)
        return COEFF * 0.5 * ((f_row * P_row_Hn1).sum(-1) + (f_col * P_col_Hn2).sum(-1)).mean()

    ref = brute(a_THn1, b_THn2)
    got = subkey_marginal_loss(a_THn1, b_THn2, rows_Hn1, cols_Hn2, int(valid_T.sum()), k, COEFF, valid_T=valid_T)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
    for g_got, g_ref in zip(torch.autograd.grad(got, (a_THn1, b_THn2)), torch.autograd.grad(ref, (a_THn1, b_THn2))):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-12, atol=1e-16)


def _candidates(a_THn1: torch.Tensor, b_THn2: torch.Tensor, kp: int) -> tuple[torch.Tensor, ...]:
    """Each side's top-kp half scores and indices (what the product-key search keeps), differentiable."""
    a_THk1, row_THk1 = a_THn1.topk(kp, dim=-1)
    b_THk2, col_THk2 = b_THn2.topk(kp, dim=-1)
    return a_THk1, row_THk1, b_THk2, col_THk2


def test_subkey_candidate_loss_matches_explicit_candidate_marginals() -> None:
    T, H, n1, n2, k, kp = 10, 2, 5, 4, 2, 3
    a_THn1 = torch.randn(T, H, n1, generator=gen(71), dtype=f64, requires_grad=True)
    b_THn2 = torch.randn(T, H, n2, generator=gen(72), dtype=f64, requires_grad=True)
    valid_T = torch.arange(T) % 4 != 1
    _, ids_THk = topk_from_half_scores(a_THn1.detach(), b_THn2.detach(), k, subkey_topk=kp)
    rows_Hn1, cols_Hn2 = subkey_counts(ids_THk, n1, n2, valid_T=valid_T)

    def explicit(a, b):
        # P built as a dense [T, H, n] tensor: each token's candidate softmax scattered onto its sub-keys.
        a_THk1, row_THk1, b_THk2, col_THk2 = _candidates(a, b, kp)
        pa_THn1 = torch.zeros(T, H, n1, dtype=f64).scatter(-1, row_THk1, torch.softmax(a_THk1, -1))
        pb_THn2 = torch.zeros(T, H, n2, dtype=f64).scatter(-1, col_THk2, torch.softmax(b_THk2, -1))
        n = valid_T.sum().to(f64)
        P_row_Hn1, P_col_Hn2 = pa_THn1[valid_T].sum(0) / n, pb_THn2[valid_T].sum(0) / n
        f_row, f_col = rows_Hn1 * n1 / (k * n), cols_Hn2 * n2 / (k * n)
        return COEFF * 0.5 * ((f_row * P_row_Hn1).sum(-1) + (f_col * P_col_Hn2).sum(-1)).mean()

    ref = explicit(a_THn1, b_THn2)
    got = subkey_candidate_loss(*_candidates(a_THn1, b_THn2, kp), rows_Hn1, cols_Hn2, int(valid_T.sum()), k, COEFF,
                                valid_T=valid_T)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
    grads = torch.autograd.grad(got, (a_THn1, b_THn2))
    for g_got, g_ref in zip(grads, torch.autograd.grad(ref, (a_THn1, b_THn2))):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-12, atol=1e-16)
    # Only the kept sub-keys carry gradient (O(k') per token and side), and padding tokens none.
    for g in grads:
        assert int((g != 0).sum(-1).max()) <= kp and not bool(g[~valid_T].any())


def test_subkey_candidate_loss_with_every_subkey_kept_is_the_full_marginal_loss() -> None:
    T, H, n1, n2, k = 12, 3, 4, 6, 3
    a_THn1 = torch.randn(T, H, n1, generator=gen(73), dtype=f64, requires_grad=True)
    b_THn2 = torch.randn(T, H, n2, generator=gen(74), dtype=f64, requires_grad=True)
    valid_T = torch.arange(T) % 5 != 2
    _, ids_THk = topk_from_half_scores(a_THn1.detach(), b_THn2.detach(), k, subkey_topk=n2)
    counts = subkey_counts(ids_THk, n1, n2, valid_T=valid_T)
    a_THk1, row_THk1 = a_THn1.topk(n1, dim=-1)
    b_THk2, col_THk2 = b_THn2.topk(n2, dim=-1)
    got = subkey_candidate_loss(a_THk1, row_THk1, b_THk2, col_THk2, *counts, int(valid_T.sum()), k, COEFF,
                                valid_T=valid_T)
    ref = subkey_marginal_loss(a_THn1, b_THn2, *counts, int(valid_T.sum()), k, COEFF, valid_T=valid_T)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
    for g_got, g_ref in zip(torch.autograd.grad(got, (a_THn1, b_THn2)), torch.autograd.grad(ref, (a_THn1, b_THn2))):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("n1, n2, H, k, kp", [(4, 4, 1, 1, 1), (8, 2, 2, 4, 2), (16, 16, 2, 4, 6)])
def test_subkey_candidate_loss_equals_coeff_at_perfect_balance(n1: int, n2: int, H: int, k: int, kp: int) -> None:
    T, rows_Hn1, cols_Hn2 = _balanced_subkey_counts(n1, n2, H, k)
    # Any candidates, any scores: every token's candidate softmax sums to 1 and f = 1 everywhere.
    a_THn1 = torch.randn(T, H, n1, generator=gen(75), dtype=f64)
    b_THn2 = torch.randn(T, H, n2, generator=gen(76), dtype=f64)
    cand = _candidates(a_THn1, b_THn2, min(kp, n2))
    got = subkey_candidate_loss(*cand, rows_Hn1, cols_Hn2, T, k, COEFF)
    torch.testing.assert_close(got, torch.tensor(COEFF, dtype=f64), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Coefficient policy across granularity: measured router gradient norms
# ----------------------------------------------------------------------------------------------------------


def router_grad_norm(G: int, coeff: float, *, E: int = 8, k0: int = 1, T: int = 1024, h: int = 16) -> tuple[float, float]:
    """(||dL/dW||_F, ||dL/dz||_F) of the expert loss for a dense router z = x W at near-uniform scores, under
    uniformly random top-k routing; root-mean-square over enough batches for ~512 expert samples."""
    N, K = E * G, k0 * G
    sq_w = sq_z = 0.0
    repeats = max(1, 512 // N)
    for r in range(repeats):
        x_Th = torch.randn(T, h, generator=gen(10 * G + r), dtype=f64)
        W_hN = (0.01 * torch.randn(h, N, generator=gen(999 + r), dtype=f64)).requires_grad_()
        z_TN = x_Th @ W_hN
        z_TN.retain_grad()
        map_TN = random_routing(T, N, K, seed=5000 + 10 * G + r)
        expert_balance_loss(torch.softmax(z_TN, -1), expert_counts(map_TN), T, K, coeff).backward()
        sq_w += W_hN.grad.square().sum().item()
        sq_z += z_TN.grad.square().sum().item()
    return math.sqrt(sq_w / repeats), math.sqrt(sq_z / repeats)


def test_coefficient_policy_keeps_router_gradient_comparable_across_granularity() -> None:
    E, k0, T, h = 8, 1, 1024, 16
    raw, policy, per_expert = {}, {}, {}
    for G in GRANULARITIES:
        N, K = E * G, k0 * G
        w, z = router_grad_norm(G, COEFF)
        # The derivation: E||dL/dz||^2 = coeff^2 (1/K - 1/N) / T^2, and ||dL/dW|| ~ sqrt(h) ||dL/dz||.
        theory_z = COEFF * math.sqrt(1 / K - 1 / N) / T
        assert z == pytest.approx(theory_z, rel=0.15), (G, z, theory_z)
        assert w == pytest.approx(math.sqrt(h) * theory_z, rel=0.2), (G, w, math.sqrt(h) * theory_z)
        raw[G] = w
        c_g = coefficient_for_granularity(COEFF, G)
        policy[G] = router_grad_norm(G, c_g)[0]
        # Per expert row: the RMS over the N rows of dL/dW under the per-expert policy.
        per_expert[G] = router_grad_norm(G, coefficient_for_granularity(COEFF, G, "constant_gradient_per_expert"))[0] / math.sqrt(N)
    print("\n||dL/dW|| raw coeff:", {g: f"{v:.3e}" for g, v in raw.items()})
    print("||dL/dW|| constant_gradient:", {g: f"{v:.3e}" for g, v in policy.items()})
    print("row RMS constant_gradient_per_expert:", {g: f"{v:.3e}" for g, v in per_expert.items()})

    def spread(d):
        return max(d.values()) / min(d.values())

    assert spread(raw) > 6.0, "the raw coefficient's gradient falls as G^-1/2 (8x over G = 1..64)"
    assert spread(policy) < 1.25, "constant_gradient keeps the router's gradient norm within 1.25x"
    assert spread(per_expert) < 1.25, "constant_gradient_per_expert keeps each expert row's gradient within 1.25x"
    assert coefficient_for_granularity(COEFF, 16, "constant") == COEFF
    assert coefficient_for_granularity(COEFF, 16) == pytest.approx(4 * COEFF)
    assert coefficient_for_granularity(COEFF, 16, "constant_gradient_per_expert") == pytest.approx(16 * COEFF)


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


def test_max_violation_and_entropy_on_hand_made_counts() -> None:
    assert max_violation(torch.full((8,), 5)) == 0.0
    assert load_entropy(torch.full((8,), 5)) == pytest.approx(1.0)
    hot = torch.zeros(8, dtype=torch.long)
    hot[3] = 40
    assert max_violation(hot) == pytest.approx(7.0)  # N - 1
    assert load_entropy(hot) == 0.0
    counts = torch.tensor([2, 1, 1, 0])
    assert max_violation(counts) == pytest.approx(1.0)
    assert load_entropy(counts, normalized=False) == pytest.approx(1.5 * math.log(2))
    assert load_entropy(counts) == pytest.approx(0.75)
    assert load_entropy(torch.tensor([3])) == 1.0
    assert math.isnan(max_violation(torch.zeros(4))) and math.isnan(load_entropy(torch.zeros(4)))


def test_max_violation_per_rank_and_device() -> None:
    counts_N = torch.tensor([4, 0, 1, 1, 2, 2, 0, 0])
    per_rank = max_violation_per_rank(counts_N, 4)
    assert per_rank[:3].tolist() == [1.0, 0.0, 0.0] and math.isnan(per_rank[3])
    assert device_max_violation(counts_N, 4) == pytest.approx((4 - 2.5) / 2.5)  # rank loads [4, 2, 4, 0]
    assert max_violation_per_rank(counts_N, 1).tolist() == pytest.approx([max_violation(counts_N)])
    assert device_max_violation(counts_N, 8) == pytest.approx(max_violation(counts_N))


def test_usage_window_at_a_million_experts() -> None:
    N = 1_000_000
    window = UsageWindow(N, window=3)
    counts_N = torch.zeros(N, dtype=torch.int32)
    counts_N[:10] = 1
    window.update(counts_N, step=0)
    counts_N.zero_()
    counts_N[10:20] = 2
    window.update(counts_N, step=1)
    window.update(torch.zeros(N), step=2)
    assert window.fraction_used(2) == pytest.approx(20 / N)  # steps 0..2
    counts_N.zero_()
    counts_N[5] = 1
    window.update(counts_N, step=3)
    assert window.fraction_used(3) == pytest.approx(11 / N)  # steps 1..3: experts 10..19 and 5
    assert window.fraction_used(4) == pytest.approx(1 / N)  # steps 2..4: expert 5
    assert window.fraction_used(7) == 0.0


def test_subkey_usage() -> None:
    usage = subkey_usage(torch.tensor([[2, 2, 0, 0], [1, 1, 1, 1]]), torch.tensor([[1, 3], [2, 2]]))
    assert usage.row_fraction_used == pytest.approx(6 / 8) and usage.col_fraction_used == 1.0
    assert usage.row_max_violation == pytest.approx(1.0) and usage.col_max_violation == pytest.approx(0.5)
    single = subkey_usage(torch.tensor([3, 1]), torch.tensor([2, 2, 0]))
    assert single.col_fraction_used == pytest.approx(2 / 3) and single.row_max_violation == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------
# Every ValueError
# ----------------------------------------------------------------------------------------------------------

_s = random_scores(4, 8, seed=0)
_m = random_routing(4, 8, 2, seed=0)
_c = expert_counts(_m)
_a, _b = torch.zeros(4, 2, 3, dtype=f64), torch.zeros(4, 2, 4, dtype=f64)
_rc, _cc = torch.ones(2, 3), torch.ones(2, 4)
_ids = torch.zeros(4, 2, 2, dtype=torch.long)
_ir, _ic = torch.arange(3).expand(4, 2, 3), torch.arange(4).expand(4, 2, 4)  # all sub-keys as candidates

BAD_CALLS = {
    "negative coeff": (lambda: expert_balance_loss(_s, _c, 4, 2, -0.1), "coeff=-0.1"),
    "nan coeff": (lambda: device_balance_loss(_s, _c, 4, 2, 2, float("nan")), "coeff=nan"),
    "scores not 2-D": (lambda: expert_balance_loss(_s.view(2, 2, 8), _c, 4, 2, COEFF), r"\[T, N\]"),
    "integer scores": (lambda: expert_balance_loss(_m.long(), _c, 4, 2, COEFF), "floating"),
    "counts shape": (lambda: expert_balance_loss(_s, _c[:6], 4, 2, COEFF), r"counts_N of shape \(6,\)"),
    "topk > N": (lambda: expert_balance_loss(_s, _c, 4, 9, COEFF), "topk=9"),
    "topk 0": (lambda: expert_balance_loss(_s, _c, 4, 0, COEFF), "topk=0"),
    "num_tokens 0": (lambda: expert_balance_loss(_s, _c, 0, 2, COEFF), "num_tokens=0"),
    "num_tokens tensor shape": (lambda: expert_balance_loss(_s, _c, torch.ones(2), 2, COEFF), "num_tokens is a tensor"),
    "valid_T dtype": (lambda: expert_balance_loss(_s, _c, 4, 2, COEFF, valid_T=torch.ones(4)), "valid_T"),
    "valid_T shape": (lambda: expert_balance_loss(_s, _c, 4, 2, COEFF, valid_T=torch.ones(5, dtype=torch.bool)), "valid_T"),
    "dp_size 0": (lambda: global_batch_balance_loss(_s, _c, 8, 2, COEFF, group_tokens=8, dp_size=0), "dp_size=0"),
    "group_tokens 0": (lambda: global_batch_balance_loss(_s, _c, 8, 2, COEFF, group_tokens=0, dp_size=2), "group_tokens=0"),
    "seq scores dims": (lambda: sequence_balance_loss(_s, _c.view(1, 8), 2, COEFF), r"\[S, B, N\]"),
    "seq counts shape": (lambda: sequence_balance_loss(_s.view(2, 2, 8), _c.view(1, 8), 2, COEFF), "counts_BN"),
    "seq tokens_B shape": (lambda: sequence_balance_loss(_s.view(2, 2, 8), _c.repeat(2, 1), 2, COEFF,
                                                         tokens_B=torch.ones(3)), "tokens_B"),
    "seq valid shape": (lambda: sequence_balance_loss(_s.view(2, 2, 8), _c.repeat(2, 1), 2, COEFF,
                                                      valid_SB=torch.ones(4, dtype=torch.bool)), "valid_SB"),
    "seq counts map": (lambda: sequence_counts(_m), r"\[S, B, N\]"),
    "expert_counts map": (lambda: expert_counts(_m.long()), "bool"),
    "device ep_size 1": (lambda: device_balance_loss(_s, _c, 4, 2, 1, COEFF), "ep_size=1"),
    "device ep_size not dividing": (lambda: device_balance_loss(_s, _c, 4, 2, 3, COEFF), "does not divide N=8"),
    "comm ep_size 1": (lambda: communication_balance_loss(_s, _m, 1, COEFF), "ep_size=1"),
    "comm ep_size not dividing": (lambda: communication_balance_loss(_s, _m, 3, COEFF), "does not divide"),
    "comm map shape": (lambda: communication_balance_loss(_s, _m[:3], 2, COEFF), "routing_map_TN"),
    "comm map dtype": (lambda: communication_balance_loss(_s, _m.long(), 2, COEFF), "routing_map_TN"),
    "comm max_devices 0": (lambda: communication_balance_loss(_s, _m, 2, COEFF, max_devices=0), "max_devices=0"),
    "comm max_devices > D": (lambda: communication_balance_loss(_s, _m, 2, COEFF, max_devices=3), "max_devices=3"),
    "device_token_counts ep": (lambda: device_token_counts(_m, 1), "ep_size=1"),
    "expected devices ep": (lambda: expected_devices_per_token(8, 2, 1), "ep_size=1"),
    "expected devices topk": (lambda: expected_devices_per_token(8, 9, 2), "topk=9"),
    "subkey ids range": (lambda: subkey_counts(_ids + 12, 3, 4), r"outside one head's \[0, n1\*n2\)"),
    "subkey ids negative": (lambda: subkey_counts(_ids - 1, 3, 4), "outside"),
    "subkey ids float": (lambda: subkey_counts(_ids.double(), 3, 4), "integer"),
    "subkey ids dims": (lambda: subkey_counts(_ids[:, 0], 3, 4), r"\[T, H, k\]"),
    "subkey n1 0": (lambda: subkey_counts(_ids, 0, 4), "n1=0"),
    "subkey valid": (lambda: subkey_counts(_ids, 3, 4, valid_T=torch.ones(3, dtype=torch.bool)), "valid_T"),
    "marginal T/H mismatch": (lambda: subkey_marginal_loss(_a, _b[:3], _rc, _cc, 4, 2, COEFF), r"disagree on \[T, H\]"),
    "marginal row counts": (lambda: subkey_marginal_loss(_a, _b, _cc, _cc, 4, 2, COEFF), "row_counts_Hn1"),
    "marginal col counts": (lambda: subkey_marginal_loss(_a, _b, _rc, _rc, 4, 2, COEFF), "col_counts_Hn2"),
    "marginal k > n1*n2": (lambda: subkey_marginal_loss(_a, _b, _rc, _cc, 4, 13, COEFF), "topk=13"),
    "marginal coeff": (lambda: subkey_marginal_loss(_a, _b, _rc, _cc, 4, 2, -1.0), "coeff=-1.0"),
    "marginal num_tokens": (lambda: subkey_marginal_loss(_a, _b, _rc, _cc, -3, 2, COEFF), "num_tokens=-3"),
    "candidate T/H mismatch": (lambda: subkey_candidate_loss(_a, _ir, _b[:3], _ic[:3], _rc, _cc, 4, 2, COEFF),
                               r"disagree on \[T, H\]"),
    "candidate float ids": (lambda: subkey_candidate_loss(_a, _ir.double(), _b, _ic, _rc, _cc, 4, 2, COEFF),
                            r"row_THk1 .* expected integer"),
    "candidate ids shape": (lambda: subkey_candidate_loss(_a, _ir, _b, _ic[..., :2], _rc, _cc, 4, 2, COEFF),
                            r"col_THk2 of shape \(4, 2, 2\)"),
    "candidate counts heads": (lambda: subkey_candidate_loss(_a, _ir, _b, _ic, _rc[:1], _cc, 4, 2, COEFF),
                               r"row_counts_Hn1 of shape \(1, 3\): expected \[H=2, n\]"),
    "candidate counts < kept": (lambda: subkey_candidate_loss(_a, _ir, _b, _ic, _rc, _cc[:, :3], 4, 2, COEFF),
                                r"col_counts_Hn2 .* n >= the 4 candidates"),
    "candidate k > n1*n2": (lambda: subkey_candidate_loss(_a, _ir, _b, _ic, _rc, _cc, 4, 13, COEFF), "topk=13"),
    "candidate coeff": (lambda: subkey_candidate_loss(_a, _ir, _b, _ic, _rc, _cc, 4, 2, -1.0), "coeff=-1.0"),
    "candidate num_tokens": (lambda: subkey_candidate_loss(_a, _ir, _b, _ic, _rc, _cc, 0, 2, COEFF), "num_tokens=0"),
    "candidate valid": (lambda: subkey_candidate_loss(_a, _ir, _b, _ic, _rc, _cc, 4, 2, COEFF,
                                                      valid_T=torch.ones(3, dtype=torch.bool)), "valid_T"),
    "policy unknown": (lambda: coefficient_for_granularity(COEFF, 4, "sqrt"), "unknown policy 'sqrt'; choose from"),
    "policy G 0": (lambda: coefficient_for_granularity(COEFF, 0), "granularity=0"),
    "policy coeff": (lambda: coefficient_for_granularity(-1.0, 4), "coeff=-1.0"),
    "maxvio empty": (lambda: max_violation(torch.zeros(0)), "non-empty"),
    "maxvio 2-D": (lambda: max_violation(torch.ones(2, 2)), r"\[N\]"),
    "maxvio bool": (lambda: max_violation(torch.ones(4, dtype=torch.bool)), "numeric"),
    "per rank not dividing": (lambda: max_violation_per_rank(torch.ones(8), 3), "ep_size=3"),
    "device maxvio ep 0": (lambda: device_max_violation(torch.ones(8), 0), "ep_size=0"),
    "entropy 2-D": (lambda: load_entropy(torch.ones(2, 2)), r"\[N\]"),
    "window 0": (lambda: UsageWindow(10, 0), "window=0"),
    "window experts": (lambda: UsageWindow(0, 3), "num_experts=0"),
    "window counts shape": (lambda: UsageWindow(10, 3).update(torch.ones(9), 0), r"expected \[10\]"),
    "subkey usage H": (lambda: subkey_usage(torch.ones(2, 3), torch.ones(3, 4)), "same H"),
    "subkey usage dims": (lambda: subkey_usage(torch.ones(3), torch.ones(2, 4)), "same H"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_value_errors(name: str) -> None:
    call, match = BAD_CALLS[name]
    with pytest.raises(ValueError, match=match):
        call()


def test_usage_window_refuses_steps_going_backwards() -> None:
    window = UsageWindow(4, 2)
    window.update(torch.ones(4), step=5)
    with pytest.raises(ValueError, match="step=4 is before"):
        window.update(torch.ones(4), step=4)
