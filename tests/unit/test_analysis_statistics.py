"""Routing statistics on synthetic traces with known answers: uniform load (entropy log N, MaxVio ~ 0 within
multinomial bounds), a router hard-wired to a planted label (MI = H(label) exactly), a random router (MI ~ the
plug-in bias (Kx-1)(Ky-1)/(2S)), path diversity of identical and exhaustive routings, head overlap, effective
experts, linear CKA identities and the explicit-Gram references, streaming == one-shot, and every ValueError.

Legend: T tokens, K selections per token, N experts, V label values, H heads, k per head, L layers, D / E hidden.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_moe_ext.analysis import (
    ExpertLoadAccumulator,
    HeadOverlapAccumulator,
    JointCountAccumulator,
    LinearCKAAccumulator,
    PathDiversityAccumulator,
    bucket_positions,
    cka_matrix,
    dead_experts,
    effective_experts,
    expert_counts,
    expert_label_counts,
    head_overlap,
    linear_cka,
    load_entropy,
    load_stats,
    max_violation,
    mutual_information,
    path_diversity,
    path_diversity_curve,
    plugin_mi_bias,
    routing_dependence,
    routing_pairs,
    specialisation,
    top1,
)


def _entropy(values_T: np.ndarray) -> float:
    p = np.unique(values_T, return_counts=True)[1] / values_T.shape[0]
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------------------------------ load


def test_load_hand_made():
    counts_N = np.array([1, 1, 0, 6])
    assert max_violation(counts_N) == pytest.approx(6 / 2 - 1)
    assert dead_experts(counts_N) == (1, 0.25)
    p = np.array([1, 1, 6]) / 8
    assert load_entropy(counts_N) == pytest.approx(float(-(p * np.log(p)).sum()))
    assert load_entropy(np.array([0, 5, 0])) == 0.0
    assert load_entropy(np.array([3])) == 0.0 and load_entropy(np.array([3]), normalized=True) == 1.0
    assert math.isnan(max_violation(np.zeros(4))) and math.isnan(load_entropy(np.zeros(4)))
    assert max_violation(np.array([0, 0, 0, 8])) == pytest.approx(3.0)  # N - 1 when one expert takes all


def test_uniform_load_exact_and_sampled():
    N = 64
    # Exactly uniform: every expert chosen T/N times -> H = log N and MaxVio = 0 exactly.
    stats = load_stats(expert_counts(np.arange(N * 10) % N, N))
    assert stats.entropy_nats == pytest.approx(math.log(N), abs=1e-12)
    assert stats.entropy_normalized == pytest.approx(1.0, abs=1e-12)
    assert stats.max_violation == pytest.approx(0.0, abs=1e-12) and stats.dead_count == 0
    # Sampled uniformly: 2T (log N - H_plugin) ~ chi2(N - 1) (the G statistic), so the deficit has mean
    # (N-1)/(2T) and sd sqrt(2(N-1))/(2T); allow mean + 6 sd. MaxVio = (max count - mean)/mean with count sd
    # sqrt(T/N): a 5-sd bound (union over N experts: P(fail) < N * 3e-7).
    T = 100_000
    ids_T = np.random.default_rng(0).integers(0, N, T)
    stats = load_stats(expert_counts(ids_T, N))
    deficit = math.log(N) - stats.entropy_nats
    assert 0 <= deficit < ((N - 1) + 6 * math.sqrt(2 * (N - 1))) / (2 * T)
    assert stats.max_violation < 5 / math.sqrt(T / N)
    assert stats.num_selections == T


def test_load_accumulator_equals_one_shot():
    ids_TK = np.random.default_rng(1).integers(0, 50, (301, 4))
    acc = ExpertLoadAccumulator(50)
    for part in np.array_split(ids_TK, 5):
        acc.update(torch.from_numpy(part))  # torch input is accepted too
    one = load_stats(expert_counts(ids_TK, 50))
    got = acc.result()
    np.testing.assert_array_equal(got.counts_N, one.counts_N)
    assert (got.max_violation, got.entropy_nats, got.dead_count) == (one.max_violation, one.entropy_nats,
                                                                    one.dead_count)


# ------------------------------------------------------------------------------------------- specialisation


def test_planted_label_mi_equals_label_entropy_exactly():
    rng = np.random.default_rng(2)
    labels_T = rng.choice(5, size=3000, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    # Top-2 router: column 0 = the label's expert, column 1 noise; top-1 MI is exactly H(label) (plug-in).
    ids_TK = np.stack([labels_T + 3, rng.integers(0, 8, 3000)], 1)
    mi = specialisation(ids_TK, labels_T)
    assert mi.nats == pytest.approx(_entropy(labels_T), abs=1e-12)
    assert mi.entropy_y == pytest.approx(_entropy(labels_T), abs=1e-12)
    # Gates decide the top-1 when given: put the larger gate on the noise column and the MI drops.
    gates_TK = np.tile([0.3, 0.7], (3000, 1))
    assert specialisation(ids_TK, labels_T, gates_TK).nats < 0.05
    np.testing.assert_array_equal(top1(ids_TK, gates_TK), ids_TK[:, 1])


def test_random_router_mi_matches_plugin_bias():
    # Independent expert and label: E[plug-in MI] ~ (Kx-1)(Ky-1)/(2S) (2 S MI ~ chi2 with that many dof).
    # Averaging R repetitions, 2 S mean(MI) should be within 5 standard errors sqrt(2 dof / R) of dof.
    N, V, S, R = 16, 8, 2000, 40
    rng = np.random.default_rng(3)
    dof = (N - 1) * (V - 1)
    mis = []
    for _ in range(R):
        mi = specialisation(rng.integers(0, N, S), rng.integers(0, V, S))
        assert mi.bias_nats == pytest.approx(plugin_mi_bias(mi.support_x, mi.support_y, S))
        assert mi.corrected_nats == pytest.approx(mi.nats - mi.bias_nats)
        mis.append(mi.nats)
    assert abs(2 * S * np.mean(mis) - dof) < 5 * math.sqrt(2 * dof / R)
    assert plugin_mi_bias(N, V, S) == dof / (2 * S)
    # A single large sample: MI ~ 0 within bias + 6 sd of chi2/(2S).
    S = 50_000
    mi = specialisation(rng.integers(0, N, S), rng.integers(0, V, S))
    assert mi.nats < (dof + 6 * math.sqrt(2 * dof)) / (2 * S)


def test_position_and_token_identity_specialisation():
    T = 512
    positions_T = np.arange(T) % 128
    lin = bucket_positions(positions_T, 4)
    np.testing.assert_array_equal(lin, positions_T // 32)
    np.testing.assert_array_equal(bucket_positions(np.array([0, 1, 2, 3, 6, 7, 1000]), 4, scheme="log2"),
                                  [0, 1, 1, 2, 2, 3, 3])
    assert specialisation(lin, lin).nats == pytest.approx(math.log(4), abs=1e-12)  # expert = position bucket
    token_ids_T = np.random.default_rng(4).integers(0, 30, T)
    mi = specialisation(token_ids_T % 7, token_ids_T)  # routing a function of the token: MI = H(expert)
    assert mi.nats == pytest.approx(_entropy(token_ids_T % 7), abs=1e-12)


def test_pairs_mode_and_label_matrix():
    ids_TK = np.array([[0, 1], [1, 2], [0, 2]])
    labels_T = np.array([0, 1, 1])
    counts_NV = expert_label_counts(ids_TK, labels_T, num_experts=3, num_labels=2)
    np.testing.assert_array_equal(counts_NV, [[1, 1], [1, 1], [0, 2]])
    acc = JointCountAccumulator(3, 2)
    acc.update(ids_TK.ravel(), np.repeat(labels_T, 2))
    np.testing.assert_array_equal(acc.count_matrix(), counts_NV)
    x_S, y_S, w_S = routing_pairs(ids_TK, labels_T, mode="pairs")
    assert w_S.sum() == pytest.approx(3.0)  # each token weighs 1 in pairs mode
    mi = specialisation(ids_TK, labels_T, mode="pairs")
    assert mi.num_samples == pytest.approx(3.0)
    assert mi.nats == pytest.approx(mutual_information(x_S, y_S, w_S).nats)


def test_joint_accumulator_streaming_equals_one_shot():
    rng = np.random.default_rng(5)
    x_S, y_S = rng.integers(0, 40, 999), rng.integers(0, 9, 999)
    y_S = np.where(rng.random(999) < 0.5, x_S % 9, y_S)
    acc = JointCountAccumulator(40, 9)
    for xs, ys in zip(np.array_split(x_S, 4), np.array_split(y_S, 4)):
        acc.update(xs, ys)
    assert acc.result() == mutual_information(x_S, y_S)


# ---------------------------------------------------------------------------------------------- dependence


def test_routing_dependence_identical_and_independent():
    rng = np.random.default_rng(6)
    a_TK = rng.integers(0, 32, (4000, 2))
    same = routing_dependence(a_TK, a_TK.copy())
    assert same.nats == pytest.approx(_entropy(a_TK[:, 0]), abs=1e-12)
    permuted = routing_dependence(a_TK, (a_TK * 5 + 1) % 32)  # a relabelling is still fully dependent
    assert permuted.nats == pytest.approx(same.nats, abs=1e-12)
    indep = routing_dependence(a_TK, rng.integers(0, 32, (4000, 3)))
    assert indep.nats < (31 * 31 + 6 * math.sqrt(2 * 31 * 31)) / (2 * 4000)
    pairs = routing_dependence(a_TK, a_TK.copy(), mode="pairs")
    assert 0 < pairs.nats < same.nats + 1e-12  # each pair mixes the two selections, so less than top-1


# ------------------------------------------------------------------------------------------- path diversity


def test_path_diversity_identical_routing():
    N, L, T = 8, 3, 40
    ids_T = np.arange(T) % N
    pd = path_diversity([ids_T] * L, [N] * L)
    # Every token's path is (e, e, e): N distinct paths whatever L.
    assert (pd.distinct, pd.num_tokens, pd.window) == (N, T, L)
    assert pd.per_token == N / T and pd.of_max == N / min(T, N**L) and pd.max_paths == N**L


def test_path_diversity_exhaustive_and_set_mode():
    N = 4
    a_T, b_T = np.repeat(np.arange(N), N), np.tile(np.arange(N), N)  # all N^2 pairs once
    pd = path_diversity([a_T, b_T], [N, N])
    assert pd.distinct == N * N and pd.of_max == 1.0 and pd.per_token == 1.0
    # Set mode ignores the order inside a layer's top-k.
    ids_TK = np.array([[0, 1], [1, 0], [2, 3]])
    assert path_diversity([ids_TK], [4], mode="set").distinct == 2
    assert path_diversity([ids_TK], [4], mode="set").max_paths == math.comb(4, 2)
    assert path_diversity([ids_TK], [4], mode="top1").distinct == 3
    curve = path_diversity_curve([a_T, b_T, a_T], [N] * 3, window=2)
    assert [c.distinct for c in curve] == [N * N, N * N]
    assert path_diversity_curve([a_T, b_T, a_T], [N] * 3, window=1)[0].distinct == N


def test_path_accumulator_equals_one_shot():
    rng = np.random.default_rng(7)
    layers = [rng.integers(0, 5, (200, 2)) for _ in range(3)]
    acc = PathDiversityAccumulator([5, 5, 5], mode="set")
    for s in range(0, 200, 64):
        acc.update([ids[s:s + 64] for ids in layers])
    assert acc.result() == path_diversity(layers, [5, 5, 5], mode="set")


# ----------------------------------------------------------------------------------- heads, effective experts


def test_head_overlap():
    h_Tk = np.random.default_rng(8).integers(0, 100, (50, 4))
    assert head_overlap(np.concatenate([h_Tk, h_Tk], 1), num_heads=2) == pytest.approx(1.0)
    disjoint = np.concatenate([np.arange(50 * 4).reshape(50, 4), 1000 + np.arange(50 * 4).reshape(50, 4)], 1)
    assert head_overlap(disjoint, num_heads=2) == 0.0
    # {1, 2} vs {2, 3}: 1/3; {1, 2} vs {1, 2}: 1; {2, 3} vs {1, 2}: 1/3 -> mean 5/9. Duplicates count once.
    assert head_overlap(np.array([[1, 2, 2, 3, 1, 2]]), num_heads=3) == pytest.approx(5 / 9)
    assert head_overlap(np.array([[1, 1, 1, 2]]), num_heads=2) == pytest.approx(1 / 2)
    acc = HeadOverlapAccumulator(3)
    ids_TK = np.random.default_rng(9).integers(0, 6, (90, 6))
    for part in np.array_split(ids_TK, 3):
        acc.update(part)
    assert acc.result() == pytest.approx(head_overlap(ids_TK, 3), abs=1e-14)


def test_effective_experts():
    K = 6
    uniform = np.full((3, K), 0.2)
    one_hot = np.eye(K)[:3] * 0.9
    for kind in ("entropy", "inverse_simpson"):
        np.testing.assert_allclose(effective_experts(uniform, kind), K)
        np.testing.assert_allclose(effective_experts(one_hot, kind), 1.0)
    # Between 1 and K, and inverse Simpson <= exp(entropy) (Hill numbers decrease with order).
    g = np.array([[0.5, 0.25, 0.25]])
    assert effective_experts(g)[0] == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25))))
    assert effective_experts(g, "inverse_simpson")[0] == pytest.approx(1 / 0.375)
    assert math.isnan(effective_experts(np.zeros((1, 3)))[0])
    assert effective_experts(torch.full((2, 4), 0.25, dtype=torch.float16))[1] == pytest.approx(4.0)


# ----------------------------------------------------------------------------------------------------- CKA


def _gram_cka(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    """Reference CKA from explicit T x T Gram matrices (Kornblith 2019; Song 2012 eq. 5 for debiased)."""
    def hsic(k, l):
        n = k.shape[0]
        if not debiased:
            h = np.eye(n) - 1.0 / n
            return np.trace(k @ h @ l @ h)
        k, l = k.copy(), l.copy()
        np.fill_diagonal(k, 0)
        np.fill_diagonal(l, 0)
        o = np.ones(n)
        return (np.trace(k @ l) + (o @ k @ o) * (o @ l @ o) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (o @ k @ l @ o)) / (n * (n - 3))
    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_identities_and_reference(debiased):
    rng = np.random.default_rng(10)
    x_TD = rng.normal(size=(40, 6)) + 3.0
    y_TE = x_TD[:, :3] @ rng.normal(size=(3, 5)) + 0.5 * rng.normal(size=(40, 5))
    assert linear_cka(x_TD, x_TD, debiased) == pytest.approx(1.0, abs=1e-12)
    q_DD = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    assert linear_cka(x_TD, 2.5 * x_TD @ q_DD + 7.0, debiased) == pytest.approx(1.0, abs=1e-10)
    ref = _gram_cka(x_TD - x_TD.mean(0), y_TE - y_TE.mean(0), debiased)
    assert linear_cka(x_TD, y_TE, debiased) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(x_TD @ q_DD * 0.1, y_TE, debiased) == pytest.approx(ref, abs=1e-10)
    acc = LinearCKAAccumulator(debiased)
    for xs, ys in zip(np.array_split(x_TD, 3), np.array_split(y_TE, 3)):
        acc.update(xs, ys)
    assert acc.result() == pytest.approx(ref, abs=1e-10)


def test_cka_independent_small_and_matrix():
    rng = np.random.default_rng(11)
    T, D = 4000, 8
    x_TD, y_TD = rng.normal(size=(T, D)), rng.normal(size=(T, D))
    # Biased CKA of independent Gaussians ~ D/T-ish (here ~0.002); the debiased one is centred on 0.
    assert linear_cka(x_TD, y_TD) < 0.02
    assert abs(linear_cka(x_TD, y_TD, debiased=True)) < 0.005
    m = cka_matrix([x_TD, y_TD], [y_TD, x_TD, x_TD[:, :4]])
    assert m.shape == (2, 3)
    np.testing.assert_allclose([m[0, 1], m[1, 0]], 1.0)
    assert m[0, 0] < 0.02 and 0.5 < m[0, 2] < 1.0


# ------------------------------------------------------------------------------------------------- errors


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"spans \[0, 9\].*num_experts=8"):
        expert_counts(np.array([0, 9]), 8)
    with pytest.raises(ValueError, match="3 entries for 4 tokens"):
        specialisation(np.zeros((4, 2), dtype=int), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="integer expert ids"):
        expert_counts(np.zeros((4, 2)), 8)
    with pytest.raises(ValueError, match="mode='best'"):
        routing_dependence(np.zeros(4, dtype=int), np.zeros(4, dtype=int), mode="best")
    with pytest.raises(ValueError, match="has 3 tokens, expected 4"):
        routing_dependence(np.zeros(4, dtype=int), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="num_heads=4 with K=6"):
        head_overlap(np.zeros((2, 6), dtype=int), 4)
    with pytest.raises(ValueError, match="negative"):
        effective_experts(np.array([[0.5, -0.1]]))
    with pytest.raises(ValueError, match="40 rows and y_TE 39"):
        linear_cka(np.ones((40, 2)), np.ones((39, 2)))
    with pytest.raises(ValueError, match="constant"):
        linear_cka(np.ones((10, 2)), np.random.default_rng(0).normal(size=(10, 2)))
    with pytest.raises(ValueError, match="needs at least 4"):
        linear_cka(np.eye(3), np.eye(3), debiased=True)
    with pytest.raises(ValueError, match="window=4 with 3 layers"):
        path_diversity_curve([np.zeros(2, dtype=int)] * 3, [2] * 3, window=4)
    with pytest.raises(ValueError, match=r"labels span \[0, 5\].*num_labels=3"):
        expert_label_counts(np.zeros(2, dtype=int), np.array([0, 5]), 4, 3)
    with pytest.raises(ValueError, match="num_experts \\* num_labels"):
        expert_label_counts(np.zeros(2, dtype=int), np.zeros(2, dtype=int), 2**20, 2**10)
    with pytest.raises(ValueError, match="outside"):
        JointCountAccumulator(3, 3).update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match="negative"):
        load_stats(np.array([1, -1]))
