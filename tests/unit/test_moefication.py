"""MoEfication's statistics (analysis/moefication.py) on known answers: a dense FFN built from E disjoint neuron
blocks (each token type drives one block) is recovered exactly by the co-activation clustering, whatever the
neuron order; with k = 1 the oracle cluster carries (up to the input noise) the whole output of every token
while a random cluster carries it for ~1/E of them; balanced sizes, the share formula, the bootstrap interval,
the layout-independent random draw and the option checks.

Legend: T tokens, H hidden, F neurons, E clusters (blocks), C calibration tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_moe_ext.analysis.moefication import (
    balanced_kmeans,
    bootstrap_mean_ci,
    check_options,
    cluster_parts,
    coactivation_features,
    output_share,
    random_clusters,
    report_section,
    top_clusters,
)

T, H, F, E = 800, 16, 64, 4


@pytest.fixture(scope="module")
def block_ffn():
    """A ReLU FFN whose neurons form E blocks: token type e has input direction u_e; block e's neurons read u_e
    (and nothing else strongly), so only block e fires on type-e tokens; block e writes to hidden dims
    [4e, 4e + 4). Neurons are shuffled so the blocks are not contiguous."""
    rng = np.random.default_rng(0)
    u_EH = np.linalg.qr(rng.normal(size=(H, H)))[0][:E]
    type_T = rng.integers(0, E, T)
    x_TH = u_EH[type_T] * (1 + rng.random((T, 1))) + 0.05 * rng.normal(size=(T, H))
    block_F = np.repeat(np.arange(E), F // E)
    w1_FH = u_EH[block_F] * (0.5 + rng.random((F, 1))) - 0.3 * np.abs(rng.normal(size=(F, 1))) * u_EH.sum(0)
    w2_HF = np.zeros((H, F))
    for f in range(F):
        w2_HF[4 * block_F[f]:4 * block_F[f] + 4, f] = rng.normal(size=4)
    perm = rng.permutation(F)
    w1_FH, w2_HF, block_F = w1_FH[perm], w2_HF[:, perm], block_F[perm]
    a_TF = np.maximum(x_TH @ w1_FH.T, 0)
    return {"a": a_TF, "w2": w2_HF, "block": block_F, "type": type_T}


def _same_partition(a_F: np.ndarray, b_F: np.ndarray) -> bool:
    pairs = set(zip(a_F.tolist(), b_F.tolist()))
    return len(pairs) == len(set(a_F.tolist())) == len(set(b_F.tolist()))


def test_disjoint_blocks_are_recovered(block_ffn):
    labels = balanced_kmeans(coactivation_features(block_ffn["a"][:400]), E, seed=0)
    assert _same_partition(labels, block_ffn["block"])
    assert np.bincount(labels).tolist() == [F // E] * E
    # A random partition is not the block one (the check can fail).
    assert not _same_partition(np.random.default_rng(1).permutation(block_ffn["block"]), block_ffn["block"])


def test_oracle_cluster_carries_the_output_random_does_not(block_ffn):
    labels = balanced_kmeans(coactivation_features(block_ffn["a"][:400]), E, seed=0)
    a = torch.from_numpy(block_ffn["a"][400:])
    parts = cluster_parts(a, torch.from_numpy(block_ffn["w2"]), labels, E)
    y = parts.sum(0)
    torch.testing.assert_close(y, a.double() @ torch.from_numpy(block_ffn["w2"]).T)  # parts add up to the FFN
    keep = top_clusters(parts, 1)
    share = output_share(y, (parts * keep.T.unsqueeze(-1)).sum(0))
    # the other blocks fire only on the input noise: the oracle cluster carries (almost) everything
    assert float(share.min()) > 0.95 and float(share.mean()) > 0.995
    keys = np.arange(400, T)
    keep_r = torch.from_numpy(random_clusters(keys, layer=1, seed=0, num_clusters=E, k=1))
    share_r = output_share(y, (parts * keep_r.T.unsqueeze(-1)).sum(0)).numpy()
    assert abs(float(np.mean(share_r > 0.5)) - 1 / E) < 0.08
    assert float(output_share(y, (parts * torch.ones_like(keep).T.unsqueeze(-1)).sum(0)).min()) > 1 - 1e-9


def test_small_pieces():
    y = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    s = output_share(y, torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    assert s[0].item() == pytest.approx(1 - 16 / 25) and torch.isnan(s[1])
    assert np.bincount(balanced_kmeans(np.random.default_rng(0).normal(size=(10, 3)), 3)).tolist() == [4, 3, 3]
    mean, lo, hi = bootstrap_mean_ci(np.array([1.0, 2.0, 3.0, 4.0, np.nan]))
    assert mean == 2.5 and 1.0 <= lo < mean < hi <= 4.0
    assert bootstrap_mean_ci(np.full(7, 0.25)) == (0.25, 0.25, 0.25)
    keys = np.arange(100)
    r = random_clusters(keys, 2, 0, 8, 3)
    assert r.sum(1).tolist() == [3] * 100
    np.testing.assert_array_equal(random_clusters(keys[::-1], 2, 0, 8, 3), r[::-1])  # per token, not per order
    assert not np.array_equal(random_clusters(keys, 3, 0, 8, 3), r)
    with pytest.raises(ValueError, match="fix: k <= E"):
        check_options({"moefication_clusters": 2, "moefication_topk": 3})
    with pytest.raises(ValueError, match="--moefication-clusters 0"):
        check_options({"moefication_clusters": 0})
    with pytest.raises(ValueError, match="1 <= clusters <= points"):
        balanced_kmeans(np.zeros((3, 2)), 4)


def test_report_section_prints_the_numbers():
    stat = {"mean": 0.5, "ci95": [0.4, 0.6], "tokens": 10, "windows": 2}
    result = {"clusters": 8, "topk": 2, "calibration": "c", "selection": "s", "clean_loss": stat,
              "dense": {"calibration_tokens": 5, "layers": {"1": {"share_topk": stat, "share_random": stat,
                                                                  "cluster_sizes": [4, 4]}},
                        "loss_topk_clusters": stat, "loss_random_clusters": stat, "loss_increase_topk": stat,
                        "loss_increase_random": stat},
              "moe": {"not_applicable": "no MoE layers"}}
    md = report_section(result, "/nonexistent")
    assert "| 1 | 0.5 [0.4, 0.6] | 0.5 [0.4, 0.6] | 4, 4 |" in md and "not applicable (no MoE layers)" in md
